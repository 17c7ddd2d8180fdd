"""The index backends side by side (``simserve bench index --parts backends``): the embedded
SQLite + FAISS collection and a collection in Milvus (a ``milvus-lite server`` process on
loopback, as a replica would reach a Milvus server), on the same real embeddings, in one run.

Per backend and index type: durable adds/s (an add is counted when the backend acknowledged it),
single-query search p50/p99 and recall@10 against exact search, and queries/s from two threads.
For Milvus also two replicas against one: searches/s from two processes, each its own client.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from simserve.bench.common import start_milvus_lite
from simserve.bench.index import _recall
from simserve.index.collection import Collections
from simserve.index.store import NewItem

ADD_BATCH = 256  # items per add: a client's bulk request


def _open(backend: str, root: Path, uri: str):
    if backend == "embedded":
        return Collections(root / "embedded")
    from simserve.index.milvus import MilvusCollections

    return MilvusCollections(uri)


def _wait_indexed(col, timeout: float = 1800) -> float:
    """Seconds until every acknowledged vector is in the index proper (HNSW graph, Milvus's sealed
    and indexed segments), so searches measure the index, not a brute-force tail."""
    t = time.perf_counter()
    if hasattr(col, "wait_background"):
        col.wait_background(timeout)
        col.wait_indexed(timeout)
        return time.perf_counter() - t
    client, table = col.owner.client, col.table
    client.flush(table)
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = client.describe_index(table, "vector")
        if info.get("pending_index_rows", 0) == 0 and info.get("indexed_rows", 0) >= info.get("total_rows", 0):
            break
        time.sleep(0.5)
    return time.perf_counter() - t


def _searches(col, queries: np.ndarray, k: int = 10) -> tuple[list[float], list[list[str]]]:
    times, keys = [], []
    for q in queries:
        t = time.perf_counter()
        row = col.search(q[None], k)[0]
        times.append((time.perf_counter() - t) * 1e3)
        keys.append([c.key for c in row])
    return times, keys


def _replica(uri: str, name: str, queries: np.ndarray, seconds: float, out) -> None:
    from simserve.index.milvus import MilvusCollections

    col = MilvusCollections(uri).get(name)
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        col.search(queries[n % len(queries)][None], 10)
        n += 1
    out.put(n)


def _replica_qps(uri: str, name: str, queries: np.ndarray, procs: int, seconds: float = 10.0) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=_replica, args=(uri, name, queries, seconds, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    total = sum(out.get(timeout=seconds + 120) for _ in workers)
    for w in workers:
        w.join()
    return total / seconds


def compare(base: np.ndarray, queries: np.ndarray, backends: tuple[str, ...] = ("embedded", "milvus"), factories: tuple[str, ...] = ("Flat", "HNSW32")) -> dict:
    import faiss

    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    truth, _ = exact.search(queries, 10)  # similarities: recall is tie-aware (real embeddings hold duplicates)
    keys = [f"v{i}" for i in range(len(base))]
    rows, replicas = [], []
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        root = Path(tmp)
        proc, uri = start_milvus_lite(root / "milvus") if "milvus" in backends else (None, "")
        try:
            for factory in factories:
                for backend in backends:
                    cols = _open(backend, root, uri)
                    name = f"bench-{factory.replace(',', '.')}"
                    col = cols.create(name, base.shape[1], factory, store_features=False)
                    t = time.perf_counter()
                    for s in range(0, len(base), ADD_BATCH):
                        col.add([NewItem(keys[i], base[i]) for i in range(s, min(len(base), s + ADD_BATCH))])
                    add_s = time.perf_counter() - t
                    indexed_s = _wait_indexed(col)
                    _searches(col, queries[:20])  # warm up
                    times, found = _searches(col, queries)
                    recall = _recall([np.array([int(k[1:]) for k in f], np.int64) for f in found], truth, base, queries)
                    with ThreadPoolExecutor(2) as pool:
                        t = time.perf_counter()
                        list(pool.map(lambda q: col.search(q[None], 10), queries))
                        qps2 = len(queries) / (time.perf_counter() - t)
                    row = {
                        "backend": backend, "factory": factory, "n": len(base), "durable_adds_per_s": len(base) / add_s,
                        "indexed_after_s": indexed_s, "search_p50_ms": float(np.percentile(times, 50)), "search_p99_ms": float(np.percentile(times, 99)),
                        "single_thread_qps": 1e3 / statistics.mean(times), "two_thread_qps": qps2, "recall@10": recall,
                    }
                    print(row, flush=True)
                    rows.append(row)
                    if backend == "milvus":
                        one, two = _replica_qps(uri, name, queries, 1), _replica_qps(uri, name, queries, 2)
                        replicas.append({"factory": factory, "one_replica_qps": one, "two_replicas_qps": two, "ratio": two / one})
                        print(replicas[-1], flush=True)
                    cols.close()
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
    return {"rows": rows, "replicas": replicas, "add_batch": ADD_BATCH}


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2f}"  # Milvus Lite at 1M answers ~0.5 searches/s


def table(result: dict) -> str:
    """Markdown: the backends side by side."""
    lines = [
        "| backend | index | vectors | durable adds/s | indexed after | search p50 / p99 ms | queries/s (1 / 2 threads) | recall@10 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['backend']} | {r['factory']} | {r['n']:,} | {r['durable_adds_per_s']:,.0f} | {r['indexed_after_s']:.1f} s | "
            f"{r['search_p50_ms']:.2f} / {r['search_p99_ms']:.2f} | {_rate(r['single_thread_qps'])} / {_rate(r['two_thread_qps'])} | {r['recall@10']:.3f} |"
        )
    for r in result["replicas"]:
        lines.append(f"\nMilvus {r['factory']}: one replica {_rate(r['one_replica_qps'])} searches/s, two {_rate(r['two_replicas_qps'])} ({r['ratio']:.2f}x)")
    return "\n".join(lines) + "\n"
