"""Where a search's CPU goes: thread CPU clocked around the verification's, the engine's and the
index's functions, for queries searched one at a time, unbudgeted. Calls nest (a coarse or full
``_inliers`` holds its ORB and SIFT matching and its RANSAC), so the rows overlap; the process CPU
a query is printed too. Figures in docs/decisions/search-budget.md ("Where an uncertain search's
CPU goes now").

Needs the caches scripts/bench-copydetect-100k.py makes under runs/bench/.

    python scripts/profile-search.py COLLECTION N_QUERIES [TRANSFORMS]

e.g. ``python scripts/profile-search.py col-100k 120 crop_25,crop_paste,crop_colour_text,paste_into,rotate_90``.
"""

import argparse
import asyncio
import collections
import pickle
import random
import threading
import time
from pathlib import Path

import numpy as np

from simserve.ranking import verify

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"
_spent: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])  # name -> [calls, thread CPU seconds]
_lock = threading.Lock()


def _clock(owner, name: str, label=None) -> None:
    """Replaces ``owner.name`` with itself timed by thread CPU, under ``label(*args)`` or ``name``."""
    f = getattr(owner, name)

    def timed(*a, **kw):
        start = time.thread_time()
        try:
            return f(*a, **kw)
        finally:
            with _lock:
                row = _spent[label(*a, **kw) if label else name]
                row[0] += 1
                row[1] += time.thread_time() - start

    setattr(owner, name, timed)


async def main(collection: str, n: int, transforms: str) -> None:
    import cv2

    from simserve.index.collection import Collection, Collections
    from simserve.inference.engine import Engine, load_engine
    from simserve.serve.config import ServerConfig
    from simserve.serve.service import ImageRef, Service

    _clock(verify, "_inliers", lambda q, s, least=0, iters=1000: "_inliers coarse" if iters == verify.COARSE_ITERS else "_inliers full")
    for name in ("_sift_pairs", "_orb_pairs", "unpack", "part_inliers", "within", "query_features"):
        _clock(verify, name)
    _clock(verify.QueryFeatures, "region", lambda *a: "region points found again")
    _clock(verify.QueryFeatures, "mirrored", lambda *a: "mirrored points")
    _clock(Engine, "embed", lambda *a: "engine")
    _clock(Collection, "search", lambda *a, **kw: "index scan + store read")
    _clock(Collection, "keypoints", lambda *a: "keypoints read")

    class Cv2:  # RANSAC is OpenCV's, called through verify._cv2()
        def __getattr__(self, attr):
            return getattr(cv2, attr)

    ransac = Cv2()
    _clock(cv2, "estimateAffine2D", lambda *a, **kw: "RANSAC")
    verify._cv2 = lambda: ransac

    cs, photos = pickle.loads((RUNS / "copyset-detail8.pkl").read_bytes())
    keep = set(filter(None, transforms.split(",")))
    queries = random.Random(0).sample([q for q in cs.queries if not keep or q.transform in keep], n)
    svc = Service(load_engine(None), Collections(RUNS / collection), ServerConfig(collection="bench", search_budget_ms=0))
    await svc.search(ImageRef(data=queries[0].data), "bench", 10, 0, {}, None)  # warm
    _spent.clear()
    wall, cpu = [], []
    for q in queries:
        t, c = time.perf_counter(), time.process_time()
        await svc.search(ImageRef(data=q.data), "bench", 10, 0, {}, None)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    svc.close()
    print(f"{n} queries: wall mean {np.mean(wall) * 1e3:.1f} ms, process CPU mean {np.mean(cpu) * 1e3:.1f} ms a query ({np.sum(cpu) / np.sum(wall):.2f} cores)")
    for name, (calls, seconds) in sorted(_spent.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:28s} {calls / n:7.1f} calls  {seconds * 1e3 / n:7.1f} ms a query  {seconds * 1e3 / max(calls, 1):.3f} ms a call")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("collection", help="a collection folder under runs/bench/ (col-detail8: 10,100 items; col-100k)")
    p.add_argument("n", type=int, help="queries drawn at random from the set")
    p.add_argument("transforms", nargs="?", default="", help="only these transforms' queries (comma-separated)")
    args = p.parse_args()
    asyncio.run(main(args.collection, args.n, args.transforms))
