"""Small building blocks shared by the tower and the heads."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 with a channel multiplier, then a 1x1 pointwise conv.

    The multiplier (MobileNet v1's "depth multiplier") gives every input
    channel several spatial filters before the pointwise mix; a residual is
    added whenever input and output shapes match.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, multiplier: int = 1) -> None:
        super().__init__()
        mid = cin * multiplier
        self.dw = conv_bn_act(cin, mid, 3, stride=stride, groups=cin)
        self.pw = conv_bn_act(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw(self.dw(x))
        if self.residual:
            y = y + x
        return self.act(y)
