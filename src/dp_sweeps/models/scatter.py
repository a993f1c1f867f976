"""Tramèr & Boneh 2021's models on ScatterNet features: a linear classifier and a
small tanh CNN, each behind a data-independent normalisation.

They read the output of the ``scattering`` feature map (:mod:`dp_sweeps.data.features.scattering`),
N x 243 x 8 x 8 for CIFAR-10 (``model.features`` in conf/model/scatter_*.yaml).

Normalisation (``norm``):

- ``group``: GroupNorm without affine parameters (``norm_groups`` groups over the 243
  channels; 27 in the paper's CIFAR-10 runs, i.e. 9 channels per group). It uses one
  example's own statistics, so it needs no privacy budget.
- ``data``: the paper's "DP data normalisation": per-channel means and variances of the
  scattered training set, released with the Gaussian mechanism before training and
  charged to the run's ε (:mod:`dp_sweeps.privacy.data_normalization`, ``model.data_norm``).
- ``none``.

Layout follows the authors' code (ftramer/Handcrafted-DP, ``ScatterLinear`` and
``CIFAR10_CNN`` with scattering input): linear = GroupNorm -> flatten -> Linear;
CNN = GroupNorm -> [conv3x3 64, tanh, max-pool 2, conv3x3 64, tanh] -> flatten -> Linear.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch.nn as nn

from dp_sweeps.models._registry import register_model
from dp_sweeps.models.norms import ChannelStandardize

# ScatterNet(J=2, L=8) on 32x32 RGB: 3 colours x 81 paths, at 8x8.
SCATTER_CHANNELS = 243
SCATTER_SIZE = 8


def scatter_norm(channels: int, norm: str, norm_groups: int) -> nn.Module:
    """The input normalisation: ``group`` (GroupNorm, no affine), ``data`` (fixed
    per-channel statistics, set before training) or ``none``."""
    if norm == "none":
        return nn.Identity()
    if norm == "data":
        return ChannelStandardize(channels)
    if norm != "group":
        raise ValueError(f"norm={norm!r} must be 'group', 'data' or 'none'")
    if isinstance(norm_groups, bool) or not isinstance(norm_groups, int) or norm_groups < 1 \
            or channels % norm_groups:
        raise ValueError(f"norm_groups={norm_groups!r} must be a positive divisor of the {channels} input channels")
    return nn.GroupNorm(norm_groups, channels, affine=False)


@register_model
def scatter_linear(*, num_classes: int = 10, in_channels: int = SCATTER_CHANNELS,
                   spatial_size: int = SCATTER_SIZE, norm: str = "group", norm_groups: int = 27) -> nn.Module:
    """GroupNorm(norm_groups, no affine) then one linear layer over all
    ``in_channels * spatial_size**2`` features (155,530 parameters for CIFAR-10)."""
    return nn.Sequential(scatter_norm(in_channels, norm, norm_groups), nn.Flatten(),
                         nn.Linear(in_channels * spatial_size * spatial_size, num_classes))


@register_model
def scatter_cnn(*, num_classes: int = 10, in_channels: int = SCATTER_CHANNELS,
                spatial_size: int = SCATTER_SIZE, norm: str = "group", norm_groups: int = 27,
                layers: Sequence[Union[int, str]] = (64, "M", 64)) -> nn.Module:
    """GroupNorm, then ``layers`` (an int: 3x3 convolution to that many channels + tanh;
    ``"M"``: 2x2 max-pool), then one linear layer. The default is the paper's CIFAR-10
    head (187,210 parameters); its "small" variant is ``[16, 16, "M", 32, 32]``."""
    modules: list[nn.Module] = [scatter_norm(in_channels, norm, norm_groups)]
    channels, size = in_channels, spatial_size
    for layer in layers:
        if layer == "M":
            if size % 2:
                raise ValueError(f"layers={list(layers)!r}: a max-pool on an odd {size}x{size} map")
            modules.append(nn.MaxPool2d(2))
            size //= 2
        elif isinstance(layer, int) and not isinstance(layer, bool) and layer > 0:
            modules += [nn.Conv2d(channels, layer, 3, padding=1), nn.Tanh()]
            channels = layer
        else:
            raise ValueError(f"layers: {layer!r} is neither a positive channel count nor 'M'")
    modules += [nn.Flatten(), nn.Linear(channels * size * size, num_classes)]
    return nn.Sequential(*modules)
