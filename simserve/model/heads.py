"""Fusion heads: two feature maps -> one similarity logit, built by name.

Every head sees the same order-free pair features, ``[|fa - fb|, fa * fb]``,
so score(a, b) == score(b, a) exactly, by construction, at the cost of one
head pass (fusing both orders would cost two). The heads differ only in the
convolution that mixes those 2C channels:

- ``concat``: a plain dense Conv2d over all 2C channels (the baseline).
- ``grouped``: Conv2d with groups=2 (one filter bank per feature kind), then
  a 1x1 conv that mixes the two groups.
- ``separable``: depthwise conv with a channel multiplier, then 1x1 pointwise.
- ``dynamic``: K dense kernels mixed per sample by a softmax attention with a
  temperature (annealed during training); kernels are mixed with einsum and
  applied with a batched matmul over an explicit im2col, so the batch
  dimension stays dynamic in ONNX (never groups=batch).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from simserve.inference.config import ModelConfig
from simserve.model.layers import conv_bn_act

HEAD_REGISTRY: dict[str, Callable[[ModelConfig], "FusionHead"]] = {}


def register_head(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        HEAD_REGISTRY[name] = cls
        return cls

    return deco


def build_head(cfg: ModelConfig) -> "FusionHead":
    try:
        return HEAD_REGISTRY[cfg.head](cfg)
    except KeyError:
        raise ValueError(f"unknown head {cfg.head!r}; registered: {sorted(HEAD_REGISTRY)}") from None


def pair_features(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """Order-free pair features: swapping fa and fb leaves them unchanged."""
    return torch.cat([(fa - fb).abs(), fa * fb], dim=1)


class FusionHead(nn.Module):
    """Shared skeleton: pair features -> ``body`` (per head) -> BN/ReLU -> pool -> logit."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.in_channels = 2 * cfg.feature_channels
        self.width = cfg.head_width
        self.body = self.make_body(cfg)
        self.post = nn.Sequential(nn.BatchNorm2d(self.width), nn.ReLU(inplace=True))
        self.fc = nn.Linear(self.width, 1)

    def make_body(self, cfg: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def forward(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        x = self.post(self.body(pair_features(fa, fb)))
        return self.fc(x.mean(dim=(2, 3))).squeeze(1)


@register_head("concat")
class ConcatHead(FusionHead):
    def make_body(self, cfg: ModelConfig) -> nn.Module:
        return nn.Conv2d(self.in_channels, self.width, 3, padding=1, bias=False)


@register_head("grouped")
class GroupedHead(FusionHead):
    def make_body(self, cfg: ModelConfig) -> nn.Module:
        return nn.Sequential(
            conv_bn_act(self.in_channels, self.width, 3, groups=2),
            nn.Conv2d(self.width, self.width, 1, bias=False),
        )


@register_head("separable")
class SeparableHead(FusionHead):
    def make_body(self, cfg: ModelConfig) -> nn.Module:
        mid = self.in_channels * cfg.head_multiplier
        return nn.Sequential(
            conv_bn_act(self.in_channels, mid, 3, groups=self.in_channels),
            nn.Conv2d(mid, self.width, 1, bias=False),
        )


class DynamicConv2d(nn.Module):
    """CondConv / DY-Conv style 3x3 convolution with K kernels mixed per sample.

    ``temperature`` is a buffer so training can anneal it (e.g. 30 -> 1: a
    high temperature keeps the attention near uniform early, so every kernel
    gets gradient) and export bakes the final value in.
    """

    def __init__(self, cin: int, cout: int, k: int, kernels: int, reduction: int = 4) -> None:
        super().__init__()
        self.cin, self.cout, self.k, self.kernels = cin, cout, k, kernels
        hidden = max(8, cin // reduction)
        self.attention = nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, kernels))
        self.weight = nn.Parameter(torch.empty(kernels, cout, cin * k * k))
        for i in range(kernels):
            nn.init.kaiming_uniform_(self.weight[i], a=5**0.5)
        self.register_buffer("temperature", torch.tensor(1.0))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.attention(x.mean(dim=(2, 3))) / self.temperature, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        attn = self.attend(x)  # [B, K]
        weight = torch.einsum("bk,kof->bof", attn, self.weight)  # [B, cout, cin*k*k]
        # im2col by explicit shifted slices: exports to plain ONNX Slice/Concat.
        p = self.k // 2
        xp = F.pad(x, (p, p, p, p))
        cols = torch.stack(
            [xp[:, :, i : i + h, j : j + w] for i in range(self.k) for j in range(self.k)], dim=2
        )  # [B, cin, k*k, h, w], same order as weight.view(cout, cin, k, k)
        cols = cols.reshape(b, c * self.k * self.k, h * w)
        return torch.bmm(weight, cols).reshape(b, self.cout, h, w)


@register_head("dynamic")
class DynamicHead(FusionHead):
    def make_body(self, cfg: ModelConfig) -> nn.Module:
        return DynamicConv2d(self.in_channels, self.width, 3, cfg.dynamic_kernels)


def set_temperature(module: nn.Module, value: float) -> None:
    """Set the attention temperature of every dynamic conv inside ``module``."""
    for m in module.modules():
        if isinstance(m, DynamicConv2d):
            m.temperature.fill_(float(value))
