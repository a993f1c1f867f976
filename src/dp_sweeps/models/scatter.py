"""Tramèr & Boneh 2021's models on ScatterNet features: a linear classifier and a
small tanh CNN, each behind a data-independent normalisation.

They read the output of the ``scattering`` feature map (:mod:`dp_sweeps.data.features.scattering`),
N x 243 x 8 x 8 for CIFAR-10, N x 81 x 7 x 7 for MNIST: the builders derive that shape
from the data's channels and image size and the map's ``J``/``L`` (``model.J``/``model.L``
in conf/model/scatter_*.yaml follow ``features.J``/``features.L``).

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

from typing import Any, Mapping, Optional, Sequence, Union

import torch.nn as nn

from dp_sweeps.data.features.scattering import num_scattering_paths
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


def scatter_input_shape(*, in_channels: int, image_size: int, spatial_size: Optional[int], J: int, L: int,
                        max_order: int) -> tuple[int, int]:
    """(channels, side) of the features the model reads. With ``spatial_size`` unset (the
    configs): the scattering of ``in_channels`` x ``image_size`` images, i.e.
    ``in_channels`` x paths(J, L) channels of ``image_size / 2^J``; set, the model reads
    ``in_channels`` x ``spatial_size`` x ``spatial_size`` features as they are."""
    if spatial_size is not None:
        return in_channels, spatial_size
    if isinstance(J, bool) or not isinstance(J, int) or J < 1:
        raise ValueError(f"model.J={J!r} must be an integer >= 1")
    if image_size % 2**J:
        raise ValueError(f"the scattering's J={J} needs data.image_size divisible by 2^J={2**J}, "
                         f"got data.image_size={image_size}")
    return in_channels * num_scattering_paths(J, L, max_order), image_size // 2**J


@register_model
def scatter_linear(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                   spatial_size: Optional[int] = None, J: int = 2, L: int = 8, max_order: int = 2,
                   norm: str = "group", norm_groups: int = 27) -> nn.Module:
    """GroupNorm(norm_groups, no affine) then one linear layer over all features
    (155,530 parameters for CIFAR-10's 243 x 8 x 8; 39,700 for MNIST's 81 x 7 x 7)."""
    channels, size = scatter_input_shape(in_channels=in_channels, image_size=image_size, spatial_size=spatial_size,
                                         J=J, L=L, max_order=max_order)
    return nn.Sequential(scatter_norm(channels, norm, norm_groups), nn.Flatten(),
                         nn.Linear(channels * size * size, num_classes))


def _conv_spec(layer: Any) -> Optional[tuple[int, int]]:
    """(channels, stride) of a convolution entry of ``layers``, None for anything else."""
    if isinstance(layer, int) and not isinstance(layer, bool) and layer > 0:
        return layer, 1
    if isinstance(layer, Mapping) and set(layer) <= {"conv", "stride"}:
        channels, stride = layer.get("conv"), layer.get("stride", 1)
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (channels, stride)):
            return channels, stride
    return None


@register_model
def scatter_cnn(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                spatial_size: Optional[int] = None, J: int = 2, L: int = 8, max_order: int = 2,
                norm: str = "group", norm_groups: int = 27,
                layers: Sequence[Union[int, str, Mapping]] = (64, "M", 64), hidden: Optional[int] = None) -> nn.Module:
    """GroupNorm, then ``layers`` (an int: 3x3 convolution to that many channels + tanh;
    ``{conv: c, stride: s}``: the same at stride s; ``"M"``: 2x2 max-pool), then one
    linear layer, or with ``hidden`` a tanh layer of that width and then one. The default
    is the paper's CIFAR-10 head (187,210 parameters); its "small" variant is
    ``[16, 16, "M", 32, 32]``; its MNIST head is ``[{conv: 16, stride: 2}, 32]`` with
    ``hidden: 32`` (ftramer/Handcrafted-DP, models.py ``MNIST_CNN``)."""
    channels, size = scatter_input_shape(in_channels=in_channels, image_size=image_size, spatial_size=spatial_size,
                                         J=J, L=L, max_order=max_order)
    modules: list[nn.Module] = [scatter_norm(channels, norm, norm_groups)]
    for layer in layers:
        if layer == "M":
            if size % 2:
                raise ValueError(f"layers={list(layers)!r}: a max-pool on an odd {size}x{size} map")
            modules.append(nn.MaxPool2d(2))
            size //= 2
            continue
        spec = _conv_spec(layer)
        if spec is None:
            raise ValueError(f"layers: {layer!r} is neither a positive channel count, {{conv, stride}} nor 'M'")
        out, stride = spec
        modules += [nn.Conv2d(channels, out, 3, stride=stride, padding=1), nn.Tanh()]
        channels, size = out, (size - 1) // stride + 1
    modules.append(nn.Flatten())
    features = channels * size * size
    if hidden is not None:
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden={hidden!r} must be null or a positive integer")
        modules += [nn.Linear(features, hidden), nn.Tanh()]
        features = hidden
    modules.append(nn.Linear(features, num_classes))
    return nn.Sequential(*modules)
