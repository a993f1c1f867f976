"""Faster per-example gradients for Opacus's hooks engines: no zero-filled buffer per
layer, stride-1 and depthwise ``nn.Conv2d`` without im2col, ghost norms for ``nn.Conv2d``,
and no summed gradients that DP-SGD never reads (book-keeping clipping, which avoids
building large per-example gradients at all, is :mod:`dp_sweeps.grad_sample.bookkeeping`).

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

4. Depthwise convolutions (EfficientNet, MobileNet): Opacus unfolds the input and runs
one tiny matrix product per example and channel; :func:`depthwise_grad_sample` takes one
elementwise product per kernel offset on strided views instead.

5. In the hooks engine autograd still computes every layer's *summed* weight gradient
into ``p.grad``, and Opacus's optimizer then overwrites it with the clipped, noised sum
of the per-example gradients: that work (a third of a convolution's or linear layer's
backward FLOPs) is thrown away. :func:`skip_summed_gradients` makes it not happen.

6. Empty batches (a Poisson batch may hold no example; its step must still add the
noise): every sampler here returns per-example gradients (or norms) with 0 rows, and
:func:`install` gives Opacus's functorch rule and its ExpandedWeights engine the same
case, where they crashed (vmap cannot map a convolution over 0 examples; ExpandedWeights
refuses a batch of 0). Tested for every registered model in every engine
(tests/test_empty_batch_samplers.py): the step is exactly the noise.

7. Padding modes: Opacus's per-example rule for convolutions (and so every sampler and
norm here) reads the layer's padding as zeros; ``padding_mode='reflect'``, ``'replicate'``
or ``'circular'`` gets wrong per-example gradients and norms, hence wrong clipping, and
Opacus's validator lets such layers through. :func:`check_per_example_support` refuses
them before training wherever that rule would run; this module's convolution samplers
also refuse them rather than return a wrong value.

Guarantee: the results equal Opacus's ``compute_conv_grad_sample`` (and the norms of
its per-example gradients), tested to float32 rounding on every shape the models use and
on odd ones (depthwise ones with stride, dilation and channel multipliers too); any other
zero-padded convolution (dilated or grouped non-depthwise, string padding) is handed to
Opacus's own code unchanged, an empty batch gets 0-row results and a non-zero padding
mode a ``ConfigError``. Only speed and memory change: clipping, noise and accounting are
Opacus's.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule, GradSampleModuleExpandedWeights
from opacus.grad_sample import grad_sample_module as _opacus_hooks
from opacus.grad_sample.conv import compute_conv_grad_sample as opacus_conv_grad_sample
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient as opacus_functorch_grad_sample
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.grad_sample.linear import compute_linear_grad_sample as opacus_linear_grad_sample
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler
from opacus.utils.tensor_utils import unfold2d

from dp_sweeps.errors import ConfigError
from dp_sweeps.grad_sample.bookkeeping import FactoredGradSample, factored_grad_sample, gram_squared_norms
from dp_sweeps.grad_sample.per_example import (
    _refuse_non_zero_padding,
    build_conv2d_grad_sample,
    depthwise_grad_sample,
    empty_grad_sample,
    fast_path_applies,
    is_depthwise,
)

# Opacus's own storage function, kept for the tests' comparison (install() replaces it).
opacus_store_grad_sample = _opacus_hooks.create_or_accumulate_grad_sample
# Opacus's ExpandedWeights forward (install() wraps it for empty batches).
opacus_expanded_weights_forward = GradSampleModuleExpandedWeights.forward

__all__ = ["build_conv2d_grad_sample", "check_per_example_support", "conv2d_grad_sample", "conv2d_norm_sample",
           "depthwise_grad_sample", "empty_grad_sample", "fast_path_applies", "functorch_grad_sample", "install",
           "is_depthwise", "linear_grad_sample", "skip_summed_gradients", "stock_opacus", "stock_opacus_active",
           "store_grad_sample"]

# True inside stock_opacus(): the benchmark's baseline is Opacus exactly as shipped.
_stock_opacus = False


def stock_opacus_active() -> bool:
    """Inside :func:`stock_opacus`: make_private leaves Opacus's engine as shipped."""
    return _stock_opacus


