"""The statistics of a privacy audit: from canary scores to a lower bound on ε.

Every bound here is a statement about the *mechanism*, derived from what an attacker
observed; none of them uses the accountant. The functions are pure (NumPy/SciPy):

- :func:`threshold_audit` (many runs, Jagielski et al. 2020; Nasr et al. 2021): a
  threshold test separating runs trained with the canary from runs without it. With
  probability ≥ ``confidence``, ``epsilon_lower`` ≤ the true ε of any (ε, δ)-DP
  mechanism (Clopper–Pearson intervals on the error rates; the threshold and the
  direction of the test are picked on a held-out part of the runs, so choosing the
  best threshold does not inflate the bound).
- The Gaussian-DP view (Dong, Roth & Su 2022; Nasr et al. 2023): ``mu_lower`` bounds
  μ from below *if* the mechanism's trade-off curve is Gaussian (true for DP-SGD at
  full batch, approximately so with subsampling), and ``epsilon_gdp_lower`` is the ε
  of a ``mu_lower``-GDP mechanism at the run's δ. ``mu_estimate`` is a point estimate
  (difference of means over the pooled standard deviation), not a bound.
- :func:`one_run_epsilon_lower` (Steinke, Nasr & Jagielski 2023): many canaries in one
  training run, each included with probability ½; the bound from the number of
  correct guesses, with their correction for δ > 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import optimize, special, stats


def clopper_pearson_upper(successes, trials: int, significance: float):
    """One-sided upper confidence bound on a binomial proportion (level 1 - significance)."""
    successes = np.asarray(successes)
    # scipy's beta.ppf would warn on b = 0; k = n has the trivial bound 1.
    safe = np.where(successes < trials, successes, trials - 1)
    bound = stats.beta.ppf(1 - significance, safe + 1, trials - safe)
    return np.where(successes < trials, bound, 1.0)


def clopper_pearson_lower(successes, trials: int, significance: float):
    """One-sided lower confidence bound on a binomial proportion (level 1 - significance)."""
    successes = np.asarray(successes)
    safe = np.where(successes > 0, successes, 1)
    bound = stats.beta.ppf(significance, safe, trials - safe + 1)
    return np.where(successes > 0, bound, 0.0)


def epsilon_from_rates(*, true_rate, false_rate, delta: float):
    """ln((true_rate - δ) / false_rate), floored at 0: the ε that (ε, δ)-DP needs so that a
    test accepts D' with probability ``true_rate`` but D only with ``false_rate``."""
    true_rate, false_rate = np.asarray(true_rate, dtype=float), np.asarray(false_rate, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.log(np.maximum(true_rate - delta, 0.0)) - np.log(false_rate)
    return np.where((true_rate > delta) & np.isfinite(eps), np.maximum(eps, 0.0), 0.0)


def gdp_delta(*, mu: float, epsilon: float) -> float:
    """δ(ε) of μ-Gaussian DP (Dong, Roth & Su 2022, Corollary 2.13)."""
    if mu <= 0:
        return 0.0
    # e^ε Φ(·) in log space: ε reaches hundreds for the μ of a perfectly separating attack.
    return float(stats.norm.cdf(-epsilon / mu + mu / 2)
                 - math.exp(epsilon + stats.norm.logcdf(-epsilon / mu - mu / 2)))


def gdp_epsilon(*, mu: float, delta: float) -> float:
    """The smallest ε such that a μ-GDP mechanism is (ε, δ)-DP; 0 when μ ≤ 0."""
    if not math.isfinite(mu):
        return math.inf
    if mu <= 0 or gdp_delta(mu=mu, epsilon=0.0) <= delta:
        return 0.0
    high = 1.0
    while gdp_delta(mu=mu, epsilon=high) > delta:
        high *= 2
    return float(optimize.brentq(lambda e: gdp_delta(mu=mu, epsilon=e) - delta, 0.0, high, xtol=1e-6))


def _counts_above(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many scores are ≥ each threshold."""
    return len(sorted_scores) - np.searchsorted(sorted_scores, thresholds, side="left")


def _rate_bounds(in_scores, out_scores, thresholds, significance):
    """For the test "score ≥ t means the canary was in": CP bounds on the four rates."""
    in_sorted, out_sorted = np.sort(in_scores), np.sort(out_scores)
    n_in, n_out = len(in_sorted), len(out_sorted)
    tp = _counts_above(in_sorted, thresholds)
    fp = _counts_above(out_sorted, thresholds)
    return dict(
        tpr_lower=clopper_pearson_lower(tp, n_in, significance),
        fpr_upper=clopper_pearson_upper(fp, n_out, significance),
        tnr_lower=clopper_pearson_lower(n_out - fp, n_out, significance),
        fnr_upper=clopper_pearson_upper(n_in - tp, n_in, significance),
    )


def _epsilon_bounds(rates, delta):
    """(ε from the test, ε from its complement) at each threshold."""
    return (epsilon_from_rates(true_rate=rates["tpr_lower"], false_rate=rates["fpr_upper"], delta=delta),
            epsilon_from_rates(true_rate=rates["tnr_lower"], false_rate=rates["fnr_upper"], delta=delta))


def _mu_bounds(rates):
    """μ ≥ Φ⁻¹(1 - FPR) - Φ⁻¹(FNR) for any μ-GDP mechanism, at each threshold."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = stats.norm.ppf(1 - rates["fpr_upper"]) - stats.norm.ppf(rates["fnr_upper"])
    return np.where(np.isfinite(mu), mu, -np.inf)


def threshold_audit(in_scores: Sequence[float], out_scores: Sequence[float], *, delta: float,
                    confidence: float = 0.95, selection_fraction: float = 0.2, seed: int = 0) -> dict:
    """ε lower bounds from scores of runs with (``in_scores``) and without the canary.

    A random ``selection_fraction`` of each set picks the threshold (and, for the
    Clopper–Pearson bound, the direction of the test); the rest, untouched by that
    choice, gives the bound. Two one-sided intervals at (1 - confidence)/2 each make the
    reported ``epsilon_lower`` hold with probability ≥ ``confidence`` for any mechanism;
    ``mu_lower``/``epsilon_gdp_lower`` hold with that probability if the mechanism is μ-GDP
    for some μ.
    """
    in_scores, out_scores = np.asarray(in_scores, dtype=float), np.asarray(out_scores, dtype=float)
    if not 0 < selection_fraction < 1:
        raise ValueError(f"selection_fraction={selection_fraction} must be in (0, 1)")
    if min(len(in_scores), len(out_scores)) < 4:
        raise ValueError("need at least 4 runs with and 4 without the canary")
    rng = np.random.default_rng(seed)
    in_scores, out_scores = rng.permutation(in_scores), rng.permutation(out_scores)
    cut_in, cut_out = int(len(in_scores) * selection_fraction), int(len(out_scores) * selection_fraction)
    select_in, bound_in = in_scores[:cut_in], in_scores[cut_in:]
    select_out, bound_out = out_scores[:cut_out], out_scores[cut_out:]
    significance = (1 - confidence) / 2

    candidates = np.unique(np.concatenate([select_in, select_out]))
    selection = _rate_bounds(select_in, select_out, candidates, significance)
    eps_test, eps_complement = _epsilon_bounds(selection, delta)
    use_complement = eps_complement.max() > eps_test.max()
    eps_threshold = candidates[np.argmax(eps_complement if use_complement else eps_test)]
    mu_threshold = candidates[np.argmax(_mu_bounds(selection))]

    held_out = _rate_bounds(bound_in, bound_out, np.array([eps_threshold, mu_threshold]), significance)
    eps_test, eps_complement = _epsilon_bounds(held_out, delta)
    epsilon_lower = float((eps_complement if use_complement else eps_test)[0])
    mu_lower = float(max(_mu_bounds(held_out)[1], 0.0))

    pooled_std = math.sqrt((in_scores.var(ddof=1) + out_scores.var(ddof=1)) / 2)
    mu_estimate = float((in_scores.mean() - out_scores.mean()) / pooled_std) if pooled_std > 0 else math.inf
    return {
        "epsilon_lower": epsilon_lower,
        "mu_lower": mu_lower,
        "epsilon_gdp_lower": gdp_epsilon(mu=mu_lower, delta=delta),
        "mu_estimate": mu_estimate,
        "epsilon_gdp_estimate": gdp_epsilon(mu=mu_estimate, delta=delta),
        "threshold": float(eps_threshold),
        "test": "score < threshold" if use_complement else "score >= threshold",
        "confidence": confidence,
        "runs_with_canary": int(len(in_scores)),
        "runs_without_canary": int(len(out_scores)),
    }


def one_run_p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P[≥ ``correct`` right out of ``guesses``] for an (ε, δ)-DP mechanism with ``canaries``
    canaries each included with probability ½ (Steinke, Nasr & Jagielski 2023, Thm 5.2:
    a Binomial(guesses, e^ε / (1 + e^ε)) tail, plus their δ term)."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct={correct} <= guesses={guesses} <= canaries={canaries}")
    accuracy = special.expit(epsilon)  # e^ε / (1 + e^ε): randomized response's accuracy
    tail = stats.binom.sf(correct - 1, guesses, accuracy)
    if delta == 0 or correct == 0:
        return float(tail)
    shortfall = np.arange(1, correct + 1)
    spread = (stats.binom.sf(correct - shortfall - 1, guesses, accuracy) - tail) / shortfall
    return float(min(tail + spread.max(initial=0.0) * delta * 2 * canaries, 1.0))


def one_run_epsilon_lower(*, canaries: int, guesses: int, correct: int, delta: float,
                          significance: float = 0.05) -> float:
    """The largest ε that the guesses refute at ``significance`` (0 if none)."""
    def excess(epsilon: float) -> float:  # > 0: this ε is refuted
        return significance - one_run_p_value(canaries=canaries, guesses=guesses, correct=correct,
                                              epsilon=epsilon, delta=delta)
    if guesses == 0 or excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        high *= 2
        if high > 1e3:
            return math.inf
    return float(optimize.brentq(excess, 0.0, high, xtol=1e-6))
