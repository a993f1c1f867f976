"""Vision Transformer from timm for small inputs (4x4 patches: 64 tokens at 32x32, 49 at
28x28). LayerNorm and attention keep examples independent, so it is DP-compatible as it comes.

One change for speed, none to the function: timm keeps the class token and the position
embedding as parameters of the ``VisionTransformer`` module itself, for which Opacus has
no per-example gradient rule, so its hooks engine ran ``torch.func`` over the *whole*
network (a second forward and backward pass) just for those two tensors. Here they live
in :class:`TokenEmbedding`, whose per-example gradients are read off its output gradient
(:func:`token_embedding_grad_sample`). Same forward values and gradients as timm's
``_pos_embed`` (class token prepended, then the position embedding added; tested).
State-dict keys: ``token_embed.cls_token`` and ``token_embed.pos_embed``.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
from opacus.grad_sample import register_grad_sampler
from timm.models.vision_transformer import VisionTransformer

from dp_sweeps.models._registry import disable_inplace, register_model


class TokenEmbedding(nn.Module):
    """Prepend the class token to N x L x D patch tokens, then add the position embedding
    (1 x (L + 1) x D): timm's default ``_pos_embed``."""

    def __init__(self, cls_token: torch.Tensor, pos_embed: torch.Tensor):
        super().__init__()
        self.cls_token = nn.Parameter(cls_token.detach().clone())
        self.pos_embed = nn.Parameter(pos_embed.detach().clone())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed


@register_grad_sampler(TokenEmbedding)
def token_embedding_grad_sample(layer: TokenEmbedding, activations: List[torch.Tensor],
                                backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """out[n] = [cls; tokens[n]] + pos, so example n's gradient is its output gradient:
    all of it for ``pos_embed``, its first row for ``cls_token``."""
    grads: Dict[nn.Parameter, torch.Tensor] = {}
    if layer.pos_embed.requires_grad:
        grads[layer.pos_embed] = backprops.unsqueeze(1).clone()
    if layer.cls_token.requires_grad:
        grads[layer.cls_token] = backprops[:, :1].unsqueeze(1).clone()
    return grads


class DPVisionTransformer(VisionTransformer):
    """timm's ``VisionTransformer`` (class token, learned position embedding, no register
    tokens, fixed image size) with the class token and position embedding in a
    :class:`TokenEmbedding` submodule."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.cls_token is None or self.pos_embed is None or self.reg_token is not None \
                or self.no_embed_class or self.dynamic_img_size:
            raise ValueError("DPVisionTransformer supports a class token with a learned position embedding only")
        self.token_embed = TokenEmbedding(self.cls_token, self.pos_embed)
        del self.cls_token, self.pos_embed  # now token_embed's
        self.cls_token = self.pos_embed = None

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # flatten, not reshape(N, -1, D): an empty batch (N = 0) has no -1 to infer.
        return self.pos_drop(self.token_embed(x.flatten(1, -2)))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"token_embed.pos_embed", "token_embed.cls_token", "dist_token"}


@register_model
def vit(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4,
        embed_dim: int = 192, depth: int = 6, num_heads: int = 3, mlp_ratio: float = 4.0) -> nn.Module:
    """``image_size`` / ``patch_size`` patches per side: the patch must divide the image."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"model.patch_size={patch_size!r} must be a positive integer")
    if image_size % patch_size:
        raise ValueError(f"model.patch_size={patch_size} does not divide data.image_size={image_size}")
    model = DPVisionTransformer(img_size=image_size, patch_size=patch_size, in_chans=in_channels,
                                num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                                num_heads=num_heads, mlp_ratio=mlp_ratio)
    return disable_inplace(model)
