"""Search latency and quality of a few variants of the running code, side by side: each query is
searched under every variant in turn (the order rotating), so the machine's noise falls on all
alike. A variants module defines ``VARIANTS = {name: switch}``, each ``switch(service)`` putting
that variant in place (monkeypatching what it changes); the first variant is the baseline of the
per-query ratios. Queries are drawn at random (seed 0) from the copydetect set: the set lists each
scene's transforms in a fixed order, so every k-th query is not a fair sample.

Needs the caches scripts/bench-copydetect-100k.py makes under runs/bench/.

    python scripts/ab-variants.py COLLECTION N_QUERIES VARIANTS_MODULE [--budget-ms MS] [--transforms a,b]

e.g. ``python scripts/ab-variants.py col-100k 400 scripts/variants/exact_scan.py --budget-ms 0``.
"""

import argparse
import asyncio
import importlib.util
import pickle
import random
import statistics
import time
from pathlib import Path

import numpy as np

from simserve.bench.copydetect import score

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"


async def compare(collection: str, n: int, variants: dict, budget_ms: float = 0, transforms: str = "", dump: str = "") -> None:
    """Each of ``n`` random queries searched under every variant in turn; prints the figures, and
    with ``dump`` pickles each query's (name, transform, truth) with each variant's ms and hits."""
    from simserve.index.collection import Collections
    from simserve.inference.engine import load_engine
    from simserve.serve.config import ServerConfig
    from simserve.serve.service import ImageRef, Service

    cs, photos = pickle.loads((RUNS / "copyset-detail8.pkl").read_bytes())
    keep = set(filter(None, transforms.split(",")))
    queries = [q for q in cs.queries if not keep or q.transform in keep]
    queries = random.Random(0).sample(queries, min(n, len(queries)))
    svc = Service(load_engine(None), Collections(RUNS / collection), ServerConfig(collection="bench", search_budget_ms=budget_ms))
    await svc.search(ImageRef(data=queries[0].data), "bench", 10, 0, {}, None)  # warm
    names = list(variants)
    ms: dict[str, list[float]] = {n: [] for n in names}
    hits: dict[str, list] = {n: [] for n in names}
    for i, q in enumerate(queries):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            variants[name](svc)
            t = time.perf_counter()
            found = await svc.search(ImageRef(data=q.data), "bench", 10, 0, {}, None)
            ms[name].append((time.perf_counter() - t) * 1000)
            hits[name].append([(h.key, h.score) for h in found])
    svc.close()
    if dump:
        Path(dump).write_bytes(pickle.dumps({"queries": [(q.name, q.transform, q.truth) for q in queries], "ms": ms, "hits": hits}))
    for name in names:
        sc, m = score(queries, hits[name], photos), ms[name]
        print(
            f"{name}: p50 {statistics.median(m):.1f} p90 {np.percentile(m, 90):.1f} p99 {np.percentile(m, 99):.1f} mean {np.mean(m):.1f} ms; "
            f"recall@1 {sc['recall@1']:.3f} µAP {sc['micro_ap']:.3f} photographs {sc['photographs']['recall@1']:.3f} / {sc['photographs']['micro_ap']:.3f}"
        )
    per = {name: score(queries, hits[name], photos)["per_transform_recall@1"] for name in names}
    print("recall@1 by transform: " + ", ".join(names))
    for t in sorted(per[names[0]]):
        row = [per[name].get(t) for name in names]
        if any(r != row[0] for r in row):
            print(f"  {t}: " + " ".join(f"{r:.2f}" for r in row))
    base = names[0]
    for name in names[1:]:
        r = np.array(ms[name]) / np.array(ms[base])
        same = sum(bool(a and b and a[0][0] == b[0][0]) or (not a and not b) for a, b in zip(hits[base], hits[name]))
        print(f"per query {name}/{base}: median {np.median(r):.3f} mean {r.mean():.3f}; same first hit {same}/{len(queries)}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("collection", help="a collection folder under runs/bench/ (col-detail8: 10,100 items; col-100k)")
    p.add_argument("n", type=int, help="queries drawn at random from the set")
    p.add_argument("variants", help="a Python file defining VARIANTS = {name: switch(service)}")
    p.add_argument("--budget-ms", type=int, default=0, help="the service's search budget (0: none, to compare CPU cost)")
    p.add_argument("--transforms", default="", help="only these transforms' queries (comma-separated)")
    p.add_argument("--dump", default="", help="pickle each query's figures under every variant to this file")
    args = p.parse_args()
    spec = importlib.util.spec_from_file_location("variants", args.variants)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    asyncio.run(compare(args.collection, args.n, module.VARIANTS, args.budget_ms, args.transforms, args.dump))
