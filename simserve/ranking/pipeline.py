"""The one search pipeline: ANN -> view re-score -> geometric verification -> head fusion.

Each stage re-orders the shortlist the stage before it left. The index finds candidates by
the embedding; a crop-views collection re-scores them by their stored views; a verifying one
adds the inliers one affine map gives between the query's keypoints and each candidate's; with
``rerank`` the fusion head, which compares feature maps and so cannot be pre-indexed, fuses its
log-odds with that score. Whatever evidence the stages need is read with the candidates, in one
query of the store. ``simserve index search`` and the server both search through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from simserve.index.collection import Collection
from simserve.index.store import Candidate
from simserve.inference.engine import Engine
from simserve.ranking import verify
from simserve.ranking.scores import fused_scores, verified_score
from simserve.ranking.views import RESCORE_DEPTH, view_scores


@dataclass
class Hit:
    key: str
    # Cosine of the embeddings; in a crop-views collection, the mean of that and the best view's.
    score: float
    id: int
    metadata: dict[str, Any] | None = None
    head_score: float | None = None  # set when re-ranked by the fusion head
    inliers: int | None = None  # set by a verifying collection

    @property
    def rank(self) -> float:
        """What orders hits before any head re-ranking: the score, plus the inliers' worth when verified."""
        return verified_score(self.score, self.inliers)


@dataclass
class Query:
    embedding: np.ndarray  # [d]
    features: np.ndarray | None = None  # the head's input, for re-ranking
    keypoints: Sequence[verify.LocalFeatures] | None = None  # for a verifying collection (verify.query_features)
    exclude_id: int | None = None  # a stored item used as the query is not its own neighbour


def search(collection: Collection, query: Query, k: int, *, rerank: int = 0, where: dict[str, Any] | None = None, engine: Engine | None = None) -> list[Hit]:
    """The top k for one query. With ``rerank`` > 0 (query features and an engine given), the
    top max(k, rerank) are re-ordered by ``fused_scores`` and carry the head's score too."""
    cfg = collection.config
    verifying = cfg.verify and query.keypoints is not None
    fusing = rerank > 0 and query.features is not None and engine is not None
    keep = max(k, rerank) if fusing else k
    depth = max(keep, RESCORE_DEPTH) if cfg.crop_views or verifying else keep
    exclude = () if query.exclude_id is None else (query.exclude_id,)
    found = collection.search(query.embedding.reshape(1, -1), depth, where, exclude, views=cfg.crop_views, keypoints=verifying, features=fusing)[0]
    hits = [Hit(c.key, c.score, c.id, c.metadata) for c in found]
    evidence = {c.id: c for c in found}
    if cfg.crop_views:
        hits = _rescore_views(query.embedding, hits, evidence)
    if verifying:
        # Only the top RESCORE_DEPTH: the rest score below all of them even before their inliers count.
        hits = _verify(query.keypoints, hits[:RESCORE_DEPTH], evidence) + hits[RESCORE_DEPTH:]
    hits = hits[:keep]
    if fusing:
        hits = _fuse(engine, query.features, hits, evidence, cfg.feature_shape)
    return hits[:k]


def stored_keypoints(collection: Collection, id: int) -> list[verify.LocalFeatures] | None:
    """A stored item's keypoints as a query's (not mirrored: its image is not kept), or None."""
    blob = collection.keypoints([id]).get(id)
    return None if blob is None else [verify.unpack(blob)]


def _rescore_views(query: np.ndarray, hits: list[Hit], evidence: dict[int, Candidate]) -> list[Hit]:
    """Hits re-scored by their stored views, best first (items added before views were stored
    keep the pooled cosine)."""
    have = [h for h in hits if evidence[h.id].views is not None]
    if have:
        q = np.asarray(query, np.float32).reshape(-1)
        new = view_scores(q, np.array([h.score for h in have], np.float32), np.stack([evidence[h.id].views for h in have]))
        for h, s in zip(have, new):
            h.score = float(s)
    return sorted(hits, key=lambda h: -h.score)


def _verify(query: Sequence[verify.LocalFeatures], hits: list[Hit], evidence: dict[int, Candidate]) -> list[Hit]:
    """Hits with their inlier counts, re-ordered by ``verified_score`` (items added without
    keypoints keep no count and their plain score)."""
    for h in hits:
        blob = evidence[h.id].keypoints
        if blob is not None:
            h.inliers = verify.inliers(query, verify.unpack(blob))
    return sorted(hits, key=lambda h: -h.rank)


def _fuse(engine: Engine, features: np.ndarray, hits: list[Hit], evidence: dict[int, Candidate], shape: Sequence[int]) -> list[Hit]:
    """Hits re-ordered by the head fused with their score; items stored without features follow, unscored."""
    scored = [h for h in hits if evidence[h.id].features is not None]
    if not scored:
        return hits
    cand = np.stack([evidence[h.id].features.reshape(tuple(shape)).astype(np.float32) for h in scored])
    q = np.repeat(np.asarray(features, np.float32).reshape(1, *cand.shape[1:]), len(scored), axis=0)
    head = engine.fuse(q, cand)
    for h, s in zip(scored, head):
        h.head_score = float(s)
    order = np.argsort(-fused_scores(np.array([h.rank for h in scored]), head), kind="stable")
    return [scored[i] for i in order] + [h for h in hits if evidence[h.id].features is None]
