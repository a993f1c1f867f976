"""Which parameters of a pretrained backbone train (``model.trainable``).

- ``all``: every parameter (full fine-tuning).
- ``head``: the new classifier only (a linear probe; :mod:`dp_sweeps.data.features.backbone`
  is its fast path, with the backbone's features computed once).
- ``bias_and_head``: every bias and the classifier (BiTFiT, Bu et al. 2022).
- ``norm_and_head``: the affine parameters of every normalisation layer (LayerNorm,
  GroupNorm, BatchNorm with fixed statistics) and the classifier.
- ``last_blocks``: the last ``model.trainable_blocks`` blocks and the classifier, where a
  block is one coarse group of timm's ``group_matcher`` (a stage for ResNet and ConvNeXt,
  a transformer block for ViT); the final norm is grouped with the last block by timm.

Guarantee: every other parameter gets ``requires_grad=False``. Opacus then builds no
per-example gradient for it, the optimizer is given only the trainable ones
(:func:`trainable_parameters`), so DP-SGD's clipping, noise and update touch exactly the
trainable set and a frozen parameter stays bit-identical (tests/test_timm_finetune.py).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch.nn as nn

from dp_sweeps.errors import ConfigError
from dp_sweeps.models.frozen_batchnorm import ChannelAffine

TRAINABLE_CHOICES = ("all", "head", "bias_and_head", "norm_and_head", "last_blocks")
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, ChannelAffine)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer (and so DP-SGD) updates."""
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def _norm_parameter_names(model: nn.Module) -> set[str]:
    return {f"{name}.{p_name}" if name else p_name
            for name, m in model.named_modules() if isinstance(m, NORM_TYPES)
            for p_name, _ in m.named_parameters(recurse=False)}


def _last_block_names(groups: Sequence[Sequence[str]], blocks: int) -> set[str]:
    """Names of the parameters in the last ``blocks`` groups before the classifier's group
    (``groups``: stem, blocks..., head, in order)."""
    if not groups:
        raise ConfigError("model.trainable=last_blocks: this model states no block structure; "
                          "use another model.trainable")
    body = list(groups[:-1])  # the last group holds the classifier
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= len(body) - 1:
        raise ConfigError(f"model.trainable_blocks={blocks!r} must be an integer in 1..{len(body) - 1} "
                          f"(blocks of this architecture after its stem)")
    return {name for group in body[-blocks:] for name in group} | set(groups[-1])


def timm_blocks(model: nn.Module, *, prefix: str = "") -> list[list[str]]:
    """A timm model's parameter names (under ``prefix``) in coarse groups, ordered stem,
    blocks, head (timm's ``group_parameters`` over its ``group_matcher``)."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        return []
    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [[prefix + name for name in groups[k]] for k in sorted(groups)]


def select_trainable(model: nn.Module, *, trainable: str, head: Iterable[str], trainable_blocks: int = 1,
                     blocks: Sequence[Sequence[str]] = ()) -> int:
    """Freeze every parameter of ``model`` that ``trainable`` (:data:`TRAINABLE_CHOICES`)
    does not select; ``head`` names the classifier's parameters and ``blocks`` the
    parameter groups for ``last_blocks`` (:func:`timm_blocks`). Returns the number of
    trainable scalars; a selection that leaves none is refused."""
    if trainable not in TRAINABLE_CHOICES:
        raise ConfigError(f"model.trainable={trainable!r} is not one of: {', '.join(TRAINABLE_CHOICES)}")
    head = set(head)
    names = dict(model.named_parameters())
    if trainable == "all":
        keep = set(names)
    elif trainable == "head":
        keep = head
    elif trainable == "bias_and_head":
        keep = head | {n for n in names if n.rsplit(".", 1)[-1] == "bias"}
    elif trainable == "norm_and_head":
        keep = head | _norm_parameter_names(model)
    else:
        keep = _last_block_names(blocks, trainable_blocks)
    for name, p in names.items():
        p.requires_grad_(name in keep)
    count = count_trainable(model)
    if count == 0:
        raise ConfigError(f"model.trainable={trainable!r} leaves no trainable parameter in this model")
    return count


# Layers whose only per-example rule is a registered Opacus grad sampler: torch's
# ExpandedWeights (grad_sample_mode=ew) has no rule for the ops in their forward.
NO_EXPANDED_WEIGHTS = (ChannelAffine,)


def refuse_unsupported_layers(model: nn.Module, *, grad_sample_mode: Optional[str] = None) -> None:
    """Before a private run: refuse, naming it, a trainable layer that Opacus's validators
    reject (e.g. a plain BatchNorm, nn.MultiheadAttention, LSTM): its per-example
    gradients would not exist or would be wrong. Frozen layers need no per-example
    gradient and pass. (Opacus validates too, but without naming the layer, and only
    once training starts.) Under ``grad_sample_mode=ew`` a trainable
    :data:`NO_EXPANDED_WEIGHTS` layer is refused too."""
    from opacus.validators.module_validator import ModuleValidator

    for name, layer in model.named_modules():
        if not any(p.requires_grad for p in layer.parameters(recurse=False)):
            continue
        if grad_sample_mode == "ew" and isinstance(layer, NO_EXPANDED_WEIGHTS):
            raise ConfigError(f"model layer {name!r} ({type(layer).__name__}) has no per-example rule under "
                              f"grad_sample_mode=ew; use hooks, ghost or functorch")
        validator = ModuleValidator.VALIDATORS.get(type(layer))
        errors = validator(layer) if validator is not None else []
        if errors:
            reason = str(errors[0]).strip().splitlines()[0].split(". ")[0]
            raise ConfigError(f"model layer {name!r} ({type(layer).__name__}) is not supported by the per-example "
                              f"gradient engine: {reason}; freeze it (model.trainable) or pick another arch")
