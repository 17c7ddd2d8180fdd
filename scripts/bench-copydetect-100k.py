"""The default configuration's search at 10,100 and at 100,100 items, side by side; at 100,100 also
with no search budget (every candidate verified, however long it takes).

The copydetect set (simserve bench copydetect's, seed 0: 100 references, 10,000 distractors, 1,884
queries) is indexed once; a copy of that collection is grown by 90,000 more distractors (random
crops of its distractors, so still cut only from the benchmark's distractor regions), and each
query is searched in both, in turn, so the machine's noise falls on both alike. Caches the set and
both collections under runs/bench/ (an interrupted run resumes its adds). About an hour on 2 cores.

    python scripts/bench-copydetect-100k.py [--out docs/bench/copydetect-100k.json]
"""

import argparse
import asyncio
import io
import json
import math
import pickle
import random
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from simserve.bench.copydetect import score
from simserve.bench.copyset import TRANSFORMS, build
from simserve.photos import scenes as photo_scenes

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"
EXTRA = 90_000


def copy_set():
    cache = RUNS / "copyset-detail8.pkl"
    if not cache.exists():
        chosen = photo_scenes("eval")
        if not chosen:
            raise SystemExit("no benchmark photos installed: run scripts/install-data.sh --photos")
        photos = frozenset(s.name for s in chosen if getattr(s, "photograph", False))
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps((build(chosen, refs_per_scene=8, distractors=10_000, transforms=tuple(TRANSFORMS), seed=0), photos)))
    return pickle.loads(cache.read_bytes())


def extra(i: int, cs) -> tuple[str, bytes, None]:
    """Extra distractor i: a 30-100% crop of a distractor, drawn from its own seed."""
    rng, keys = random.Random(f"7:{i}"), sorted(cs.distractors)
    src = Image.open(io.BytesIO(cs.distractors[keys[rng.randrange(len(keys))]])).convert("RGB")
    area, aspect = rng.uniform(0.3, 1.0), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = min(src.width, round(src.width * math.sqrt(area * aspect))), min(src.height, round(src.height * math.sqrt(area / aspect)))
    x, y = rng.randint(0, src.width - w), rng.randint(0, src.height - h)
    buf = io.BytesIO()
    src.crop((x, y, x + w, y + h)).save(buf, "JPEG", quality=90)
    return f"extra{i:06d}", buf.getvalue(), None


async def main(out: str | None, budget_ms: float | None = None) -> None:
    from simserve.index.collection import Collections
    from simserve.inference.engine import load_engine
    from simserve.serve.config import ServerConfig
    from simserve.serve.service import ImageRef, Service

    cs, photos = copy_set()
    engine, small_root, big_root = load_engine(None), RUNS / "col-detail8", RUNS / "col-100k"
    base = len(cs.references) + len(cs.distractors)
    small = Service(engine, Collections(small_root), ServerConfig(collection="bench"))
    if await small.count("bench") < base:  # a first run: index the set
        items = [(k, v, None) for k, v in {**cs.references, **cs.distractors}.items()]
        for s in range(0, len(items), 32):
            await small.add("bench", items[s : s + 32], None)
    small.close()
    if not big_root.exists():
        shutil.copytree(small_root, big_root)
    cuts = {"10100": [], "100100": []}
    small, big = (Service(engine, Collections(r), ServerConfig(collection="bench"), on_cut=lambda n=n: cuts[n].append(1)) for n, r in (("10100", small_root), ("100100", big_root)))
    budget = big.config.search_budget_ms if budget_ms is None else budget_ms
    runs = (("10100", small, budget), ("100100", big, budget), ("100100-unbudgeted", big, 0.0))
    t, start = time.perf_counter(), await big.count("bench") - base
    for s in range(start, EXTRA, 32):
        await big.add("bench", [extra(i, cs) for i in range(s, min(s + 32, EXTRA))], None)
        if s % 3200 == 0:
            print(f"added {s + 32}: {(time.perf_counter() - t) * 1000 / (s + 32 - start):.1f} ms/item", flush=True)
    rows = []
    for i, q in enumerate(cs.queries):
        r = {"truth": q.truth}
        for name, svc, ms in runs[i % 3 :] + runs[: i % 3]:
            svc.config.search_budget_ms = ms
            t = time.perf_counter()
            hits = await svc.search(ImageRef(data=q.data), "bench", 10, 0, {}, None)
            r[name] = ((time.perf_counter() - t) * 1000, [(h.key, h.score) for h in hits])
        rows.append(r)
    small.close()
    big.close()
    result = {"runs": {}, "median_per_query_ratio": float(np.median([r["100100"][0] / r["10100"][0] for r in rows])), "budget_ms": budget}
    for name, _, ms_budget in runs:
        ms = np.array([r[name][0] for r in rows])
        certain = np.array([bool(r[name][1]) and r[name][1][0][1] >= 0.99 for r in rows])
        sc = score(cs.queries, [r[name][1] for r in rows], photos)
        result["runs"][name] = {
            **{k: sc[k] for k in ("recall@1", "micro_ap", "photographs", "per_transform_recall@1")},
            "search_budget_ms": ms_budget, "searches_cut": len(cuts[name]) / len(rows) if name in cuts else 0.0,
            "search_p50_ms": statistics.median(ms), "search_p90_ms": float(np.percentile(ms, 90)), "search_p99_ms": float(np.percentile(ms, 99)),
            "share_certain": float(certain.mean()), "p50_ms_certain": float(np.median(ms[certain])), "p50_ms_rest": float(np.median(ms[~certain])),
        }
        print(name, json.dumps({k: v for k, v in result["runs"][name].items() if k not in ("photographs", "per_transform_recall@1")}))
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the figures here as JSON")
    p.add_argument("--budget-ms", type=float, help="the search budget of the budgeted runs (default: the server's)")
    a = p.parse_args()
    asyncio.run(main(a.out, a.budget_ms))
