"""Faster per-example gradients for Opacus's hooks engines: no zero-filled buffer per
layer, stride-1 ``nn.Conv2d`` without im2col, and ghost norms for ``nn.Conv2d``.

1. Opacus stores each layer's per-example gradients by allocating a zero buffer of the
batch's size and copying them in (``create_or_accumulate_grad_sample``), so every
per-example gradient is written three times (sampler, ``fill_``, ``copy_``). When the
gradients already span the whole batch (always, for the image models here), keeping the
sampler's own tensor is the same value: :func:`store_grad_sample` does that, and adds
out of place when a parameter receives a second contribution. Measured on the ConvNet
(CPU, one thread, batch 64): the zero fill alone was 13% of a DP step.

2. Convolutions:

Opacus computes a convolution's per-example weight gradient by unfolding the input
(im2col: a zero-padded copy, then a copy ``k_h·k_w`` times the activation's size) and one
batched matrix product. On CPU those copies cost more than the product itself (profile of
the ConvNet: ``copy_`` + ``fill_`` 31% of a DP step, ``bmm`` 15%).

For stride 1, dilation 1 and one group (every 3x3 convolution of the paper's ConvNet and
ResNet-18) the unfold is not needed. Lay the zero-padded input ``A`` (N x C x Hp x Wp)
out flat, and the output gradient ``B`` (N x O x Ho x Wo) on the same row width Wp (zeros
in the last ``Wp - Wo`` columns). Then kernel offset ``(a, b)`` reads ``A`` shifted by
``a·Wp + b`` in that flat layout: a view, not a copy. So

    grad[n, o, c, a, b] = Σ_t B_flat[n, o, t] · A_flat[n, c, t + a·Wp + b]

is ``k_h·k_w`` batched products on views, with the same arithmetic as Opacus's single
product (rows ``Ho·Wp`` long instead of ``Ho·Wo``: +6% for a 32-wide map with padding 1).

3. Ghost clipping (``grad_sample_mode=ghost``) needs only per-example gradient *norms*;
Opacus 1.6 has no norm rule for convolutions and built every gradient to take its norm.
:func:`conv2d_norm_sample` is that rule (see its docstring).

Guarantee: the results equal Opacus's ``compute_conv_grad_sample`` (and the norms of
its per-example gradients), tested to float32 rounding on every shape the models use and
on odd ones; any other convolution (dilation, groups, non-zero padding modes, string
padding, empty batches) is handed to Opacus's own code unchanged. Only speed and memory
change: clipping, noise and accounting are Opacus's.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample import grad_sample_module as _opacus_hooks
from opacus.grad_sample.conv import compute_conv_grad_sample as opacus_conv_grad_sample
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
from opacus.utils.tensor_utils import unfold2d

# Opacus's own storage function, kept for the tests' comparison (install() replaces it).
opacus_store_grad_sample = _opacus_hooks.create_or_accumulate_grad_sample

__all__ = ["conv2d_grad_sample", "conv2d_norm_sample", "fast_path_applies", "install", "stock_opacus", "store_grad_sample"]


def fast_path_applies(layer: nn.Module, activations: torch.Tensor) -> bool:
    """Stride-1 dense convolutions on maps large enough that im2col's copy (``Ho·Wo``
    rows per example and offset) outweighs interleaving the per-offset results into the
    weight's layout (``O`` rows): early, high-resolution layers."""
    if not (type(layer) is nn.Conv2d and layer.groups == 1 and tuple(layer.stride) == (1, 1)
            and tuple(layer.dilation) == (1, 1) and not isinstance(layer.padding, str)
            and layer.padding_mode == "zeros" and activations.dim() == 4 and activations.shape[0] > 0):
        return False
    height, width = activations.shape[-2:]
    out_h = height + 2 * layer.padding[0] - layer.kernel_size[0] + 1
    out_w = width + 2 * layer.padding[1] - layer.kernel_size[1] + 1
    return out_h * out_w > 2 * layer.out_channels


