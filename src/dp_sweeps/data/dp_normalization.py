"""``data.normalization=dp``: standardise the pixels of a data set with no published
constants by a DP release of its training set's per-channel means and variances.

Guarantee: the release is :func:`dp_sweeps.privacy.data_normalization.private_channel_statistics`,
two Gaussian mechanisms over the whole training set with noise multiplier
``data.dp_normalization.noise_multiplier``. Pixels lie in [0, 1], so an example's vector
of C channel means (and of C channel mean squares) has L2 norm at most sqrt(C): that is
the clip, and nothing is clipped. The releases are returned in
:attr:`~dp_sweeps.data.ImageData.prior_releases`, which the run's accountant composes
with DP-SGD (:func:`dp_sweeps.training.network.train_network`): the reported ε covers
them. Mean and standard deviation are then post-processing, and so is standardising
every split with them. Without privacy (``privacy.enabled=false``) the statistics are exact.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Mapping, Optional

import torch

from dp_sweeps.data.image_data import ImageData
from dp_sweeps.privacy.data_normalization import RELEASES, private_channel_statistics
from dp_sweeps.privacy.randomness import mechanism_generator

# A released variance near 0 (noise can push it there) would blow the inputs up:
# the standard deviation is floored at 1/255, one grey level (post-processing).
MIN_STD = 1.0 / 255.0


def release_normalization(data: ImageData, *, settings: Optional[Mapping[str, Any]], private: bool,
                          noise_seed: Optional[int] = None) -> ImageData:
    """``data`` standardised with released statistics when its facts ask for a DP
    release (``normalization == "dp"`` and no constants yet); otherwise ``data`` as is."""
    facts = data.facts
    if facts.normalization != "dp" or facts.mean is not None:
        return data
    clip = math.sqrt(facts.channels)
    if private:
        sigma = float(settings["noise_multiplier"])
        mean, var = private_channel_statistics(data.train_x, clip_mean=clip, clip_square=clip, noise_multiplier=sigma,
                                               generator=mechanism_generator("data_norm", noise_seed=noise_seed))
        releases: tuple[tuple[float, float, int], ...] = ((sigma, 1.0, RELEASES),)
        source = f"DP release of the training set's channel statistics (Gaussian, σ={sigma:g}), charged to ε"
    else:
        mean, var = private_channel_statistics(data.train_x, clip_mean=math.inf, clip_square=math.inf,
                                               noise_multiplier=0.0, generator=None)
        releases, source = (), "the training set's exact channel statistics (privacy.enabled=false)"
    std = var.sqrt().clamp(min=MIN_STD)
    shape = (1, -1, 1, 1)

    def standardised(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else ((x - mean.view(shape)) / std.view(shape)).contiguous()

    new_facts = facts.replace(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                              normalization_source=source)
    return replace(data, train_x=standardised(data.train_x), val_x=standardised(data.val_x),
                   test_x=standardised(data.test_x), val_x_mirror=standardised(data.val_x_mirror),
                   test_x_mirror=standardised(data.test_x_mirror), facts=new_facts,
                   prior_releases=data.prior_releases + releases)
