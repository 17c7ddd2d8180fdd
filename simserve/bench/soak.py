"""``simserve bench soak``: mixed traffic for minutes, watching errors, latency and memory.

A ``simserve serve`` process on loopback; ``procs`` load processes with
``clients`` threads in all, each looping over a weighted mix: ScorePairs of two
real JPEGs (40%), Search by image (40%), Add of one item (20%, keys drawn from a
bounded set so adds are upserts and the index stays about one size while
deletes pile up and background rebuilds run). Every request has a deadline.

Reported: requests and errors by method and status code, p50/p99 latency per
time window, the server's RSS per window, and RSS growth from the end of
warm-up (the first 20% of the run) to the end. Target: no unexpected errors (every
non-OK status counts), RSS growth < 10%.

    simserve bench soak --minutes 10 --out docs/bench/soak.json
"""

from __future__ import annotations

import multiprocessing as mp
import random
import tempfile
import threading
import time
from collections import Counter, defaultdict

import numpy as np

from simserve.bench.common import jpeg_crops, rss_mb, run_threads, start_server

MIX = (("ScorePairs", 0.4), ("Search", 0.4), ("Add", 0.2))
KEYS = 2000  # Add draws keys from this many, so the collection stays bounded


def _worker(target: str, threads: int, seconds: float, blobs: list[bytes], seed: int, t0: float, out: "mp.Queue") -> None:
    import grpc

    from simserve.v1 import simserve_pb2 as pb
    from simserve.v1 import simserve_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(target)
    sim, index = pb_grpc.SimilarityStub(channel), pb_grpc.IndexStub(channel)
    records: list[tuple[float, str, float, str]] = []
    lock = threading.Lock()
    stop = t0 + seconds
    methods, weights = zip(*MIX)

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        mine = []
        while time.time() < stop:
            method = rng.choices(methods, weights)[0]
            a, b = rng.choice(blobs), rng.choice(blobs)
            t = time.perf_counter()
            try:
                if method == "ScorePairs":
                    sim.ScorePairs(pb.ScorePairsRequest(pairs=[pb.Pair(a=pb.Image(data=a), b=pb.Image(data=b))]), timeout=10)
                elif method == "Search":
                    sim.Search(pb.SearchRequest(query=pb.Image(data=a), k=10, rerank=rng.choice((0, 20))), timeout=10)
                else:
                    key = f"k{rng.randrange(KEYS)}"
                    index.Add(pb.AddRequest(items=[pb.AddItem(key=key, image=a, metadata_json='{"src": "soak"}')]), timeout=10)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            mine.append((time.time() - t0, method, (time.perf_counter() - t) * 1e3, code))
        with lock:
            records.extend(mine)

    run_threads(client, threads)
    channel.close()
    out.put(records)


def run(bundle: str | None = None, minutes: float = 10.0, clients: int = 32, procs: int = 2, window_s: float | None = None) -> dict:
    seconds = minutes * 60
    window = window_s or max(5.0, seconds / 20)
    blobs = jpeg_crops(64, 256, seed=11)
    with tempfile.TemporaryDirectory() as d:
        proc, addr, log = start_server(d, bundle, [])
        try:
            rss: list[tuple[float, float]] = []
            ctx = mp.get_context("spawn")
            q: mp.Queue = ctx.Queue()
            t0 = time.time() + 2.0  # every load process starts its clock together
            per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
            ps = [ctx.Process(target=_worker, args=(addr, n, seconds, blobs, i, t0, q)) for i, n in enumerate(per)]
            for p in ps:
                p.start()
            while time.time() < t0 + seconds:
                time.sleep(min(window, max(0.0, t0 + seconds - time.time()), 1.0))
                now = time.time() - t0
                if now >= 0 and (not rss or now - rss[-1][0] >= window - 0.5):
                    rss.append((now, rss_mb(proc.pid)))
                if proc.poll() is not None:
                    break
            records: list[tuple[float, str, float, str]] = []
            for _ in ps:
                records += q.get(timeout=120)
            for p in ps:
                p.join(30)
            rss.append((time.time() - t0, rss_mb(proc.pid)))
            alive = proc.poll() is None
        finally:
            if proc.poll() is None:
                proc.terminate()
            code = proc.wait(60)
        log_tail = log.read_text(errors="replace").splitlines()[-3:]
    return _report(records, rss, window, seconds, clients, procs, alive, code, log_tail)


WARMUP = 0.2  # the first 20% of the run: caches, allocator arenas, FAISS and ORT buffers fill up


def rss_growth(timeline: list[dict], seconds: float, end: float | None) -> tuple[float | None, float | None, float | None]:
    """(RSS at the end of warm-up, RSS at the end, growth between them)."""
    warm = [t["rss_mb"] for t in timeline if t["rss_mb"] and t["t_s"] >= WARMUP * seconds]
    after_warmup = warm[0] if warm else None
    growth = (end - after_warmup) / after_warmup if after_warmup and end else None
    return after_warmup, end, growth


def _report(records, rss, window, seconds, clients, procs, alive, exit_code, log_tail) -> dict:
    by_method: dict[str, Counter] = defaultdict(Counter)
    for _, m, _, c in records:
        by_method[m][c] += 1
    unexpected = Counter(c for _, _, _, c in records if c != "OK")
    timeline = []
    for w in range(int(np.ceil(seconds / window))):
        lo, hi = w * window, (w + 1) * window
        lat = np.array([ms for t, _, ms, c in records if lo <= t < hi and c == "OK"])
        errs = sum(1 for t, _, _, c in records if lo <= t < hi and c != "OK")
        mem = [m for t, m in rss if lo <= t < hi + 0.5]
        timeline.append({
            "t_s": round(hi, 1),
            "requests": int(len(lat) + errs),
            "per_s": round((len(lat) + errs) / window, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "errors": errs,
            "rss_mb": mem[-1] if mem else None,
        })  # fmt: skip
    after_warmup, end, growth = rss_growth(timeline, seconds, rss[-1][1] if rss else None)
    lat_all = np.array([ms for _, _, ms, c in records if c == "OK"])
    return {
        "minutes": seconds / 60,
        "clients": clients,
        "load_processes": procs,
        "requests": len(records),
        "per_s": round(len(records) / seconds, 1),
        "p50_ms": round(float(np.percentile(lat_all, 50)), 1) if len(lat_all) else None,
        "p99_ms": round(float(np.percentile(lat_all, 99)), 1) if len(lat_all) else None,
        "by_method": {m: dict(c) for m, c in sorted(by_method.items())},
        "unexpected_errors": dict(unexpected),
        "rss_mb_start": rss[0][1] if rss else None,
        "rss_mb_peak": max(m for _, m in rss) if rss else None,
        "rss_mb_after_warmup": after_warmup,
        "rss_mb_end": end,
        "rss_growth_after_warmup": round(growth, 4) if growth is not None else None,
        "timeline": timeline,
        "server_alive_at_end": alive,
        "server_exit_code": exit_code,
        "server_log_tail": log_tail,
        "ok": not unexpected and alive and exit_code == 0 and growth is not None and growth < 0.10,
    }
