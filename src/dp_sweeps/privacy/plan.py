"""What a run will spend, decided before training: σ calibrated to the target ε, the
sampling rate and the step count.

Guarantee: :func:`plan_privacy` returns a :class:`PrivacyPlan` whose ``planned_epsilon``
is the configured accountant's ε for the mechanism (Gaussian, or Laplace:
:mod:`dp_sweeps.privacy.laplace`) at (σ, q = 1/ceil(N/B), ceil(N/B)·epochs steps), the
releases before training composed in; a calibrated σ spends at most the target.

A reduced-batch plan (``batch_scale`` k > 1, Sander et al. 2023, "TAN without a burn")
is for search trials only: it runs at batch B/k for epochs/k with σ/k, where σ is the
full-scale run's, so σ/B and the step count are (up to rounding) the full run's. Its
``planned_epsilon`` is the small run's own ε, larger than the full run's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

from dp_sweeps.errors import ConfigError
from dp_sweeps.privacy.accounting import check_prior_releases, epsilon_for, ledger_epsilon, prior_epsilon

# The range in which every accountant answers in seconds and bounded memory. Beyond
# MAX_EPSILON PRV's grid grows to gigabytes (CIFAR-10, 100 epochs: σ=0.5, ε≈31 takes
# 1.3 GB; ε=50 takes 5 GB; σ=0.3 more than 3 GB) and such an ε promises nothing anyway.
# Above MAX_NOISE_MULTIPLIER a single RDP/PRV call takes several seconds and calibration
# would search for minutes; below MIN_DELTA PRV's floating-point error exceeds δ.
MAX_EPSILON = 30.0
MAX_NOISE_MULTIPLIER = 1e4
MIN_DELTA = 1e-10
MIN_EPSILON = 0.05
MAX_STEPS = 10**7
# Past this σ RDP's ε barely falls (its floor is ≈ 0.1 at δ = 1e-5): calibration moves on.
MAX_RDP_START = 100.0

@dataclass(frozen=True)
class PrivacyPlan:
    """What a run will spend, decided before training.

    ``sample_rate`` and ``steps`` follow Opacus's Poisson loader: q = 1 / ceil(N / B)
    and ceil(N / B) steps per epoch, so the expected batch is about B.
    ``prior_releases``: Gaussian mechanisms run on the training set before DP-SGD, as
    accountant history entries ``(σ, q, count)``; every ε of the plan composes them.
    """

    private: bool
    accountant: Optional[str]  # None without DP
    delta: Optional[float]
    max_grad_norm: Optional[float]
    noise_multiplier: Optional[float]
    sample_rate: float
    steps_per_epoch: int
    steps: int
    target_epsilon: Optional[float]
    planned_epsilon: Optional[float]
    poisson_sampling: bool
    prior_releases: tuple[tuple[float, float, int], ...] = ()
    # "gaussian" (L2 clipping, Gaussian noise) or "laplace" (L1 clipping, Laplace noise;
    # noise_multiplier is then b / C); None without DP.
    mechanism: Optional[str] = "gaussian"
    # Reduced-batch search (TAN): this run is the full-scale run of ``full_scale`` shrunk by
    # ``batch_scale`` in batch size and epochs, with noise_multiplier = full σ / batch_scale.
    batch_scale: int = 1
    full_scale: Optional[dict] = None

    def as_dict(self) -> dict:
        return asdict(self)


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    return math.ceil(num_train / batch_size)


@functools.lru_cache(maxsize=256)  # sweeps ask for the same calibration again and again
def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               accountant: str = "prv", epsilon_tolerance: float = 0.01,
                               prior: tuple[tuple[float, float, int], ...] = (),
                               mechanism: str = "gaussian") -> float:
    """The smallest σ (to ``epsilon_tolerance`` in ε) whose ε after ``steps`` is ≤ the target.

    The search brackets σ with RDP first (milliseconds at moderate σ), then refines with
    ``accountant`` near RDP's σ, which is within a few percent of PRV's: Opacus's own
    bisection from σ = 0 evaluates PRV at σ ≈ 0.3, where its grid at CIFAR scale takes
    more than 3 GB. Raises ConfigError if no σ ≤ MAX_NOISE_MULTIPLIER reaches the target.
    ``prior``: releases composed before the steps (their ε is spent whatever σ is).
    ``mechanism="laplace"``: the noise ratio b / C of the Laplace mechanism, by bisection
    under dp_accounting's PLD (``accountant="pld"``, milliseconds per call at any b).
    """
    def eps(sigma: float, accountant_name: str = accountant) -> float:
        return epsilon_for(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta,
                           accountant=accountant_name, prior=prior, mechanism=mechanism)

    def bisect(low: float, high: float, eps_high: float, mechanism: str, ratio: float = 1 + 1e-9) -> float:
        """low misses the target, high meets it: narrow until high is within tolerance
        (or high / low ≤ ``ratio``)."""
        while target_epsilon - eps_high > epsilon_tolerance and high > ratio * low:
            mid = (low + high) / 2
            eps_mid = eps(mid, mechanism)
            if eps_mid <= target_epsilon:
                high, eps_high = mid, eps_mid
            else:
                low = mid
        return high

    def bracket(mechanism: str, start: float, factor: float, limit: float) -> tuple[float, float, float]:
        """(low, high, ε(high)) with ε(low) > target ≥ ε(high) and high / low = factor."""
        high, eps_high = start, eps(start, mechanism)
        while eps_high > target_epsilon:
            if high >= limit:
                raise ConfigError(f"privacy.epsilon={target_epsilon:g} is out of reach of the {mechanism} "
                                  f"accountant: σ={high:g} gives ε={eps_high:.3g} over {steps} steps at "
                                  f"q={sample_rate:.4g}")
            high = min(high * factor, limit)
            eps_high = eps(high, mechanism)
        low = high / factor
        while low > 1e-2:
            eps_low = eps(low, mechanism)
            if eps_low > target_epsilon:
                break
            high, eps_high, low = low, eps_low, low / factor
        return low, high, eps_high

    if mechanism == "laplace":
        return bisect(*bracket(accountant, 1.0, 2.0, MAX_NOISE_MULTIPLIER), accountant)
    try:
        rdp_sigma = bisect(*bracket("rdp", 1.0, 2.0, MAX_RDP_START), "rdp",
                           ratio=1 + 1e-9 if accountant == "rdp" else 1.05)
    except ConfigError:
        # RDP cannot certify ε below ≈ 0.1 (its orders stop at 256): search with the finer accountant.
        if accountant == "rdp":
            raise
        return bisect(*bracket(accountant, MAX_RDP_START, 2.0, MAX_NOISE_MULTIPLIER), accountant)
    if accountant == "rdp":
        return rdp_sigma
    # PRV and GDP need slightly less noise than RDP (rarely more): refine from RDP's σ.
    return bisect(*bracket(accountant, rdp_sigma, 1.05, MAX_NOISE_MULTIPLIER), accountant)


def plan_privacy(privacy_cfg, *, num_train: int, batch_size: int, epochs: int,
                 prior_releases: tuple[tuple[float, float, int], ...] = (), batch_scale: int = 1) -> PrivacyPlan:
    """Decide σ (calibrated to ``privacy.epsilon``, or the given ``privacy.noise_multiplier``)
    and the ε the accountant predicts for the whole run, ``prior_releases`` included.

    ``batch_scale`` k > 1 (a reduced-batch search trial): ``batch_size`` and ``epochs`` are
    the trial's, B/k and E/k; σ is calibrated for the full run (B, E) and divided by k."""
    if batch_scale != 1:
        return _reduced_batch_plan(privacy_cfg, num_train=num_train, batch_size=batch_size, epochs=epochs,
                                   prior_releases=prior_releases, batch_scale=int(batch_scale))
    per_epoch = steps_per_epoch(num_train, batch_size)
    sample_rate = 1.0 / per_epoch
    steps = per_epoch * epochs
    if steps > MAX_STEPS:
        raise ConfigError(f"trainer.epochs={epochs} gives {steps:.3g} steps of {per_epoch} per epoch; at most "
                          f"{MAX_STEPS:.0e} are supported")
    if not privacy_cfg.enabled:
        return PrivacyPlan(private=False, accountant=None, delta=None, max_grad_norm=None,
                           noise_multiplier=None, sample_rate=sample_rate, steps_per_epoch=per_epoch,
                           steps=steps, target_epsilon=None, planned_epsilon=None, poisson_sampling=False,
                           mechanism=None)
    delta, accountant = float(privacy_cfg.delta), str(privacy_cfg.accountant)
    mechanism = str(privacy_cfg.get("mechanism") or "gaussian")
    prior = tuple((float(s), float(q), int(n)) for s, q, n in prior_releases)
    if mechanism == "gaussian":
        check_prior_releases(prior, accountant)
    if prior and privacy_cfg.noise_multiplier is None:
        spent = (prior_epsilon(prior, delta=delta, accountant=accountant) if mechanism == "gaussian"
                 else ledger_epsilon(gaussian=list(prior), laplace=[], delta=delta))
        if not spent < float(privacy_cfg.epsilon):
            raise ConfigError(f"privacy.epsilon={float(privacy_cfg.epsilon):g}: the releases before training "
                              f"{list(prior)} already spend ε={spent:.3g}; raise it or add noise to them")
    try:
        if privacy_cfg.noise_multiplier is None:
            target = float(privacy_cfg.epsilon)
            sigma = calibrate_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=sample_rate,
                                               steps=steps, accountant=accountant, prior=prior, mechanism=mechanism)
        else:
            target, sigma = None, float(privacy_cfg.noise_multiplier)
            # RDP first: cheap at any σ and an upper bound on PRV's ε, whose grid for a
            # huge ε takes gigabytes. (PLD, the Laplace mechanism's, is cheap at any b.)
            bound_accountant = "rdp" if mechanism == "gaussian" else accountant
            bound = epsilon_for(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta,
                                accountant=bound_accountant, prior=prior, mechanism=mechanism)
            if not bound <= MAX_EPSILON:
                raise ConfigError(f"privacy.noise_multiplier={sigma:g} gives ε≈{bound:.3g} "
                                  f"({bound_accountant.upper()}) over {steps} steps: too little noise "
                                  f"(ε ≤ {MAX_EPSILON:g} is supported)")
        planned = epsilon_for(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta,
                              accountant=accountant, prior=prior, mechanism=mechanism)
    except (ValueError, ArithmeticError, MemoryError) as err:  # ConfigError is a ValueError: re-raised as is
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"privacy: the {accountant} accountant cannot handle δ={delta:g}, q={sample_rate:.4g}, "
                          f"{steps} steps ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                          ) from err
    if not math.isfinite(planned):
        raise ConfigError(f"privacy.noise_multiplier={sigma:g} gives ε={planned} under {accountant}: "
                          f"too little noise for this run")
    return PrivacyPlan(private=True, accountant=accountant, delta=delta,
                       max_grad_norm=float(privacy_cfg.max_grad_norm), noise_multiplier=sigma,
                       sample_rate=sample_rate, steps_per_epoch=per_epoch, steps=steps,
                       target_epsilon=target, planned_epsilon=planned,
                       poisson_sampling=bool(privacy_cfg.poisson_sampling), prior_releases=prior,
                       mechanism=mechanism)


