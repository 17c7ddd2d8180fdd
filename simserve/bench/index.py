"""``simserve bench index``: FAISS index types on real embeddings, durability costs.

Vectors are real: the default model's embeddings of random crops of real
images (cached to ``--cache`` because making a million takes a while).
Queries are embeddings of *other* crops, never indexed. Ground truth is
exact inner-product search. Reported per index type and size: build time,
bytes per vector, recall@10 against exact, batched queries/s (all threads),
single-query p50/p99 (one thread, as a server would run many at once); for
IVF-PQ also recall@10 after exact re-ranking of its top 100. Then durable
adds/s through SQLite + FAISS, start-up time from a snapshot, the embedded index against
Milvus (bench/backends.py), and what a
crop-views collection's re-scoring and a verifying collection's geometric verification add to
a search.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from simserve.bench.common import photo_sources
from simserve.index.vector_index import VectorIndex, min_train_size

DEFAULT_TYPES = ("Flat", "HNSW32", "IVF1024,Flat", "IVF1024,PQ32")


def real_embeddings(n: int, bundle: str | None, cache: str | None, seed: int = 0) -> np.ndarray:
    """``n`` embeddings of random crops (10-100% of the side) of real images, cached as .npy."""
    if cache and Path(cache).exists():
        x = np.load(cache, mmap_mode="r")
        if len(x) >= n:
            return np.ascontiguousarray(x[:n])
    from PIL import Image
    from tqdm import tqdm

    from simserve.inference.engine import load_engine
    from simserve.inference.pixels import to_pixels

    engine = load_engine(bundle)
    cfg = engine.config
    sources = photo_sources(drawings=True)
    rng = np.random.default_rng(seed)
    out = np.empty((n, engine.bundle.embedding_dim), np.float32)
    batch = 256
    for s in tqdm(range(0, n, batch), desc="embedding crops", unit_scale=batch, disable=n < 50_000):
        px = []
        for _ in range(min(batch, n - s)):
            img = sources[rng.integers(len(sources))]
            w, h = img.size
            side = max(1, min(w, h, int(min(w, h) * rng.uniform(0.1, 1.0))))
            x0, y0 = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
            crop = img.crop((x0, y0, x0 + side, y0 + side))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            px.append(to_pixels(crop, cfg.input_size, cfg.in_channels))
        _, out[s : s + len(px)] = engine.embed(np.stack(px))
    if cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, out)
    return out


def _single_query_ms(idx: VectorIndex, queries: np.ndarray, k: int = 10) -> tuple[float, float]:
    faiss.omp_set_num_threads(1)
    try:
        times = []
        for q in queries:
            t = time.perf_counter()
            idx.search(q[None], k)
            times.append((time.perf_counter() - t) * 1e3)
    finally:
        faiss.omp_set_num_threads(faiss.omp_get_max_threads())
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _recall(found: "np.ndarray | list[np.ndarray]", truth_sim: np.ndarray, base: np.ndarray, queries: np.ndarray) -> float:
    """Tie-aware recall@k: a returned vector counts when it is at least as similar as the
    exact k-th neighbour. Real embeddings hold exact duplicates (identical crops), whose
    order among equals is arbitrary; counting ids would punish a correct answer."""
    hits = []
    for f, kth, q in zip(found, truth_sim[:, -1], queries):
        f = f[f >= 0]
        hits.append(float(np.sum(base[f] @ q >= kth - 1e-5)) / truth_sim.shape[1])
    return float(np.mean(hits))


def bench_type(factory: str, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, threads: int) -> dict:
    """``truth``: the exact top-k similarities per query (for tie-aware recall)."""
    n, d = base.shape
    idx = VectorIndex(d, factory)
    t = time.perf_counter()
    if idx.pending_training:
        sample = base[np.random.default_rng(0).choice(n, size=min(n, max(min_train_size(factory), 64 * 1024)), replace=False)]
        idx.train(sample)
    for s in range(0, n, 100_000):
        idx.add(np.arange(s, min(n, s + 100_000), dtype=np.int64), base[s : s + 100_000])
    build_s = time.perf_counter() - t
    faiss.omp_set_num_threads(threads)
    t = time.perf_counter()
    _, found = idx.search(queries, 10)
    batched_qps = len(queries) / (time.perf_counter() - t)
    p50, p99 = _single_query_ms(idx, queries[:300])
    row = {
        "factory": factory,
        "n": n,
        "build_s": build_s,
        "bytes_per_vector": idx.memory_bytes() / n,
        "recall@10": _recall(found, truth, base, queries),
        "batched_qps": batched_qps,
        "single_p50_ms": p50,
        "single_p99_ms": p99,
    }
    if "PQ" in factory:  # exact re-rank of the top 100 with the original vectors
        _, top = idx.search(queries, 100)
        reranked = []
        for q, cand in zip(queries, top):
            cand = cand[cand >= 0]
            reranked.append(cand[np.argsort(-(base[cand] @ q))[:10]])
        row["recall@10_rerank100"] = _recall(reranked, truth, base, queries)
    return row


def durable_adds(base: np.ndarray, factory: str, batch: int = 10_000, total: int = 200_000) -> dict:
    """Acknowledged adds/s (SQLite commit + FAISS or the HNSW buffer), and for HNSW how
    long until every vector is in the graph. Past the tuning's ``buffer_limit`` adds wait for the graph."""
    from simserve.index.collection import Collections
    from simserve.index.store import NewItem
    from simserve.index.vector_index import IndexTuning

    total = min(total, len(base))
    tuning = IndexTuning()
    with tempfile.TemporaryDirectory() as d:
        col = Collections(d, tuning=tuning).create("adds", base.shape[1], factory)
        t = time.perf_counter()
        for s in range(0, total, batch):
            col.add([NewItem(f"k{s + i}", v) for i, v in enumerate(base[s : s + batch])])
        acked = time.perf_counter() - t
        col.wait_indexed()
        indexed = time.perf_counter() - t
        col.close(snapshot=False)
    return {"factory": factory, "vectors": total, "batch": batch, "buffer_limit": tuning.buffer_limit,
            "vectors_per_s": total / acked, "indexed_per_s": total / indexed}


