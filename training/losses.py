"""Losses and miners as small composable parts (pytorch-metric-learning style).

A batch is two views, ``za[i]`` and ``zb[i]``, of items with ``labels[i]``;
any (i, j) with equal labels is a positive, so the same code serves
self-supervised copy pairs (every label unique) and class data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(za: torch.Tensor, zb: torch.Tensor, labels: torch.Tensor, tau: float = 0.07, memory: "EmbeddingMemory | None" = None) -> torch.Tensor:
    """Symmetric InfoNCE with every same-label entry counted as a positive (SupCon form).
    With a ``memory``, the a-side also contrasts against the embeddings of earlier batches."""
    logits = za @ zb.t() / tau
    pos = (labels[:, None] == labels[None, :]).float()

    def one_side(lg: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        log_prob = lg - torch.logsumexp(lg, dim=1, keepdim=True)
        return -((log_prob * p).sum(1) / p.sum(1)).mean()

    logits_a, pos_a = logits, pos
    if memory is not None and len(memory):
        logits_a = torch.cat([logits, za @ memory.z.t() / tau], 1)
        pos_a = torch.cat([pos, (labels[:, None] == memory.labels[None, :]).float()], 1)
    return 0.5 * (one_side(logits_a, pos_a) + one_side(logits.t(), pos.t()))


class EmbeddingMemory:
    """Cross-batch memory (XBM, Wang et al., CVPR 2020): the last ``size`` embeddings and their
    labels, detached, as extra candidates for the metric loss. Retrieval among a thousand
    distractors needs finer distinctions than a batch of 128 offers, and the embeddings of a
    slowly-changing encoder stay valid for a few dozen steps, so this buys thousands of
    negatives for one small matmul.

    Measured on the default recipe (seed 0, 30 epochs, memory 4,096 from 30% of training on;
    ``--set train.memory=4096``): embedding recall@1 0.733 vs 0.768 without it, while the head
    got better (pair ROC-AUC 0.9975 vs 0.9963, recall at precision 0.99 0.949 vs 0.916, re-rank
    recall@1 0.774 vs 0.752). So it stays off in the shipped recipe."""

    def __init__(self, size: int, dim: int) -> None:
        self.size = size
        self.z = torch.zeros(0, dim)
        self.labels = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    @torch.no_grad()
    def extend(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        self.z = torch.cat([self.z, z.detach()])[-self.size :]
        self.labels = torch.cat([self.labels, labels])[-self.size :]


def contrastive(za: torch.Tensor, zb: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Classic contrastive loss on cosine distance over all cross-view pairs."""
    dist = 1.0 - za @ zb.t()
    pos = labels[:, None] == labels[None, :]
    pos_loss = dist[pos].pow(2).mean()
    neg = F.relu(margin - dist[~pos])
    neg_loss = neg.pow(2).sum() / neg.gt(0).sum().clamp(min=1)
    return pos_loss + neg_loss


METRIC_LOSSES = {"infonce": info_nce, "contrastive": contrastive}


def koleo(z: torch.Tensor, labels: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser (Sablayrolles et al., ICLR 2019; used by SSCD,
    Pizzi et al., CVPR 2022): minus the mean log distance from each embedding to its nearest
    neighbour of *another* label. InfoNCE only asks a copy to be nearer its source than the batch
    is; spreading the embeddings uniformly over the sphere leaves more room between unrelated
    images, which is what nearest-neighbour search among thousands of distractors needs.

    Measured on the default recipe (128 px, 6-epoch pilots, seed 0, same split): recall@1 0.664
    without it, 0.628 at weight 1, 0.535 at 5, 0.165 at SSCD's 30. With 128-image batches and a
    small tower it fights InfoNCE instead of helping, so it stays off in the shipped recipe."""
    with torch.no_grad():
        sim = (z @ z.t()).masked_fill(labels[:, None] == labels[None, :], float("-inf"))
        nearest = sim.argmax(dim=1)
    return -torch.log((z - z[nearest]).norm(dim=1) + eps).mean()


@torch.no_grad()
def hardest_negatives(za: torch.Tensor, zb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For each i, the j whose view-b embedding is most similar to za[i] among other labels."""
    sim = za @ zb.t()
    sim = sim.masked_fill(labels[:, None] == labels[None, :], float("-inf"))
    return sim.argmax(dim=1)


@torch.no_grad()
def random_negatives(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each i, a random j with a different label (itself if none exists; masked out by the caller)."""
    n = labels.shape[0]
    scores = torch.rand(n, n, generator=generator)
    scores = scores.masked_fill(labels[:, None] == labels[None, :], -1.0)
    return scores.argmax(dim=1)


def pair_bce(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """Balanced BCE: positives and negatives weigh the same whatever their counts."""
    pos = F.binary_cross_entropy_with_logits(pos_logits, torch.ones_like(pos_logits))
    neg = F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits))
    return 0.5 * (pos + neg)
