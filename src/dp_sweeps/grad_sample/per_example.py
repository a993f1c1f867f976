"""Per-example gradients built in full, for the layers whose Opacus rule we replace:
stride-1 convolutions without im2col, depthwise convolutions, and empty batches.
Used by :mod:`.samplers` (the registered rules) and by :mod:`.bookkeeping` (which builds
them only when it must); it imports neither, so there is no cycle.

Guarantee: each result equals Opacus's ``compute_conv_grad_sample`` to float32
rounding (tests/test_grad_samplers.py), and a padding mode other than zeros is refused
(ConfigError) rather than answered wrong.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.grad_sample.conv import compute_conv_grad_sample as opacus_conv_grad_sample

from dp_sweeps.errors import ConfigError


def _refuse_non_zero_padding(layer: nn.Module) -> None:
    """This module's convolution rules read ``layer.padding`` as zeros: any other padding
    mode raises (check_per_example_support refuses such models before training)."""
    padding_mode = getattr(layer, "padding_mode", "zeros")
    if padding_mode != "zeros":
        raise ConfigError(f"{type(layer).__name__} with padding_mode={padding_mode!r}: the per-example gradient "
                          f"rule of grad_sample_mode=hooks/ghost assumes zero padding; use padding_mode='zeros' "
                          f"or grad_sample_mode=functorch")


def empty_grad_sample(layer: nn.Module, like: torch.Tensor, *, recurse: bool = False
                      ) -> Dict[nn.Parameter, torch.Tensor]:
    """The per-example gradients of an empty batch: for each trainable parameter of
    ``layer``, a 0 x parameter-shape tensor (``like``'s dtype and device)."""
    return {p: like.new_zeros((0, *p.shape)) for p in layer.parameters(recurse=recurse) if p.requires_grad}


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


def build_conv2d_grad_sample(layer: nn.Conv2d, activations: List[torch.Tensor],
                             backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """The per-example gradients themselves: im2col-free where :func:`fast_path_applies`,
    by :func:`depthwise_grad_sample` for depthwise convolutions, else Opacus's
    ``compute_conv_grad_sample``; 0 x shape for an empty batch (Opacus's rule returns one
    row of zeros there); ConfigError for a padding mode other than zeros."""
    _refuse_non_zero_padding(layer)
    x = activations[0]
    if x.shape[0] == 0:
        return empty_grad_sample(layer, backprops)
    if is_depthwise(layer, x):
        return depthwise_grad_sample(layer, x, backprops)
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


def is_depthwise(layer: nn.Module, activations: torch.Tensor) -> bool:
    """A depthwise ``nn.Conv2d`` (one input channel per group, zero padding, explicit
    padding) on a non-empty batch: the case :func:`depthwise_grad_sample` handles."""
    return (type(layer) is nn.Conv2d and layer.groups > 1 and layer.groups == layer.in_channels
            and not isinstance(layer.padding, str) and layer.padding_mode == "zeros"
            and activations.dim() == 4 and activations.shape[0] > 0)


def depthwise_grad_sample(layer: nn.Conv2d, x: torch.Tensor,
                          backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of a depthwise convolution (EfficientNet's, MobileNet's).

    Each output channel o reads one input channel, ``o // multiplier``, so
    ``grad[n, o, 0, a, b] = Σ_{y,x} B[n, o, y, x] · X_pad[n, o // m, s·y + d·a, s·x + d·b]``:
    per kernel offset, one elementwise product of the output gradient with a strided view
    of the padded input, summed over the map (``k_h·k_w`` passes over N x O x Ho x Wo, the
    forward's arithmetic). For stride 1 the same sums are one depthwise convolution of the
    N·O input maps with their own output gradients as kernels (5-9x faster on CPU than the
    views on EfficientNet's stride-1 layers; slower with stride, where it would be dilated).
    Opacus unfolds the input and runs one tiny matrix product per example and channel."""
    x = x.to(backprops.dtype)
    n = x.shape[0]
    kh, kw = layer.kernel_size
    (ph, pw), (sh, sw), (dh, dw) = layer.padding, layer.stride, layer.dilation
    out_h, out_w = backprops.shape[-2:]
    padded = F.pad(x, (pw, pw, ph, ph))
    multiplier = layer.out_channels // layer.in_channels
    if multiplier > 1:
        padded = padded.repeat_interleave(multiplier, dim=1)
    result: Dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad and (sh, sw) == (1, 1):
        # One depthwise convolution over N·O channels: each (example, channel) input map
        # correlated with its own output gradient as the kernel (dilation becomes stride).
        channels = n * layer.out_channels
        grads = F.conv2d(padded.reshape(1, channels, *padded.shape[-2:]), backprops.reshape(channels, 1, out_h, out_w),
                         stride=(dh, dw), groups=channels)
        result[layer.weight] = grads[0, :, :kh, :kw].reshape(n, *layer.weight.shape)
    elif layer.weight.requires_grad:
        # Strided: that convolution would be dilated (slow on CPU); per offset, a product on views.
        per_offset = []
        for a in range(kh):
            for b in range(kw):
                rows = slice(a * dh, a * dh + sh * (out_h - 1) + 1, sh)
                columns = slice(b * dw, b * dw + sw * (out_w - 1) + 1, sw)
                window = padded[:, :, rows, columns]                              # a strided view
                per_offset.append((window * backprops).sum(dim=(2, 3)))          # N x O
        result[layer.weight] = torch.stack(per_offset, dim=-1).reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = backprops.sum(dim=(2, 3))
    return result