def conv2d_grad_sample(layer: nn.Conv2d, activations: List[torch.Tensor],
                       backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of ``layer``'s weight and bias (Opacus's grad-sampler signature)."""
    x = activations[0]
    if not fast_path_applies(layer, x):
        return opacus_conv_grad_sample(layer, activations, backprops)
    x = x.to(backprops.dtype)
    n, channels, height, width = x.shape
    kh, kw = layer.kernel_size
    ph, pw = layer.padding
    out_h, out_w = height + 2 * ph - kh + 1, width + 2 * pw - kw + 1
    padded_w = width + 2 * pw
    result: Dict[nn.Parameter, torch.Tensor] = {}
    backprops = backprops.reshape(n, -1, out_h, out_w)
    if layer.weight.requires_grad:
        padded = F.pad(x, (pw, pw, ph, ph)).reshape(n, channels, -1)          # N x C x Hp·Wp
        laid = backprops.new_zeros(n, backprops.shape[1], out_h, padded_w)  # B on the padded width
        laid[..., :out_w] = backprops
        # Up to the last output column of the last row: every shifted window stays inside A.
        length = (out_h - 1) * padded_w + out_w
        rows = laid.reshape(n, -1, out_h * padded_w)[:, :, :length]         # N x O x L (a view)
        per_offset = [torch.bmm(rows, padded[:, :, a * padded_w + b: a * padded_w + b + length].transpose(1, 2))
                      for a in range(kh) for b in range(kw)]                  # each N x O x C
        result[layer.weight] = torch.stack(per_offset, dim=-1).reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = backprops.sum(dim=(2, 3))
    return result


def conv2d_norm_sample(layer: nn.Conv2d, activations: List[torch.Tensor],
                       backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-example gradient norms of ``layer``'s weight and bias, for Opacus's ghost
    clipping (a norm sampler: per parameter, a vector of N norms). Opacus 1.6 has none for
    convolutions, so its ghost mode built every per-example gradient just to take its norm.

    With ``a_t`` the unfolded input and ``b_t`` the output gradient at output position ``t``
    (``T`` positions), example n's weight gradient is ``G = Σ_t b_t a_tᵀ`` and
    ``‖G‖² = Σ_{t,t'} (a_t·a_t')(b_t·b_t')`` (the ghost norm: two T x T Gram matrices).
    That costs ``T²(d + O)`` per example against ``T·d·O`` for building ``G`` (d = C·k_h·k_w):
    the ghost norm wins on small late maps (ResNet-18's 4x4 stage: 16² x 5120 vs 16 x 2.4M),
    building wins on large early ones; the cheaper is taken per layer and call."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if not (type(layer) is nn.Conv2d and layer.groups == 1 and not isinstance(layer.padding, str)
            and layer.padding_mode == "zeros" and x.dim() == 4 and n > 0):
        samples = opacus_conv_grad_sample(layer, activations, backprops)
        return {p: g.reshape(n, -1).norm(2, dim=1) for p, g in samples.items()}
    output_gradient = backprops
    backprops = backprops.reshape(n, layer.out_channels, -1)                  # N x O x T
    positions = backprops.shape[-1]
    unfolded_size = (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]
    result: Dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        if positions * (unfolded_size + layer.out_channels) < unfolded_size * layer.out_channels:
            unfolded = unfold2d(x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                                dilation=layer.dilation)                       # N x d x T
            gram_a = torch.bmm(unfolded.transpose(1, 2), unfolded)              # N x T x T
            gram_b = torch.bmm(backprops.transpose(1, 2), backprops)
            squared = (gram_a * gram_b).sum(dim=(1, 2))
        else:
            samples = conv2d_grad_sample(layer, activations, output_gradient)
            squared = samples[layer.weight].reshape(n, -1).pow(2).sum(1)
        result[layer.weight] = squared.clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = backprops.sum(dim=2).norm(2, dim=1)
    return result


def store_grad_sample(*, param: torch.Tensor, grad_sample: torch.Tensor, max_batch_len: int) -> None:
    """Drop-in for Opacus's ``create_or_accumulate_grad_sample`` (same arguments, same
    resulting ``param._current_grad_sample``), without the zero-filled copy when
    ``grad_sample`` covers the whole batch. Never writes into ``grad_sample``, which may
    be a view of autograd's buffers."""
    if not param.requires_grad:
        return
    if grad_sample.shape[0] != max_batch_len:  # a shorter batch (packed sequences): zero-pad as Opacus
        padded = grad_sample.new_zeros((max_batch_len, *grad_sample.shape[1:]))
        padded[: grad_sample.shape[0]] = grad_sample
        grad_sample = padded
    current = getattr(param, "_current_grad_sample", None)
    if current is None:
        param._current_grad_sample = grad_sample.contiguous()
    else:  # a parameter used twice in one forward pass (weight tying)
        param._current_grad_sample = current + grad_sample


@contextlib.contextmanager
def stock_opacus():
    """Opacus's own sampler and storage inside the block (the benchmark's baseline), this
    module's again after it."""
    from opacus.grad_sample import grad_sample_module_fast_gradient_clipping

    GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] = opacus_conv_grad_sample
    GradSampleModuleFastGradientClipping.NORM_SAMPLERS.pop(nn.Conv2d, None)
    _opacus_hooks.create_or_accumulate_grad_sample = opacus_store_grad_sample
    grad_sample_module_fast_gradient_clipping.create_or_accumulate_grad_sample = opacus_store_grad_sample
    try:
        yield
    finally:
        install()


def install() -> None:
    """Route Opacus's hooks engines through this module (idempotent): :func:`conv2d_grad_sample`
    for ``nn.Conv2d`` and :func:`store_grad_sample` for storing per-example gradients."""
    from opacus.grad_sample import grad_sample_module_fast_gradient_clipping

    GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] = conv2d_grad_sample
    GradSampleModuleFastGradientClipping.NORM_SAMPLERS[nn.Conv2d] = conv2d_norm_sample
    _opacus_hooks.create_or_accumulate_grad_sample = store_grad_sample
    grad_sample_module_fast_gradient_clipping.create_or_accumulate_grad_sample = store_grad_sample
