"""ResNet for 32x32 inputs (the CIFAR stem of He et al. 2016: a 3x3 convolution at
stride 1, no max-pool), with GroupNorm and out-of-place residual additions so that
Opacus can compute per-example gradients."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from dp_sweeps.models._registry import register_model, require_min_size
from dp_sweeps.models.norms import group_norm


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = group_norm(out_channels)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), group_norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))  # not `out += ...`: in-place breaks Opacus hooks


class ResNet(nn.Module):
    def __init__(self, *, num_classes: int, in_channels: int, width: int,
                 blocks_per_stage: Sequence[int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  group_norm(width), nn.ReLU())
        stages, channels = [], width
        for i, blocks in enumerate(blocks_per_stage):
            out = width * 2**i
            for b in range(blocks):
                stages.append(BasicBlock(channels, out, stride=2 if (i > 0 and b == 0) else 1))
                channels = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


@register_model
def resnet18(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int = 64,
             blocks_per_stage: Sequence[int] = (2, 2, 2, 2)) -> nn.Module:
    """ResNet-18 (11.2M parameters at ``width=64``); smaller ``width``/``blocks_per_stage`` for tests.
    Any ``image_size`` >= 2^(stages - 1) (stride-2 stages, then global pooling)."""
    require_min_size(image_size, 2 ** (len(blocks_per_stage) - 1), model="resnet18")
    return ResNet(num_classes=num_classes, in_channels=in_channels, width=width,
                  blocks_per_stage=tuple(blocks_per_stage))