def snapshot_start(base: np.ndarray, factory: str) -> dict:
    """Load a collection of len(base) vectors from its snapshot (what a restart does)."""
    from simserve.index.collection import Collections
    from simserve.index.store import NewItem

    with tempfile.TemporaryDirectory() as d:
        cols = Collections(d, synchronous="OFF")  # filling speed only; the measured part is the reopen
        col = cols.create("big", base.shape[1], factory)
        for s in range(0, len(base), 50_000):
            col.add([NewItem(f"k{s + i}", v) for i, v in enumerate(base[s : s + 50_000])])
        col.wait_background()
        col.wait_indexed()  # the snapshot then holds every vector: what is timed is loading it
        cols.close(snapshot=True)
        t = time.perf_counter()
        c2 = Collections(d).get("big")
        secs = time.perf_counter() - t
        n = c2.stats()["indexed"]
        c2.close(snapshot=False)
    return {"factory": factory, "vectors": n, "start_s": secs}


def view_rescoring(base: np.ndarray, queries: np.ndarray, n: int = 100_000, views: int = 6) -> dict:
    """What a crop-views collection's re-scoring costs a search: single-query Collection.search
    (k=10) on a plain and a crop-views Flat collection of the same n vectors, side by side.
    The view vectors are other real embeddings (the cost does not depend on their values)."""
    from simserve.index.collection import Collections
    from simserve.index.store import NewItem
    from simserve.ranking.pipeline import Query, search

    n = min(n, len(base))
    b = base[:n]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        cols = Collections(d, synchronous="OFF")
        plain = cols.create("plain", b.shape[1], "Flat", store_features=False)
        viewed = cols.create("views", b.shape[1], "Flat", store_features=False, crop_views=True)
        for s in range(0, n, 20_000):
            part = b[s : s + 20_000]
            plain.add([NewItem(f"k{s + i}", v) for i, v in enumerate(part)])
            other = b[rng.integers(0, n, size=(len(part), views))]
            viewed.add([NewItem(f"k{s + i}", v, views=other[i]) for i, v in enumerate(part)])
        times: dict[str, list[float]] = {"plain": [], "views": []}
        for q in queries:
            for name, col in (("plain", plain), ("views", viewed)):  # interleaved: same noise for both
                t = time.perf_counter()
                search(col, Query(q), 10)
                times[name].append((time.perf_counter() - t) * 1000)
        cols.close(snapshot=False)
    p50 = {k: statistics.median(v) for k, v in times.items()}
    p99 = {k: float(np.percentile(v, 99)) for k, v in times.items()}
    return {"vectors": n, "views_per_item": views, "queries": len(queries), "plain_p50_ms": p50["plain"], "views_p50_ms": p50["views"],
            "plain_p99_ms": p99["plain"], "views_p99_ms": p99["views"], "views_over_plain_p50": p50["views"] / p50["plain"]}


