"""How the pieces of evidence about a candidate combine into the score that orders it.

numpy only, so training's evaluation orders candidates exactly as a search does without
loading the index. docs/decisions/head-fusion.md and geometric-verification.md have the figures.
"""

from __future__ import annotations

import numpy as np

# Each inlier is worth this much cosine: flat between 0.01 and 0.025 on three query draws.
INLIER_WEIGHT = 0.02
# The head's logit beside the cosine in a re-ranked order: flat near 0.03 (0.01-0.05 measured).
HEAD_WEIGHT = 0.03


def verified_score(score: float | np.ndarray, count: int | np.ndarray | None) -> float | np.ndarray:
    """The order a verifying search returns: the embedding (or view) score plus the inliers' worth
    (no count: the score alone). Scalars or arrays alike."""
    return score if count is None else score + INLIER_WEIGHT * count


def fused_scores(cosine: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Embedding scores and head probabilities (sigmoid outputs) -> the re-ranking score.

    The head's log-odds, not its probability: a probability saturates near 1 exactly where
    near-duplicates need telling apart. Clipped so a saturated float32 sigmoid stays finite."""
    p = np.clip(np.asarray(head, np.float64), 1e-6, 1 - 1e-6)
    return np.asarray(cosine, np.float64) + HEAD_WEIGHT * (np.log(p) - np.log1p(-p))
