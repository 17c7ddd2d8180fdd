"""``simserve bench serve``: the gRPC service under concurrent load.

The server runs in its own process; the load comes from separate client
processes (``--procs``), each with ``clients / procs`` asyncio clients, every client
sending one 256x256 JPEG per Embed request back to back. Reported side by
side in one run: the engine's in-process throughput (decode + embed at
the batcher's batch size, a batch per lane as the bulk jobs run them: the
fastest in-process pipeline here), the service with micro-batching on, and the
service with it off (max_batch=1). Then Search over a collection of
``--collection-size`` items under the same load.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from simserve.bench.common import jpeg_crops, start_server
from simserve.inference.bundle import load_bundle
from simserve.inference.decode_pool import DecodePool, load_bytes
from simserve.inference.engine import default_threads, load_engine
from simserve.jobs.lanes import map_lanes


def _load_worker(target: str, method: str, concurrency: int, seconds: float, blobs: list[bytes], collection: str, out: "mp.Queue") -> None:
    """One load process: ``concurrency`` asyncio clients on one channel, each sending back to back.

    asyncio rather than a thread per client: the load shares the server's
    cores, so every CPU-second the generator spends on thread switching is
    taken from the service it measures (ghz, the usual gRPC load tool, is
    event-driven for the same reason). Reports its own CPU time.
    """
    import asyncio

    import grpc

    from simserve.v1 import simserve_pb2 as pb
    from simserve.v1 import simserve_pb2_grpc as pb_grpc

    lat: list[float] = []
    errors: dict[str, int] = {}

    async def main() -> None:
        async with grpc.aio.insecure_channel(target, [("grpc.max_send_message_length", 64 << 20)]) as channel:
            sim = pb_grpc.SimilarityStub(channel)
            stop = time.perf_counter() + seconds

            async def client(i: int) -> None:
                k = i
                while time.perf_counter() < stop:
                    blob = blobs[k % len(blobs)]
                    k += concurrency
                    t = time.perf_counter()
                    try:
                        if method == "embed":
                            await sim.Embed(pb.EmbedRequest(images=[pb.Image(data=blob)]), timeout=10)
                        else:
                            await sim.Search(pb.SearchRequest(collection=collection, query=pb.Image(data=blob), k=10), timeout=10)
                        lat.append(time.perf_counter() - t)
                    except grpc.RpcError as e:
                        errors[e.code().name] = errors.get(e.code().name, 0) + 1

            await asyncio.gather(*(client(i) for i in range(concurrency)))

    cpu0 = time.process_time()
    asyncio.run(main())
    out.put((lat, errors, time.process_time() - cpu0))


def _bare_server(out: "mp.Queue") -> None:
    """gRPC's own cost: a grpc.aio server whose Embed decodes nothing and answers a constant
    128-d embedding. Under the same load its CPU per request is the floor any Python
    handler starts from."""
    import asyncio

    import grpc

    from simserve.v1 import simserve_pb2 as pb
    from simserve.v1 import simserve_pb2_grpc as pb_grpc

    class Bare(pb_grpc.SimilarityServicer):
        async def Embed(self, request, context):
            return pb.EmbedResponse(embeddings=[pb.Embedding(values=[0.1] * 128)], dim=128, model="bare")

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_SimilarityServicer_to_server(Bare(), server)
        out.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load(target: str, method: str, clients: int, procs: int, seconds: float, blobs: list[bytes], collection: str = "", server_pid: int | None = None) -> dict:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    ps = [ctx.Process(target=_load_worker, args=(target, method, n, seconds, blobs[i::procs], collection, q)) for i, n in enumerate(per)]
    server_cpu0 = _process_cpu_seconds(server_pid) if server_pid else 0.0
    t0 = time.perf_counter()
    for p in ps:
        p.start()
    lat: list[float] = []
    errors: dict[str, int] = {}
    load_cpu = 0.0
    for _ in ps:
        pl, pe, pc = q.get()
        lat += pl
        load_cpu += pc
        for k, v in pe.items():
            errors[k] = errors.get(k, 0) + v
    server_cpu = _process_cpu_seconds(server_pid) - server_cpu0 if server_pid else float("nan")
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
        # Where the machine's CPU went: the load generator shares the server's cores here.
        "server_cpu_s": server_cpu,
        "load_cpu_s": load_cpu,
    }


def _fill_collection(data_dir: str, bundle: str | None, name: str, n: int, blobs: list[bytes]) -> None:
    """``n`` items: real images embedded once, then every further item a re-embedded augmented crop."""
    from simserve.index.collection import Collections
    from simserve.index.store import NewItem

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


def run(
    bundle: str | None = None, clients: int = 32, procs: int = 2, seconds: float = 10.0, max_batch: int = 32,
    collection_size: int = 100_000, rounds: int = 3,
) -> dict:
    """Embed figures come from ``rounds`` rounds of (engine pass, batching on, batching off),
    interleaved so that the shared machine's slow spells hit all three alike; each figure is
    the median over rounds and each ratio is taken within a round, then the median."""
    b = load_bundle(bundle)
    cfg = b.config
    blobs = jpeg_crops(512, 256, seed=3)
    engine = load_engine(b, max_batch=max_batch)
    configs = {"batching_on": max_batch, "batching_off": 1}
    per_round: dict[str, list[dict]] = {label: [] for label in configs}
    engine_ips: list[float] = []
    engine_cpu: list[float] = []
    cores = default_threads()
    load = partial(load_bytes, size=cfg.input_size, channels=cfg.in_channels)
    batches = [blobs[s : s + max_batch] for s in range(0, len(blobs), max_batch)]
    with tempfile.TemporaryDirectory() as d:

        def engine_pass() -> tuple[float, float]:
            """(images/s, CPU seconds per image: every thread of this process)."""
            t, cpu = time.perf_counter(), time.process_time()
            for _ in map_lanes(engine, batches, lambda part: np.stack([load(b) for b in part]), lambda lane, px: lane.embed(px)):
                pass
            return len(blobs) / (time.perf_counter() - t), (time.process_time() - cpu) / len(blobs)

        engine_pass()
        servers = {label: start_server(d, bundle, ["--max-batch", str(mb)])[:2] for label, mb in configs.items()}
        try:
            for _, addr in servers.values():
                _load(addr, "embed", clients, procs, 3, blobs)  # warm-up
            for _ in range(rounds):
                passes = sorted(engine_pass() for _ in range(3))
                engine_ips.append(passes[1][0])
                engine_cpu.append(passes[1][1])
                for label, (proc, addr) in servers.items():
                    r = _load(addr, "embed", clients, procs, seconds, blobs, server_pid=proc.pid)
                    r["vs_engine"] = r["per_s"] / engine_ips[-1]
                    n = max(1, r["requests"])
                    r["server_cpu_ms_per_request"] = 1e3 * r["server_cpu_s"] / n
                    r["load_cpu_ms_per_request"] = 1e3 * r["load_cpu_s"] / n
                    # A server that spent nothing beyond the in-process decode + embed would still
                    # share the cores with the load generator: its best possible ratio.
                    r["ceiling_vs_engine"] = cores / (engine_cpu[-1] + r["load_cpu_s"] / n) / engine_ips[-1]
                    per_round[label].append(r)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(60)
    engine = None  # its sessions go before the search server starts
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    bare = ctx.Process(target=_bare_server, args=(q,), daemon=True)
    bare.start()
    try:
        addr = f"127.0.0.1:{q.get(timeout=60)}"
        _load(addr, "embed", clients, procs, 3, blobs)
        floor = _load(addr, "embed", clients, procs, seconds, blobs, server_pid=bare.pid)
    finally:
        bare.terminate()
        bare.join(10)
    n = max(1, floor["requests"])
    grpc_floor = {"per_s": floor["per_s"], "server_cpu_ms_per_request": 1e3 * floor["server_cpu_s"] / n, "load_cpu_ms_per_request": 1e3 * floor["load_cpu_s"] / n}
    # The best any Python gRPC server could do here: decode + embed + gRPC's own cost, on cores
    # shared with the load generator.
    grpc_floor["ceiling_vs_engine"] = cores / (statistics.median(engine_cpu) + (floor["server_cpu_s"] + floor["load_cpu_s"]) / n) / statistics.median(engine_ips)
    result: dict = {"clients": clients, "load_processes": procs, "seconds": seconds, "rounds": rounds, "cores": cores, "grpc_floor": grpc_floor,
                    "engine_images_per_s": statistics.median(engine_ips), "engine_per_round": engine_ips,
                    "engine_cpu_ms_per_image": 1e3 * statistics.median(engine_cpu)}
    keys = ("per_s", "p50_ms", "p99_ms", "vs_engine", "server_cpu_s", "load_cpu_s", "server_cpu_ms_per_request", "load_cpu_ms_per_request", "ceiling_vs_engine")
    for label, rs in per_round.items():
        summary = {k: statistics.median(r[k] for r in rs) for k in keys}
        summary["requests"] = sum(r["requests"] for r in rs)
        summary["errors"] = {k: sum(r["errors"].get(k, 0) for r in rs) for k in {k for r in rs for k in r["errors"]}}
        summary["vs_engine_per_round"] = [r["vs_engine"] for r in rs]
        result[f"embed_{label}"] = summary
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        _fill_collection(d, bundle, "bench", collection_size, blobs)
        result["collection_fill_s"] = time.perf_counter() - t
        proc, addr, _ = start_server(d, bundle, ["--max-batch", str(max_batch)])
        try:
            _load(addr, "search", clients, procs, 3, blobs, "bench")
            result["search_100k" if collection_size == 100_000 else f"search_{collection_size}"] = _load(addr, "search", clients, procs, seconds, blobs, "bench", server_pid=proc.pid)
        finally:
            proc.terminate()
            proc.wait(60)
    return result
