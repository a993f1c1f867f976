"""Vision Transformer from timm for 32x32 inputs (4x4 patches: 64 tokens). LayerNorm
and attention keep examples independent, so it is DP-compatible as it comes."""

from __future__ import annotations

import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from dp_sweeps.models import disable_inplace, register_model


@register_model
def vit(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4,
        embed_dim: int = 192, depth: int = 6, num_heads: int = 3, mlp_ratio: float = 4.0) -> nn.Module:
    model = VisionTransformer(img_size=image_size, patch_size=patch_size, in_chans=in_channels,
                              num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                              num_heads=num_heads, mlp_ratio=mlp_ratio)
    return disable_inplace(model)
