"""The durable index: SQLite truth, FAISS derived, snapshots, every index type."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from simserve.index.collection import CollectionNotFound, Collections
from simserve.index.store import NewItem
from tests.conftest import store_with_inline_features

ROOT = Path(__file__).resolve().parents[1]
DIM = 16
FACTORIES = ["Flat", "HNSW16", "IVF8,Flat", "IVF8,PQ4"]


def vecs(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(x: np.ndarray, prefix: str = "k", meta=None) -> list[NewItem]:
    return [NewItem(f"{prefix}{i}", v, meta(i) if meta else {"i": i}) for i, v in enumerate(x)]


@pytest.mark.parametrize("factory", FACTORIES)
def test_every_index_type_searches_removes_and_round_trips_restart(tmp_path, factory):
    cols = Collections(tmp_path)
    c = cols.create("c", DIM, factory)
    x = vecs(1200)  # past IVF's training size: trained in the background
    for s in range(0, 1200, 300):
        c.add([NewItem(f"k{i}", x[i], {"i": i}) for i in range(s, s + 300)])
    c.wait_background()
    assert c.stats()["pending_training"] is False
    hits = c.search(x[:5], 3)
    exact = factory in ("Flat", "HNSW16", "IVF8,Flat")
    if exact:
        assert [h[0].key for h in hits] == [f"k{i}" for i in range(5)]
    assert c.remove(["k0", "k1", "nope"]) == {"k0": 1, "k1": 2}
    after = c.search(x[:2], 5)
    assert all(h.key not in ("k0", "k1") for row in after for h in row)
    cols.close()  # snapshots

    cols2 = Collections(tmp_path)
    c2 = cols2.get("c")
    assert c2.stats()["items"] == 1198 and c2.stats()["indexed"] == 1198
    again = c2.search(x[:5], 3)
    assert all(h.key not in ("k0", "k1") for row in again for h in row)
    if exact:
        assert [h[0].key for h in again[2:]] == ["k2", "k3", "k4"]
    cols2.close()


def test_a_collection_past_its_stand_in_trains_the_real_index_on_opening(tmp_path, monkeypatch):
    from simserve.index import collection

    cols = Collections(tmp_path)
    c = cols.create("c", DIM, "IVF8,Flat")
    c.add(items(vecs(900)))  # below the 1,000 IVF8 trains on: an exact stand-in
    assert (c.stats()["index_type"], c.stats()["pending_training"]) == ("IndexFlatIP", True)
    cols.close()
    monkeypatch.setattr(collection, "min_train_size", lambda factory: 800)  # as if cut off before training
    cols = Collections(tmp_path)
    c = cols.get("c")
    c.wait_background()
    assert (c.stats()["index_type"], c.stats()["pending_training"], c.stats()["indexed"]) == ("IndexIVFFlat", False, 900)
    cols.close()


def test_head_features_live_apart_and_an_old_store_hands_its_rows_over_once(tmp_path):
    import sqlite3

    from simserve.index.store import ItemStore

    path = tmp_path / "items.sqlite"
    x, feats = vecs(2500), np.random.default_rng(1).standard_normal((2500, 12)).astype(np.float16)
    store_with_inline_features(path, x, feats)

    store = ItemStore(path, DIM)  # 2,500 rows: three batches of the move
    got = store.candidates({1: 0.5, 1234: 0.4, 2500: 0.3}, features=True)
    assert all(np.array_equal(got[i].features, feats[i - 1]) for i in (1, 1234, 2500))
    ids, _ = store.add([NewItem("new", x[0], features=feats[0])])
    assert np.array_equal(store.features(ids)[ids[0]], feats[0])
    store.remove(["k0", "new"])
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM items WHERE features IS NOT NULL").fetchone()[0] == 0  # all moved
    assert db.execute("SELECT COUNT(*) FROM item_features").fetchone()[0] == 2499  # and removed ones went with their rows
    assert db.execute("SELECT v FROM meta WHERE k='features_apart'").fetchone() == ("1",)
    db.close()


def test_unknown_collection_and_bad_names(tmp_path):
    cols = Collections(tmp_path)
    with pytest.raises(CollectionNotFound):
        cols.get("missing")
    with pytest.raises(ValueError, match="collection name"):
        cols.create("../evil", DIM)
    with pytest.raises(ValueError, match="bad FAISS factory"):
        cols.create("x", DIM, "NotAnIndex")


def test_add_replaces_by_key_and_filter_returns_only_matches(tmp_path):
    c = Collections(tmp_path).create("c", DIM)
    x = vecs(100)
    c.add(items(x, meta=lambda i: {"colour": "red" if i % 3 == 0 else "blue", "i": i}))
    hits = c.search(x[:4], 10, where={"colour": "red"})
    for row in hits:
        assert row and all(h.metadata["colour"] == "red" for h in row)
    assert hits[0][0].key == "k0" and hits[3][0].key == "k3"
    assert c.search(x[:1], 5, where={"colour": "green"}) == [[]]
    c.add([NewItem("k5", x[50], {"colour": "new"})])  # same key, new vector
    assert c.stats()["items"] == 100
    assert c.search(x[50:51], 2)[0][0].key in ("k5", "k50")
    assert c.get(["k5"])["k5"].metadata == {"colour": "new"}


def test_corrupt_or_missing_snapshot_is_rebuilt_from_sqlite(tmp_path, caplog):
    cols = Collections(tmp_path)
    c = cols.create("c", DIM, "HNSW16")
    x = vecs(300)
    c.add(items(x))
    c.remove(["k7"])
    cols.close()
    snap = tmp_path / "collections" / "c" / "index.faiss"
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snap.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="simserve.index.collection"):
        c2 = Collections(tmp_path).get("c")
    assert "checksum" in caplog.text and "rebuilding" in caplog.text
    assert c2.stats()["indexed"] == 299
    assert c2.search(x[8:9], 1)[0][0].key == "k8"
    c2.close()
    snap.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="simserve.index.collection"):
        c3 = Collections(tmp_path).get("c")
    assert "rebuilding" in caplog.text and c3.stats()["indexed"] == 299


def test_snapshot_plus_replay_after_it(tmp_path):
    cols = Collections(tmp_path)
    c = cols.create("c", DIM)
    x = vecs(200)
    c.add(items(x[:100]))
    c.snapshot()
    c.add([NewItem(f"k{i}", x[i]) for i in range(100, 200)])
    c.remove(["k3"])
    c.store.close()  # no snapshot at close: as after a crash
    c2 = Collections(tmp_path).get("c")
    assert c2.stats()["indexed"] == 199
    assert c2.search(x[150:151], 1)[0][0].key == "k150"


def test_concurrent_add_search_remove_never_returns_a_removed_key(tmp_path):
    c = Collections(tmp_path).create("c", DIM, "HNSW16")
    x = vecs(2000)
    c.add(items(x[:500]))
    removed: set[str] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer():
        try:
            for s in range(500, 2000, 100):
                c.add([NewItem(f"k{i}", x[i]) for i in range(s, s + 100)])
                gone = [f"k{i}" for i in range(s - 500, s - 450)]
                c.remove(gone)
                removed.update(gone)  # after remove() returned
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    def reader(seed):
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                before = set(removed)
                for row in c.search(x[rng.integers(0, 2000, 8)], 10):
                    assert not any(h.key in before for h in row)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert c.stats()["items"] == 2000 - len(removed)


ADDER = """
import sys, numpy as np
from simserve.index.collection import Collections
from simserve.index.store import NewItem
c = Collections(sys.argv[1]).create("c", 16, "HNSW16")
rng = np.random.default_rng(0)
for b in range(100000):
    x = rng.standard_normal((50, 16)).astype(np.float32)
    c.add([NewItem(f"b{b}-{i}", v, {"batch": b}) for i, v in enumerate(x)])
    print(b, flush=True)  # acknowledged
