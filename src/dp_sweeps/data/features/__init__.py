"""Data-independent feature maps, applied once per dataset before training.

A feature map is a fixed function of one example (a wavelet scattering transform, a
random projection with a fixed seed, downsampled pixels): it reads nothing from the
private data, so it costs no privacy. Anything *fitted* on private data is not a
feature map in this sense and needs its own DP budget.

Builders register with :func:`register_feature_map`; :func:`apply_feature_map` is the
only door, and caches the transformed tensors on disk keyed by the map's settings and
a fingerprint of the input.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import torch

from dp_sweeps.data import DataFacts, ImageData

log = logging.getLogger(__name__)

# A feature map: (images N x C x H x W, **settings) -> features N x ... (float32).
FeatureMap = Callable[..., torch.Tensor]
_FEATURE_MAPS: Dict[str, FeatureMap] = {}


# Maps whose output depends on more than their settings (a pretrained backbone's weights):
# name -> settings -> a string identifying that state, part of the cache key.
_IDENTITIES: Dict[str, Callable[..., str]] = {}


def register_feature_map(name: str, *, identity: Optional[Callable[..., str]] = None
                         ) -> Callable[[FeatureMap], FeatureMap]:
    """Register a feature map; ``identity(**settings)``, when given, is added to its cache
    key (e.g. a hash of the weights a file holds), so the cache is invalidated when it changes."""
    def decorator(fn: FeatureMap) -> FeatureMap:
        if name in _FEATURE_MAPS:
            raise ValueError(f"feature map {name!r} is registered twice")
        _FEATURE_MAPS[name] = fn
        if identity is not None:
            _IDENTITIES[name] = identity
        return fn
    return decorator


def list_feature_maps() -> list[str]:
    _import_builtin_maps()
    return sorted(_FEATURE_MAPS)


def _import_builtin_maps() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def _fingerprint(x: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(str(tuple(x.shape)).encode())
    h.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def compute_features(name: str, x: torch.Tensor, settings: Mapping, *, cache_dir: Optional[str | os.PathLike] = None,
                     batch_size: int = 1024, data_facts: Optional[DataFacts] = None) -> torch.Tensor:
    """Apply feature map ``name`` to ``x`` in batches, reading/writing the on-disk cache.
    A map whose signature names ``data_facts`` gets the images' :class:`DataFacts` (e.g.
    to undo their normalisation), and then the facts are part of the cache key."""
    _import_builtin_maps()
    if name not in _FEATURE_MAPS:
        from dp_sweeps.errors import ConfigError
        raise ConfigError(f"features.name={name!r} is not one of: {', '.join(sorted(_FEATURE_MAPS))}")
    fn = _FEATURE_MAPS[name]
    uses_facts = data_facts is not None and "data_facts" in inspect.signature(fn).parameters
    if uses_facts:
        fn = functools.partial(fn, data_facts=data_facts)
    path = None
    if cache_dir is not None and len(x) > 0:
        fields = {"name": name, "settings": dict(settings), "input": _fingerprint(x)}
        if uses_facts:
            fields["facts"] = dataclasses.asdict(data_facts)
        if name in _IDENTITIES:
            fields["identity"] = _IDENTITIES[name](**settings)
        key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"{name}-{key}.pt"
        if path.is_file():
            # The file name is a hash of the exact (private) inputs: never logged.
            log.info("feature map %s: read from the cache in %s", name, path.parent)
            return torch.load(path, weights_only=True)
    outs = [fn(x[i:i + batch_size], **settings) for i in range(0, len(x), batch_size)]
    out = torch.cat(outs) if outs else fn(x[:0], **settings)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(out, tmp)
        os.replace(tmp, path)
    return out


def apply_feature_map(data: ImageData, spec: Optional[Mapping], *,
                      cache_dir: Optional[str | os.PathLike] = None) -> ImageData:
    """``data`` with every split's inputs replaced by features (``spec`` = {name, **settings})."""
    if not spec:
        return data
    spec = dict(spec)
    name = spec.pop("name")

    def mapped(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else compute_features(name, x, spec, cache_dir=cache_dir, data_facts=data.facts)

    # The facts still describe the images the features came from (and the releases made from them).
    return ImageData(train_x=mapped(data.train_x), train_y=data.train_y, val_x=mapped(data.val_x), val_y=data.val_y,
                     test_x=mapped(data.test_x), test_y=data.test_y, num_classes=data.num_classes,
                     val_x_mirror=mapped(data.val_x_mirror), test_x_mirror=mapped(data.test_x_mirror),
                     facts=data.facts, prior_releases=data.prior_releases)
