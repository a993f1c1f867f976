"""DenseNet-121 from timm, made DP-compatible: GroupNorm+ReLU in place of every
``BatchNormAct2d``, activations out of place, and a CIFAR stem (3x3 convolution at
stride 1, no max-pool) for small inputs (32x32, 28x28)."""

from __future__ import annotations

from typing import Sequence

import timm
import torch.nn as nn

from dp_sweeps.models._registry import disable_inplace, register_model, require_min_size
from dp_sweeps.models.norms import group_norm_act


@register_model
def densenet121(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, growth_rate: int = 32,
                block_config: Sequence[int] = (6, 12, 24, 16)) -> nn.Module:
    """Any ``image_size`` >= 2^(transitions): each of the ``len(block_config) - 1``
    transitions halves the map, and global pooling reads whatever is left."""
    require_min_size(image_size, 2 ** (len(block_config) - 1), model="densenet121")
    model = timm.create_model("densenet121", pretrained=False, num_classes=num_classes,
                              in_chans=in_channels, growth_rate=growth_rate,
                              block_config=tuple(block_config), norm_layer=group_norm_act)
    stem_channels = model.features.conv0.out_channels
    model.features.conv0 = nn.Conv2d(in_channels, stem_channels, 3, 1, 1, bias=False)
    model.features.pool0 = nn.Identity()
    return disable_inplace(model)
