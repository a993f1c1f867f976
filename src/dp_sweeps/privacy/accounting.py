"""ε from the accountants: the one place where a privacy ledger becomes an ε.

Guarantee: :func:`epsilon_for` is the Opacus accountant's (PRV or RDP: upper bounds on
the true ε) for the Poisson-subsampled Gaussian steps given, after the releases made
before training; for the Laplace mechanism (:mod:`dp_sweeps.privacy.laplace`) it is
dp_accounting's PLD ε of the Poisson-subsampled Laplace steps (:func:`ledger_epsilon`).
:func:`cross_check_epsilon` is a second opinion, described below.

A second opinion on ε: the same run under three accountants (and GDP, for contrast).

Accountants disagree by design. Opacus's PRV accountant (the default here) and Google's
``dp-accounting`` PLD accountant both compute the privacy-loss distribution of the
Poisson-subsampled Gaussian numerically, each reporting an upper bound within its
discretization error, so they agree to about 0.01; Opacus's RDP accountant is a looser
upper bound (≈ 8% higher at the paper's setting). Reporting all three lets a user see
that spread, and a PRV/PLD disagreement beyond their error points at a bug in one of
them (or in how a run's σ, q and steps were handed to it).

Measured (Opacus 1.6, dp-accounting 0.4+, q = 256/50000, σ = 0.912, 19,531 steps,
δ = 1e-5): PRV 5.007, PLD 4.996, RDP 5.430; one call takes ≈ 2.5 s on one CPU core,
most of it PRV's. At the PLD discretization used here (1e-4), PLD is within 0.001 of
its converged value on every setting tested.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import create_accountant

from dp_sweeps.errors import ConfigError

# Accountants that may calibrate σ and report a run's ε: upper bounds on the true ε.
# Opacus's GDP accountant is a CLT approximation that can under-report ε (σ = 0.8,
# q = 0.1, 50 steps: GDP 6.35, PRV 8.07, PLD 8.06): it appears only in the dry run's
# cross-check (dp_sweeps.privacy.accounting), never as a run's ε.
ACCOUNTANTS = ("prv", "rdp")


def check_prior_releases(prior: tuple, accountant: str) -> None:
    # Opacus's GDP accountant reads only one (σ, q) pair: it would drop the prior releases.
    if prior and accountant == "gdp":
        raise ConfigError("privacy.accountant='gdp' cannot compose the data normalisation's release with "
                          "DP-SGD (it assumes one (σ, q) throughout): use prv or rdp")


def epsilon_for(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "prv", prior: tuple[tuple[float, float, int], ...] = (),
                mechanism: str = "gaussian") -> float:
    """ε after ``prior`` (Gaussian) releases then ``steps`` Poisson-sampled steps of
    ``mechanism``: Gaussian steps from an Opacus accountant (prv, rdp), Laplace steps
    (noise ratio b / C = ``noise_multiplier``) from dp_accounting's PLD (``accountant="pld"``)."""
    if mechanism == "laplace":
        if accountant != "pld":
            raise ValueError(f"the Laplace mechanism is accounted with pld, not {accountant!r}")
        return ledger_epsilon(gaussian=[*map(tuple, prior)], laplace=[(noise_multiplier, sample_rate, steps)],
                              delta=delta)
    if mechanism != "gaussian":
        raise ValueError(f"unknown mechanism {mechanism!r}")
    check_prior_releases(prior, accountant)
    return _ledger_epsilon([*map(tuple, prior), (noise_multiplier, sample_rate, steps)], delta=delta,
                           accountant=accountant)


def prior_epsilon(prior: tuple[tuple[float, float, int], ...], *, delta: float, accountant: str = "prv") -> float:
    """ε of the releases before training alone."""
    check_prior_releases(prior, accountant)
    return _ledger_epsilon([*map(tuple, prior)], delta=delta, accountant=accountant)


