"""How many inliers the calibrated score should set apart as free (calibration.FREE_INLIERS): the
views+inliers model refitted on the calibration set's evidence with each number set apart, and
every benchmark query's captured shortlist re-scored by it, side by side.

Both inputs are cached under runs/bench/: the calibration set's evidence rows (``simserve
calibrate``'s, ~6 min on 2 cores; the bundle is not written) and each query's shortlist with its
evidence (key, cosine, inliers) as the default search leaves it with no budget (~2 min at 100k;
needs the caches scripts/bench-copydetect-100k.py makes). Delete them to measure changed code.

    python scripts/rescore-free-inliers.py [--collection col-100k] [--free 0,2,3,4,5,6]
"""

import argparse
import asyncio
import pickle
from pathlib import Path

import numpy as np

from simserve.bench.copydetect import score
from simserve.ranking import pipeline
from simserve.ranking.calibration import fit

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"


def calibration_rows() -> np.ndarray:
    path = RUNS / "calibration-rows.npz"
    if not path.exists():
        from simserve.bench import calibrate

        calibrate.run(None, rows_out=path)
    return np.load(path)["views_inliers"]  # score, inliers, head, label, query


async def _capture(collection: str) -> list:
    from simserve.index.collection import Collections
    from simserve.inference.engine import load_engine
    from simserve.serve.config import ServerConfig
    from simserve.serve.service import ImageRef, Service

    cs, _ = pickle.loads((RUNS / "copyset-detail8.pkl").read_bytes())
    seen: list = []
    shortlist = pipeline.shortlist

    def keep(*a, **kw):
        hits, evidence = shortlist(*a, **kw)
        seen.append([(h.key, h.cosine, h.inliers) for h in hits])
        return hits, evidence

    pipeline.shortlist = keep
    try:
        svc = Service(load_engine(None), Collections(RUNS / collection), ServerConfig(collection="bench", search_budget_ms=0))
        rows = []
        for q in cs.queries:
            await svc.search(ImageRef(data=q.data), "bench", 10, 0, {}, None)
            rows.append(((q.name, q.transform, q.truth), seen.pop()))
        svc.close()
    finally:
        pipeline.shortlist = shortlist
    return rows


def shortlists(collection: str) -> list:
    path = RUNS / f"shortlists-{collection}.pkl"
    if not path.exists():
        path.write_bytes(pickle.dumps(asyncio.run(_capture(collection))))
    return pickle.loads(path.read_bytes())


class _Query:  # what bench.copydetect.score reads of a query
    def __init__(self, name: str, transform: str, truth: str | None) -> None:
        self.name, self.transform, self.truth = name, transform, truth


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--collection", default="col-100k", help="a collection folder under runs/bench/")
    p.add_argument("--free", default="0,2,3,4,5,6", help="comma-separated numbers of inliers set apart")
    a = p.parse_args()
    ev, rows = calibration_rows(), shortlists(a.collection)
    _, photographs = pickle.loads((RUNS / "copyset-detail8.pkl").read_bytes())
    queries = [_Query(*q) for q, _ in rows]
    for free in (float(f) for f in a.free.split(",")):
        cal = fit(ev[:, 0], ev[:, 1], ev[:, 3], free=free)
        hits = []
        for _, short in rows:
            cosine, n = np.array([c for _, c, _ in short]), np.array([i or 0 for _, _, i in short])
            prob = cal.probability(cosine, n) if short else np.zeros(0)
            hits.append([(short[j][0], float(prob[j])) for j in np.argsort(-prob, kind="stable")[:10]])
        s = score(queries, hits, photographs)
        print(f"free {free:g}: recall@1 {s['recall@1']:.4f} µAP {s['micro_ap']:.4f} photographs {s['photographs']['recall@1']:.4f} / {s['photographs']['micro_ap']:.4f}")
