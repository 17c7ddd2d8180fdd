"""Two-stage search: recall from FAISS (embeddings), precision from the fusion head.

The head compares feature maps, so it cannot be pre-indexed; it re-scores
only the top ``rerank`` candidates that the embedding search found, using
the features stored with each item.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from simserve.collection import Collection, Hit
from simserve.engine import Engine


def search(
    engine: Engine | None,
    collection: Collection,
    embeddings: np.ndarray,
    k: int,
    *,
    features: np.ndarray | None = None,
    rerank: int = 0,
    where: dict[str, Any] | None = None,
    exclude_ids: list[list[int]] | None = None,
) -> list[list[Hit]]:
    """Top-k per query. With ``rerank`` > 0 (and query ``features``), the top
    max(k, rerank) by cosine are re-ordered by head score, and each hit carries both."""
    depth = max(k, rerank) if rerank else k
    out: list[list[Hit]] = []
    for qi in range(len(embeddings)):
        excl = exclude_ids[qi] if exclude_ids else ()
        hits = collection.search(embeddings[qi : qi + 1], depth, where=where, exclude_ids=excl)[0]
        if rerank and hits and features is not None and engine is not None:
            feats = collection.features([h.id for h in hits])
            scored = [h for h in hits if h.id in feats]
            if scored:
                cand = np.stack([feats[h.id] for h in scored])
                q = np.repeat(features[qi : qi + 1], len(scored), axis=0)
                for h, s in zip(scored, engine.fuse(q, cand)):
                    h.head_score = float(s)
                unscored = [h for h in hits if h.id not in feats]  # added without features
                hits = sorted(scored, key=lambda h: -h.head_score) + unscored
        out.append(hits[:k])
    return out
