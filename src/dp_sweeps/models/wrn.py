"""WideResNet-16-4 as De et al. 2022 train it with DP-SGD ("Unlocking high-accuracy
differentially private image classification through scale").

Differences from a textbook WRN (Zagoruyko & Komodakis 2016), each needed or chosen
for DP-SGD, following the authors' reference model (jax_privacy, ``WideResNet``):

- GroupNorm with 16 groups instead of BatchNorm (BatchNorm mixes examples, so
  per-example gradients would not exist);
- scaled weight standardisation on every convolution (:class:`WSConv2d`), which
  keeps activations well scaled without batch statistics;
- pre-activation blocks in the reference's order: ReLU -> GroupNorm -> conv, with a
  1x1 projection on the skip path of each stage's first block, and a final
  ReLU -> GroupNorm -> global average pool -> linear head;
- out-of-place residual additions (Opacus's backward hooks forbid in-place ops).

Depth 16 gives (16 - 4) / 6 = 2 blocks per stage; width 4 gives stages of 64, 128 and
256 channels (2.75M parameters). ``depth`` and ``width`` are exposed for small test
builds and ablations; the registered name is the default.

Per-example gradients: :class:`WSConv2d` is not a layer Opacus has a hand-written
per-sample gradient rule for, so Opacus computes its per-sample gradients with
``torch.func`` (vmap over the layer's own forward, standardisation included); the
gradients are with respect to the raw weights, as DP-SGD needs (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dp_sweeps.models._registry import register_model, require_min_size


class WSConv2d(nn.Conv2d):
    """Conv2d with scaled weight standardisation and a learnable per-channel gain:
    ``w_hat = gain * (w - mean(w)) / sqrt(max(fan_in * var(w), eps))``, statistics per
    output channel (Qiao et al. 2019; Brock et al. 2021, as in De et al.'s WSConv2D)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, eps: float = 1e-4) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1))
        self.eps = eps
        fan_in = self.weight[0].numel()
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(fan_in))  # WS makes the scale irrelevant
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        fan_in = self.weight[0].numel()
        mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
        var = self.weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        scale = torch.rsqrt(torch.clamp(var * fan_in, min=self.eps)) * self.gain
        return (self.weight - mean) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding)


class WideBlock(nn.Module):
    """ReLU -> GN -> conv3x3 -> ReLU -> GN -> conv3x3, plus the skip path."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, num_groups: int,
                 project: bool) -> None:
        super().__init__()
        self.act1, self.norm1 = nn.ReLU(), nn.GroupNorm(num_groups, in_channels)
        self.conv1 = WSConv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.act2, self.norm2 = nn.ReLU(), nn.GroupNorm(num_groups, out_channels)
        self.conv2 = WSConv2d(out_channels, out_channels, 3, padding=1)
        self.skip: nn.Module = nn.Identity()
        if project:
            self.skip = nn.Sequential(nn.ReLU(), nn.GroupNorm(num_groups, in_channels),
                                      WSConv2d(in_channels, out_channels, 1, stride=stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.norm1(self.act1(x)))
        out = self.conv2(self.norm2(self.act2(out)))
        return out + self.skip(x)  # out of place: Opacus hooks forbid in-place ops


class WideResNet(nn.Module):
    def __init__(self, *, num_classes: int, in_channels: int, depth: int, width: int,
                 num_groups: int) -> None:
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"depth={depth!r} must be 6n + 4 with n >= 1 (16 for WRN-16-4)")
        blocks_per_stage = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)
        for channels in (16, *widths):
            if channels % num_groups:
                raise ValueError(f"num_groups={num_groups!r} must divide every stage width {(16, *widths)}")
        self.stem = WSConv2d(in_channels, 16, 3, padding=1)
        blocks, channels = [], 16
        for stage, out in enumerate(widths):
            for b in range(blocks_per_stage):
                blocks.append(WideBlock(channels, out, stride=2 if (stage > 0 and b == 0) else 1,
                                        num_groups=num_groups, project=(b == 0)))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.ReLU(), nn.GroupNorm(num_groups, channels), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(channels, num_classes))
        head = self.head[-1]
        nn.init.trunc_normal_(head.weight, std=1.0 / math.sqrt(channels))
        nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@register_model
def wrn16_4(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, depth: int = 16, width: int = 4,
            num_groups: int = 16) -> nn.Module:
    """WRN-16-4 with GroupNorm(16) and weight-standardised convolutions (De et al. 2022).
    Any ``image_size`` >= 4 (two stride-2 stages, then global pooling)."""
    require_min_size(image_size, 4, model="wrn16_4")
    return WideResNet(num_classes=num_classes, in_channels=in_channels, depth=depth, width=width,
                      num_groups=num_groups)
