"""Empirical privacy audit of the DP-SGD mechanism: ``python -m dp_sweeps.audit``.

What is audited is the real mechanism: :func:`dp_sweeps.privacy.make_private` wraps a
small model, so Opacus's per-example clipping, Gaussian noise and Poisson sampler are
what produce every released model. The attacker is white-box and as strong as DP-SGD
allows (Nasr et al. 2021): a *gradient canary* whose gradient is a fixed direction
``u`` of norm ``2·max_grad_norm`` (clipped to exactly C) on a parameter coordinate no
other example touches, and the released model's update projected on ``u`` as the
score. For full-batch runs this test is optimal, so an honest mechanism's audit
approaches the claimed ε (from below), and a broken one exceeds it.

Two audits:

- **Many runs** (:func:`audit_mechanism`; Jagielski et al. 2020): thousands of short
  runs with and without the canary; ε lower bound by Clopper–Pearson on the threshold
  test's error rates, plus the Gaussian-DP view (:mod:`dp_sweeps.audit_stats`). Runs are
  batched: ``runs_per_batch`` independent runs share one Opacus step, each run on its
  own block of parameters and its own examples, so per-example clipping, independent
  per-coordinate noise and independent per-example Poisson sampling make them exactly
  independent runs (``runs_per_batch=1`` removes even that reliance, ~30x slower).
- **One run** (:func:`one_run_audit`; Steinke, Nasr & Jagielski 2023): ``canaries``
  gradient canaries, each included with probability ½, in a single training run of a
  given size (N, batch, epochs: e.g. CIFAR-10's); the bound comes from how many
  inclusions the auditor guesses right.

An audit can refute a claim (lower bound > claimed ε: the mechanism or its accounting
is broken) but never prove one: a lower bound below the claim is what a correct
implementation gives, and also what a subtly broken one might give.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from dp_sweeps.audit_stats import one_run_epsilon_lower, threshold_audit
from dp_sweeps.privacy import PrivacyPlan, calibrate_noise_multiplier, epsilon_for, make_private, steps_per_epoch

CANARY_GRADIENT_SCALE = 2.0  # the canary's raw gradient norm, in units of max_grad_norm (≥ 1: clipped to C)


def _plan(*, noise_multiplier: float, max_grad_norm: float, sample_rate: float, steps: int,
          delta: float) -> PrivacyPlan:
    return PrivacyPlan(private=True, accountant="prv", delta=delta, max_grad_norm=max_grad_norm,
                       noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                       steps_per_epoch=round(1 / sample_rate), steps=steps, target_epsilon=None,
                       planned_epsilon=None, poisson_sampling=True)


def _loader_with_rate(num_examples: int, batches_per_epoch: int, generator: torch.Generator) -> DataLoader:
    """An index loader with exactly ``batches_per_epoch`` batches, so that Opacus samples at
    q = 1 / batches_per_epoch (make_private checks this against the plan)."""
    batch_size = math.ceil(num_examples / batches_per_epoch)
    if math.ceil(num_examples / batch_size) != batches_per_epoch:
        raise ValueError(f"{num_examples} examples cannot be split into {batches_per_epoch} batches")
    return DataLoader(TensorDataset(torch.arange(num_examples)), batch_size=batch_size, generator=generator)


class _Mechanism:
    """A linear model wrapped by :func:`make_private`, trained with SGD (lr 1) on the loss
    ``-w·x``: each example's gradient is ``-x``, independent of the parameters, so the
    released update is exactly the clipped, summed, noised gradient of the mechanism.

    ``features(idx)`` builds the inputs of the examples ``idx`` (the data set is never
    materialised: the one-run audit has 50,000 examples).
    """

    def __init__(self, *, num_features: int, num_examples: int, features, plan: PrivacyPlan,
                 seed: int, broken_noise_factor: float = 1.0):
        self.features = features
        generator = torch.Generator().manual_seed(seed)
        loader = _loader_with_rate(num_examples, round(1 / plan.sample_rate), generator)
        model = nn.Linear(num_features, 1, bias=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, self.model, self.optimizer, _, self.loader = make_private(
                plan=plan, module=model, optimizer=optimizer, data_loader=loader, criterion=nn.MSELoss(),
                grad_sample_mode="hooks", noise_generator=torch.Generator().manual_seed(seed + 1))
        if broken_noise_factor != 1.0:
            # The deliberately broken mechanism: less noise than the plan (and its ε) claims.
            self.optimizer.noise_multiplier = plan.noise_multiplier * broken_noise_factor
        self.weight = self.model._module.weight
        self.max_grad_norm = plan.max_grad_norm

    def train(self, steps: int) -> torch.Tensor:
        """``steps`` DP-SGD steps from w = 0; returns the released w, rescaled so that one
        clipped example's contribution per step is 1 (and the noise's std is σ)."""
        with torch.no_grad():
            self.weight.zero_()
        done = 0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            while done < steps:
                # Opacus's Poisson sampler itself; skipping the loader's per-index fetch of
                # an index data set (the identity) saves most of a step's time.
                for indices in self.loader.batch_sampler:
                    idx = torch.as_tensor(indices, dtype=torch.long)
                    out = self.model(self.features(idx))
                    (-out.sum() / max(len(idx), 1)).backward()  # "mean" reduction, as Opacus expects
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    done += 1
                    if done == steps:
                        break
        return self.weight.detach()[0] * self.optimizer.expected_batch_size / self.max_grad_norm


def canary_scores(*, noise_multiplier: float, sample_rate: float, steps: int, runs: int, with_canary: bool,
                  max_grad_norm: float = 1.0, ordinary_examples: int = 2, runs_per_batch: int = 500,
                  broken_noise_factor: float = 1.0, seed: int = 0) -> np.ndarray:
    """The attacker's score in ``runs`` independent DP-SGD runs, with or without the canary.

    Run r owns parameters 2r (its ordinary examples' feature) and 2r+1 (the canary's);
    the score is the released parameter 2r+1 in units of C: Σ_t (1[canary sampled at t]
    + σ·z_t) with the canary, Σ_t σ·z_t without.
    """
    batches_per_epoch = round(1 / sample_rate)
    if not math.isclose(sample_rate, 1 / batches_per_epoch) or runs_per_batch % batches_per_epoch:
        raise ValueError(f"sample_rate={sample_rate} must be 1/k with k dividing runs_per_batch={runs_per_batch}")
    per_run = ordinary_examples + int(with_canary)
    rng = torch.Generator().manual_seed(seed + 7)
    # Ordinary examples: a fixed random gradient on their run's first coordinate.
    ordinary_value = torch.randn(runs_per_batch * per_run, generator=rng) * max_grad_norm
    canary_value = CANARY_GRADIENT_SCALE * max_grad_norm

    def features(idx: torch.Tensor) -> torch.Tensor:
        run, slot = idx // per_run, idx % per_run
        is_canary = slot == ordinary_examples
        x = torch.zeros(len(idx), 2 * runs_per_batch)
        x[torch.arange(len(idx)), 2 * run + is_canary.long()] = torch.where(
            is_canary, torch.full_like(ordinary_value[idx], canary_value), ordinary_value[idx])
        return x

    plan = _plan(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, sample_rate=sample_rate,
                 steps=steps, delta=1e-5)
    mechanism = _Mechanism(num_features=2 * runs_per_batch, num_examples=runs_per_batch * per_run,
                           features=features, plan=plan, seed=seed, broken_noise_factor=broken_noise_factor)
    scores = []
    for _ in range(math.ceil(runs / runs_per_batch)):
        scores.append(mechanism.train(steps)[1::2].numpy().copy())
    return np.concatenate(scores)[:runs]


@dataclass(frozen=True)
class AuditResult:
    """One audit: the accountant's claim beside what the attack shows."""

    kind: str  # "many-run" or "one-run"
    mechanism: str  # "honest" or "broken"
    claimed_epsilon: float
    delta: float
    noise_multiplier: float  # what the plan claims (the broken mechanism adds less)
    sample_rate: float
    steps: int
    epsilon_lower: float  # the assumption-free bound (Clopper–Pearson / Steinke et al.)
    epsilon_gdp_lower: Optional[float]
    epsilon_gdp_estimate: Optional[float]
    confidence: float
    runs: int  # per case (with / without canary); canaries for the one-run audit
    seconds: float

    @property
    def violated(self) -> bool:
        """The claim is refuted: the attack proves more leakage than the accountant allows."""
        return self.epsilon_lower > self.claimed_epsilon

    def as_dict(self) -> dict:
        return {**asdict(self), "violated": self.violated}


