"""``simserve bench serve``: the gRPC service under concurrent load.

The server runs in its own process; the load comes from separate client
processes (``--procs``), each with ``clients / procs`` threads, every client
sending one 256x256 JPEG per Embed request back to back. Reported side by
side in one run: the engine's in-process throughput (decode + embed at
the batcher's batch size), the service with micro-batching on, and the
service with it off (max_batch=1). Then Search over a collection of
``--collection-size`` items under the same load.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from simserve.bench.common import jpeg_crops, run_threads, start_server
from simserve.bundle import load_bundle
from simserve.decode_pool import DecodePool
from simserve.engine import load_engine


def _load_worker(target: str, method: str, threads: int, seconds: float, blobs: list[bytes], collection: str, out: "mp.Queue") -> None:
    import grpc

    from simserve.v1 import simserve_pb2 as pb
    from simserve.v1 import simserve_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(target, [("grpc.max_send_message_length", 64 << 20)])
    sim = pb_grpc.SimilarityStub(channel)
    lat: list[float] = []
    errors: dict[str, int] = {}
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        k = i
        while time.perf_counter() < stop:
            blob = blobs[k % len(blobs)]
            k += threads
            t = time.perf_counter()
            try:
                if method == "embed":
                    sim.Embed(pb.EmbedRequest(images=[pb.Image(data=blob)]), timeout=10)
                else:
                    sim.Search(pb.SearchRequest(collection=collection, query=pb.Image(data=blob), k=10), timeout=10)
                lat.append(time.perf_counter() - t)
            except grpc.RpcError as e:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1

    run_threads(client, threads)
    channel.close()
    out.put((lat, errors))


def _load(target: str, method: str, clients: int, procs: int, seconds: float, blobs: list[bytes], collection: str = "") -> dict:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    ps = [ctx.Process(target=_load_worker, args=(target, method, n, seconds, blobs[i::procs], collection, q)) for i, n in enumerate(per)]
    t0 = time.perf_counter()
    for p in ps:
        p.start()
    lat: list[float] = []
    errors: dict[str, int] = {}
    for _ in ps:
        pl, pe = q.get()
        lat += pl
        for k, v in pe.items():
            errors[k] = errors.get(k, 0) + v
    for p in ps:
        p.join()
    wall = time.perf_counter() - t0
    lat_ms = np.array(lat) * 1e3
    return {
        "requests": len(lat),
        "per_s": len(lat) / seconds,
        "p50_ms": float(np.percentile(lat_ms, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat_ms, 99)) if len(lat) else None,
        "errors": errors,
        "wall_s": wall,
    }


def _fill_collection(data_dir: str, bundle: str | None, name: str, n: int, blobs: list[bytes]) -> None:
    """``n`` items: real images embedded once, then every further item a re-embedded augmented crop."""
    from simserve.collection import Collections
    from simserve.store import NewItem

    engine = load_engine(bundle)
    cfg = engine.config
    cols = Collections(data_dir)
    col = cols.get_or_create(name, engine.bundle.embedding_dim, "Flat", engine.bundle.manifest["feature_shape"])
    extra = jpeg_crops(max(0, n - len(blobs)), 256, seed=7) if n > len(blobs) else []
    source = (blobs + extra)[:n]
    with DecodePool(cfg.input_size, cfg.in_channels) as pool:
        for s in range(0, n, 4096):
            px = np.stack(list(pool.map(source[s : s + 4096])))
            feats, embs = engine.embed(px)
            col.add([NewItem(f"img{s + i}", e, None, None, f.astype(np.float16)) for i, (f, e) in enumerate(zip(feats, embs))])
    cols.close()


def run(bundle: str | None = None, clients: int = 32, procs: int = 2, seconds: float = 20.0, max_batch: int = 32, collection_size: int = 100_000) -> dict:
    b = load_bundle(bundle)
    cfg = b.config
    blobs = jpeg_crops(512, 256, seed=3)
    engine = load_engine(b, max_batch=max_batch)
    with DecodePool(cfg.input_size, cfg.in_channels) as pool:
        def engine_pass() -> int:
            for s in range(0, len(blobs), max_batch):
                engine.embed(np.stack(list(pool.map(blobs[s : s + max_batch]))))
            return len(blobs)

        engine_pass()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            engine_pass()
            times.append(time.perf_counter() - t)
    engine_ips = len(blobs) / statistics.median(times)
    del engine
    result: dict = {"clients": clients, "load_processes": procs, "seconds": seconds, "engine_images_per_s": engine_ips}
    with tempfile.TemporaryDirectory() as d:
        for label, mb in (("batching_on", max_batch), ("batching_off", 1)):
            proc, addr, _ = start_server(d, bundle, ["--max-batch", str(mb)])
            try:
                _load(addr, "embed", clients, procs, 3, blobs)  # warm-up
                r = _load(addr, "embed", clients, procs, seconds, blobs)
            finally:
                proc.terminate()
                proc.wait(60)
            r["vs_engine"] = r["per_s"] / engine_ips
            result[f"embed_{label}"] = r
        t = time.perf_counter()
        _fill_collection(d, bundle, "bench", collection_size, blobs)
        result["collection_fill_s"] = time.perf_counter() - t
        proc, addr, _ = start_server(d, bundle, ["--max-batch", str(max_batch)])
        try:
            _load(addr, "search", clients, procs, 3, blobs, "bench")
            result["search_100k" if collection_size == 100_000 else f"search_{collection_size}"] = _load(addr, "search", clients, procs, seconds, blobs, "bench")
        finally:
            proc.terminate()
            proc.wait(60)
    return result
