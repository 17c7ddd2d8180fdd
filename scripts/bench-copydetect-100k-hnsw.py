"""The copydetect set searched at 10,100 items (Flat) and at 100,100 as Flat and as HNSW32, each query in all three in rotating order (docs/decisions/graph-index-for-copies.md).

Needs the collections scripts/bench-copydetect-100k.py caches under runs/bench/, and a copy of col-100k as col-100k-hnsw with "factory": "HNSW32" in its collection.json (its index is rebuilt on opening).

    python scripts/bench-copydetect-100k-hnsw.py N_QUERIES OUT.json
"""

import asyncio, json, pickle, statistics, sys, time
from pathlib import Path
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simserve.bench.copydetect import score

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"


async def main(n, out):
    from simserve.index.collection import Collections
    from simserve.inference.engine import load_engine
    from simserve.serve.config import ServerConfig
    from simserve.serve.service import ImageRef, Service

    cs, photos = pickle.loads((RUNS / "copyset-detail8.pkl").read_bytes())
    engine = load_engine(None)
    names = {"10k-flat": "col-detail8", "100k-flat": "col-100k", "100k-hnsw": "col-100k-hnsw"}
    svcs = {}
    for k, d in names.items():
        t = time.perf_counter()
        svcs[k] = Service(engine, Collections(RUNS / d), ServerConfig(collection="bench"))
        print(k, await svcs[k].count("bench"), f"open {time.perf_counter() - t:.1f}s", flush=True)
    col = svcs["100k-hnsw"].collection("bench")
    print("hnsw index", type(col.index.index.index).__name__, col.index.ntotal, flush=True)
    qs = cs.queries[:: max(1, len(cs.queries) // n)][:n] if n < len(cs.queries) else cs.queries
    for s in svcs.values():
        await s.search(ImageRef(data=qs[0].data), "bench", 10, 0, {}, None)
    rows = []
    order = list(svcs)
    for i, q in enumerate(qs):
        r = {}
        for name in order[i % 3 :] + order[: i % 3]:
            t = time.perf_counter()
            hits = await svcs[name].search(ImageRef(data=q.data), "bench", 10, 0, {}, None)
            r[name] = ((time.perf_counter() - t) * 1000, [(h.key, h.score) for h in hits])
        rows.append(r)
        if i % 200 == 0:
            print(i, flush=True)
    res = {}
    for name in svcs:
        ms = np.array([r[name][0] for r in rows])
        sc = score(qs, [r[name][1] for r in rows], photos)
        res[name] = {
            "recall@1": sc["recall@1"],
            "micro_ap": sc["micro_ap"],
            "photographs": sc["photographs"],
            "p50": statistics.median(ms),
            "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)),
        }
        print(name, json.dumps(res[name]))
    res["ratio_hnsw_over_flat_100k"] = float(np.median([r["100k-hnsw"][0] / r["100k-flat"][0] for r in rows]))
    res["ratio_hnsw100k_over_flat10k"] = float(np.median([r["100k-hnsw"][0] / r["10k-flat"][0] for r in rows]))
    same = np.mean([r["100k-hnsw"][1][:1] == r["100k-flat"][1][:1] or (r["100k-hnsw"][1][:1] and r["100k-flat"][1][:1] and r["100k-hnsw"][1][0][0] == r["100k-flat"][1][0][0]) for r in rows])
    res["same_first_key_hnsw_vs_flat"] = float(same)
    print({k: v for k, v in res.items() if k.startswith(("ratio", "same"))})
    Path(out).write_text(json.dumps(res, indent=1))


asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
