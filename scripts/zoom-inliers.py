"""Offline, what the query's zoomed-out side (verify.QueryFeatures.zoomed) finds at each scale:
how often a photograph's copy reaches 10 inliers with its original, by transform, with the given
and mirrored sides alone and with the zoomed side at each of --scales; and how often the hardest
negatives (the first 5 non-copies of each query's shortlist) reach 6.

Needs the caches scripts/bench-copydetect-100k.py and scripts/rescore-free-inliers.py make under
runs/bench/ (the set, the 100k collection, and its shortlists).

    python scripts/zoom-inliers.py [--n 600] [--scales 0.6,0.7,0.8]
"""

import argparse
import collections
import pickle
import sqlite3
from pathlib import Path

import numpy as np

from simserve.ranking import verify

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=600, help="queries drawn at random (seed 0) from the photographs' and the copy-less")
    p.add_argument("--scales", default="0.6,0.7,0.8", help="comma-separated fractions of the keypoints' size")
    a = p.parse_args()
    scales = [float(s) for s in a.scales.split(",")]
    cs, photographs = pickle.loads((RUNS / "copyset-detail8.pkl").read_bytes())
    by_name = {q.name: q for q in cs.queries}
    rows = [r for r in pickle.loads((RUNS / "shortlists-col-100k.pkl").read_bytes()) if r[0][0].split("/")[0] in photographs or r[0][2] is None]
    db = sqlite3.connect(RUNS / "col-100k" / "collections" / "bench" / "items.sqlite")

    def stored(key: str) -> verify.LocalFeatures:
        return verify.unpack(db.execute("SELECT keypoints FROM items WHERE key = ?", (key,)).fetchone()[0])

    copies, negatives = collections.defaultdict(list), []
    for i in np.random.default_rng(0).choice(len(rows), min(a.n, len(rows)), replace=False):
        (name, transform, truth), short = rows[i]
        image = verify.decode(by_name[name].data)
        sides = []
        for s in scales:  # a side's scale is read when it is found: one QueryFeatures a scale
            verify.ZOOM_OUT = s
            sides.append(verify.query_features(image).zoomed())
        q = verify.query_features(image)

        def counts(key: str) -> list[int]:
            st = stored(key)
            return [verify.inliers(q[:2], st), *(verify._inliers(z, st) for z in sides)]

        if truth:
            copies[transform].append(counts(truth))
        negatives += [counts(k) for k, _, _ in short[:6] if k != truth][:5]
    head = "given + mirrored, " + ", ".join(f"+ zoomed {s:g}" for s in scales)
    print(f"copies reaching 10 inliers ({head}):")
    for t, v in sorted(copies.items()) + [("all", [c for v in copies.values() for c in v])]:
        v = np.array(v)
        print(f"  {t:18s} {len(v):4d}  " + "  ".join(f"{np.mean(np.maximum(v[:, 0], v[:, j]) >= 10):.3f}" for j in range(v.shape[1])))
    n = np.array(negatives)
    print(f"hard negatives reaching 6 ({len(n)}): " + "  ".join(f"{np.mean(np.maximum(n[:, 0], n[:, j]) >= 6):.3f}" for j in range(n.shape[1])))