def verification_cost(base: np.ndarray, queries: np.ndarray, n: int = 100_000, n_images: int = 400) -> dict:
    """What geometric verification costs (simserve/ranking/verify.py): keypoints per added image, the
    query's two keypoint sets, and single-query searches (k=10) on a plain and a
    verifying Flat collection of the same n vectors, side by side. Items carry the keypoints of
    real images (256 px JPEG crops of photos and drawings, reused round-robin: the cost of
    matching depends on their number, not on which image they came from)."""
    from simserve.bench.common import jpeg_crops, photo_sources
    from simserve.index.collection import Collections
    from simserve.index.store import NewItem
    from simserve.inference.decode import decode_image
    from simserve.ranking import verify
    from simserve.ranking.pipeline import Query, search

    images = [decode_image(j) for j in jpeg_crops(n_images + len(queries), sources=photo_sources(drawings=True))]
    t = time.perf_counter()
    blobs = [verify.keypoints(im) for im in images[:n_images]]
    extract_ms = (time.perf_counter() - t) * 1000 / n_images
    n = min(n, len(base))
    with tempfile.TemporaryDirectory() as d:
        cols = Collections(d, synchronous="OFF")
        plain = cols.create("plain", base.shape[1], "Flat", store_features=False)
        verifying = cols.create("verify", base.shape[1], "Flat", store_features=False, verify=True)
        for s in range(0, n, 20_000):
            part = base[s : min(n, s + 20_000)]
            plain.add([NewItem(f"k{s + i}", v) for i, v in enumerate(part)])
            verifying.add([NewItem(f"k{s + i}", v, keypoints=blobs[(s + i) % n_images]) for i, v in enumerate(part)])
        times: dict[str, list[float]] = {"plain": [], "verify": [], "query_keypoints": []}
        for q, im in zip(queries, images[n_images:]):
            t = time.perf_counter()
            kp = verify.query_features(im, regions=True)
            times["query_keypoints"].append((time.perf_counter() - t) * 1000)
            for name, col, query in (("plain", plain, Query(q)), ("verify", verifying, Query(q, keypoints=kp))):  # interleaved
                t = time.perf_counter()
                search(col, query, 10)
                times[name].append((time.perf_counter() - t) * 1000)
        cols.close(snapshot=False)
    p50 = {k: statistics.median(v) for k, v in times.items()}
    return {
        "vectors": n, "queries": len(queries), "keypoint_images": n_images,
        "sift_points_per_image": statistics.mean(len(verify.unpack(b).sift) for b in blobs),
        "orb_points_per_image": statistics.mean(len(verify.unpack(b).orb) for b in blobs),
        "bytes_per_item": statistics.mean(len(b) for b in blobs),
        "extract_ms_per_added_image": extract_ms,
        "query_keypoints_p50_ms": p50["query_keypoints"],
        "plain_search_p50_ms": p50["plain"], "verified_search_p50_ms": p50["verify"],
        "plain_search_p99_ms": float(np.percentile(times["plain"], 99)), "verified_search_p99_ms": float(np.percentile(times["verify"], 99)),
    }


def run(bundle: str | None = None, n: int = 1_000_000, sizes: tuple[int, ...] = (10_000, 100_000), types: tuple[str, ...] = DEFAULT_TYPES,
        queries: int = 1000, cache: str | None = "runs/bench/embeddings.npy", threads: int | None = None, snapshot_type: str = "HNSW32",
        parts: tuple[str, ...] = ("types", "adds", "snapshot"), backends: tuple[str, ...] = ("embedded", "milvus"),
        backend_types: tuple[str, ...] = ("Flat", "HNSW32")) -> dict:
    threads = threads or faiss.omp_get_max_threads()
    t = time.perf_counter()
    allv = real_embeddings(n + queries, bundle, cache)
    embed_s = time.perf_counter() - t
    base, q = allv[:n], allv[n : n + queries]
    result: dict = {"n": n, "dim": base.shape[1], "queries": queries, "threads": threads, "embedding_s": embed_s, "types": [], "scaling": []}
    for size in sorted({s for s in sizes if s < n} | {n}) if "types" in parts else ():
        b = base[:size]
        exact = faiss.IndexFlatIP(b.shape[1])
        exact.add(b)
        truth, _ = exact.search(q, 10)  # similarities
        for f in types:
            if size < min_train_size(f):
                continue
            row = bench_type(f, b, q, truth, threads)
            print(row, flush=True)
            (result["types"] if size == n else result["scaling"]).append(row)
    # HNSW twice: a burst the buffer absorbs, and twice that, where adds wait for the graph
    if "adds" in parts:
        result["durable_adds"] = [durable_adds(base, "Flat"), durable_adds(base, "HNSW32", total=100_000), durable_adds(base, "HNSW32", total=200_000)]
    if "snapshot" in parts:
        result["snapshot_start"] = snapshot_start(base, snapshot_type)
    if "views" in parts:
        result["view_rescoring"] = view_rescoring(base, q)
        print(result["view_rescoring"], flush=True)
    if "backends" in parts:
        from simserve.bench import backends as backend_bench

        result["backends"] = backend_bench.compare(base, q, backends, backend_types)
    if "verify" in parts:
        result["verification"] = verification_cost(base, q[:200])
        print(result["verification"], flush=True)
    return result


def scaling_table(result: dict) -> str:
    """Markdown: single-query p50 / p99 ms and recall@10 per index type as the collection grows."""
    rows = result["scaling"] + result["types"]
    sizes = sorted({r["n"] for r in rows})
    head = "| index type | " + " | ".join(f"{n:,} vectors" for n in sizes) + " |"
    lines = [head, "|---|" + "---:|" * len(sizes)]
    for f in dict.fromkeys(r["factory"] for r in rows):
        by_n = {r["n"]: r for r in rows if r["factory"] == f}
        cells = [f"{by_n[n]['single_p50_ms']:.2f} / {by_n[n]['single_p99_ms']:.2f} ms, recall {by_n[n]['recall@10']:.3f}" if n in by_n else "-" for n in sizes]
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
