"""Book-keeping clipping for Opacus's hooks engine: per-example gradient norms and the
clipped sum, without building the per-example gradients of layers where that costs more.

A convolution's or linear layer's per-example weight gradient is a sum over its ``T``
positions (pixels, tokens) of outer products, ``G_n = Σ_t b_{n,t} a_{n,t}ᵀ`` (``a``: the
unfolded input, d wide; ``b``: the output gradient, O wide). DP-SGD needs two things of
the ``G_n``: their norms, to get each example's clipping factor ``c_n``, and the clipped
sum ``Σ_n c_n G_n``. Opacus builds every ``G_n`` (N·d·O floats) for both. Late
convolutions of a ResNet have small maps and many channels (ResNet-18's last stage:
T = 16, d·O = 2.4M), so that tensor is large and cheap to avoid:

- the norm is the ghost norm ``‖G_n‖² = Σ_{t,t'} (a_t·a_t')(b_t·b_t')``: two T x T Gram
  matrices per example (Li et al. 2022; :func:`dp_sweeps.grad_sample.samplers.conv2d_norm_sample`);
- the clipped sum is the layer's ordinary weight gradient with each example's output
  gradient scaled by ``c_n``: ``Σ_n c_n G_n = Σ_{n,t} (c_n b_{n,t}) a_{n,t}ᵀ``, one
  convolution-weight-gradient (or matrix) product over the whole batch.

This is Bu et al.'s book-keeping (BK) clipping ("Differentially Private Optimization on
Large Model at Small Cost", ICML 2023), taken per layer where ``T·(d + O) < d·O`` (the
Gram matrices cost less than the per-example gradients); other layers keep Opacus's
per-example gradients. It needs no second backward pass (unlike Opacus's ghost mode).

How it plugs into Opacus: the layer's grad sampler stores a :class:`FactoredGradSample`
in ``p.grad_sample`` — an N x 1 tensor of the per-example norms that also keeps the
layer's input and output gradient — and :class:`BookkeepingDPOptimizer` (Opacus's
``DPOptimizer`` with ``clip_and_accumulate`` extended) forms the clipped sum from them.
Noise, scaling, the step and accounting are Opacus's own code.

Guarantee: each example's clipping factor is Opacus's ``min(1, C / (‖g_n‖ + 1e-6))`` of
its whole per-example gradient norm, and the summed gradient equals Opacus's einsum of
the factors with the materialised per-example gradients, up to float rounding (tested on
every model family against stock Opacus and an explicit per-example loop:
tests/test_grad_sample_modes.py, tests/test_bookkeeping.py). A factored gradient that
reaches any other optimizer fails loudly (its shape is N x 1), never silently.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.linear import compute_linear_grad_sample as opacus_linear_grad_sample
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.tensor_utils import unfold2d

from dp_sweeps.grad_sample.per_example import build_conv2d_grad_sample

__all__ = ["BookkeepingDPOptimizer", "FactoredGradSample", "enable_bookkeeping", "factored_grad_sample",
           "factoring_pays", "gram_squared_norms"]

# Marks layers whose samplers may return factored gradients (set by enable_bookkeeping).
_FLAG = "_dp_sweeps_bookkeeping"


class FactoredGradSample(torch.Tensor):
    """Per-example gradients of one parameter kept as factors: the tensor's value is the
    N x 1 per-example gradient norms; ``layer``, ``activations`` and ``backprops`` give
    the gradients themselves (:meth:`clipped_sum`, :meth:`materialize`)."""

    # Operations on it give plain tensors: only the optimizer below reads the factors.
    __torch_function__ = torch._C._disabled_torch_function_impl

    layer: nn.Module
    param_name: str
    activations: torch.Tensor
    backprops: torch.Tensor

    @staticmethod
    def create(norms: torch.Tensor, layer: nn.Module, param_name: str, activations: torch.Tensor,
               backprops: torch.Tensor) -> "FactoredGradSample":
        factored = torch.Tensor._make_subclass(FactoredGradSample, norms.reshape(-1, 1))
        factored.layer, factored.param_name = layer, param_name
        factored.activations, factored.backprops = activations, backprops
        return factored

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        """``Σ_n factors[n] · G_n`` (the parameter's shape), without building the ``G_n``."""
        scaled = self.backprops * factors.to(self.backprops.dtype).reshape(-1, *[1] * (self.backprops.dim() - 1))
        layer = self.layer
        if self.param_name == "bias":
            return scaled.sum(dim=(0, 2, 3)) if type(layer) is nn.Conv2d \
                else scaled.reshape(-1, scaled.shape[-1]).sum(dim=0)
        if type(layer) is nn.Conv2d:
            return torch.nn.grad.conv2d_weight(self.activations.to(scaled.dtype), layer.weight.shape, scaled,
                                               stride=layer.stride, padding=layer.padding,
                                               dilation=layer.dilation, groups=layer.groups)
        return scaled.reshape(-1, scaled.shape[-1]).t() @ self.activations.reshape(-1, self.activations.shape[-1])

    def materialize(self) -> torch.Tensor:
        """The per-example gradients themselves (N x parameter shape), as Opacus builds them."""
        sampler = build_conv2d_grad_sample if type(self.layer) is nn.Conv2d else opacus_linear_grad_sample
        return sampler(self.layer, [self.activations], self.backprops)[getattr(self.layer, self.param_name)]


def _positions_and_widths(layer: nn.Module, backprops: torch.Tensor) -> tuple[int, int, int]:
    """(T, d, O): positions per example, input width, output width."""
    if type(layer) is nn.Conv2d:
        width = (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]
        return backprops[0, 0].numel(), width, layer.out_channels
    return backprops[0, ..., 0].numel(), layer.in_features, layer.out_features


def factoring_pays(layer: nn.Module, activations: torch.Tensor, backprops: torch.Tensor) -> bool:
    """Book-keeping applies to this call: a dense ``nn.Conv2d`` (zero padding, no string
    padding) or an ``nn.Linear``, a non-empty batch, and Gram matrices cheaper than the
    per-example gradients (``T·(d + O) < d·O``)."""
    if not getattr(layer, _FLAG, False) or activations.shape[0] == 0:
        return False
    if type(layer) is nn.Conv2d:
        if (layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros"
                or activations.dim() != 4):
            return False
    elif type(layer) is not nn.Linear:
        return False
    positions, d, o = _positions_and_widths(layer, backprops)
    return positions * (d + o) < d * o


def gram_squared_norms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_{t,t'} (a_t·a_t')(b_t·b_t') per example; a: N x T x d, b: N x T x O."""
    if a.shape[1] == 1:
        return a.pow(2).sum(dim=(1, 2)) * b.pow(2).sum(dim=(1, 2))
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(b, b.transpose(1, 2))).sum(dim=(1, 2))


def factored_grad_sample(layer: nn.Module, activations: List[torch.Tensor],
                         backprops: torch.Tensor) -> Optional[Dict[nn.Parameter, torch.Tensor]]:
    """The layer's per-example gradients as :class:`FactoredGradSample`, or None when
    book-keeping does not pay here (the caller then builds them)."""
    x = activations[0].to(backprops.dtype)
    if not factoring_pays(layer, x, backprops):
        return None
    n = x.shape[0]
    if type(layer) is nn.Conv2d:
        a = unfold2d(x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                     dilation=layer.dilation).transpose(1, 2)                    # N x T x d
        b = backprops.reshape(n, layer.out_channels, -1).transpose(1, 2)        # N x T x O
    else:
        a, b = x.reshape(n, -1, x.shape[-1]), backprops.reshape(n, -1, backprops.shape[-1])
    result: Dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        norms = gram_squared_norms(a, b).clamp(min=0).sqrt()
        result[layer.weight] = FactoredGradSample.create(norms, layer, "weight", x, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = FactoredGradSample.create(b.sum(dim=1).norm(2, dim=1), layer, "bias", x, backprops)
    return result


class _BookkeepingMixin:
    """``clip_and_accumulate`` that also takes :class:`FactoredGradSample` gradients.
    Clipping factors: Opacus's formula on the same per-example norms."""

    def clip_and_accumulate(self) -> None:
        if not any(isinstance(p.grad_sample, (FactoredGradSample, list)) for p in self.params):
            return super().clip_and_accumulate()
        for p in self.params:  # several backward passes before a step: build the gradients
            if isinstance(p.grad_sample, list):
                p.grad_sample = [g.materialize() if isinstance(g, FactoredGradSample) else g for g in p.grad_sample]
        samples = [self._get_flat_grad_sample(p) for p in self.params]
        if len(samples[0]) == 0:
            factors = torch.zeros((0,), device=samples[0].device)
        else:
            per_param_norms = [g.reshape(len(g), -1).norm(2, dim=-1) for g in samples]
            per_sample_norms = torch.stack(per_param_norms, dim=1).norm(2, dim=1)
            factors = (self.max_grad_norm / (per_sample_norms + 1e-6)).clamp(max=1.0)
        for p, sample in zip(self.params, samples):
            _check_processed_flag(p.grad_sample)
            factors_here = factors.to(sample.device).to(p.dtype)
            if isinstance(sample, FactoredGradSample):
                grad = sample.clipped_sum(factors_here).to(p.dtype).reshape(p.shape)
            else:
                grad = torch.einsum("i,i...", factors_here, sample.to(p.dtype))
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)


class BookkeepingDPOptimizer(_BookkeepingMixin, DPOptimizer):
    """Opacus's ``DPOptimizer`` that accepts factored per-example gradients."""


class BookkeepingDistributedDPOptimizer(_BookkeepingMixin, DistributedDPOptimizer):
    """Opacus's ``DistributedDPOptimizer`` that accepts factored per-example gradients."""


_BOOKKEEPING_CLASSES = {DPOptimizer: BookkeepingDPOptimizer, DistributedDPOptimizer: BookkeepingDistributedDPOptimizer}


def enable_bookkeeping(grad_sample_module: GradSampleModule, optimizer: DPOptimizer) -> int:
    """Turn on book-keeping for the ``nn.Conv2d`` / ``nn.Linear`` layers of an Opacus
    hooks-engine module whose optimizer is Opacus's flat-clipping ``DPOptimizer`` (or its
    distributed form), which becomes the book-keeping subclass (same state, same noise).
    Returns how many layers may factor; 0 (nothing changed) for any other engine or optimizer."""
    book_class = _BOOKKEEPING_CLASSES.get(type(optimizer))
    if (book_class is None or type(grad_sample_module) is not GradSampleModule
            or grad_sample_module.force_functorch):
        return 0
    layers = [m for m in grad_sample_module._module.modules() if type(m) in (nn.Conv2d, nn.Linear)
              and any(p.requires_grad for p in m.parameters(recurse=False))]
    for layer in layers:
        setattr(layer, _FLAG, True)
    optimizer.__class__ = book_class  # only clip_and_accumulate differs: no state to move
    return len(layers)
