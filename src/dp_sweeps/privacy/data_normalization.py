"""DP data normalisation: per-channel feature means and variances released with the
Gaussian mechanism, for a fixed standardisation layer (Tramèr & Boneh 2021, "data
normalisation" of ScatterNet features).

Guarantee: :func:`private_channel_statistics` is two Gaussian mechanisms over the whole
training set (no subsampling). Example ``i`` contributes ``m_i``, the spatial mean of each
of its feature channels, clipped to L2 norm ``clip_mean``, and ``s_i``, the spatial mean of
each channel's square, clipped to ``clip_square``. The sums ``Σ m_i`` and ``Σ s_i`` get
Gaussian noise of standard deviation ``σ · clip`` per coordinate, so adding or removing
one example changes each sum by at most its clip in L2: each release is the Gaussian
mechanism with noise multiplier ``σ``. Dividing by ``N`` (public, as Opacus's division by
the expected batch size) and ``var = max(E[s] - E[m]², 0)`` are post-processing. The two
releases enter the run's accountant as ``(σ, q = 1, 2 steps)`` before DP-SGD's steps
(:attr:`dp_sweeps.privacy.PrivacyPlan.prior_releases`), so the reported ε covers them.

The clipping thresholds must not be read from the training set (the paper's code took
the training set's median norm, which leaks): the defaults in ``conf/model/scatter_*.yaml``
are the medians on the CIFAR-10 *test* split. Without privacy the statistics are exact
(no clipping, no noise).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from dp_sweeps.errors import ConfigError
from dp_sweeps.models.norms import ChannelStandardize
from dp_sweeps.privacy.randomness import mechanism_generator

# Two releases: the channel means and the channel means of squares.
RELEASES = 2


def _clip_rows(rows: torch.Tensor, bound: float) -> torch.Tensor:
    norms = rows.norm(dim=1, keepdim=True)
    return rows * (bound / norms.clamp(min=1e-12)).clamp(max=1.0)


def private_channel_statistics(features: torch.Tensor, *, clip_mean: float, clip_square: float,
                               noise_multiplier: float, generator: Optional[torch.Generator],
                               chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var) per channel of ``features`` (N x C x ...), each example's contribution
    clipped and the two sums noised as the module docstring states. ``noise_multiplier=0``
    with infinite clips gives the exact statistics (non-private runs only)."""
    n, channels = features.shape[:2]
    if n == 0:
        raise ConfigError("data normalisation needs at least one training example")
    sum_mean = torch.zeros(channels, dtype=torch.float64)
    sum_square = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, n, chunk):  # chunks: the features may be gigabytes
        block = features[start:start + chunk].float().reshape(-1, channels, max(1, features[0, 0].numel()))
        sum_mean += _clip_rows(block.mean(-1), clip_mean).double().sum(0).cpu()
        sum_square += _clip_rows(block.pow(2).mean(-1), clip_square).double().sum(0).cpu()
    if noise_multiplier > 0:
        noise = torch.randn((2, channels), generator=generator, dtype=torch.float64)
        sum_mean += noise[0] * noise_multiplier * clip_mean
        sum_square += noise[1] * noise_multiplier * clip_square
    mean, square = sum_mean / n, sum_square / n
    var = (square - mean.pow(2)).clamp(min=0.0)
    return mean.float(), var.float()


def standardize_layers(model: nn.Module) -> list[ChannelStandardize]:
    return [m for m in model.modules() if isinstance(m, ChannelStandardize)]


def fit_data_normalization(model: nn.Module, train_x: torch.Tensor, *, private: bool, settings,
                           noise_seed: Optional[int] = None) -> tuple[tuple[float, float, int], ...]:
    """Set every :class:`ChannelStandardize` layer of ``model`` from ``train_x`` (the
    layer's input: the models here put it first). Returns the Gaussian releases made,
    as accountant history entries ``(σ, q, count)``: ``()`` when the model has no such
    layer or the run is not private. ``settings``: ``model.data_norm`` (noise_multiplier,
    clip_mean, clip_square). The noise is the mechanism's secret stream ``data_norm``
    (:mod:`dp_sweeps.privacy.randomness`: fresh OS entropy unless ``noise_seed`` is set for
    debugging). A resumed run draws statistics again but never uses them: the
    checkpoint's weights, which hold the released statistics, replace them before any
    step, so what is published is the first release alone."""
    layers = standardize_layers(model)
    if not layers:
        return ()
    if not private:
        mean, var = private_channel_statistics(train_x, clip_mean=math.inf, clip_square=math.inf,
                                               noise_multiplier=0.0, generator=None)
        releases: tuple[tuple[float, float, int], ...] = ()
    else:
        sigma = float(settings.noise_multiplier)
        clip_mean, clip_square = float(settings.clip_mean), float(settings.clip_square)
        generator = mechanism_generator("data_norm", noise_seed=noise_seed)
        mean, var = private_channel_statistics(train_x, clip_mean=clip_mean, clip_square=clip_square,
                                               noise_multiplier=sigma, generator=generator)
        releases = ((sigma, 1.0, RELEASES),)
    for layer in layers:
        layer.set_statistics(mean.to(layer.mean.device), var.to(layer.var.device))
    return releases
