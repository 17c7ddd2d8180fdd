"""Model configuration: one small dataclass saved with every checkpoint and bundle.

Plain Python (no torch) so the serving path can read it from a manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model's architecture and its preprocessing."""

    input_size: int = 96
    in_channels: int = 3
    stem_width: int = 24
    # (out_channels, stride, n_blocks) per stage of depthwise-separable blocks.
    stages: tuple[tuple[int, int, int], ...] = ((32, 2, 1), (64, 2, 2), (128, 2, 2), (192, 1, 2))
    dw_multiplier: int = 2  # channel multiplier of the tower's depthwise convs
    embed_dim: int = 128
    head: str = "concat"  # a name in simserve.model.heads.HEAD_REGISTRY, the one list of heads
    head_width: int = 128
    head_multiplier: int = 2  # channel multiplier of the separable head's depthwise conv
    dynamic_kernels: int = 4  # K of the dynamic head
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3):
            raise ValueError("in_channels must be 1 (grey) or 3 (RGB)")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("mean/std need one value per input channel")

    @property
    def stride(self) -> int:
        s = 2  # stem
        for _, st, _ in self.stages:
            s *= st
        return s

    @property
    def feature_channels(self) -> int:
        return self.stages[-1][0]

    @property
    def feature_size(self) -> int:
        return max(1, -(-self.input_size // self.stride))

    @property
    def colour_mode(self) -> str:
        return "RGB" if self.in_channels == 3 else "L"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        kw = dict(d)
        if "stages" in kw:
            kw["stages"] = tuple(tuple(int(v) for v in s) for s in kw["stages"])
        for k in ("mean", "std"):
            if k in kw:
                kw[k] = tuple(float(v) for v in kw[k])
        return cls(**kw)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
