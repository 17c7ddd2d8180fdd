"""Crop views: what a crop-views collection stores, whichever way items arrive."""

from __future__ import annotations

import io

import numpy as np
import pytest

from simserve.collection import Collections
from simserve.decode import decode
from simserve.decode_pool import pixels
from simserve.engine import load_engine
from simserve.indexer import index_folder
from simserve.preprocess import to_pixels
from simserve.runtime import Runtime
from simserve.views import N_VIEWS, WHOLE_WEIGHT, crop_view_pixels, pool_views


@pytest.fixture(scope="module")
def photo_jpeg(photos) -> bytes:
    buf = io.BytesIO()
    photos["chelsea"].save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_views_are_the_whole_image_and_five_crops_of_three_quarters_of_each_side(photo_jpeg):
    v = crop_view_pixels(photo_jpeg, 48, 3)
    assert v.shape == (N_VIEWS, 3, 48, 48) and v.dtype == np.uint8
    wide = to_pixels(decode(photo_jpeg, min_side=64), 64, 3)
    for view, (y, x) in zip(v[1:], [(0, 0), (0, 16), (16, 0), (16, 16), (8, 8)]):
        assert np.array_equal(view, wide[:, y : y + 48, x : x + 48])
    # the whole view is the ordinary model input, up to the decoder's scaling (a few grey levels)
    assert np.abs(v[0].astype(int) - pixels(photo_jpeg, 48, 3).astype(int)).mean() < 4
    assert len({view.tobytes() for view in v}) == N_VIEWS


def test_pooled_vector_is_the_normalised_weighted_mean_of_the_views():
    e = np.random.default_rng(0).normal(size=(3, N_VIEWS, 8)).astype(np.float32)
    p = pool_views(e)
    m = WHOLE_WEIGHT * e[:, 0] + e[:, 1:].sum(1)
    assert np.allclose(np.linalg.norm(p, axis=1), 1, atol=1e-6)
    assert np.allclose(p, m / np.linalg.norm(m, axis=1, keepdims=True), atol=1e-6)


def test_server_adds_and_folder_builds_store_the_same_pooled_vectors(tiny_bundle, stamp_folder, tmp_path):
    engine = load_engine(str(tiny_bundle))
    path = sorted(stamp_folder.rglob("*.png"))[0]
    data = path.read_bytes()
    views = crop_view_pixels(data, engine.config.input_size, engine.config.in_channels)
    feats, embs = engine.embed(views)
    expected = pool_views(embs[None])[0]
    plain_vector = engine.embed(pixels(data, engine.config.input_size, 3)[None])[1][0]
    assert np.abs(expected - plain_vector).max() > 1e-4  # so the checks below can tell the two apart

    rt = Runtime(engine, Collections(tmp_path / "rt"), default_collection="c", crop_views=True)
    rt.add("c", [("k", data, None)], timeout=30)
    item = rt.collection("c").get(["k"])["k"]
    assert np.allclose(item.vector, expected, atol=1e-5)
    fmap = rt.collection("c").features([item.id])[item.id]
    assert np.allclose(fmap, feats[0], atol=2e-2)  # whole-image features (stored as float16) for re-ranking
    assert rt.collection("c").stats()["crop_views"] is True
    rt.close()

    cols = Collections(tmp_path / "rt")  # reopened: the choice is part of the collection
    assert cols.get("c").config.crop_views is True
    cols.close()

    built = Collections(tmp_path / "ix").create("b", engine.bundle.embedding_dim, crop_views=True)
    report = index_folder(engine, built, stamp_folder, progress=False)
    assert report.added == len(list(stamp_folder.rglob("*.png"))) - 1  # all but the broken file
    key = path.relative_to(stamp_folder).as_posix()
    assert np.allclose(built.get([key])[key].vector, expected, atol=1e-5)
    # and a plain collection stores the plain embedding of the whole image
    plain = Collections(tmp_path / "plain").create("p", engine.bundle.embedding_dim)
    index_folder(engine, plain, stamp_folder, progress=False)
    assert np.allclose(plain.get([key])[key].vector, plain_vector, atol=1e-5)
