"""A timeline of single searches: when each engine pass, index scan, keypoint read, region's
points and inlier count starts and ends, on which thread, in ms from the search's start; to see
where a slow query's wall time goes (which phase waits on which).

Needs the caches scripts/bench-copydetect-100k.py makes under runs/bench/.

    python scripts/trace-search.py COLLECTION QUERY_NAME [QUERY_NAME ...] [--budget-ms MS]

e.g. ``python scripts/trace-search.py col-100k 'Dragonfly_by_Bolly/ref4~crop_paste'``.
"""

import argparse
import asyncio
import pickle
import threading
import time
from pathlib import Path

from simserve.ranking import verify

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"
_events: list[tuple[float, float, str, str]] = []  # start, end, thread, what
_lock = threading.Lock()


def _trace(owner, name: str, label) -> None:
    """Replaces ``owner.name`` with itself, logging its start and end under ``label(result, *args)``."""
    f = getattr(owner, name)

    def traced(*a, **kw):
        start = time.perf_counter()
        out = f(*a, **kw)
        with _lock:
            _events.append((start, time.perf_counter(), threading.current_thread().name, label(out, *a, **kw)))
        return out

    setattr(owner, name, traced)


async def main(collection: str, names: list[str], budget_ms: float) -> None:
    from simserve.index.collection import Collection, Collections
    from simserve.inference.engine import Engine, load_engine
    from simserve.serve.config import ServerConfig
    from simserve.serve.service import ImageRef, Service

    _trace(Engine, "embed", lambda out, self, x, *a, **kw: f"engine {tuple(x.shape)}")
    _trace(Collection, "search", lambda out, self, v, k, *a, **kw: f"scan {len(v)} x {k}")
    _trace(Collection, "keypoints", lambda out, self, ids: f"keypoints read {len(ids)}")
    _trace(verify, "query_features", lambda out, *a, **kw: "query keypoints")
    _trace(verify, "inliers", lambda out, q, s, enough=0: f"inliers {'region' if len(q) == 1 else 'whole'} -> {out}")
    _trace(verify, "part_inliers", lambda out, *a: f"part inliers -> {out}")
    _trace(verify.QueryFeatures, "region", lambda out, self, box: f"region points {box}")
    _trace(verify.QueryFeatures, "mirrored", lambda out, self: "mirrored points")

    cs, _ = pickle.loads((RUNS / "copyset-detail8.pkl").read_bytes())
    by_name = {q.name: q for q in cs.queries}
    svc = Service(load_engine(None), Collections(RUNS / collection), ServerConfig(collection="bench", search_budget_ms=budget_ms))
    await svc.search(ImageRef(data=cs.queries[0].data), "bench", 10, 0, {}, None)  # warm
    for name in names:
        q = by_name[name]
        _events.clear()
        t0 = time.perf_counter()
        hits = await svc.search(ImageRef(data=q.data), "bench", 10, 0, {}, None)
        took = (time.perf_counter() - t0) * 1000
        first = f"{hits[0].key} {hits[0].score:.3f}" if hits else "nothing"
        print(f"\n{name} (truth {q.truth}): {took:.1f} ms, first {first}")
        for start, end, thread, what in sorted(_events):
            print(f"  {(start - t0) * 1000:7.1f} {(end - t0) * 1000:7.1f}  {thread[:14]:14s} {what}")
    svc.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("collection", help="a collection folder under runs/bench/ (col-detail8: 10,100 items; col-100k)")
    p.add_argument("names", nargs="+", help="query names as the copydetect set has them")
    p.add_argument("--budget-ms", type=float, default=0, help="the service's search budget (0: none)")
    a = p.parse_args()
    asyncio.run(main(a.collection, a.names, a.budget_ms))
