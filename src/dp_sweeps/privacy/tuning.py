"""The privacy of a whole hyperparameter search: random search with a random number of
trials, releasing only the best (Papernot & Steinke, *Hyperparameter Tuning with Renyi
Differential Privacy*, ICLR 2022, arXiv:2110.03620). Pure functions, no Hydra: auditable
alone.

Guarantee: let every trial Q be (λ, ε_Q(λ))-RDP for every order λ, where ε_Q is the
pointwise maximum over every privacy-relevant choice the search space allows (see
:func:`worst_case_rdp`). Draw K from :class:`TrialCount` (truncated negative binomial of
shape η, geometric η = 1, logarithmic η = 0, or Poisson), run K independent trials and
release only the one with the best (noisy, DP) score, never K. Then the release is
(λ, ε'(λ))-RDP with, for the truncated negative binomial (their Theorem 2),

    ε'(λ) = ε_Q(λ) + (1 + η)(1 − 1/λ̂) ε_Q(λ̂) + (1 + η) log(1/γ)/λ̂ + log E[K]/(λ − 1)

for every λ̂ ≥ 1, and for Poisson(μ) (their Theorem 6) ε'(λ) = ε_Q(λ) + μ δ̂ + log μ/(λ − 1)
where Q is (log(1 + 1/(λ − 1)), δ̂)-DP. dp_accounting implements both
(``RepeatAndSelectDpEvent`` in its RDP accountant); :func:`tuning_privacy` hands it the
worst-case curve and converts to (ε, δ) with its conversion.

Each trial's mechanism is the composition (:func:`trial_event`) of the releases before
training (DP data normalisation), DP-SGD's Poisson-subsampled Gaussian steps, and the
noisy validation score (:mod:`dp_sweeps.privacy.noisy_score`).

dp_accounting's public API composes one event inside ``RepeatAndSelectDpEvent``; a
pointwise maximum over several events' curves needs its module functions
``_compute_rdp_repeat_and_select`` and ``compute_epsilon`` (dp-accounting 0.6.0). With a
single event the result equals the public path exactly (tested), and the tests check
both against the paper's formulas written out independently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from dp_sweeps.errors import ConfigError
from dp_sweeps.privacy.randomness import mechanism_random_state

# RDP orders: dp_accounting's defaults (1.1 … 10.9, 11 … 63, 128 … 1024).
ORDERS = tuple(float(a) for a in rdp_lib.DEFAULT_RDP_ORDERS)
# The distributions of the number of trials, as RepeatAndSelectDpEvent's shape η.
DISTRIBUTIONS = ("truncated_negative_binomial", "geometric", "logarithmic", "poisson")
SCORE_MECHANISMS = ("gaussian", "laplace")
# Rejection sampling of the truncated negative binomial: P(reject) = γ^η per draw.
MAX_REJECTIONS = 10**6


@dataclass(frozen=True)
class TrialCount:
    """The law of K, the number of trials: ``distribution`` (one of
    :data:`DISTRIBUTIONS`), its mean E[K] and, for ``truncated_negative_binomial``, the
    shape η > 0 (η = 1 is the geometric law, η → 0 the logarithmic one)."""

    distribution: str
    mean: float
    shape: Optional[float] = None

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"tuning.distribution={self.distribution!r}: one of {', '.join(DISTRIBUTIONS)}")
        if not (isinstance(self.mean, (int, float)) and math.isfinite(self.mean) and self.mean > 1):
            raise ConfigError(f"tuning.mean_trials={self.mean!r} must be a finite number > 1")
        if self.distribution == "truncated_negative_binomial":
            if not (isinstance(self.shape, (int, float)) and 0 < self.shape < math.inf):
                raise ConfigError(f"tuning.shape={self.shape!r}: the truncated negative binomial needs a "
                                  f"finite shape η > 0 (η=1 is geometric; use distribution=logarithmic for η=0)")

    @property
    def eta(self) -> float:
        """RepeatAndSelectDpEvent's ``shape``: inf for Poisson, 1 geometric, 0 logarithmic."""
        return {"poisson": math.inf, "geometric": 1.0, "logarithmic": 0.0}.get(self.distribution,
                                                                                  float(self.shape or 0))

    @property
    def gamma(self) -> Optional[float]:
        """The truncated negative binomial's γ for this mean (dp_accounting's own inversion,
        so that draws and accounting use the same law); None for Poisson."""
        if self.distribution == "poisson":
            return None
        return float(rdp_lib._gamma_truncated_negative_binomial(self.eta, float(self.mean)))

    def as_dict(self) -> dict:
        return {**asdict(self), "eta": self.eta, "gamma": self.gamma}