def audit_mechanism(*, target_epsilon: Optional[float] = None, noise_multiplier: Optional[float] = None,
                    delta: float = 1e-5, sample_rate: float = 1.0, steps: int = 1, runs: int = 50000,
                    broken: bool = False, confidence: float = 0.95, runs_per_batch: int = 500,
                    seed: int = 0) -> AuditResult:
    """Many-run audit of DP-SGD at σ = ``noise_multiplier`` (or σ calibrated to
    ``target_epsilon`` by the accountant). ``broken`` halves the noise actually added
    while the claim stays the accountant's ε for σ.

    Guarantee: for a correct mechanism, ``epsilon_lower`` ≤ the true ε ≤ the claimed ε
    with probability ≥ ``confidence``; ``violated`` is then a false alarm with at most
    that probability (per audit).
    """
    started = time.perf_counter()
    if noise_multiplier is None:
        noise_multiplier = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta,
                                                      sample_rate=sample_rate, steps=steps)
    claimed = epsilon_for(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta)
    common = dict(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, runs=runs,
                  runs_per_batch=runs_per_batch, broken_noise_factor=0.5 if broken else 1.0)
    with_canary = canary_scores(with_canary=True, seed=seed, **common)
    without_canary = canary_scores(with_canary=False, seed=seed + 1_000_003, **common)
    bounds = threshold_audit(with_canary, without_canary, delta=delta, confidence=confidence, seed=seed)
    return AuditResult(kind="many-run", mechanism="broken" if broken else "honest", claimed_epsilon=claimed,
                       delta=delta, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                       epsilon_lower=bounds["epsilon_lower"], epsilon_gdp_lower=bounds["epsilon_gdp_lower"],
                       epsilon_gdp_estimate=bounds["epsilon_gdp_estimate"], confidence=confidence, runs=runs,
                       seconds=time.perf_counter() - started)


