"""Held-out evaluation: pair verification and retrieval, by embedding and by head.

Metrics (all on data never used in training):
- ``pair_auc`` / ``pair_accuracy`` / ``threshold``: the head's score on
  balanced positive / negative pairs; accuracy at the best threshold.
- ``recall@1`` / ``recall@10``: nearest neighbour by embedding (the FAISS path).
- ``rerank_recall@1``: top 10 by embedding re-ordered by cosine and head together
  (``simserve.ranking.scores.fused_scores``: what a re-ranked Search returns).
- ``head_rerank_recall@1``: the same top 10 re-ordered by the head alone (how good the
  head is by itself: the head comparison's column).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from simserve.inference.pixels import to_array
from simserve.model import SiameseNet
from simserve.ranking.calibration import threshold_at_precision  # noqa: F401  (shared with the benchmarks)
from simserve.ranking.scores import fused_scores
from training.sources import ImageSet


def input_batches(model: SiameseNet, images: list[Image.Image], batch: int = 256) -> Iterator[torch.Tensor]:
    """PIL images -> model input tensors, ``batch`` at a time (preprocessed as served)."""
    cfg = model.cfg
    for s in range(0, len(images), batch):
        yield torch.from_numpy(np.stack([to_array(im, cfg.input_size, cfg.mean, cfg.std) for im in images[s : s + batch]]))


@torch.no_grad()
def embed_images(model: SiameseNet, images: list[Image.Image], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    fmaps, embs = [], []
    for x in input_batches(model, images, batch):
        f, e = model.embed(x)
        fmaps.append(f)
        embs.append(e)
    return torch.cat(fmaps), torch.cat(embs)


@torch.no_grad()
def head_scores(model: SiameseNet, fa: torch.Tensor, fb: torch.Tensor, batch: int = 1024) -> np.ndarray:
    out = [torch.sigmoid(model.fuse(fa[s : s + batch], fb[s : s + batch])) for s in range(0, len(fa), batch)]
    return torch.cat(out).numpy()


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney form of ROC-AUC, with ties counted half."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Threshold (predict "same" when score >= t) with the best accuracy, and the
    precision / recall it gives. One sort, O(n log n)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last index of each tied group
    acc = (tp[last] + (len(y) - y.sum()) - fp[last]) / len(y)
    k = int(np.argmax(acc))
    i = last[k]
    return {
        "accuracy": float(acc[k]),
        "threshold": float(s[i]),
        "precision": float(tp[i] / (i + 1)),
        "recall": float(tp[i] / max(1, y.sum())),
    }


def _retrieval(model: SiameseNet, q_f, q_e, g_f, g_e, correct) -> dict[str, float]:
    return _retrieval_from_sim(model, q_f, g_f, q_e @ g_e.t(), correct)


def _pairs(model: SiameseNet, fa, fb, ea, eb, labels: np.ndarray) -> dict[str, float]:
    s = head_scores(model, fa, fb)
    cos = (ea * eb).sum(1).numpy()
    out = {"pair_auc": roc_auc(s, labels), "embedding_pair_auc": roc_auc(cos, labels)}
    bt = best_threshold(s, labels)
    out.update({"pair_accuracy": bt["accuracy"], "threshold": bt["threshold"], "precision": bt["precision"], "recall": bt["recall"]})
    hp = threshold_at_precision(s, labels, 0.99)
    out.update({"threshold_p99": hp["threshold"], "precision_p99": hp["precision"], "recall_p99": hp["recall"]})
    return out


@torch.no_grad()
def evaluate_copy(model: SiameseNet, held_out: ImageSet, augment, n_queries: int = 1000, seed: int = 1234) -> dict[str, float]:
    """Queries are augmented copies of held-out images; the gallery is every held-out original."""
    model.eval()
    g_f, g_e = embed_images(model, held_out.images)
    rng = np.random.default_rng(seed)
    qidx = np.sort(rng.choice(len(held_out), size=min(n_queries, len(held_out)), replace=False))
    queries = [augment(held_out.images[i], random.Random(f"eval:{seed}:{i}")) for i in qidx]
    q_f, q_e = embed_images(model, queries)
    metrics = _retrieval(model, q_f, q_e, g_f, g_e, lambda qi, gi: gi == qidx[qi])
    neg = (qidx + rng.integers(1, len(held_out), size=len(qidx))) % len(held_out)
    gi = torch.from_numpy(np.concatenate([qidx, neg]))
    labels = np.concatenate([np.ones(len(qidx)), np.zeros(len(qidx))])
    metrics.update(_pairs(model, q_f.repeat(2, 1, 1, 1), g_f[gi], q_e.repeat(2, 1), g_e[gi], labels))
    metrics.update({"queries": len(qidx), "gallery": len(held_out)})
    return metrics


@torch.no_grad()
def evaluate_class(model: SiameseNet, test: ImageSet, n_pairs: int = 5000, n_queries: int = 2000, seed: int = 1234) -> dict[str, float]:
    """Pairs of test images: positive when they share a class; retrieval leave-one-out."""
    model.eval()
    f, e = embed_images(model, test.images)
    labels = test.labels
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(test), size=40 * n_pairs)
    b = rng.integers(0, len(test), size=40 * n_pairs)
    keep = a != b
    same = (labels[a] == labels[b]) & keep
    diff = (labels[a] != labels[b]) & keep
    pi, ni = np.flatnonzero(same)[:n_pairs], np.flatnonzero(diff)[:n_pairs]
    ia, ib = np.concatenate([a[pi], a[ni]]), np.concatenate([b[pi], b[ni]])
    y = np.concatenate([np.ones(len(pi)), np.zeros(len(ni))])
    ta, tb = torch.from_numpy(ia), torch.from_numpy(ib)
    metrics = _pairs(model, f[ta], f[tb], e[ta], e[tb], y)
    qidx = np.sort(rng.choice(len(test), size=min(n_queries, len(test)), replace=False))
    metrics.update(_retrieval_loo(model, f, e, qidx, labels))
    metrics.update({"pairs": int(len(y)), "queries": int(len(qidx))})
    return metrics


def _retrieval_loo(model: SiameseNet, f: torch.Tensor, e: torch.Tensor, qidx: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Leave-one-out retrieval: each query searches the whole set but itself."""
    tq = torch.from_numpy(qidx)
    sim = e[tq] @ e.t()
    sim[torch.arange(len(qidx)), tq] = float("-inf")
    return _retrieval_from_sim(model, f[tq], f, sim, lambda qi, gi: labels[gi] == labels[qidx[qi]])


def _retrieval_from_sim(model, q_f, g_f, sim, correct, rerank: int = 10) -> dict[str, float]:
    """recall@1/@10 from a query x gallery similarity matrix, and recall@1 once each query's
    top ``rerank`` candidates are re-ordered, by cosine and head together and by the head alone."""
    cos, top = (t.numpy() for t in sim.topk(rerank, dim=1))
    qi = np.arange(len(top))
    hits = correct(np.repeat(qi, rerank).reshape(top.shape), top)
    rs = head_scores(model, q_f.repeat_interleave(rerank, 0), g_f[torch.from_numpy(top.reshape(-1))]).reshape(top.shape)
    return {
        "recall@1": float(hits[:, 0].mean()),
        "recall@10": float(hits.any(1).mean()),
        "rerank_recall@1": float(correct(qi, top[qi, fused_scores(cos, rs).argmax(1)]).mean()),
        "head_rerank_recall@1": float(correct(qi, top[qi, rs.argmax(1)]).mean()),
    }
