"""EfficientNet from timm, made DP-compatible: timm's ``BatchNormAct2d`` (which
Opacus's ``ModuleValidator.fix`` does not replace) becomes GroupNorm+activation, every
activation runs out of place, and the stem keeps full resolution on 32x32 inputs."""

from __future__ import annotations

import timm
import torch.nn as nn

from dp_sweeps.models._registry import disable_inplace, register_model, require_min_size
from dp_sweeps.models.norms import group_norm_act


@register_model
def efficientnet(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 variant: str = "efficientnet_b0", stem_stride: int = 1, drop_rate: float = 0.0) -> nn.Module:
    """``variant`` is any timm EfficientNet (``test_efficientnet`` is a tiny one for tests).
    Any ``image_size`` >= 8: the stages are strided convolutions ending in global pooling."""
    require_min_size(image_size, 8, model="efficientnet")
    model = timm.create_model(variant, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                              norm_layer=group_norm_act, drop_rate=drop_rate)
    stem = model.conv_stem
    model.conv_stem = nn.Conv2d(stem.in_channels, stem.out_channels, stem.kernel_size,
                                stride=stem_stride, padding=stem.kernel_size[0] // 2, bias=False)
    return disable_inplace(model)