"""


def test_acknowledged_adds_survive_kill_9(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", ADDER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    acked = -1
    deadline = time.time() + 60
    while acked < 30 and time.time() < deadline:
        line = proc.stdout.readline()
        if line:
            acked = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rest = proc.stdout.read().split()
    acked = int(rest[-1]) if rest else acked
    assert acked >= 30
    c = Collections(tmp_path).get("c")
    n = c.stats()["items"]
    assert n % 50 == 0, "a half-written batch is visible"
    assert n >= (acked + 1) * 50
    keys = [f"b{b}-{i}" for b in range(acked + 1) for i in range(50)]
    assert len(c.get(keys)) == len(keys)
    assert c.stats()["indexed"] == n
    probe = c.get(["b3-7"])["b3-7"].vector
    assert c.search(probe[None], 1)[0][0].key == "b3-7"


def test_fresh_buffer_matches_brute_force_through_kills_takes_and_growth():
    from simserve.index.tiered_index import FreshBuffer

    x = vecs(3000, seed=3)
    q = vecs(20, seed=4)
    buf = FreshBuffer(DIM)
    live = {}
    next_id = 0
    rng = np.random.default_rng(5)
    for step in range(30):  # appends, removals and front hand-offs interleaved, past several regrowths
        n = int(rng.integers(1, 200))
        ids = np.arange(next_id, next_id + n)
        buf.append(ids, x[ids % len(x)], base_seq=step)
        live.update({int(i): x[i % len(x)] for i in ids})
        next_id += n
        dead = rng.choice(next_id, 20, replace=False)
        buf.kill(dead)
        for i in dead:
            live.pop(int(i), None)
        if step % 3 == 2:
            taken, _, last = buf.take(int(rng.integers(1, 150)))
            assert all(int(i) in live for i in taken) and all(i <= last for i in taken)
            for i in [i for i in live if i <= last]:
                assert i in set(taken.tolist())
                del live[i]
        assert buf.live == len(live)
        allow = np.array(sorted(live)[::2], np.int64)
        for sel in (None, allow):
            pool = sorted(live) if sel is None else allow.tolist()
            scores, got = buf.search(q, 10, sel)
            for qi in range(len(q)):
                want = sorted(pool, key=lambda i: -float(live[i] @ q[qi]))[: min(10, len(pool))]
                assert got[qi][: len(want)].tolist() == want
                assert np.allclose(scores[qi][: len(want)], [live[i] @ q[qi] for i in want], atol=1e-5)
                assert (got[qi][len(want):] == -1).all()


def test_hnsw_snapshot_taken_mid_drain_replays_to_exactly_the_live_items(tmp_path, monkeypatch):
    """Buffered adds, a half-drained commit, removals on both sides of the line, then a restart."""
    from simserve.index.collection import Collection

    monkeypatch.setattr(Collection, "_kick_drainer", lambda self: None)  # drain by hand, deterministically
    cols = Collections(tmp_path)
    c = cols.create("c", DIM, "HNSW16")
    x = vecs(900)
    for s in range(0, 900, 300):
        c.add([NewItem(f"k{i}", x[i]) for i in range(s, s + 300)])
    assert c.stats()["buffered"] == 900 and c.stats()["indexed"] == 900
    assert [h[0].key for h in c.search(x[[5, 450, 899]], 1)] == ["k5", "k450", "k899"]  # searchable while buffered
    with c.lock.write():
        c.index.drain(450)  # all of the first commit, half of the second
    c.remove(["k10", "k600", "k700"])  # one in the graph, two still buffered
    c.add([NewItem("k20", x[20])])  # replace a key in the graph
    assert c.stats()["indexed"] == 897
    cols.close()  # snapshot of the graph, complete up to before the second commit

    monkeypatch.undo()
    c2 = Collections(tmp_path).get("c")
    assert c2.wait_indexed(60)
    st = c2.stats()
    assert st["items"] == st["indexed"] == 897 and st["buffered"] == 0
    for i, row in enumerate(c2.search(x, 3)):
        keys = [h.key for h in row]
        assert len(set(keys)) == len(keys)  # nothing indexed twice
        if f"k{i}" not in ("k10", "k600", "k700"):
            assert keys[0] == f"k{i}"
        assert not {"k10", "k600", "k700"} & set(keys)
    c2.close()


def test_hnsw_adds_past_the_buffer_limit_wait_and_all_get_indexed(tmp_path):
    from simserve.index.vector_index import IndexTuning

    cols = Collections(tmp_path, tuning=IndexTuning(buffer_limit=300, drain_batch=64))
    c = cols.create("c", DIM, "HNSW16")
    x = vecs(3000)
    for s in range(0, 3000, 200):
        c.add([NewItem(f"k{i}", x[i]) for i in range(s, s + 200)])
        assert c.stats()["buffered"] <= 300 + 200
    assert c.wait_indexed(60)
    assert c.stats()["indexed"] == 3000 and c.stats()["buffered"] == 0
    assert [h[0].key for h in c.search(x[::500], 1)] == [f"k{i}" for i in range(0, 3000, 500)]
    cols.close()


@pytest.mark.timeout(60)  # an unfair lock starves the waiters for good
def test_rwlock_serves_readers_and_writers_past_a_writer_that_keeps_coming_back():
    from simserve.index.rwlock import RWLock

    lock = RWLock()
    stop = threading.Event()

    def drainer():  # like the HNSW drainer: re-takes the write lock the moment it lets go
        while not stop.is_set():
            with lock.write():
                time.sleep(0.002)

    t = threading.Thread(target=drainer)
    t.start()
    time.sleep(0.02)
    waits = []
    try:
        for kind in ("read", "write") * 10:
            t0 = time.monotonic()
            with getattr(lock, kind)():
                waits.append(time.monotonic() - t0)
    finally:
        stop.set()
        t.join()
    assert max(waits) < 0.5, waits  # a turn each; an unfair lock leaves them waiting on the drainer
    readers_together = threading.Barrier(3, timeout=5)

    def reader():
        with lock.read():
            readers_together.wait()  # three readers hold the lock at once

    rs = [threading.Thread(target=reader) for _ in range(3)]
    for r in rs:
        r.start()
    for r in rs:
        r.join()


def test_searches_use_the_configured_threads_in_whatever_thread_they_run(tmp_path):
    """OpenMP's thread count is per thread: a setting made in the main thread does not reach
    gRPC handler threads, so the index applies it where the search runs (a filtered search goes
    through FAISS); an unfiltered flat search is the exact scan, whose session gets as many."""
    import faiss

    from simserve.index import exact_scan
    from simserve.index.vector_index import IndexTuning

    c = Collections(tmp_path, tuning=IndexTuning(search_threads=1)).create("c", DIM)
    c.add(items(vecs(50)))
    seen = []

    def handler():
        before = faiss.omp_get_max_threads()
        c.search(vecs(1, seed=9), 3, where={"i": 4})
        seen.append((before, faiss.omp_get_max_threads()))
        exact_scan._sessions.clear()
        c.search(vecs(1, seed=9), 3)
        seen.append(set(exact_scan._sessions))

    t = threading.Thread(target=handler)
    t.start()
    t.join()
    assert seen[0][1] == 1
    assert seen[1] == {("float", 1)}


def test_a_collection_makes_its_scan_codes_when_it_opens_not_at_its_first_search(tmp_path, monkeypatch):
    """A server opens its collection before it says SERVING: the first query must not be the one
    that encodes every row (87 ms at 100,000 items, ~10x at 1M)."""
    from simserve.index import exact_scan

    monkeypatch.setattr(exact_scan, "QUANTIZED_FROM", 0)
    cols = Collections(tmp_path)
    cols.create("c", DIM).add(items(vecs(300)))
    cols.close()
    encoded = []
    # (rows encoded before, rows asked for) at each call
    monkeypatch.setattr(exact_scan.Codes, "of", lambda self, v, of=exact_scan.Codes.of: encoded.append((len(self), len(v))) or of(self, v))
    c = Collections(tmp_path).get("c")
    assert encoded == [(0, 300)] and len(c.index.main._codes) == 300
    top = c.search(vecs(1, seed=3), 5)[0]
    assert encoded == [(0, 300), (300, 300)] and len(top) == 5  # the search found every row encoded
    c.close()
