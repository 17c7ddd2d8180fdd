"""The Siamese network (one tower, one head) and its checkpoint format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simserve.atomic import atomic_path
from simserve.inference.config import ModelConfig
from simserve.model.heads import build_head
from simserve.model.tower import Tower

CHECKPOINT_FORMAT = "simserve-checkpoint/1"


class SiameseNet(nn.Module):
    """One tower applied to both images (same module, same weights) and a fusion head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tower = Tower(cfg)
        self.head = build_head(cfg)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tower(x)

    def fuse(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        return self.head(fa, fb)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # One tower call over both images: identical weights by construction,
        # and batch norm sees one batch.
        fmap, _ = self.tower(torch.cat([a, b], dim=0))
        fa, fb = fmap.split(a.shape[0], dim=0)
        return self.head(fa, fb)

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(a, b))


def build_model(cfg: ModelConfig) -> SiameseNet:
    return SiameseNet(cfg)


def save_checkpoint(path: str | os.PathLike, model: SiameseNet, **extra: Any) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "config": model.cfg.to_dict(), "model": model.state_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> tuple[SiameseNet, dict[str, Any]]:
    """Load with ``weights_only=True``: a checkpoint can never run code on load."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a simserve checkpoint (format {payload.get('format') if isinstance(payload, dict) else None!r})")
    model = build_model(ModelConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["model"])
    model.eval()
    return model, payload
