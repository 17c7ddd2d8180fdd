"""Two-stage search: recall from FAISS (embeddings), precision from the fusion head.

The head compares feature maps, so it cannot be pre-indexed; it re-scores
only the top ``rerank`` candidates that the embedding search found, using
the features stored with each item. The two scores see different things (the
embedding a pooled summary, the head aligned feature maps), so the re-ranked
order uses both (``fused_scores``) rather than the head alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from simserve.collection import Collection, Hit
from simserve.engine import Engine
from simserve.verify import LocalFeatures

# Weight of the head's logit beside the cosine in a re-ranked order. On the default model's
# held-out copies (1,000 queries among 1,028 originals, top 10), recall@1 on two query draws:
# cosine alone 0.839 / 0.827, head alone 0.815 / 0.801, cosine + 0.03 x logit 0.866 / 0.862
# (0.02: 0.861 / 0.855, 0.05: 0.863 / 0.865); over crop-views scores 0.901 / 0.902 -> 0.902 / 0.916.
# Re-measured once the model's embedding was whitened (training/whiten.py): cosine alone
# 0.843 / 0.844; + 0.03 x logit 0.855 / 0.869 (0.02: 0.854 / 0.870, 0.05: 0.859 / 0.868); over
# crop-views scores 0.916 / 0.918 -> 0.915 / 0.922 (0.01: 0.919 / 0.922): flat near 0.03, so it stays.
# Other re-rankers measured and left out (session 10): the head fine-tuned as a listwise
# re-ranker on the embedding's own shortlists of training images (tower frozen): alone 0.815 ->
# 0.818, fused 0.866 -> 0.864; the head against the best crop view's feature map instead of the
# whole image's: crop-views + head 0.92-0.93 vs 0.92, for 36 KB more stored per item; hubness
# correction (CSLS-style, each item's mean cosine to its nearest copies of other images): +0.005.
HEAD_WEIGHT = 0.03


def fused_scores(cosine: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Embedding scores and head probabilities (sigmoid outputs) -> the re-ranking score.

    The head's log-odds, not its probability: a probability saturates near 1 exactly where
    near-duplicates need telling apart. Clipped so a saturated float32 sigmoid stays finite."""
    p = np.clip(np.asarray(head, np.float64), 1e-6, 1 - 1e-6)
    return np.asarray(cosine, np.float64) + HEAD_WEIGHT * (np.log(p) - np.log1p(-p))


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
    keypoints: Sequence[Sequence[LocalFeatures] | None] | None = None,
) -> list[list[Hit]]:
    """Top-k per query. With ``rerank`` > 0 (and query ``features``), the top
    max(k, rerank) by cosine are re-ordered by ``fused_scores``, and each hit carries both
    the embedding score and the head's. ``keypoints`` (per query) let a verifying collection
    count inliers (simserve/verify.py); the head then fuses with the verified score."""
    depth = max(k, rerank) if rerank else k
    out: list[list[Hit]] = []
    for qi in range(len(embeddings)):
        excl = exclude_ids[qi] if exclude_ids else ()
        kp = [keypoints[qi]] if keypoints is not None else None
        hits = collection.search(embeddings[qi : qi + 1], depth, where=where, exclude_ids=excl, keypoints=kp)[0]
        if rerank and hits and features is not None and engine is not None:
            feats = collection.features([h.id for h in hits])
            scored = [h for h in hits if h.id in feats]
            if scored:
                cand = np.stack([feats[h.id] for h in scored])
                q = np.repeat(features[qi : qi + 1], len(scored), axis=0)
                head = engine.fuse(q, cand)
                for h, s in zip(scored, head):
                    h.head_score = float(s)
                order = np.argsort(-fused_scores(np.array([h.rank for h in scored]), head), kind="stable")
                unscored = [h for h in hits if h.id not in feats]  # added without features
                hits = [scored[i] for i in order] + unscored
        out.append(hits[:k])
    return out
