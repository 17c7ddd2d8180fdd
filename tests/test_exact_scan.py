"""The exact scan that answers unfiltered searches of flat indexes: the same top k as brute force,
ids mapped through the id map, by the float scan and by the int8 codes' ranking (kept in step
with adds and removals), and the shipped graphs what ``graph()`` builds."""

import numpy as np
import pytest

from simserve.index import exact_scan
from simserve.index.vector_index import VectorIndex


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", sorted(exact_scan.GRAPHS))
def test_shipped_graph_is_the_built_one(kind):
    pytest.importorskip("onnx")
    assert exact_scan.GRAPHS[kind].read_bytes() == exact_scan.graph(kind)


@pytest.mark.parametrize("max_scores", [exact_scan.MAX_SCORES, 3000])  # one block, and many
@pytest.mark.parametrize("codes_from", [exact_scan.QUANTIZED_FROM, 0])  # the float scan; the codes' ranking first
def test_flat_search_matches_brute_force_through_the_id_map(monkeypatch, max_scores, codes_from):
    monkeypatch.setattr(exact_scan, "MAX_SCORES", max_scores)
    monkeypatch.setattr(exact_scan, "QUANTIZED_FROM", codes_from)
    x = _unit(2000, 32, 0)
    ids = np.arange(2000, dtype=np.int64) * 7 + 3  # the store's ids, not row numbers
    index = VectorIndex(32)
    index.add(ids, x)
    index.remove(ids[:500:2])  # FAISS compacts its rows: the scan must read the id map after that
    live = np.ones(2000, bool)
    live[:500:2] = False
    queries = _unit(25, 32, 1)
    assert exact_scan.flat_rows(index.index) is not None  # the scan is what answers here
    scores, got = index.search(queries, 10)
    truth = queries @ x[live].T
    want = ids[live][np.argsort(-truth, axis=1, kind="stable")[:, :10]]
    assert (got == want).all()
    np.testing.assert_allclose(scores, np.sort(truth, axis=1)[:, ::-1][:, :10], atol=1e-5)
    # A filtered search still goes through FAISS, and agrees on what it may return.
    allow = ids[live][::3]
    _, filtered = index.search(queries, 5, allow=allow)
    sub = queries @ x[np.isin(ids, allow)].T
    assert (filtered == ids[np.isin(ids, allow)][np.argsort(-sub, axis=1, kind="stable")[:, :5]]).all()


def test_asking_more_than_there_are_returns_them_all():
    x = _unit(4, 8, 2)
    index = VectorIndex(8)
    index.add(np.array([10, 11, 12, 13]), x)
    scores, got = index.search(x[:1], 100)
    assert sorted(got[0].tolist()) == [10, 11, 12, 13] and got[0][0] == 10
    assert scores.shape == (1, 4)


def test_codes_follow_adds_and_removals(monkeypatch):
    """The int8 codes grow with each add and are compacted with FAISS's rows on a removal: a search
    after either ranks the index's rows as they are now, not as they were when first encoded."""
    monkeypatch.setattr(exact_scan, "QUANTIZED_FROM", 0)
    x = _unit(3000, 32, 3)
    ids = np.arange(3000, dtype=np.int64) + 100
    index = VectorIndex(32)
    live = np.zeros(3000, bool)

    def check() -> None:
        queries = np.vstack([x[live][:5], _unit(5, 32, 4)])  # stored vectors find themselves first
        scores, got = index.search(queries, 10)
        truth = queries @ x[live].T
        assert (got == ids[live][np.argsort(-truth, axis=1, kind="stable")[:, :10]]).all()
        np.testing.assert_allclose(scores, np.sort(truth, axis=1)[:, ::-1][:, :10], atol=1e-5)  # exact, not the codes' scores

    for lo, hi in ((0, 1000), (1000, 1100), (1100, 3000)):  # searched between adds: codes made, then grown
        index.add(ids[lo:hi], x[lo:hi])
        live[lo:hi] = True
        check()
    gone = np.r_[0:200, 1500:1600, 2990:3000]
    index.remove(ids[gone])
    live[gone] = False
    check()
    assert index._codes.nbytes >= 2690 * 32  # compacted in place, not dropped
    index.add(ids[gone[:100]] + 10_000, x[gone[:100]])  # new ids for old vectors, appended after the compaction
    ids = ids.copy()
    ids[gone[:100]] += 10_000
    live[gone[:100]] = True
    check()