def draw_trial_count(law: TrialCount, *, random_state: np.random.RandomState) -> int:
    """One draw of K from ``law`` with ``random_state``. Poisson may give 0 (then nothing
    is released); the others are ≥ 1.

    NumPy has the negative binomial (failures before η successes of probability γ:
    P(k) ∝ Γ(k+η)/k! · (1−γ)^k, P&S's Definition 1 before truncation) and the logarithmic
    law; truncation at 0 is rejection, which leaves the law conditioned on K ≥ 1.
    """
    if law.distribution == "poisson":
        return int(random_state.poisson(law.mean))
    gamma = law.gamma
    if law.distribution == "logarithmic":
        return int(random_state.logseries(1.0 - gamma))
    if law.distribution == "geometric":
        return int(random_state.geometric(gamma))
    for _ in range(MAX_REJECTIONS):
        k = int(random_state.negative_binomial(law.eta, gamma))
        if k > 0:
            return k
    raise ConfigError(f"tuning.shape={law.shape:g}: the truncated negative binomial rejected {MAX_REJECTIONS} "
                      f"draws of 0; use a larger shape or distribution=logarithmic")


def draw_secret_trial_count(law: TrialCount, *, noise_seed: Optional[int] = None) -> int:
    """K drawn from the mechanism's secret stream ``trial_count`` (fresh OS entropy; never
    from ``seed``): K is part of the mechanism and must stay unknown to an attacker.
    ``noise_seed`` (debugging only) makes it replayable and voids the guarantee."""
    return draw_trial_count(law, random_state=mechanism_random_state("trial_count", noise_seed=noise_seed))


def score_event(*, mechanism: str, noise: float) -> dp_event.DpEvent:
    """The noisy validation count's event: sensitivity 1, noise ``noise`` (the Gaussian's
    standard deviation, or the Laplace scale b)."""
    if mechanism not in SCORE_MECHANISMS:
        raise ConfigError(f"tuning.score_mechanism={mechanism!r}: one of {', '.join(SCORE_MECHANISMS)}")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise > 0):
        raise ConfigError(f"tuning.score_noise={noise!r}: the score must be a DP release (noise > 0); "
                          f"a score computed without noise on private data breaks the theorem")
    if mechanism == "gaussian":
        return dp_event.GaussianDpEvent(float(noise))
    return dp_event.LaplaceDpEvent(float(noise))


def trial_event(*, noise_multiplier: float, sample_rate: float, steps: int,
                prior_releases: Sequence[Sequence[float]] = (), score: dp_event.DpEvent) -> dp_event.DpEvent:
    """One trial's mechanism: the Gaussian releases before training (``(σ, q, count)``, as
    in :class:`~dp_sweeps.privacy.plan.PrivacyPlan`), ``steps`` Poisson-sampled Gaussian
    steps of DP-SGD, then the noisy score (on the validation split)."""
    events: list[dp_event.DpEvent] = []
    for sigma, q, count in prior_releases:
        event = dp_event.GaussianDpEvent(float(sigma))
        if float(q) < 1:
            event = dp_event.PoissonSampledDpEvent(float(q), event)
        events.append(dp_event.SelfComposedDpEvent(event, int(count)))
    events.append(dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(float(sample_rate), dp_event.GaussianDpEvent(float(noise_multiplier))),
        int(steps)))
    events.append(score)
    return dp_event.ComposedDpEvent(events)


