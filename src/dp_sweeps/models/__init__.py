"""Model registry: every classifier (deep or classical) is built by name through
:func:`create_model`, so the training loop never branches on a model's name.

Deep models registered here are DP-compatible by construction: GroupNorm instead of
BatchNorm (BatchNorm mixes examples, so per-example gradients would not exist), and
no in-place operation on a hooked module's output (Opacus's backward hooks forbid it).
"""

# Importing the builder modules registers them.
from dp_sweeps.models import convnet, densenet, efficientnet, resnet, scatter, timm_backbone, vit, wrn  # noqa: E402,F401
from dp_sweeps.models._registry import create_model, disable_inplace, list_models, register_model

__all__ = ["create_model", "disable_inplace", "list_models", "register_model"]
