"""Data-independent feature maps of the (normalised) pixels, and the range of each.

Each map is a fixed function of one image (pooling, a colour-to-grey formula, a
projection by a matrix drawn from a fixed seed, a clip): it reads nothing from the
private data, so it costs no privacy. Each also states, from its definition and the
data's public normalisation constants (its :class:`~dp_sweeps.data.DataFacts`), the interval every output
feature lies in: :func:`feature_bounds` gives it to mechanisms that need bounds
(diffprivlib's Gaussian Naive Bayes), so no bound is ever read from the data.

Maps (``features: {name: ..., **settings}``):

- ``pixels``: average-pool to ``size`` x ``size`` and, with ``grey``, take the
  ITU-R BT.601 luma; colour output keeps the channel ranges of the normalised pixels.
- ``random_projection``: flattened normalised pixels times a Gaussian matrix drawn
  from ``seed`` (scaled by 1/sqrt(input dim)), clipped to ``[-clip, clip]``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dp_sweeps.data import CIFAR10_MEAN, CIFAR10_STD, DataFacts
from dp_sweeps.data.features import register_feature_map
from dp_sweeps.errors import ConfigError

# ITU-R BT.601 luma weights (R, G, B).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# CIFAR-10's facts: what images without facts (tensors built by hand) are taken to be.
_DEFAULT_MEAN, _DEFAULT_STD = CIFAR10_MEAN, CIFAR10_STD


def _constants(data_facts: Optional[DataFacts]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The public (mean, std) the images were standardised with."""
    if data_facts is None or data_facts.mean is None:
        return _DEFAULT_MEAN, _DEFAULT_STD
    return tuple(data_facts.mean), tuple(data_facts.std)


def grey_constants(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], float, float]:
    """(luma weights, GREY_MEAN, GREY_STD): grey output is standardised with constants
    derived from the public channel statistics (the luma of the channel means, and the
    weighted channel standard deviations). One channel is its own luma."""
    weights = LUMA_WEIGHTS if len(mean) == 3 else (1.0,) * len(mean)
    weights = tuple(w / sum(weights) for w in weights)
    return weights, sum(w * m for w, m in zip(weights, mean)), sum(w * s for w, s in zip(weights, std))


_, GREY_MEAN, GREY_STD = grey_constants(CIFAR10_MEAN, CIFAR10_STD)

# (settings, input shape C x H x W) -> (lower, upper) per flattened output feature.
BoundsFn = Callable[..., tuple[np.ndarray, np.ndarray]]
_BOUNDS: Dict[str, BoundsFn] = {}


def _bounds_of(name: str) -> Callable[[BoundsFn], BoundsFn]:
    def decorator(fn: BoundsFn) -> BoundsFn:
        _BOUNDS[name] = fn
        return fn
    return decorator