# The engines whose per-example rule for a convolution is Opacus's hand-written one (and
# this module's), which reads the layer's ``padding`` as zeros: ``hooks``, and ``ghost``,
# whose norms are taken from that rule or from :func:`conv2d_norm_sample`.
ZERO_PADDING_ENGINES = ("hooks", "ghost")
# The engines that differentiate the layer's own forward (``F.pad`` in the layer's mode,
# then the convolution with no padding): ``functorch`` (vmap over autograd) and ``ew``
# (torch's ExpandedWeights, which sees the padded input). Exact for every padding mode.
FORWARD_ENGINES = ("functorch", "ew")


def check_per_example_support(module: nn.Module, grad_sample_mode: str) -> None:
    """Refuse, before training, a model with a layer whose per-example gradients the Opacus
    engine ``grad_sample_mode`` would get wrong: raises :class:`~dp_sweeps.errors.ConfigError`,
    one line naming the first such layer (its qualified name in ``module.named_modules()``,
    its class, the setting) and the way out.

    Refused: a convolution (``nn.Conv1d/2d/3d``, transposed, lazy or subclassed) with a
    trainable parameter and ``padding_mode`` other than ``'zeros'`` (reflect, replicate,
    circular) under ``hooks`` and ``ghost``: their rule unfolds the layer's input with
    *zero* padding, so per-example gradients and norms are wrong, and so is each example's
    clipping (a security review saw one example's clipped contribution reach 1.5x the
    clipping norm). Opacus's ``ModuleValidator`` lets these layers through. Subclasses
    are refused even where Opacus would fall back to functorch for them (conservative). Also refused: an engine not in
    :data:`ZERO_PADDING_ENGINES` or :data:`FORWARD_ENGINES` (nothing is proven for it).

    Allowed: every layer under ``functorch`` and ``ew``, which differentiate the layer's
    own forward (the padding included); a frozen layer (no trainable parameter: no
    per-example gradient is taken) under any engine.

    Guarantee (tests/test_padding_modes.py): under each allowed engine, per-example
    gradients of reflect-, replicate- and circular-padded ``Conv1d/2d/3d`` equal an
    explicit per-example autograd loop; under each refused one they differ from it, and
    this function names the layer. Every registered model passes in every engine.
    """
    if isinstance(module, AbstractGradSampleModule):
        module = module._module  # names as in the user's model
    if grad_sample_mode not in ZERO_PADDING_ENGINES + FORWARD_ENGINES:
        raise ConfigError(f"grad_sample_mode={grad_sample_mode!r}: per-example gradients are checked for "
                          f"{', '.join(ZERO_PADDING_ENGINES + FORWARD_ENGINES)} only")
    if grad_sample_mode in FORWARD_ENGINES:
        return
    for name, layer in module.named_modules():
        padding_mode = getattr(layer, "padding_mode", "zeros")
        if (isinstance(layer, nn.modules.conv._ConvNd) and padding_mode != "zeros"
                and any(p.requires_grad for p in layer.parameters(recurse=False))):
            raise ConfigError(f"model layer {name!r} ({type(layer).__name__}, padding_mode={padding_mode!r}): "
                              f"per-example gradients under grad_sample_mode={grad_sample_mode} assume zero "
                              f"padding; use padding_mode='zeros' or grad_sample_mode=functorch")


