"""Search latency and quality with this checkout's ranking (ranking/pipeline.py, ranking/verify.py
and the regions of inference/crops.py) beside an earlier revision's, each query through both in
turn (the machine's noise falls on both alike), on the copydetect set's collection. The query views
are made by this checkout's service for both; searches are not budgeted. N_QUERIES are drawn at
random (seed 0): the set lists each scene's transforms in a fixed order, so every k-th query is not
a fair sample.

Needs the caches scripts/bench-copydetect-100k.py makes under runs/bench/ (the set and its 10,100-item
collection). An earlier ``inliers`` that takes no ``enough`` is called without it. TRANSFORMS (comma-
separated, e.g. paste_into,crop_paste) keeps only those queries.

    python scripts/ab-search.py REVISION [N_QUERIES] [TRANSFORMS]
"""

import asyncio
import random
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


def _crops(rev: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:simserve/inference/crops.py"], capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "crops_earlier.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("crops_earlier", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def earlier(rev: str):
    """(pipeline, verify) as they were at ``rev``, each calling the other, with that revision's regions."""
    old_verify, old_crops = _module(rev, "verify"), _crops(rev)
    old_pipeline = _module(rev, "pipeline")
    old_pipeline.verify = old_verify
    old_pipeline.REGION_BOXES, old_pipeline.TURNS = old_crops.REGION_BOXES, old_crops.TURNS
    search = old_pipeline.search
    old_pipeline.search = lambda *a, deadline=None, **kw: search(*a, **kw)  # before search budgets
    return old_pipeline, old_verify


async def main(rev: str, n: int, only: set[str]) -> None:
    from simserve.index.collection import Collections
    from simserve.inference.engine import load_engine
    from simserve.serve.config import ServerConfig
    from simserve.serve.service import ImageRef, Service

    cs, photos = pickle.loads((RUNS / "copyset-detail8.pkl").read_bytes())
    svc = Service(load_engine(None), Collections(RUNS / "col-detail8"), ServerConfig(collection="bench", search_budget_ms=0))
    variants = {rev: earlier(rev), "checkout": (pipeline, verify)}
    qs = [q for q in cs.queries if not only or q.transform in only]
    qs = random.Random(0).sample(qs, min(n, len(qs)))
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
        ph = sc.get("photographs", {})
        print(
            f"{name}: p50 {statistics.median(ms[name]):.1f} ms, p90 {np.percentile(ms[name], 90):.1f}, p99 {np.percentile(ms[name], 99):.1f}, "
            f"mean {np.mean(ms[name]):.1f}; recall@1 {sc['recall@1']:.3f}, µAP {sc['micro_ap']:.3f}; photographs {ph.get('recall@1', float('nan')):.3f} / "
            f"{ph.get('micro_ap', float('nan')):.3f}; per transform {sc['per_transform_recall@1']}"
        )
    print(f"per query, checkout / {rev} (median): {statistics.median(np.array(ms['checkout']) / np.array(ms[rev])):.3f}")
    same = np.mean([bool(a) and bool(b) and a[0][0] == b[0][0] for a, b in zip(hits[rev], hits["checkout"])])
    print(f"same first hit: {same:.3f}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 400, set(sys.argv[3].split(",")) if len(sys.argv) > 3 else set()))
