"""Search latency with this checkout's ranking/verify.py beside an earlier revision's, each query
through both in turn (the machine's noise falls on both alike), on the copydetect set's collection.

Needs the caches scripts/bench-copydetect-100k.py makes under runs/bench/ (the set and its 10,100-item
collection). An earlier ``inliers`` that takes no ``enough`` is called without it.

    python scripts/ab-search.py REVISION [N_QUERIES]
"""

import asyncio
import importlib.util
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from simserve.bench.copydetect import score
from simserve.ranking import pipeline, verify
from simserve.serve import service

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "bench"


def _module(rev: str, name: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:simserve/ranking/{name}.py"], capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"{name}_earlier.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"{name}_earlier", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look themselves up there
    spec.loader.exec_module(mod)
    return mod


def earlier(rev: str):
    """(pipeline, verify) as they were at ``rev``, the one calling the other."""
    old_verify = _module(rev, "verify")
    old_pipeline = _module(rev, "pipeline")
    old_pipeline.verify = old_verify
    return old_pipeline, old_verify


async def main(rev: str, n: int) -> None:
    from simserve.index.collection import Collections
    from simserve.inference.engine import load_engine
    from simserve.serve.config import ServerConfig
    from simserve.serve.service import ImageRef, Service

    cs, photos = pickle.loads((RUNS / "copyset-detail8.pkl").read_bytes())
    svc = Service(load_engine(None), Collections(RUNS / "col-detail8"), ServerConfig(collection="bench"))
    variants = {rev: earlier(rev), "checkout": (pipeline, verify)}
    qs = cs.queries[:: max(1, len(cs.queries) // n)][:n]
    await svc.search(ImageRef(data=qs[0].data), "bench", 10, 0, {}, None)
    ms = {k: [] for k in variants}
    hits = {k: [] for k in variants}
    for i, q in enumerate(qs):
        for name in list(variants)[:: 1 if i % 2 else -1]:
            service.pipeline, service.verify = variants[name]
            t = time.perf_counter()
            found = await svc.search(ImageRef(data=q.data), "bench", 10, 0, {}, None)
            ms[name].append((time.perf_counter() - t) * 1000)
            hits[name].append([(h.key, h.score) for h in found])
    svc.close()
    for name in variants:
        sc = score(qs, hits[name], photos)
        print(f"{name}: p50 {statistics.median(ms[name]):.1f} ms, p90 {np.percentile(ms[name], 90):.1f}, p99 {np.percentile(ms[name], 99):.1f}; recall@1 {sc['recall@1']:.3f}, µAP {sc['micro_ap']:.3f}")
    print(f"per query, checkout / {rev} (median): {statistics.median(np.array(ms['checkout']) / np.array(ms[rev])):.3f}")
    same = np.mean([bool(a) and bool(b) and a[0][0] == b[0][0] for a, b in zip(hits[rev], hits["checkout"])])
    print(f"same first hit: {same:.3f}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 400))
