"""Crop views: what a crop-views collection stores, whichever way items arrive."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest

from simserve.index.collection import Collections
from simserve.inference.crops import N_VIEWS, WHOLE_WEIGHT, crop_view_pixels, pool_views
from simserve.inference.decode import decode
from simserve.inference.decode_pool import pixels
from simserve.inference.engine import load_engine
from simserve.inference.pixels import to_pixels
from simserve.jobs.index_folder import index_folder
from simserve.serve.config import ServerConfig
from simserve.serve.service import Service
from tests.conftest import old_store, stored_views


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

    rt = Service(engine, Collections(tmp_path / "rt"), ServerConfig(collection="c", crop_views=True))
    asyncio.run(rt.add("c", [("k", data, None)], timeout=30))
    item = rt.collection("c").get(["k"])["k"]
    assert np.allclose(item.vector, expected, atol=1e-5)
    fmap = rt.collection("c").features([item.id])[item.id]
    assert np.allclose(fmap, feats[0], atol=2e-2)  # whole-image features (stored as float16) for re-ranking
    assert np.allclose(stored_views(rt.collection("c").store, [item.id])[item.id], embs, atol=2e-3)  # and the six views
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
    stored = built.get([key])[key].id
    assert np.allclose(stored_views(built.store, [stored])[stored], embs, atol=2e-3)
    # and a plain collection stores the plain embedding of the whole image
    plain = Collections(tmp_path / "plain").create("p", engine.bundle.embedding_dim)
    index_folder(engine, plain, stamp_folder, progress=False)
    assert np.allclose(plain.get([key])[key].vector, plain_vector, atol=1e-5)


def test_a_crop_views_search_rescores_its_candidates_by_the_stored_views(stamp_folder, tmp_path):
    """The default model, real stamps: a search for a crop of a stored stamp finds it, and every
    hit's score is the mean of its pooled cosine and its best view's cosine, best first."""
    from PIL import Image

    from simserve.ranking.pipeline import Query, search
    from simserve.ranking.views import view_scores

    engine = load_engine()
    cfg = engine.config
    col = Collections(tmp_path / "v").create("v", engine.bundle.embedding_dim, crop_views=True)
    index_folder(engine, col, stamp_folder, progress=False)
    path = sorted(stamp_folder.rglob("*.png"))[3]
    img = Image.open(path).convert("RGB")
    w, h = img.size
    buf = io.BytesIO()
    img.crop((0, 0, int(w * 0.65), int(h * 0.65))).save(buf, "PNG")  # the top-left 42% of it
    q = engine.embed(pixels(buf.getvalue(), cfg.input_size, cfg.in_channels)[None])[1][0]

    hits = search(col, Query(q), 5)
    assert hits[0].key == path.relative_to(stamp_folder).as_posix()
    ids = [h.id for h in hits]
    views = stored_views(col.store, ids)
    assert all(views[i].shape == (N_VIEWS, engine.bundle.embedding_dim) for i in ids)
    pooled = np.array([col.store.get_ids([i])[i].vector @ q for i in ids], np.float32)
    expected = view_scores(q, pooled, np.stack([views[i] for i in ids]))
    assert np.allclose([h.cosine for h in hits], expected, atol=2e-3)  # views are stored as float16
    assert np.abs(expected - pooled).max() > 1e-3  # so the check above can tell re-scored from pooled
    assert [h.cosine for h in hits] == sorted((h.cosine for h in hits), reverse=True)

    plain = Collections(tmp_path / "p").create("p", engine.bundle.embedding_dim)
    index_folder(engine, plain, stamp_folder, progress=False)
    hit = search(plain, Query(q), 1)[0]
    assert stored_views(plain.store, [hit.id]) == {}  # plain collections store no views and score by cosine
    assert hit.cosine == pytest.approx(float(plain.store.get_ids([hit.id])[hit.id].vector @ q), abs=1e-5)


def test_a_store_from_before_view_embeddings_opens_and_keeps_its_items(tmp_path):
    from simserve.index.store import ItemStore, NewItem

    path = tmp_path / "items.sqlite"
    old_store(path)

    store = ItemStore(path, 4)
    [new_id], _ = store.add([NewItem("new", np.zeros(4), views=np.eye(4)[:3])])
    old_id = store.get(["old"])["old"].id
    got = stored_views(store, [old_id, new_id])
    assert list(got) == [new_id] and np.array_equal(got[new_id], np.eye(4)[:3])
    with pytest.raises(ValueError, match="view embeddings"):
        store.add([NewItem("bad", np.zeros(4), views=np.zeros((3, 5)))])
    store.close()
    assert stored_views(ItemStore(path, 4), [new_id])[new_id].shape == (3, 4)  # reopened: the column is there once
