"""The model registry (timm's pattern): builders register by name; model modules import
this module, never the package, so that importing a model creates no cycle."""

from __future__ import annotations

from typing import Callable, Dict

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


def create_model(name: str, *, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` are the builder's own settings."""
    if name not in _MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODEL_REGISTRY[name](num_classes=num_classes, **kwargs)


def disable_inplace(module: nn.Module) -> nn.Module:
    """Turn off ``inplace`` on every activation: Opacus's full backward hooks raise
    "...is a view and is being modified inplace" on in-place ops of a hooked output."""
    for m in module.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    return module
