"""View re-scoring: a crop-views candidate is scored by its best-matching view as well as by its pool.

The pooled vector is what the index searches, but averaging blurs the one view a crop
matches best, so the shortlist is re-scored by the views stored with each item
(inference/crops.py makes them). docs/decisions/crop-views.md has the figures.
"""

from __future__ import annotations

import numpy as np

from simserve.inference.crops import pool_views

# The shortlist training's evaluation (training/robustness.py) re-scores by views: 10, 20 and 50
# gave the same recall@1 on drawings. A search reads a deeper one (pipeline.SHORTLIST).
RESCORE_DEPTH = 20


def view_scores(query: np.ndarray, pooled: np.ndarray, views: np.ndarray) -> np.ndarray:
    """A query embedding [d], its cosines with m candidates' pooled vectors [m] and their view
    embeddings [m, V, d] -> [m] scores: the mean of the pooled cosine and the best view's.

    The best view alone finds crops but loses uncropped copies to distractors whose single
    crop happens to match; the pooled cosine alone blurs the matching crop. Equal weights were
    the best of 0.25 / 0.5 / 1 / 2 x pooled on two query draws."""
    return 0.5 * (pooled + (views @ query).max(axis=1))


def view_score_matrix(queries: np.ndarray, views: np.ndarray) -> np.ndarray:
    """Query vectors [q, d] against m candidates' stored views [m, V, d] -> [m, q] view scores
    (``view_scores``), the pooled vector made again from the views: a candidate another query
    vector found carries its cosine with that vector only."""
    views = np.asarray(views, np.float32)
    pooled = pool_views(views) @ queries.T
    return 0.5 * (pooled + np.einsum("mvd,qd->mqv", views, queries).max(axis=2))
