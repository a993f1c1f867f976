"""BatchNorm in pretrained backbones under DP: frozen statistics, a GroupNorm swap, or
refusal.

A BatchNorm in train mode normalises each example with the *batch's* mean and variance:
one example's output then depends on the others in its batch, per-example gradients do
not exist, and the running statistics (later used at test time) are an unprotected
function of the private data. Three ways a pretrained backbone can handle it
(``model.batchnorm``):

- ``frozen_stats``: every BatchNorm becomes :class:`FixedStatsBatchNorm`, which always
  normalises with the running statistics it was pretrained with (public constants) and
  has no train mode at all, so examples stay independent and the statistics cannot
  change. Its affine weight and bias stay parameters (trainable or not, as
  ``model.trainable`` says), with an exact per-example gradient rule
  (:func:`channel_affine_grad_sample`). timm's own ``FrozenBatchNorm2d`` keeps
  the affine part as buffers, so BiTFiT and ``norm_and_head`` could not train it; and
  Opacus's validator refuses a plain ``nn.BatchNorm2d`` with trainable parameters
  whatever its mode. timm's ``BatchNormAct2d`` (BatchNorm, dropout, activation in one
  module) becomes ``Sequential(FixedStatsBatchNorm, drop, act)`` with the same values.
- ``group_norm``: every BatchNorm becomes a GroupNorm (its pretrained affine parameters
  kept, its statistics dropped): the usual DP choice when training from scratch, at the
  price of a mismatch with the pretrained features.
- ``batch_stats``: left as it is, for non-private training only (the proxy's public
  pretraining, :mod:`dp_sweeps.pretrain`); :func:`refuse_batch_statistics` refuses it
  before any private run and :func:`guard_batch_statistics` raises if a BatchNorm ever
  runs in train mode while one trains.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler

from dp_sweeps.errors import ConfigError

BATCHNORM_CHOICES = ("frozen_stats", "group_norm", "batch_stats")


class FixedStandardize(nn.Module):
    """``(x - running_mean) / sqrt(running_var + eps)`` per channel (dimension 1), with
    the statistics as buffers that never change. No parameter."""

    def __init__(self, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", running_mean.detach().clone())
        self.register_buffer("running_var", running_var.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, None, None, False, 0.0, self.eps)


class ChannelAffine(nn.Module):
    """``x · weight + bias`` per channel (dimension 1): BatchNorm's affine part, alone."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class OwnedOutput(nn.Module):
    """``x.clone()``. Opacus's backward hooks make a hooked layer's output a view that
    must not be modified in place, and timm's ResNet blocks add the shortcut in place
    (``x += shortcut``) right after a BatchNorm: this copy (no parameter, so not hooked)
    is what gets modified instead. Same values and gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class FixedStatsBatchNorm(nn.Sequential):
    """A BatchNorm in eval mode, always: :class:`FixedStandardize` (the pretrained
    statistics, buffers) then :class:`ChannelAffine` (the trainable part). Split in two
    because Opacus refuses a trainable layer that holds buffers; ``train()`` has no effect
    on the output."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        if bn.running_mean is None or bn.running_var is None:
            raise ConfigError(f"{type(bn).__name__} without running statistics cannot be frozen: "
                              f"use model.batchnorm=group_norm")
        modules: list[nn.Module] = [FixedStandardize(bn.running_mean, bn.running_var, bn.eps)]
        if bn.affine:
            modules += [ChannelAffine(bn.weight, bn.bias), OwnedOutput()]
        super().__init__(*modules)


@register_grad_sampler(ChannelAffine)
def channel_affine_grad_sample(layer: ChannelAffine, activations: List[torch.Tensor],
                               backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """out[n, c, ...] = x[n, c, ...] · w[c] + b[c], so example n's gradients are
    Σ_positions B[n, c, ...] · x[n, c, ...] (weight) and Σ_positions B[n, c, ...] (bias)."""
    x = activations[0].to(backprops.dtype)
    b = backprops.flatten(2) if backprops.dim() > 2 else backprops.unsqueeze(-1)
    grads: Dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        x = x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)
        grads[layer.weight] = (b * x).sum(-1)
    if layer.bias.requires_grad:
        grads[layer.bias] = b.sum(-1)
    return grads


def _batchnorm_act_tail(bn: nn.Module) -> list[nn.Module]:
    """timm's BatchNormAct2d applies ``drop`` then ``act`` after normalising."""
    return [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]



def _group_norm(bn: nn.modules.batchnorm._BatchNorm) -> nn.GroupNorm:
    channels = bn.num_features
    groups = math.gcd(32, channels)  # Opacus's fixer's choice (at most 32 groups dividing C)
    gn = nn.GroupNorm(groups, channels, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    return gn


def convert_batchnorm(model: nn.Module, *, mode: str) -> nn.Module:
    """Replace every BatchNorm of ``model`` (in place) as ``mode`` (:data:`BATCHNORM_CHOICES`)
    says; returns ``model``."""
    if mode not in BATCHNORM_CHOICES:
        raise ConfigError(f"model.batchnorm={mode!r} is not one of: {', '.join(BATCHNORM_CHOICES)}")
    if mode == "batch_stats":
        return model
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name, bn in targets:
        new = FixedStatsBatchNorm(bn) if mode == "frozen_stats" else _group_norm(bn)
        if isinstance(new, nn.GroupNorm):  # its output may be modified in place (see OwnedOutput)
            new = nn.Sequential(new, OwnedOutput())
        tail = _batchnorm_act_tail(bn)
        if tail:
            new = nn.Sequential(new, *tail)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def refuse_batch_statistics(model: nn.Module) -> None:
    """Before a private run: a BatchNorm that would compute batch statistics (any
    ``_BatchNorm`` left in the model) is refused, naming the layer."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(f"model layer {name!r} ({type(m).__name__}) normalises with batch statistics, "
                              f"which mixes examples under DP: set model.batchnorm=frozen_stats or group_norm")


def guard_batch_statistics(model: nn.Module) -> list:
    """Install a forward pre-hook on every BatchNorm of ``model`` that raises if it runs in
    train mode with gradients enabled (the loud check of a private run). Returns the hooks'
    handles."""
    def check(module: nn.Module, _inputs) -> None:
        if module.training and torch.is_grad_enabled():
            raise RuntimeError(f"{type(module).__name__} ran in train mode during DP training: its batch "
                               f"statistics would mix examples (privacy violation); refusing to continue")
    return [m.register_forward_pre_hook(check) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]
