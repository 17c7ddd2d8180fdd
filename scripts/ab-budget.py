"""Search budgets side by side: each of N random queries of the copydetect set (seed 0) searched
under every budget in turn (the order rotating), so the machine's noise falls on all alike; the
first budget is the baseline of the per-query ratios (scripts/ab-variants.py, with budgets as
the variants).

Needs the caches scripts/bench-copydetect-100k.py makes under runs/bench/ (the set, and the
collection named by --collection: col-detail8 holds 10,100 items, col-100k 100,100).

    python scripts/ab-budget.py [--collection col-100k] [--n 600] [--budgets 0,90,150,250]
"""

import argparse
import asyncio
import dataclasses
import importlib.util
from pathlib import Path


def _budget(ms: float):
    def switch(service) -> None:
        service.config = dataclasses.replace(service.config, search_budget_ms=ms)

    return switch


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--collection", default="col-100k")
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--budgets", default="0,90,150,250", help="comma-separated milliseconds; 0 is no budget")
    p.add_argument("--transforms", default="", help="only these transforms' queries (comma-separated)")
    p.add_argument("--dump", default="", help="pickle each query's figures under every budget to this file")
    a = p.parse_args()
    spec = importlib.util.spec_from_file_location("ab_variants", Path(__file__).with_name("ab-variants.py"))
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    asyncio.run(ab.compare(a.collection, a.n, {f"budget {float(b):g} ms": _budget(float(b)) for b in a.budgets.split(",")}, transforms=a.transforms, dump=a.dump))