def pixel_bounds(shape: Sequence[int] = (3, 32, 32), *, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of normalised pixels (C x H x W, flattened): channel c lies in
    ``[(0 - mean_c) / std_c, (1 - mean_c) / std_c]`` (pixels in [0, 1], standardised with
    the data's public constants)."""
    channels, height, width = shape
    if channels != len(mean):
        raise ConfigError(f"pixel bounds need {len(mean)}-channel images, got shape {tuple(shape)}")
    mean, std = np.asarray(mean), np.asarray(std)
    per_pixel = np.ones((1, height, width))
    lower = ((0.0 - mean) / std)[:, None, None] * per_pixel
    upper = ((1.0 - mean) / std)[:, None, None] * per_pixel
    return lower.ravel(), upper.ravel()


def feature_bounds(spec: Optional[Mapping], *, image_shape: Optional[Sequence[int]] = None,
                   data_facts: Optional[DataFacts] = None) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) of every flattened feature that ``spec`` (``features``, or
    None for raw normalised pixels) produces from images described by ``data_facts``
    (CIFAR-10's when None; ``image_shape`` overrides their shape).

    Derived from the map's definition and the data's public constants only. A map
    registered without a statement of its range is refused: its bounds would otherwise
    have to come from the data.
    """
    mean, std = _constants(data_facts)
    if image_shape is None:
        image_shape = data_facts.image_shape if data_facts is not None else (len(mean), 32, 32)
    if not spec:
        return pixel_bounds(image_shape, mean=mean, std=std)
    settings = dict(spec)
    name = settings.pop("name")
    if name not in _BOUNDS:
        raise ConfigError(f"features.name={name!r} states no public bounds for its outputs; "
                          f"bounded mechanisms accept: {', '.join(sorted(_BOUNDS))}")
    return _BOUNDS[name](image_shape=tuple(image_shape), mean=mean, std=std, **settings)


def _check_pixels_settings(size, grey) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size:
        raise ConfigError(f"features.size={size!r} must be an integer >= 1")
    if not isinstance(grey, bool):
        raise ConfigError(f"features.grey={grey!r} must be true or false")


@register_feature_map("pixels")
def pixels(x: torch.Tensor, *, size: int = 32, grey: bool = False,
           data_facts: Optional[DataFacts] = None) -> torch.Tensor:
    """Average-pool normalised images to ``size`` x ``size`` (adaptive pooling: every
    output is a mean of input pixels of one channel), then with ``grey`` the BT.601 luma
    of the de-normalised image (a grey image is its own luma), standardised by the grey
    constants of the data's public mean and std (:func:`grey_constants`)."""
    _check_pixels_settings(size, grey)
    out = F.adaptive_avg_pool2d(x, size)
    if grey:
        mean_c, std_c = _constants(data_facts)
        weights_c, grey_mean, grey_std = grey_constants(mean_c, std_c)
        mean = torch.tensor(mean_c, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(std_c, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        weights = torch.tensor(weights_c, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        luma = ((out * std + mean) * weights).sum(1, keepdim=True)  # in [0, 1]
        out = (luma - grey_mean) / grey_std
    return out.contiguous()


@_bounds_of("pixels")
def _pixels_bounds(*, image_shape, mean, std, size: int = 32, grey: bool = False):
    _check_pixels_settings(size, grey)
    if grey:  # luma of [0, 1] channels lies in [0, 1] (weights sum to 1)
        _, grey_mean, grey_std = grey_constants(mean, std)
        n = size * size
        return (np.full(n, (0.0 - grey_mean) / grey_std), np.full(n, (1.0 - grey_mean) / grey_std))
    # A mean of one channel's pixels stays in that channel's range.
    return pixel_bounds((image_shape[0], size, size), mean=mean, std=std)


def _check_projection_settings(dim, seed, clip) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"features.dim={dim!r} must be an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"features.seed={seed!r} must be an integer")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"features.clip={clip!r} must be a number > 0")


@functools.lru_cache(maxsize=4)
def projection_matrix(in_dim: int, dim: int, seed: int) -> torch.Tensor:
    """The fixed in_dim x dim matrix: i.i.d. N(0, 1/in_dim) entries from torch's CPU
    generator seeded with ``seed`` (the same on every machine, independent of the data)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(in_dim, dim, generator=generator) / math.sqrt(in_dim)


@register_feature_map("random_projection")
def random_projection(x: torch.Tensor, *, dim: int = 256, seed: int = 0, clip: float = 3.0) -> torch.Tensor:
    """``clamp(flatten(x) @ R, -clip, clip)`` with R = :func:`projection_matrix`. For
    normalised pixels each output is roughly N(0, |x|^2 / in_dim), i.e. of unit scale."""
    _check_projection_settings(dim, seed, clip)
    flat = x.flatten(1)
    matrix = projection_matrix(flat.shape[1], dim, seed).to(device=x.device, dtype=x.dtype)
    return (flat @ matrix).clamp_(-clip, clip)


@_bounds_of("random_projection")
def _random_projection_bounds(*, image_shape, mean, std, dim: int = 256, seed: int = 0, clip: float = 3.0):
    _check_projection_settings(dim, seed, clip)
    return np.full(dim, -float(clip)), np.full(dim, float(clip))