def functorch_grad_sample(layer: nn.Module, activations: List[torch.Tensor],
                          backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Opacus's functorch rule (``ft_compute_per_sample_gradient``: vmap of autograd over the
    layer's forward, for layers without a hand-written rule, e.g. WRN's ``WSConv2d``, and
    for every layer under ``grad_sample_mode=functorch``), but for an empty batch the empty
    per-example gradients, where vmap fails (a convolution over 0 examples: "expected
    groups to be greater than 0")."""
    if backprops.shape[0] == 0:
        return empty_grad_sample(layer, backprops, recurse=True)
    return opacus_functorch_grad_sample(layer, activations, backprops)


def expanded_weights_forward(self: GradSampleModuleExpandedWeights, x: torch.Tensor, *args, **kwargs):
    """Opacus's ``GradSampleModuleExpandedWeights.forward``, except on an empty batch, which
    torch's ExpandedWeights refuses ("Batch size must be positive, got 0"): the module's
    plain forward, and when the backward pass reaches its output each trainable parameter
    without per-example gradients gets the empty ones (0 x shape), as the other engines do."""
    if x.shape[0] > 0:
        return opacus_expanded_weights_forward(self, x, *args, **kwargs)
    output = self._module(x, *args, **kwargs)
    if isinstance(output, torch.Tensor) and output.requires_grad:
        params = [p for p in self._module.parameters() if p.requires_grad]

        def set_empty_grad_samples(grad: torch.Tensor) -> None:
            for p in params:
                if getattr(p, "grad_sample", None) is None:
                    p.grad_sample = p.new_zeros((0, *p.shape))

        output.register_hook(set_empty_grad_samples)
    return output


def conv2d_grad_sample(layer: nn.Conv2d, activations: List[torch.Tensor],
                       backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of ``layer``'s weight and bias (Opacus's grad-sampler signature):
    factored (:mod:`dp_sweeps.grad_sample.bookkeeping`) where that pays and is enabled, else built."""
    factored = factored_grad_sample(layer, activations, backprops)
    return factored if factored is not None else build_conv2d_grad_sample(layer, activations, backprops)


def linear_grad_sample(layer: nn.Linear, activations: List[torch.Tensor],
                       backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Opacus's ``nn.Linear`` sampler, or factored gradients where book-keeping pays."""
    factored = factored_grad_sample(layer, activations, backprops)
    return factored if factored is not None else opacus_linear_grad_sample(layer, activations, backprops)


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
    building wins on large early ones; the cheaper is taken per layer and call.

    An empty batch gets empty norms (0 rows; building them failed); a padding mode other
    than zeros raises ConfigError (the rule reads the padding as zeros)."""
    _refuse_non_zero_padding(layer)
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if n == 0:
        return {p: backprops.new_zeros((0,)) for p in layer.parameters(recurse=False) if p.requires_grad}
    if not (type(layer) is nn.Conv2d and layer.groups == 1 and not isinstance(layer.padding, str)
            and layer.padding_mode == "zeros" and x.dim() == 4 and n > 0):
        samples = build_conv2d_grad_sample(layer, activations, backprops)
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
            squared = gram_squared_norms(unfolded.transpose(1, 2), backprops.transpose(1, 2))
        else:
            samples = build_conv2d_grad_sample(layer, activations, output_gradient)
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
    current = getattr(param, "_current_grad_sample", None)
    if isinstance(grad_sample, FactoredGradSample) and (current is not None or grad_sample.shape[0] != max_batch_len):
        grad_sample = grad_sample.materialize()  # only whole, single contributions stay factored
    if isinstance(current, FactoredGradSample):
        current = current.materialize()
    if isinstance(grad_sample, FactoredGradSample):
        param._current_grad_sample = grad_sample
        return
    if grad_sample.shape[0] != max_batch_len:  # a shorter batch (packed sequences): zero-pad as Opacus
        padded = grad_sample.new_zeros((max_batch_len, *grad_sample.shape[1:]))
        padded[: grad_sample.shape[0]] = grad_sample
        grad_sample = padded
    if current is None:
        param._current_grad_sample = grad_sample.contiguous()
    else:  # a parameter used twice in one forward pass (weight tying)
        param._current_grad_sample = current + grad_sample


def _forward_without_summed_gradient(layer: nn.Module, grad_sample_module: GradSampleModule):
    """``layer``'s forward, with its parameters detached while the per-example hooks run."""
    plain_forward = layer.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        # The input must carry the graph: the backward hook then still receives the
        # output gradient. A first layer (input without grad) keeps its plain forward.
        if not (grad_sample_module.hooks_enabled and layer.training and torch.is_grad_enabled() and x.requires_grad):
            return plain_forward(x)
        weight = layer.weight.detach()
        bias = None if layer.bias is None else layer.bias.detach()
        if type(layer) is nn.Conv2d:
            return layer._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    return forward


def skip_summed_gradients(grad_sample_module: GradSampleModule) -> int:
    """Stop autograd from computing the summed weight gradients of ``nn.Conv2d`` and
    ``nn.Linear`` layers inside an Opacus hooks-engine ``GradSampleModule``; returns how
    many layers were changed.

    Guarantee: no value changes. DP-SGD never reads those sums: Opacus's ``DPOptimizer``
    sets ``p.grad`` to the clipped per-example gradients' sum plus noise, built from
    ``p.grad_sample``. The per-example gradients come from the activations and output
    gradients the hooks capture, and both are the same whether or not the weights are
    detached (the forward values are identical, and the gradient still flows through each
    layer's input). Tested: per-example gradients equal bit for bit, and the optimizer's
    clipped, noised step is the same (tests/test_grad_samplers.py). Applied only where the
    layer's own sampler is Opacus's rule (not functorch, which re-runs the forward on
    the parameters), and only while the hooks are enabled: with them disabled the layer
    trains as usual. Not for ghost clipping, whose second backward needs the sums.
    """
    if type(grad_sample_module) is not GradSampleModule or grad_sample_module.force_functorch:
        return 0
    changed = 0
    for layer in grad_sample_module._module.modules():
        if (type(layer) in (nn.Conv2d, nn.Linear) and type(layer) in grad_sample_module.GRAD_SAMPLERS
                and any(p.requires_grad for p in layer.parameters(recurse=False))):
            layer.forward = _forward_without_summed_gradient(layer, grad_sample_module)
            changed += 1
    return changed


@contextlib.contextmanager
def stock_opacus():
    """Opacus's own sampler and storage inside the block (the benchmark's baseline), this
    module's again after it. The empty-batch fixes of :func:`install` (functorch rule,
    ExpandedWeights forward) stay: they change nothing on a non-empty batch."""
    from opacus.grad_sample import grad_sample_module_fast_gradient_clipping

    GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] = opacus_conv_grad_sample
    GradSampleModule.GRAD_SAMPLERS[nn.Linear] = opacus_linear_grad_sample
    GradSampleModuleFastGradientClipping.NORM_SAMPLERS.pop(nn.Conv2d, None)
    _opacus_hooks.create_or_accumulate_grad_sample = opacus_store_grad_sample
    grad_sample_module_fast_gradient_clipping.create_or_accumulate_grad_sample = opacus_store_grad_sample
    global _stock_opacus
    _stock_opacus = True
    try:
        yield
    finally:
        _stock_opacus = False
        install()


