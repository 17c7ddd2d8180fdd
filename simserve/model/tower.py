"""The shared-weight tower: image -> (feature map, L2-normalised embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simserve.inference.config import ModelConfig
from simserve.model.layers import DepthwiseSeparable, conv_bn_act


class Tower(nn.Module):
    """A stack of depthwise-separable stages.

    Returns the last feature map (for the fusion head) and a pooled embedding
    (for FAISS). The embedding uses generalized-mean pooling, which keeps
    more of the strongest local responses than average pooling: that matters
    for copy detection, where a crop keeps only part of the image.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.stem = conv_bn_act(cfg.in_channels, cfg.stem_width, 3, stride=2)
        blocks: list[nn.Module] = []
        cin = cfg.stem_width
        for cout, stride, n in cfg.stages:
            for i in range(n):
                blocks.append(DepthwiseSeparable(cin, cout, stride if i == 0 else 1, cfg.dw_multiplier))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.gem_p = nn.Parameter(torch.tensor(3.0))
        self.proj = nn.Linear(cin, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.feature_map(x)
        return fmap, F.normalize(self.project(fmap), dim=1)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the last feature map alone, for callers that pool it themselves (whitening)."""
        return self.blocks(self.stem(x))

    def project(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map -> the embedding before L2 normalisation (GeM pool, then the linear
        projection): the space where learned whitening (training/whiten.py) is fitted and folded."""
        p = self.gem_p.clamp(1.0, 8.0)
        return self.proj(fmap.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p))