def rdp_curve(event: dp_event.DpEvent, *, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """ε(λ) of ``event`` at ``orders`` under dp_accounting's RDP accountant (add/remove one)."""
    accountant = rdp_lib.RdpAccountant(orders=list(orders))
    accountant.compose(event)
    return np.array(accountant._rdp, dtype=np.float64)  # the curve the accountant converts to ε


def worst_case_rdp(events: Sequence[dp_event.DpEvent], *, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """The pointwise maximum over ``events`` of their RDP curves: a trial whose mechanism
    is any one of them (chosen independently of the data, the choice published with the
    result) is (λ, max_i ε_i(λ))-RDP at every order λ."""
    if not events:
        raise ValueError("worst_case_rdp needs at least one event")
    return np.max(np.stack([rdp_curve(e, orders=orders) for e in events]), axis=0)


def tuning_rdp(trial_rdp: Sequence[float], *, law: TrialCount, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """The search's RDP curve from one trial's (``trial_rdp`` at ``orders``): dp_accounting's
    implementation of Papernot & Steinke's Theorems 2 and 6 (the module docstring)."""
    return np.asarray(rdp_lib._compute_rdp_repeat_and_select(np.asarray(orders, dtype=np.float64),
                                                             np.asarray(trial_rdp, dtype=np.float64),
                                                             float(law.mean), law.eta), dtype=np.float64)


@dataclass(frozen=True)
class TuningPrivacy:
    """The whole search's (ε, δ) and the worst single trial's, both from RDP."""

    epsilon: float
    delta: float
    order: float
    per_trial_epsilon: float  # the worst-case trial alone, same accountant (RDP) and δ
    per_trial_order: float

    def as_dict(self) -> dict:
        return asdict(self)


def tuning_privacy(*, trial_events: Sequence[dp_event.DpEvent], law: TrialCount, delta: float,
                   orders: Sequence[float] = ORDERS) -> TuningPrivacy:
    """(ε, δ) of releasing the best of K ~ ``law`` trials, each trial any of ``trial_events``
    (the module docstring states the theorem). With one event this is exactly
    ``RdpAccountant().compose(RepeatAndSelectDpEvent(event, mean, shape)).get_epsilon(δ)``."""
    if not 0 < delta < 1:
        raise ConfigError(f"privacy.delta={delta!r} must be in (0, 1)")
    orders = np.asarray(orders, dtype=np.float64)
    single = worst_case_rdp(trial_events, orders=orders)
    total = tuning_rdp(single, law=law, orders=orders)
    epsilon, order = rdp_lib.compute_epsilon(orders, total, delta)
    per_trial, per_trial_order = rdp_lib.compute_epsilon(orders, single, delta)
    return TuningPrivacy(epsilon=float(epsilon), delta=float(delta), order=float(order),
                         per_trial_epsilon=float(per_trial), per_trial_order=float(per_trial_order))


def calibrate_common_noise(*, target_epsilon: float, events_for, law: TrialCount, delta: float,
                           low: float = 0.5, high: float = 200.0, tolerance: float = 0.01) -> float:
    """The smallest common DP-SGD noise multiplier σ (to ``tolerance`` in ε) for which the
    whole search spends at most ``target_epsilon``: ``events_for(σ)`` gives every trial
    mechanism the space allows at that σ. Bisection: more noise never costs more."""
    def total(sigma: float, *, refused_is_too_little: bool = True) -> float:
        try:
            return tuning_privacy(trial_events=events_for(sigma), law=law, delta=delta).epsilon
        except ConfigError:  # a plan refuses a σ this small (its ε is out of range): too little noise
            if not refused_is_too_little:
                raise
            return math.inf

    eps_high = total(high, refused_is_too_little=False)
    if eps_high > target_epsilon:
        raise ConfigError(f"tuning.total_epsilon={target_epsilon:g} is out of reach: even σ={high:g} spends "
                          f"ε={eps_high:.3g} (the score noise and the log E[K] term alone cost that much)")
    while low > 1e-3 and total(low) <= target_epsilon:
        low /= 2  # widen downwards until low misses the target
    while target_epsilon - eps_high > tolerance and high > low * (1 + 1e-6):
        mid = math.sqrt(low * high)
        eps_mid = total(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high
