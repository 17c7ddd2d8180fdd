"""View re-scoring: a crop-views candidate is scored by its best-matching view as well as by its pool.

The pooled vector is what the index searches, but averaging blurs the one view a crop
matches best, so the shortlist is re-scored by the views stored with each item
(inference/crops.py makes them). docs/decisions/crop-views.md has the figures.
"""

from __future__ import annotations

import numpy as np

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