def _reduced_batch_plan(privacy_cfg, *, num_train: int, batch_size: int, epochs: int,
                        prior_releases: tuple[tuple[float, float, int], ...], batch_scale: int) -> PrivacyPlan:
    """The trial of a reduced-batch search: the full run (B = k·``batch_size``, E =
    k·``epochs``) is planned first; the trial keeps its σ/B (σ/k at B/k) and, with E/k
    epochs of ceil(kN/B) steps, its step count up to the rounding of each epoch's last
    batch (exact when B divides N).

    The trial's own ε (far above the full run's: it has k times less noise per expected
    example) is accounted with RDP, which answers in milliseconds at any σ, where PRV's grid
    would take gigabytes; the full run is accounted as configured."""
    if batch_scale < 1:
        raise ConfigError(f"search.batch_scale={batch_scale} must be a positive integer")
    full = plan_privacy(privacy_cfg, num_train=num_train, batch_size=batch_size * batch_scale,
                        epochs=epochs * batch_scale, prior_releases=prior_releases)
    if not full.private or full.mechanism != "gaussian":
        raise ConfigError("search.batch_scale > 1 keeps σ/B of a Gaussian DP-SGD run: use privacy=dp "
                          "(not privacy=none nor the Laplace mechanism)")
    per_epoch = steps_per_epoch(num_train, batch_size)
    sample_rate, steps = 1.0 / per_epoch, per_epoch * epochs
    sigma = full.noise_multiplier / batch_scale
    planned = epsilon_for(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=full.delta,
                          accountant="rdp", prior=full.prior_releases)
    reference = {"batch_size": batch_size * batch_scale, "epochs": epochs * batch_scale,
                 "noise_multiplier": full.noise_multiplier, "steps": full.steps,
                 "sample_rate": full.sample_rate, "accountant": full.accountant,
                 "planned_epsilon": full.planned_epsilon, "target_epsilon": full.target_epsilon}
    return replace(full, accountant="rdp", noise_multiplier=sigma, sample_rate=sample_rate,
                   steps_per_epoch=per_epoch, steps=steps, target_epsilon=None, planned_epsilon=planned,
                   batch_scale=batch_scale, full_scale=reference)
