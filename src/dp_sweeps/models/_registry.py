"""The model registry (timm's pattern): builders register by name; model modules import
this module, never the package, so that importing a model creates no cycle."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict

import torch.nn as nn

_MODEL_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name (timm's pattern)."""
    if fn.__name__ in _MODEL_REGISTRY:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODEL_REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODEL_REGISTRY)


def create_model(name: str, *, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 data_facts: Any = None, **kwargs) -> nn.Module:
    """Build the registered model ``name`` for images of ``in_channels`` x ``image_size``
    x ``image_size`` and ``num_classes`` classes; ``kwargs`` are the builder's own
    settings. ``data_facts`` (a :class:`dp_sweeps.data.DataFacts`) reaches only builders
    that name a ``data_facts`` parameter (e.g. to preprocess for a pretrained backbone).
    A size the model cannot take raises ValueError naming both values."""
    if name not in _MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    builder = _MODEL_REGISTRY[name]
    if data_facts is not None and "data_facts" in inspect.signature(builder).parameters:
        kwargs["data_facts"] = data_facts
    return builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)


def disable_inplace(module: nn.Module) -> nn.Module:
    """Turn off ``inplace`` on every activation: Opacus's full backward hooks raise
    "...is a view and is being modified inplace" on in-place ops of a hooked output."""
    for m in module.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    return module


def require_min_size(image_size: int, minimum: int, *, model: str) -> None:
    """A builder's refusal of images smaller than its downsampling can take."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < minimum:
        raise ValueError(f"model={model} needs data.image_size >= {minimum}, got data.image_size={image_size!r}")
