"""The Milvus index backend against a real Milvus server (``milvus-lite server`` on loopback):
the same answers as the embedded index, the default copy-detection configuration through it,
and two ``simserve serve`` replicas sharing it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import kill_9_mid_add
from simserve.bench.common import start_milvus_lite, start_server
from simserve.client import Client, Key
from simserve.index.backends import open_collections
from simserve.index.collection import Collections
from simserve.index.milvus import CHUNK, KEYPOINT_BYTES, MilvusCollections, MilvusUnavailable, milvus_name, simserve_name
from simserve.index.store import NewItem
from simserve.ranking import verify
from simserve.serve.app import ServerConfig, start

EX = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def milvus(tmp_path_factory):
    proc, uri = start_milvus_lite(tmp_path_factory.mktemp("milvus"))
    yield uri
    proc.kill()
    proc.wait(30)


def _items(n: int, dim: int, seed: int = 0) -> list[NewItem]:
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return [
        NewItem(
            f"item-{i}", vecs[i], {"g": str(i % 3), "i": i}, f"h{i}",
            rng.standard_normal(16).astype(np.float16), rng.standard_normal((6, dim)).astype(np.float16),
            rng.integers(0, 256, (KEYPOINT_BYTES - 1000) if i == 0 else 64 + i, np.uint8).tobytes(),
        )
        for i in range(n)
    ]


def test_same_answers_and_evidence_as_the_embedded_index(milvus, tmp_path):
    dim, items = 32, _items(600, 32)
    made = {}
    for backend, cols in (("embedded", Collections(tmp_path)), ("milvus", MilvusCollections(milvus))):
        c = cols.create("parity.a-b_c", dim, "Flat", feature_shape=(4, 2, 2), crop_views=True, verify=True)
        c.add(items[:300])
        c.add(items[300:])
        made[backend] = (cols, c)
    emb, mil = made["embedded"][1], made["milvus"][1]
    queries = np.stack([it.vector for it in items[:20]]) + 0.05
    for where in (None, {"g": "1"}):
        a, b = emb.search(queries, 10, where, views=True, features=True), mil.search(queries, 10, where, views=True, features=True)
        for ra, rb in zip(a, b):
            assert [c.key for c in ra] == [c.key for c in rb]  # exact index: the same top 10, in order
            assert np.allclose([c.score for c in ra], [c.score for c in rb], atol=1e-5)
            assert all(np.array_equal(x.views, y.views) and np.array_equal(x.features, y.features) and x.metadata == y.metadata for x, y in zip(ra, rb))
    # Excluding an item (a stored query excludes itself) by each backend's own id for it.
    own = {name: c.get(["item-3"])["item-3"].id for name, (_, c) in made.items()}
    assert [h.key for h in mil.search(items[3].vector[None], 3, exclude_ids=[own["milvus"]])[0]] == [h.key for h in emb.search(items[3].vector[None], 3, exclude_ids=[own["embedded"]])[0]]
    ids = {k: it.id for k, it in mil.get(["item-0", "item-1"]).items()}
    kps = mil.keypoints(list(ids.values()))
    assert kps[ids["item-0"]] == items[0].keypoints and len(items[0].keypoints) > CHUNK  # split over fields, joined back
    assert mil.features([ids["item-1"]])[ids["item-1"]].shape == (4, 2, 2)
    got = mil.get(["item-5", "nope"])
    assert list(got) == ["item-5"] and np.allclose(got["item-5"].vector, items[5].vector) and got["item-5"].metadata == {"g": "2", "i": 5}
    assert mil.hashes(["item-7", "nope"]) == emb.hashes(["item-7", "nope"]) == {"item-7": "h7"}
    assert mil.remove(["item-8", "nope"]).keys() == emb.remove(["item-8", "nope"]).keys() == {"item-8"}
    mil.add([NewItem("item-9", -items[9].vector)])  # a key added again replaces its item
    assert mil.count() == emb.count() == 599 and np.allclose(mil.get(["item-9"])["item-9"].vector, -items[9].vector)
    # Another process (a new client) finds the collection and its settings in Milvus itself.
    again = MilvusCollections(milvus)
    assert "parity.a-b_c" in again.names() and again.census()["parity.a-b_c"] == (599, None)
    cfg = again.get("parity.a-b_c").config
    assert (cfg.crop_views, cfg.verify, cfg.feature_shape, cfg.dim) == (True, True, [4, 2, 2], 32)
    for cols, _ in made.values():
        cols.close()


def test_keypoint_capacity_and_names():
    # The largest blob verify.py can write fits the fields a collection reserves for it.
    assert verify._HEADER.itemsize + verify.MAX_SIFT * verify.SIFT_POINT.itemsize + verify.MAX_ORB * verify.ORB_POINT.itemsize <= KEYPOINT_BYTES
    for name in ("default", "a.b-c_d", "X9", "under_score"):
        assert simserve_name(milvus_name(name)) == name and milvus_name(name).replace("_", "").isalnum()
    assert simserve_name("someone_elses") is None


def test_approximate_indexes_reach_comparable_recall(milvus, tmp_path):
    dim, n = 32, 3000
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    items = [NewItem(f"k{i}", v) for i, v in enumerate(vecs)]
    q = vecs[:50] + 0.1 * rng.standard_normal((50, dim)).astype(np.float32)
    truth = np.argsort(-(q @ vecs.T), axis=1)[:, :10]
    mcols, ecols = MilvusCollections(milvus), Collections(tmp_path)
    for factory in ("HNSW16", "IVF16,Flat"):
        recall = {}
        for name, cols in (("milvus", mcols), ("embedded", ecols)):
            c = cols.create(f"approx-{factory.replace(',', '.')}", dim, factory)
            c.add(items)
            if hasattr(c, "wait_background"):
                c.wait_background()  # the embedded IVF trains in the background once it has enough
                c.wait_indexed()
            found = c.search(q, 10)
            recall[name] = np.mean([len({int(h.key[1:]) for h in row} & set(t)) / 10 for row, t in zip(found, truth)])
        assert recall["milvus"] >= 0.8 and abs(recall["milvus"] - recall["embedded"]) < 0.15, (factory, recall)
        assert c.stats()["index_type"] != "milvus:FLAT" or factory == "Flat"
    with pytest.raises(ValueError, match="milvus backend maps"):
        mcols.create("pca", dim, "PCA16,Flat")
    mcols.close()
    ecols.close()


def test_filter_values_are_compared_not_parsed(milvus):
    cols = MilvusCollections(milvus)
    c = cols.create("filters", 4)
    tricky = ['a"b', "back\\slash", "ünï ✓", '" or id > 0 or "', "x'y", "", "line\nbreak\ttab", "\\\""]
    c.add([NewItem(f"t{i}", np.eye(4, dtype=np.float32)[i % 4], {"v": v}) for i, v in enumerate(tricky)] + [NewItem("plain", np.ones(4, np.float32), {"v": "other"})])
    for i, v in enumerate(tricky):
        assert [h.key for h in c.search(np.ones((1, 4), np.float32), 10, {"v": v})[0]] == [f"t{i}"], v
    with pytest.raises(ValueError, match="filter field"):
        c.search(np.ones((1, 4), np.float32), 3, {'v"] == 1 or metadata["v': "x"})
    cols.close()


def test_unreachable_milvus_is_one_clear_error():
    with pytest.raises(MilvusUnavailable, match="127.0.0.1:1"):
        open_collections("milvus", milvus_uri="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="--milvus-uri"):
        open_collections("milvus")


def test_default_configuration_served_from_milvus(milvus, tmp_path):
    """The shipped model, crop views and verification, with Milvus holding items and evidence."""
    srv = start(ServerConfig(port=0, data_dir=str(tmp_path), index_backend="milvus", milvus_uri=milvus, collection="served", metrics_port=0))
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
            assert c.add([(p.name, p, {"file": p.name}) for p in (EX / "seagull.png", EX / "bee.png")]) == 2
            st = c.stats("served")
            assert st.items == 2 and st.crop_views and st.verify and st.index_type == "milvus:FLAT"
            hits = c.search(EX / "seagull-copy.jpg", k=2, collection="served")
            assert hits[0]["key"] == "seagull.png" and hits[0]["inliers"] >= 10 and hits[0]["score"] > 0.9
            assert hits[1]["score"] < 0.5  # the bee: not a copy
            assert [h["key"] for h in c.search(Key("seagull.png"), k=1, collection="served")] == ["bee.png"]  # a stored query excludes itself
            assert c.search(EX / "bee.png", k=2, collection="served", where={"file": "bee.png"})[0]["key"] == "bee.png"
            assert "served" in c.collections()
            assert c.remove(["bee.png"], collection="served").removed == 1 and c.stats("served").items == 1
    finally:
        srv.stop(2)


@pytest.mark.slow
def test_two_replicas_share_one_index_and_kill_9_loses_no_acknowledged_add(milvus, tiny_bundle, tmp_path, stamp_folder):
    files = sorted(p for p in stamp_folder.rglob("*.png") if p.name != "broken.png")
    args = ["--index-backend", "milvus", "--milvus-uri", milvus, "--collection", "shared", "--no-crop-views", "--no-verify"]
    (a, addr_a, _), (b, addr_b, _) = (start_server(str(tmp_path / n), str(tiny_bundle), args) for n in ("a", "b"))
    try:
        with Client(addr_a, timeout=30) as ca, Client(addr_b, timeout=30) as cb:
            ca.add([("first", files[0], {"by": "a"})])
            assert cb.search(files[0], k=1)[0]["key"] == "first"  # added through one, found through the other
            assert cb.get(["first"]).items[0].key == "first"

        acked, _ = kill_9_mid_add(a, addr_a, files, per=4, after=100)
        assert len(acked) >= 100
        with Client(addr_b, timeout=30) as cb:
            assert not list(cb.get(acked).not_found), "an acknowledged add was lost"
            n = len(acked) // 4 - 1  # the last acknowledged request is searchable through the survivor
            assert acked[-1] in [h["key"] for h in cb.search(files[(len(acked) - 1) % len(files)], k=4, where={"batch": str(n)})]
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.terminate()
                p.wait(30)


def test_index_build_into_an_embedded_milvus_lite_file(tiny_bundle, tmp_path, stamp_folder):
    """The CLI's bulk load, into Milvus Lite's embedded form (a file, no server): the same code path."""
    import json
    import subprocess
    import sys

    db = tmp_path / "index.db"
    milvus = ["--index-backend", "milvus", "--milvus-uri", str(db), "--collection", "stamps"]
    build = subprocess.run(
        [sys.executable, "-m", "simserve.cli", "index", "build", str(stamp_folder), *milvus, "--bundle", str(tiny_bundle), "--no-crop-views", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    report = json.loads(build.stdout)
    assert report["added"] >= 10 and report["index_type"] == "milvus:FLAT" and report["verify"]
    stats = subprocess.run([sys.executable, "-m", "simserve.cli", "index", "stats", *milvus], capture_output=True, text=True, timeout=120)
    assert json.loads(stats.stdout)[0]["items"] == report["added"]