def _ledger_epsilon(history: list, *, delta: float, accountant: str) -> float:
    """ε of an Opacus accountant history ``[(σ, q, steps), ...]``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RDP's "optimal order is the largest alpha" hint; GDP's caveat
        acc = create_accountant(mechanism=accountant)
        acc.history = history
        return float(acc.get_epsilon(delta=delta))


# The PLD's value discretization: 1e-4 is converged to ~1e-3 in ε (and is an upper bound,
# the PLD being pessimistic); 1e-3 errs by up to 0.07 at 50,000 steps, 3e-5 takes 3x longer.
PLD_VALUE_DISCRETIZATION = 1e-4
# PRV's grid grows with ε: at CIFAR scale (q = 1/196, 19,600 steps) σ = 0.5 (ε ≈ 31) takes
# 1.3 GB, σ = 0.3 more than 3 GB. Above this RDP ε (an upper bound on PRV's) PRV is skipped.
PRV_MAX_RDP_EPSILON = 40.0


def pld_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                value_discretization_interval: float = PLD_VALUE_DISCRETIZATION,
                prior: tuple[tuple[float, float, int], ...] = ()) -> float:
    """ε after ``steps`` Poisson-sampled Gaussian steps under Google's PLD accountant
    (add/remove-one neighbours, as Opacus). A pessimistic estimate: an upper bound up to
    the accountant's truncation of mass below ``exp(-50)``."""
    if noise_multiplier == 0:
        return math.inf
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=value_discretization_interval)
    for sigma, q, count in (*prior, (noise_multiplier, sample_rate, steps)):
        event = dp_event.GaussianDpEvent(sigma)
        if q < 1:
            event = dp_event.PoissonSampledDpEvent(q, event)
        accountant.compose(dp_event.SelfComposedDpEvent(event, int(count)))
    return float(accountant.get_epsilon(delta))


def ledger_epsilon(*, gaussian: list, laplace: list, delta: float,
                   value_discretization_interval: float = PLD_VALUE_DISCRETIZATION) -> float:
    """ε under dp_accounting's PLD accountant of Gaussian releases ``(σ, q, count)`` followed
    by Laplace steps ``(b / C, q, count)``, each Poisson-subsampled at its q (none at q = 1).
    A pessimistic estimate, as :func:`pld_epsilon`. Used by the Laplace mechanism's
    accountant (:mod:`dp_sweeps.privacy.laplace`)."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=value_discretization_interval)
    entries = [(dp_event.GaussianDpEvent, *r) for r in gaussian] + [(dp_event.LaplaceDpEvent, *r) for r in laplace]
    for event_class, multiplier, q, count in entries:
        if int(count) == 0:
            continue
        if multiplier == 0:
            return math.inf
        event = event_class(float(multiplier))
        if q < 1:
            event = dp_event.PoissonSampledDpEvent(float(q), event)
        accountant.compose(dp_event.SelfComposedDpEvent(event, int(count)))
    return float(accountant.get_epsilon(delta))


def cross_check_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int,
                        delta: float, prior: tuple[tuple[float, float, int], ...] = ()) -> dict[str, Optional[float]]:
    """ε of ``steps`` DP-SGD steps (σ = ``noise_multiplier``, Poisson rate ``sample_rate``)
    at ``delta`` under Opacus PRV, Opacus RDP and dp-accounting PLD.

    Returns ``{"prv": ..., "rdp": ..., "pld": ..., "gdp": ...}``: the first three are
    each an accountant's own upper bound on ε, none of them adjusted; ``gdp`` is Opacus's
    Gaussian-DP approximation, which can under-report (None with ``prior`` releases, which
    it cannot compose). Assumes Poisson sampling, as all three do.
    ``prior``: Gaussian releases ``(σ, q, count)`` before the steps, composed by all three.
    ``prv`` is None (not computed) when RDP's ε exceeds ``PRV_MAX_RDP_EPSILON``.
    """
    if not (noise_multiplier > 0 and 0 < sample_rate <= 1 and steps >= 1 and 0 < delta < 1):
        raise ValueError(f"cross_check_epsilon: need σ > 0, 0 < q ≤ 1, steps ≥ 1, 0 < δ < 1; got "
                         f"σ={noise_multiplier}, q={sample_rate}, steps={steps}, δ={delta}")
    common = dict(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=int(steps), delta=delta)
    prior = tuple(tuple(r) for r in prior)
    rdp = epsilon_for(**common, accountant="rdp", prior=prior)
    return {
        "prv": epsilon_for(**common, accountant="prv", prior=prior) if rdp <= PRV_MAX_RDP_EPSILON else None,
        "rdp": rdp,
        "pld": pld_epsilon(**common, prior=prior),
        # A CLT approximation that can fall *below* the true ε: shown, never used.
        "gdp": epsilon_for(**common, accountant="gdp") if not prior else None,
    }
