"""Operating points from scores: where to put a threshold, and what it keeps.

numpy only: training picks a bundle's threshold with it, the benchmarks
compare methods with it.
"""

from __future__ import annotations

import numpy as np


def threshold_at_precision(scores: np.ndarray, labels: np.ndarray, target: float = 0.99) -> dict[str, float]:
    """The lowest threshold whose precision is still >= ``target``, and the recall it keeps.

    For copy detection a false match costs more than a miss, so this, not the
    best-accuracy threshold, is what a bundle suggests."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    precision = tp[last] / (last + 1)
    ok = np.flatnonzero(precision >= target)
    if not len(ok):
        return {"threshold": float(s[0]) + 1e-6, "precision": 1.0, "recall": 0.0}
    i = last[ok[-1]]
    return {"threshold": float(s[i]), "precision": float(tp[i] / (i + 1)), "recall": float(tp[i] / max(1, y.sum()))}
