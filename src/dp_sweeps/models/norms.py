"""Normalisation layers that keep examples independent (needed for per-example gradients)."""

from __future__ import annotations

import math

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