def one_run_audit(*, num_train: int = 50000, batch_size: int = 256, epochs: int = 100,
                  target_epsilon: Optional[float] = 5.0, noise_multiplier: Optional[float] = None,
                  delta: float = 1e-5, canaries: int = 1000, broken: bool = False, confidence: float = 0.95,
                  guess_counts: Sequence[int] = (10, 20, 50, 100, 200, 500), seed: int = 0) -> AuditResult:
    """One training run of ``num_train`` examples at the plan's sampling rate and steps,
    with ``canaries`` extra gradient canaries, each included with probability ½.

    The auditor guesses "in" for the k highest scores and "out" for the k lowest, for
    each k in ``guess_counts`` (a Bonferroni correction covers picking the best k), and
    the bound is Steinke et al.'s: with probability ≥ ``confidence`` it is ≤ the true ε.
    """
    started = time.perf_counter()
    per_epoch = steps_per_epoch(num_train, batch_size)
    sample_rate, steps = 1.0 / per_epoch, per_epoch * epochs
    if noise_multiplier is None:
        noise_multiplier = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta,
                                                      sample_rate=sample_rate, steps=steps)
    claimed = epsilon_for(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta)
    rng = np.random.default_rng(seed)
    included = rng.random(canaries) < 0.5
    # Examples 0..N-1 are ordinary (feature 0), then the included canaries (feature 1 + i).
    canary_of_example = torch.as_tensor(np.flatnonzero(included))
    ordinary_value = torch.randn(num_train, generator=torch.Generator().manual_seed(seed + 7))
    canary_value = CANARY_GRADIENT_SCALE

    def features(idx: torch.Tensor) -> torch.Tensor:
        x = torch.zeros(len(idx), 1 + canaries)
        ordinary = idx < num_train
        rows = torch.arange(len(idx))
        x[rows[ordinary], 0] = ordinary_value[idx[ordinary]]
        x[rows[~ordinary], 1 + canary_of_example[idx[~ordinary] - num_train]] = canary_value
        return x

    plan = _plan(noise_multiplier=noise_multiplier, max_grad_norm=1.0, sample_rate=sample_rate, steps=steps,
                 delta=delta)
    mechanism = _Mechanism(num_features=1 + canaries, num_examples=num_train + int(included.sum()),
                           features=features, plan=plan, seed=seed, broken_noise_factor=0.5 if broken else 1.0)
    scores = mechanism.train(steps)[1:].numpy()
    order = np.argsort(scores)  # ascending: guess "out" for the first k, "in" for the last k
    significance = (1 - confidence) / len(guess_counts)
    best = 0.0
    for k in guess_counts:
        k = min(k, canaries // 2)
        correct = int(included[order[-k:]].sum() + (~included[order[:k]]).sum())
        best = max(best, one_run_epsilon_lower(canaries=canaries, guesses=2 * k, correct=correct, delta=delta,
                                               significance=significance))
    return AuditResult(kind="one-run", mechanism="broken" if broken else "honest", claimed_epsilon=claimed,
                       delta=delta, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                       epsilon_lower=best, epsilon_gdp_lower=None, epsilon_gdp_estimate=None,
                       confidence=confidence, runs=canaries, seconds=time.perf_counter() - started)


def _format(result: AuditResult) -> str:
    def num(value):
        return "-" if value is None else f"{value:.2f}"
    gdp_flags = result.epsilon_gdp_lower is not None and result.epsilon_gdp_lower > result.claimed_epsilon
    if result.mechanism == "broken":  # the control: the audit must catch it
        verdict = "caught" if result.violated else ("MISSED (caught by the GDP fit only)" if gdp_flags else "MISSED")
    else:
        verdict = "VIOLATED: lower bound > claimed ε" if result.violated else (
            "ok (GDP fit above the claim: suspect)" if gdp_flags else "ok")
    return (f"{result.kind:8s} {result.mechanism:7s} {result.claimed_epsilon:8.2f} {result.noise_multiplier:7.3f} "
            f"{result.sample_rate:7.4f} {result.steps:6d} {result.runs:7d} {num(result.epsilon_lower):>9s} "
            f"{num(result.epsilon_gdp_lower):>9s} {num(result.epsilon_gdp_estimate):>9s} {result.seconds:6.1f}  {verdict}")


HEADER = (f"{'audit':8s} {'mech.':7s} {'claimed':>8s} {'sigma':>7s} {'q':>7s} {'steps':>6s} {'runs':>7s} "
          f"{'eps_lower':>9s} {'gdp_lower':>9s} {'gdp_est':>9s} {'sec':>6s}  verdict")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dp_sweeps.audit",
        description="Empirical lower bounds on the ε of the DP-SGD mechanism, beside the accountant's claim. "
                    "Exit status 0: no honest audit refuted its claim and every broken control was caught.")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0],
                        help="claimed ε values to audit (σ calibrated by the PRV accountant)")
    parser.add_argument("--broken-epsilons", type=float, nargs="*", default=[2.0],
                        help="claimed ε values at which to audit the broken control (noise halved)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--runs", type=int, default=50000, help="runs with and runs without the canary, each")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="1/k: Poisson sampling rate of each run")
    parser.add_argument("--steps", type=int, default=1, help="DP-SGD steps per run")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one-run", action="store_true",
                        help="instead: the one-run audit (Steinke et al. 2023) of a CIFAR-10-sized run (slow)")
    parser.add_argument("--num-train", type=int, default=50000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    print(HEADER, flush=True)
    results = []
    if args.one_run:
        for eps in args.epsilons:
            results.append(one_run_audit(num_train=args.num_train, batch_size=args.batch_size, epochs=args.epochs,
                                         target_epsilon=eps, delta=args.delta, canaries=args.canaries,
                                         confidence=args.confidence, seed=args.seed))
            print(_format(results[-1]), flush=True)
    else:
        cases = [(eps, False) for eps in args.epsilons] + [(eps, True) for eps in args.broken_epsilons]
        for eps, broken in cases:
            results.append(audit_mechanism(target_epsilon=eps, delta=args.delta, sample_rate=args.sample_rate,
                                           steps=args.steps, runs=args.runs, broken=broken,
                                           confidence=args.confidence, seed=args.seed))
            print(_format(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.as_dict() for r in results], fh, indent=2)
    false_alarms = [r for r in results if r.mechanism == "honest" and r.violated]
    missed = [r for r in results if r.mechanism == "broken" and not r.violated]
    print(f"eps_lower: {args.confidence:.0%} Clopper-Pearson (held-out threshold) lower bound on the mechanism's ε; "
          "gdp_lower/gdp_est: the ε of the Gaussian-DP fit (bound / point estimate).")
    if false_alarms:
        print(f"FAIL: {len(false_alarms)} honest audit(s) refuted the accountant's ε", file=sys.stderr)
    if missed:
        print(f"FAIL: {len(missed)} broken control(s) not caught: the audit lacks power", file=sys.stderr)
    return 1 if false_alarms or missed else 0


if __name__ == "__main__":
    sys.exit(main())
