"""Pair datasets and batch samplers.

Item ``i`` of an epoch is two views that form a positive pair plus the
item's label; negatives are mined inside the batch (see losses.py). Two
ways to make the second view:

- ``copy``: another random augmentation of the same image (self-supervised
  copy detection; every image is its own label).
- ``class``: another image of the same class, augmented (class data such as
  Fashion-MNIST, or a user's ImageFolder).

``clean_anchor`` is the probability that the first view is the image itself,
only resized: the pair is then (original, copy), which is what a collection
stores and what a query brings. Off in the default recipe: at 0.5 over the full
32 epochs (seed 0) the embedding gains (recall@1 0.839 -> 0.852) but the head
loses (alone 0.815 -> 0.802; recall at precision 0.99 0.958 -> 0.935), so what a
Search returns is no better: fused re-rank 0.866 -> 0.867, crop-views + head
0.902 -> 0.895 (`--set data.clean_anchor=0.5`, then `python -m training.robustness`).

Not built yet, piloted (session 11): two pairs of each image in a batch (64 images x 2 pairs, so
four views each and a multi-positive InfoNCE through the labels), at the same compute per step,
raised every figure of a 6-epoch pilot: recall@1 0.656 -> 0.684, re-ranked 0.689 -> 0.720, head
alone 0.612 -> 0.645, pair ROC-AUC 0.9884 -> 0.9908. The next candidate for the default recipe.
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from simserve.config import ModelConfig
from simserve.preprocess import to_array
from training.sources import ImageSet

Augment = Callable[[Image.Image, random.Random], Image.Image]


class PairDataset(Dataset):
    def __init__(self, images: ImageSet, mode: str, augment: Augment, cfg: ModelConfig, seed: int, clean_anchor: float = 0.0) -> None:
        if mode not in ("copy", "class"):
            raise ValueError(f"pair mode must be 'copy' or 'class', not {mode!r}")
        if not 0.0 <= clean_anchor <= 1.0:
            raise ValueError(f"clean_anchor is a probability in [0, 1], not {clean_anchor!r}")
        self.images, self.mode, self.augment, self.cfg, self.seed = images, mode, augment, cfg, seed
        self.clean_anchor = clean_anchor
        self.epoch = 0
        self.by_label: dict[int, np.ndarray] = {}
        if mode == "class":
            for lab in np.unique(images.labels):
                self.by_label[int(lab)] = np.flatnonzero(images.labels == lab)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def _tensor(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(to_array(img, self.cfg.input_size, self.cfg.mean, self.cfg.std))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        # Seeded by (seed, epoch, index) only: reproducible for any worker layout.
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        j = i
        if self.mode == "class":
            same = self.by_label[int(self.images.labels[i])]
            j = int(same[rng.randrange(len(same))]) if len(same) > 1 else i
        # Drawn only when enabled, so recipes without it keep their exact random stream.
        clean = self.clean_anchor > 0 and rng.random() < self.clean_anchor
        a = self.images.images[i] if clean else self.augment(self.images.images[i], rng)
        b = self.augment(self.images.images[j], rng)
        return self._tensor(a), self._tensor(b), int(self.images.labels[i])


class EpochBatchSampler(Sampler[list[int]]):
    """``steps`` batches per epoch, drawn from a permutation seeded by (seed, epoch).

    Under DDP every rank draws the same global batch and keeps its own slice,
    so the union over ranks is exactly what one process would train on.
    """

    def __init__(self, n: int, batch_size: int, steps: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} must divide evenly over {world} processes")
        self.n, self.batch_size, self.steps, self.seed, self.rank, self.world = n, batch_size, steps, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        g = np.random.default_rng([self.seed, self.epoch])
        need = self.steps * self.batch_size
        order = np.concatenate([g.permutation(self.n) for _ in range(-(-need // self.n))])[:need]
        per_rank = self.batch_size // self.world
        for s in range(self.steps):
            batch = order[s * self.batch_size : (s + 1) * self.batch_size]
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()
