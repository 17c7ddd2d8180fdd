"""Operating points from scores, and scores that are probabilities.

numpy only: training picks a bundle's threshold with it, the benchmarks compare methods with it,
and a search turns its evidence about a candidate into P(copy) with a bundle's ``Calibration``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

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


# What a search knows about a candidate, by collection configuration: the embedding score
# (pooled, or re-scored by crop views) and, when verified, the inlier count; a pair (ScorePairs,
# compare) also has the fusion head's score, which a search computes only when asked to re-rank.
def evidence_key(crop_views: bool, inliers: bool, head: bool = False) -> str:
    return ("views" if crop_views else "pooled") + ("+inliers" if inliers else "") + ("+head" if head else "")


PAIR = evidence_key(False, True, head=True)  # what ScorePairs and compare decide by, when the bundle has it


def head_logit(score: float | np.ndarray) -> np.ndarray:
    """The fusion head's score as log-odds: the scale a logistic model adds evidence on."""
    p = np.clip(np.asarray(score, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


@dataclass(frozen=True)
class Calibration:
    """P(the candidate is a copy of the query) from the evidence a search has about it:
    logistic in the score and the inlier count, fitted on copies of photos no benchmark uses
    (``simserve calibrate``). ``threshold``: the lowest probability at precision 0.99 there.

    Linear in the count: the chance that n matches agree with one affine map by accident falls
    geometrically with n, so each inlier multiplies the odds alike; log1p(n) and sqrt(n) ranked
    copies worse. Counted past ``free``: an affine map passes through any three matches, so the
    first three inliers are no evidence (docs/decisions/calibrated-score.md)."""

    bias: float
    score: float
    inliers: float = 0.0
    threshold: float = 0.5
    head: float = 0.0  # weight of the head's log-odds (``head_logit``), in a pair's model
    free: float = 0.0  # inliers that count nothing (a calibration fitted before they were set apart: none)

    def probability(self, score: float | np.ndarray, inliers: int | np.ndarray | None = None, head: float | np.ndarray | None = None) -> np.ndarray:
        """``head``: the fusion head's score in [0, 1], for a model fitted with it."""
        z = self.bias + self.score * np.asarray(score, np.float64)
        if inliers is not None:
            z = z + self.inliers * counted(inliers, self.free)
        if head is not None and self.head:
            z = z + self.head * head_logit(head)
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))

    def to_dict(self) -> dict[str, float]:
        return {"bias": self.bias, "score": self.score, "inliers": self.inliers, "head": self.head, "free_inliers": self.free, "threshold": self.threshold}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        vals = {k: d.get(k, 0.0) for k in ("bias", "score", "inliers", "head", "free_inliers")}
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals.values()):
            raise ValueError(f"calibration {d!r}: bias, score, inliers, head and free_inliers must be finite numbers")
        if vals["free_inliers"] < 0:
            raise ValueError(f"calibration free_inliers {vals['free_inliers']!r} must not be negative")
        thr = d.get("threshold", 0.5)
        if not isinstance(thr, (int, float)) or isinstance(thr, bool) or not 0.0 <= thr <= 1.0:
            raise ValueError(f"calibration threshold {thr!r} must be a number in [0, 1]")
        return cls(float(vals["bias"]), float(vals["score"]), float(vals["inliers"]), float(thr), float(vals["head"]), float(vals["free_inliers"]))


# What ``fit`` sets apart by default: the three matches any affine map passes through. On the
# benchmark's 1,884 queries at 100k, refitted on the calibration set with 0, 2-6 set apart:
# photographs 0.980 at 0 and 4, 0.981 at 2 and 3, 0.979 at 5 (scripts/rescore-free-inliers.py;
# docs/decisions/calibrated-score.md).
FREE_INLIERS = 3


def counted(inliers: int | np.ndarray, free: float) -> np.ndarray:
    """Inlier counts as evidence: those past ``free`` (no count, or a negative one, is none)."""
    return np.maximum(np.asarray(inliers, np.float64) - free, 0)


def fit(
    score: np.ndarray, inliers: np.ndarray | None, labels: np.ndarray, l2: float = 1.0, head: np.ndarray | None = None, free: float = FREE_INLIERS,
) -> Calibration:
    """Logistic regression by Newton's method (a handful of steps; up to four weights), and the
    threshold at precision 0.99 of the probabilities it gives on the same candidates. ``head``:
    the fusion head's scores, for a pair's model (with inliers); ``free``: inliers that count
    nothing."""
    y = np.asarray(labels, np.float64)
    cols = [np.ones_like(y), np.asarray(score, np.float64)]
    free = float(free) if inliers is not None else 0.0
    if inliers is not None:
        cols.append(counted(inliers, free))
    if head is not None:
        assert inliers is not None, "a pair's model has inliers"
        cols.append(head_logit(head))
    x = np.stack(cols, axis=1)
    w = np.zeros(x.shape[1])
    # Ridge on the weights, not the bias: copies are often perfectly separable by inliers, where
    # unpenalised weights grow without bound and every probability becomes 0 or 1.
    ridge = l2 * np.diag([0.0] + [1.0] * (x.shape[1] - 1))
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -50, 50)))
        grad = x.T @ (p - y) + ridge @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    cal = Calibration(float(w[0]), float(w[1]), float(w[2]) if inliers is not None else 0.0, head=float(w[3]) if head is not None else 0.0, free=free)
    op = threshold_at_precision(cal.probability(score, inliers, head), y, 0.99)
    return dataclasses.replace(cal, threshold=min(1.0, op["threshold"]))


Calibrations = dict[str, Calibration]  # by evidence_key


def pair_model(calibrations: Calibrations) -> Calibration | None:
    """What a pair is scored by: cosine, inliers and the head's score (a bundle calibrated before
    the head was fitted in: cosine and inliers, as a search scores a plain collection's hit)."""
    return calibrations.get(PAIR) or calibrations.get(evidence_key(False, True))


def from_manifest(manifest: dict[str, Any]) -> Calibrations:
    """A bundle manifest's calibrations (none for a bundle never calibrated); raises ValueError
    for a malformed one, so a server refuses it at start-up rather than mis-scoring every hit."""
    raw = manifest.get("calibration") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"calibration must be an object, got {type(raw).__name__}")
    known = {evidence_key(v, i) for v in (False, True) for i in (False, True)} | {PAIR}
    out = {}
    for key, d in raw.items():
        if key not in known:
            continue  # notes and provenance sit beside the fitted models
        if not isinstance(d, dict):
            raise ValueError(f"calibration[{key!r}] must be an object")
        out[key] = Calibration.from_dict(d)
    return out
