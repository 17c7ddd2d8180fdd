"""Losses and miners as small composable parts (pytorch-metric-learning style).

A batch is two views, ``za[i]`` and ``zb[i]``, of items with ``labels[i]``;
any (i, j) with equal labels is a positive, so the same code serves
self-supervised copy pairs (every label unique) and class data.

Every embedding loss is ``loss(za, zb, labels) -> scalar`` (settings go to its constructor;
a cross-batch memory wraps one); every miner is ``miner(za, zb, labels) -> indices``; the
head's pair loss takes its positive and negative logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class InfoNCE:
    """Symmetric InfoNCE with every same-label entry counted as a positive (SupCon form)."""

    def __init__(self, tau: float = 0.07) -> None:
        self.tau = tau

    def __call__(self, za: torch.Tensor, zb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.with_bank(za, zb, labels, zb[:0], labels[:0])

    def with_bank(self, za: torch.Tensor, zb: torch.Tensor, labels: torch.Tensor, bank_z: torch.Tensor, bank_labels: torch.Tensor) -> torch.Tensor:
        """The loss with extra candidates for the a-side (a memory of earlier batches' b-views)."""
        logits = za @ zb.t() / self.tau
        pos = (labels[:, None] == labels[None, :]).float()
        logits_a = torch.cat([logits, za @ bank_z.t() / self.tau], 1)
        pos_a = torch.cat([pos, (labels[:, None] == bank_labels[None, :]).float()], 1)
        return 0.5 * (_log_softmax_positives(logits_a, pos_a) + _log_softmax_positives(logits.t(), pos.t()))


def _log_softmax_positives(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -((log_prob * pos).sum(1) / pos.sum(1)).mean()


class CrossBatchMemory:
    """A metric loss that also contrasts against the last ``size`` b-view embeddings (XBM, Wang
    et al., CVPR 2020), detached. Retrieval among a thousand distractors needs finer distinctions
    than a batch of 128 offers, and a slowly-changing encoder's embeddings stay valid for a few
    dozen steps. ``active`` is off early in training, when embeddings move too fast; the memory
    fills all the same. Off in the shipped recipe: docs/decisions/training-losses.md."""

    def __init__(self, loss: InfoNCE, size: int, dim: int) -> None:
        if not hasattr(loss, "with_bank"):
            raise ValueError(f"a cross-batch memory needs a loss that takes a bank of candidates (infonce), not {type(loss).__name__}")
        self.loss, self.size, self.active = loss, size, False
        self.z = torch.zeros(0, dim)
        self.labels = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __call__(self, za: torch.Tensor, zb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.loss.with_bank(za, zb, labels, self.z, self.labels) if self.active else self.loss(za, zb, labels)
        with torch.no_grad():
            self.z = torch.cat([self.z, zb.detach()])[-self.size :]
            self.labels = torch.cat([self.labels, labels])[-self.size :]
        return out


class Contrastive:
    """Classic contrastive loss on cosine distance over all cross-view pairs."""

    def __init__(self, margin: float = 0.5) -> None:
        self.margin = margin

    def __call__(self, za: torch.Tensor, zb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = 1.0 - za @ zb.t()
        pos = labels[:, None] == labels[None, :]
        pos_loss = dist[pos].pow(2).mean()
        neg = F.relu(self.margin - dist[~pos])
        neg_loss = neg.pow(2).sum() / neg.gt(0).sum().clamp(min=1)
        return pos_loss + neg_loss


def koleo(za: torch.Tensor, zb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser (Sablayrolles et al., ICLR 2019; used by SSCD,
    Pizzi et al., CVPR 2022): minus the mean log distance from each embedding to its nearest
    neighbour of *another* label. InfoNCE only asks a copy to be nearer its source than the batch
    is; spreading the embeddings uniformly over the sphere leaves more room between unrelated
    images, which is what nearest-neighbour search among thousands of distractors needs.

    Both views count as points. Off in the shipped recipe: docs/decisions/training-losses.md."""
    z, labels = torch.cat([za, zb]), torch.cat([labels, labels])
    with torch.no_grad():
        sim = (z @ z.t()).masked_fill(labels[:, None] == labels[None, :], float("-inf"))
        nearest = sim.argmax(dim=1)
    return -torch.log((z - z[nearest]).norm(dim=1) + 1e-8).mean()


@torch.no_grad()
def hardest_negatives(za: torch.Tensor, zb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For each i, the j whose view-b embedding is most similar to za[i] among other labels."""
    sim = za @ zb.t()
    sim = sim.masked_fill(labels[:, None] == labels[None, :], float("-inf"))
    return sim.argmax(dim=1)


@torch.no_grad()
def random_negatives(za: torch.Tensor, zb: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
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


def metric_loss(name: str, tau: float, memory: int, dim: int):
    """The embedding loss a recipe names, wrapped in a cross-batch memory when it asks for one."""
    losses = {"infonce": lambda: InfoNCE(tau), "contrastive": Contrastive}
    if name not in losses:
        raise ValueError(f"unknown metric_loss {name!r}; choose one of {sorted(losses)}")
    loss = losses[name]()
    return CrossBatchMemory(loss, memory, dim) if memory else loss