def install() -> None:
    """Route Opacus's hooks engines through this module (idempotent): :func:`conv2d_grad_sample`
    for ``nn.Conv2d``, :func:`store_grad_sample` for storing per-example gradients, and
    :func:`skip_summed_gradients` enabled for ``make_private`` (off in :func:`stock_opacus`);
    :func:`functorch_grad_sample` and :func:`expanded_weights_forward` for empty batches.
    Inside :func:`stock_opacus` it does nothing: the baseline stays Opacus as shipped."""
    from opacus.grad_sample import grad_sample_module_fast_gradient_clipping

    if _stock_opacus:
        return

    _opacus_hooks.ft_compute_per_sample_gradient = functorch_grad_sample
    grad_sample_module_fast_gradient_clipping.ft_compute_per_sample_gradient = functorch_grad_sample
    GradSampleModuleExpandedWeights.forward = expanded_weights_forward
    # Opacus's own registration decorators, applied here rather than at import.
    register_grad_sampler(nn.Conv2d)(conv2d_grad_sample)
    register_grad_sampler(nn.Linear)(linear_grad_sample)
    register_norm_sampler(nn.Conv2d)(conv2d_norm_sample)
    _opacus_hooks.create_or_accumulate_grad_sample = store_grad_sample
    grad_sample_module_fast_gradient_clipping.create_or_accumulate_grad_sample = store_grad_sample
