"""The small CNN that DP-SGD papers train on CIFAR-10 (Papernot et al. 2021;
Tramèr & Boneh 2021): three stages of two 3x3 convolutions and a max-pool, then two
linear layers. Tanh (a tempered sigmoid) by default: it keeps activations, and so
per-example gradient norms, bounded, which suits clipping."""

from __future__ import annotations

import torch.nn as nn

from dp_sweeps.models._registry import register_model, require_min_size
from dp_sweeps.models.norms import group_norm

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def activation_layer(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


@register_model
def convnet(*, num_classes: int = 10, in_channels: int = 3, width: int = 32,
            hidden: int = 128, activation: str = "tanh", norm: bool = False,
            image_size: int = 32) -> nn.Module:
    """``width`` channels in the first stage, doubling per stage; ``norm`` adds GroupNorm.
    Three 2x2 max-pools: ``image_size`` >= 8 (28 -> 14 -> 7 -> 3, 32 -> 4)."""
    require_min_size(image_size, 8, model="convnet")
    for key, value in (("width", width), ("hidden", hidden)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"model.{key}={value!r} must be a positive integer")
    layers: list[nn.Module] = []
    channels = in_channels
    for stage in range(3):
        out = width * 2**stage
        for _ in range(2):
            layers.append(nn.Conv2d(channels, out, 3, padding=1))
            if norm:
                layers.append(group_norm(out))
            layers.append(activation_layer(activation))
            channels = out
        layers.append(nn.MaxPool2d(2))
    spatial = image_size // 8
    layers += [nn.Flatten(), nn.Linear(channels * spatial * spatial, hidden),
               activation_layer(activation), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)
