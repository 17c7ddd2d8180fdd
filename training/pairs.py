"""Pair datasets and batch samplers.

Item ``i`` of an epoch is two views that form a positive pair plus the
item's label; negatives are mined inside the batch (see losses.py). Two
ways to make the second view:

- ``copy``: another random augmentation of the same image (self-supervised
  copy detection; every image is its own label).
- ``class``: another image of the same class, augmented (class data such as
  Fashion-MNIST, or a user's ImageFolder).

``clean_anchor`` is the probability that the first view is the image itself, only resized
(the pair is then (original, copy), what a collection stores and a query brings).
``pairs_per_image`` (k) puts k pairs of each image in a batch (batch_size / k images), so InfoNCE
pulls all of an image's views together at the same compute per step; draw 0 keeps the stream of
k = 1. Both are off in the default recipe: docs/decisions/pair-sampling.md.
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from simserve.inference.config import ModelConfig
from simserve.inference.pixels import to_array
from training.sources import ImageSet

Augment = Callable[[Image.Image, random.Random], Image.Image]


class PairDataset(Dataset):
    def __init__(
        self, images: ImageSet, mode: str, augment: Augment, cfg: ModelConfig, seed: int, clean_anchor: float = 0.0, pairs_per_image: int = 1
    ) -> None:
        if isinstance(pairs_per_image, bool) or not isinstance(pairs_per_image, int) or pairs_per_image < 1:
            raise ValueError(f"pairs_per_image must be a whole number at least 1, not {pairs_per_image!r}")
        if mode not in ("copy", "class"):
            raise ValueError(f"pair mode must be 'copy' or 'class', not {mode!r}")
        if not 0.0 <= clean_anchor <= 1.0:
            raise ValueError(f"clean_anchor is a probability in [0, 1], not {clean_anchor!r}")
        self.images, self.mode, self.augment, self.cfg, self.seed = images, mode, augment, cfg, seed
        self.clean_anchor, self.pairs_per_image = clean_anchor, pairs_per_image
        self.epoch = 0
        self.by_label: dict[int, np.ndarray] = {}
        if mode == "class":
            for lab in np.unique(images.labels):
                self.by_label[int(lab)] = np.flatnonzero(images.labels == lab)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images) * self.pairs_per_image

    def _tensor(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(to_array(img, self.cfg.input_size, self.cfg.mean, self.cfg.std))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        draw, i = divmod(index, len(self.images))
        # Seeded by (seed, epoch, image, draw) only: reproducible for any worker layout.
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}" + (f":{draw}" if draw else ""))
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
    """``steps`` batches per epoch, images drawn from a permutation seeded by (seed, epoch).

    With ``pairs_per_image`` k a batch holds batch_size / k images, each as items
    ``i, n + i, ..., (k - 1) n + i`` of a PairDataset, side by side. Under DDP every rank
    draws the same global batch and keeps its own slice, whole images only (each rank's
    loss sees all of an image's pairs), so the union over ranks is exactly what one
    process would train on.

    Batches are random on purpose: batches of visual neighbours (harder negatives) trained worse
    (docs/decisions/pair-sampling.md).
    """

    def __init__(self, n: int, batch_size: int, steps: int, seed: int, rank: int = 0, world: int = 1, pairs_per_image: int = 1) -> None:
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} must divide evenly over {world} processes")
        if (batch_size // world) % pairs_per_image:
            raise ValueError(f"each process's batch of {batch_size // world} must hold whole images of {pairs_per_image} pairs each")
        self.n, self.batch_size, self.steps, self.seed, self.rank, self.world = n, batch_size, steps, seed, rank, world
        self.pairs_per_image = pairs_per_image
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        g = np.random.default_rng([self.seed, self.epoch])
        per_batch = self.batch_size // self.pairs_per_image
        need = self.steps * per_batch
        order = np.concatenate([g.permutation(self.n) for _ in range(-(-need // self.n))])[:need]
        draws = np.arange(self.pairs_per_image) * self.n
        per_rank = self.batch_size // self.world
        for s in range(self.steps):
            images = order[s * per_batch : (s + 1) * per_batch]
            batch = (images[:, None] + draws[None, :]).reshape(-1)  # an image's k items side by side
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()
