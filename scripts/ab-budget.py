"""Search budgets side by side: each of N random queries of the copydetect set (seed 0) searched
under every budget in turn (the order rotating), so the machine's noise falls on all alike.

Needs the caches scripts/bench-copydetect-100k.py makes under runs/bench/ (the set, and the
collection named by --collection: col-detail8 holds 10,100 items, col-100k 100,100).

    python scripts/ab-budget.py [--collection col-100k] [--n 600] [--budgets 0,90,150,250]
"""

import argparse
import asyncio
import pickle
import random
import statistics
from pathlib import Path

import numpy as np

from simserve.bench.copydetect import score

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"


async def main(collection: str, n: int, budgets: list[float]) -> None:
    import time

    from simserve.index.collection import Collections
    from simserve.inference.engine import load_engine
    from simserve.serve.config import ServerConfig
    from simserve.serve.service import ImageRef, Service

    cs, photos = pickle.loads((RUNS / "copyset-detail8.pkl").read_bytes())
    svc = Service(load_engine(None), Collections(RUNS / collection), ServerConfig(collection="bench"))
    queries = random.Random(0).sample(list(cs.queries), min(n, len(cs.queries)))
    await svc.search(ImageRef(data=queries[0].data), "bench", 10, 0, {}, None)
    ms = {b: [] for b in budgets}
    hits = {b: [] for b in budgets}
    for i, q in enumerate(queries):
        for b in budgets[i % len(budgets) :] + budgets[: i % len(budgets)]:
            svc.config.search_budget_ms = b
            t = time.perf_counter()
            found = await svc.search(ImageRef(data=q.data), "bench", 10, 0, {}, None)
            ms[b].append((time.perf_counter() - t) * 1000)
            hits[b].append([(h.key, h.score) for h in found])
    svc.close()
    for b in budgets:
        s, m = score(queries, hits[b], photos), ms[b]
        print(
            f"budget {b:g} ms: p50 {statistics.median(m):.1f} p90 {np.percentile(m, 90):.1f} p99 {np.percentile(m, 99):.1f}; "
            f"recall@1 {s['recall@1']:.3f} µAP {s['micro_ap']:.3f} photographs {s['photographs']['recall@1']:.3f} / {s['photographs']['micro_ap']:.3f}"
        )
    first = budgets[0]
    for b in budgets[1:]:
        same = sum(bool(x) == bool(y) and (not x or x[0][0] == y[0][0]) for x, y in zip(hits[first], hits[b]))
        print(f"budget {b:g} against {first:g}: per query median {np.median(np.array(ms[b]) / np.array(ms[first])):.3f}x, same first hit {same}/{len(queries)}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--collection", default="col-100k")
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--budgets", default="0,90,150,250", help="comma-separated milliseconds; 0 is no budget")
    a = p.parse_args()
    asyncio.run(main(a.collection, a.n, [float(x) for x in a.budgets.split(",")]))
