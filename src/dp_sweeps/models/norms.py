"""Normalisation layers that keep examples independent (needed for per-example gradients)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import GroupNormAct


def num_groups_for(num_channels: int, max_groups: int = 16) -> int:
    """The largest group count <= ``max_groups`` that divides ``num_channels``."""
    return math.gcd(num_channels, max_groups)


def group_norm(num_channels: int, max_groups: int = 16) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups_for(num_channels, max_groups), num_channels)


def group_norm_act(num_features: int, **kwargs) -> GroupNormAct:
    """timm norm+act layer (drop-in for ``BatchNormAct2d``) with GroupNorm inside.

    A plain function, not a class: timm's ``get_norm_act_layer`` accepts functions as
    norm+act factories, and maps unknown classes to nothing.
    """
    kwargs.pop("num_groups", None)
    kwargs["inplace"] = False
    return GroupNormAct(num_features, num_groups=num_groups_for(num_features), **kwargs)


class ChannelStandardize(nn.Module):
    """``(x - mean_c) / sqrt(var_c + eps)`` per channel ``c`` of an N x C x ... input, with
    fixed statistics (buffers, not parameters: nothing here is trained)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))
        self.register_buffer("fitted", torch.tensor(False))

    def set_statistics(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        if mean.shape != self.mean.shape or var.shape != self.var.shape:
            raise ValueError(f"statistics of shape {tuple(mean.shape)}/{tuple(var.shape)} for "
                             f"{self.mean.numel()} channels")
        self.mean.copy_(mean)
        self.var.copy_(var)
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) * torch.rsqrt(self.var.view(shape) + self.eps)

    def extra_repr(self) -> str:
        return f"{self.mean.numel()}, eps={self.eps}"
