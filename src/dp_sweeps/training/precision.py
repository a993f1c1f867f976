"""Mixed precision (``trainer.precision``): ``fp32`` or ``bf16``.

``bf16`` runs the model's forward pass (and so its backward, which autograd keeps in the
forward's dtypes) under :func:`torch.autocast` with bfloat16, on CUDA and on CPU alike.
What DP-SGD computes from those passes stays in float32:

- the per-example gradients, their norms and the clipping: the activations and output
  gradients that Opacus's hooks capture (bfloat16 under autocast) are cast to float32
  before any grad sampler sees them (:func:`per_example_math_in_fp32`), so the norm that
  sets each example's clipping factor is the float32 norm of exactly the float32 tensor
  that is clipped and summed (sensitivity ≤ C as in fp32);
- the noise: Opacus draws it like the summed gradient, which is float32;
- the weights, their gradients and the optimizer state: autocast never changes a
  parameter's dtype.

No loss scaling: bfloat16 has float32's exponent range. Hand-written because Opacus has
no mixed-precision mode: its hooks compute per-example gradients in whatever dtype the
captured tensors have.
"""

from __future__ import annotations

import contextlib
import types
from typing import ContextManager

import torch
import torch.nn as nn

PRECISIONS = ("fp32", "bf16")
_REDUCED = (torch.bfloat16, torch.float16)


def autocast(precision: str, device: torch.device) -> ContextManager:
    """The forward pass's context: bfloat16 autocast for ``bf16``, nothing for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")


def _float32(tensor):
    if isinstance(tensor, torch.Tensor) and tensor.dtype in _REDUCED:
        return tensor.float()
    return tensor


def per_example_math_in_fp32(grad_sample_module: nn.Module) -> bool:
    """Make an Opacus grad-sample module (hooks, book-keeping, ghost) hand float32
    activations and output gradients to its grad samplers, so per-example gradients and
    norms are computed in float32 from the bfloat16 passes. Returns False (nothing
    changed) for a module without Opacus's hooks (``ew``: refused with bf16 by the
    validation)."""
    rearrange = getattr(grad_sample_module, "rearrange_grad_samples", None)
    if rearrange is None:
        return False

    def rearrange_in_fp32(self, **kwargs):
        activations, backprops = rearrange(**kwargs)
        return [_float32(a) for a in activations], _float32(backprops)

    grad_sample_module.rearrange_grad_samples = types.MethodType(rearrange_in_fp32, grad_sample_module)
    return True
