"""The noisy validation score of a private search's trial: a DP release of the number of
correctly classified validation examples.

Guarantee: adding or removing one validation example changes the count of correct
predictions by at most 1 (the model is trained on the training split only), so the count
plus Gaussian noise of standard deviation ``noise`` (or Laplace noise of scale ``noise``)
is the Gaussian (Laplace) mechanism with sensitivity 1; dividing by the number of
validation examples (public, as Opacus's division by the expected batch size) is
post-processing. Its cost enters the trial's mechanism as
:func:`dp_sweeps.privacy.tuning.score_event`. The noise comes from the secret stream
``score`` (:mod:`dp_sweeps.privacy.randomness`: fresh OS entropy, never ``seed``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from dp_sweeps.privacy.randomness import mechanism_generator
from dp_sweeps.privacy.tuning import SCORE_MECHANISMS


def noisy_count(correct: int, *, mechanism: str, noise: float, generator: torch.Generator) -> float:
    """``correct`` plus one draw of the mechanism's noise (sensitivity 1)."""
    if mechanism not in SCORE_MECHANISMS:
        raise ValueError(f"unknown score mechanism {mechanism!r}")
    if not noise > 0:
        raise ValueError(f"score noise must be > 0, got {noise!r}")
    if mechanism == "gaussian":
        draw = torch.randn((), generator=generator, dtype=torch.float64).item()
        return float(correct) + noise * draw
    # Laplace by inversion of a uniform in (-1/2, 1/2): b · sign(u) · −log(1 − 2|u|).
    u = torch.rand((), generator=generator, dtype=torch.float64).item() - 0.5
    return float(correct) - noise * math.copysign(1.0, u) * math.log1p(-2 * abs(u))


def noisy_accuracy(*, correct: int, total: int, mechanism: str, noise: float,
                   noise_seed: Optional[int] = None) -> float:
    """The released score: (``correct`` + noise) / ``total``, noise from the ``score`` stream."""
    if total <= 0:
        raise ValueError("the noisy score needs a validation split (data.val_size > 0)")
    generator = mechanism_generator("score", noise_seed=noise_seed)
    return noisy_count(int(correct), mechanism=mechanism, noise=float(noise), generator=generator) / total


def noisy_score_record(*, val_accuracy: float, num_val: int, mechanism: str, noise: float,
                       noise_seed: Optional[int] = None) -> dict:
    """The fields a private search's trial adds to its ``result.json``: the released score
    ``noisy_val_accuracy`` and how it was noised. ``val_accuracy`` is the exact fraction
    correct on the ``num_val`` validation examples (the count is recovered from it)."""
    correct = round(float(val_accuracy) * num_val)
    return {"noisy_val_accuracy": noisy_accuracy(correct=correct, total=num_val, mechanism=mechanism,
                                                 noise=noise, noise_seed=noise_seed),
            "score_mechanism": mechanism, "score_noise": float(noise)}
