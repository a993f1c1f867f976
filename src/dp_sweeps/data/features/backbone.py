"""A frozen pretrained backbone as a feature map: the fast path of a linear probe
(``model=timm_probe``, which selects ``features=backbone``).

With the backbone frozen, its pooled features are a fixed function of one image whose
weights were fitted on *public* data: computing them reads nothing private beyond the
image itself, so it costs no privacy, exactly like the ScatterNet transform. They are
computed once per data set (in eval mode: BatchNorm uses its pretrained statistics) and
cached by :func:`dp_sweeps.data.features.compute_features`; only the linear head then
trains under DP, so an epoch costs what a logistic regression on ``num_features``
inputs costs.

Cache key: the settings, the input's fingerprint, and :func:`weights_identity`, a hash
of the backbone's state dict after loading: new weights under the same checkpoint path
(or a new hub revision) give a new key.

Preprocessing is :class:`~dp_sweeps.models.timm_backbone.PretrainedInputAdapter`'s:
undo the data's normalisation (the images' :class:`~dp_sweeps.data.facts.DataFacts`, which
:func:`~dp_sweeps.data.features.compute_features` passes and adds to the cache key), resize
to the pretrained resolution (or ``input_size``), normalise with the pretrained mean/std.
Augmentation does not reach cached features (the probe trains on un-augmented
images; use ``model=timm trainable=head`` for that).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from dp_sweeps.data.facts import DataFacts
from dp_sweeps.data.features import register_feature_map
from dp_sweeps.errors import ConfigError


def _key(arch, pretrained, checkpoint, input_size, channels) -> tuple:
    # The file's size and modification time too: new weights under the same path are a new model.
    stat = None
    if checkpoint is not None and Path(str(checkpoint)).is_file():
        info = Path(str(checkpoint)).stat()
        stat = (info.st_size, info.st_mtime_ns)
    return (arch, bool(pretrained), None if checkpoint is None else str(checkpoint), stat, input_size, channels)


@functools.lru_cache(maxsize=2)
def frozen_backbone(arch: str, pretrained: bool, checkpoint: Optional[str], checkpoint_stat: Optional[tuple],
                    input_size: Optional[int], channels: int) -> torch.nn.Module:
    """The backbone without its classifier (pooled features), behind its input adapter
    for *raw* pixels in [0, 1], in eval mode with no trainable parameter (built once per
    process and weights file)."""
    from dp_sweeps.models.timm_backbone import timm as build_timm

    raw_pixels = SimpleNamespace(mean=(0.0,) * channels, std=(1.0,) * channels, channels=channels)
    model = build_timm(num_classes=0, in_channels=channels, data_facts=raw_pixels, arch=arch, pretrained=pretrained,
                       checkpoint=checkpoint, trainable="all", batchnorm="frozen_stats", input_size=input_size)
    model.requires_grad_(False)
    return model.eval()


def weights_identity(*, arch: str, pretrained: bool = False, checkpoint: Optional[str] = None,
                     input_size: Optional[int] = None, channels: int = 3, chunk: int = 64) -> str:
    """SHA-256 (first 16 hex digits) of the loaded backbone's state dict (names, shapes, bytes)."""
    model = frozen_backbone(*_key(arch, pretrained, checkpoint, input_size, channels))
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@register_feature_map("backbone", identity=weights_identity)
def backbone(x: torch.Tensor, *, arch: str, pretrained: bool = False, checkpoint: Optional[str] = None,
             input_size: Optional[int] = None, channels: int = 3, chunk: int = 64,
             data_facts: Optional[DataFacts] = None) -> torch.Tensor:
    """Pooled features N x ``num_features`` of images ``x`` (N x C x H x W, normalised
    with ``data_facts``' constants, which are undone first) under the frozen ``arch``;
    deterministic, float32. ``chunk`` (memory only) does not change the values."""
    if data_facts is None or data_facts.mean is None or data_facts.std is None:
        raise ConfigError("features=backbone needs the data's normalisation constants (its DataFacts mean/std)")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ConfigError(f"features=backbone needs {channels}-channel images N x C x H x W, got {tuple(x.shape)}")
    model = frozen_backbone(*_key(arch, pretrained, checkpoint, input_size, channels))
    mean = torch.tensor(data_facts.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(data_facts.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    with torch.no_grad():  # ``chunk`` images at a time: a ViT-B at 224 px holds ~2 GB per 1024 images
        outs = [model(x[i:i + chunk].float() * std + mean).float() for i in range(0, len(x), chunk)]
    return torch.cat(outs).contiguous() if outs else x.new_zeros((0, model.backbone.num_features))
