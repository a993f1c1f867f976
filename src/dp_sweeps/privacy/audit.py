"""Empirical privacy audit of the DP-SGD mechanism: ``python -m dp_sweeps.privacy.audit``.

What is audited is the real mechanism: :func:`dp_sweeps.privacy.make_private` wraps a
small model, so Opacus's per-example clipping, Gaussian noise and make_private's Poisson
loader (:mod:`dp_sweeps.privacy.sampling`) are what produce every released model. The attacker
is white-box and as strong as DP-SGD allows (Nasr et al. 2021): a *gradient canary*
whose clipped gradient is a known direction ``u`` that no other example's gradient
touches, and the released update projected on ``u`` as the score. For full-batch runs
this test is optimal, so an honest mechanism's audit approaches the claimed ε (from
below), and a broken one exceeds it.

Three audits (the CLI runs ``linear`` and ``convnet`` by default):

- **Many runs, linear** (:func:`audit_mechanism`; Jagielski et al. 2020): thousands of
  short runs of an ``nn.Linear(d, 1)`` with and without the canary (gradient ``2C`` on a
  coordinate of its own); ε lower bound by Clopper–Pearson on the threshold test's error
  rates, plus the Gaussian-DP view (:mod:`dp_sweeps.privacy.audit_stats`). Runs are batched:
  ``runs_per_batch`` independent runs share one Opacus step, each run on its own block
  of parameters and its own examples, so per-example clipping, independent
  per-coordinate noise and independent per-example Poisson sampling make them exactly
  independent runs (``runs_per_batch=1`` removes even that reliance, ~30x slower). It
  checks σ, the noise, the clipping of Opacus's own linear sampler and the accountant,
  tightly (full batch, one step). It never reaches book-keeping (a ``Linear(d, 1)``
  never factors: ``d + 1 > d``), the convolution samplers or ``plan_privacy``: a
  book-keeping bug is invisible to it (tests/test_audit_mutation.py).
- **Many runs, convnet** (:func:`convnet_audit`): the project's training path end to
  end. ``plan_privacy`` decides σ, q and the steps (default: N = 12, B = 4, so
  q = 1/3, and 3 steps: one epoch); ``make_private`` wraps the registered ``convnet``
  (8x8 images, width 4) with the engine ``resolve_grad_sample_mode("auto", "convnet")``
  picks (hooks, with book-keeping clipping and the project's samplers) and builds the
  Poisson loader; each step takes that loader's batch, empty ones included, with
  cross-entropy and SGD. Biases are zero and frozen, the other examples are all-zero
  images, so their per-example gradients are exactly 0 whatever the weights; the canary
  is a random image with the label the network least expects, and C is 1/8 of its
  gradient norm (so it is always clipped, and a norm under-reported up to 8x shows in
  full). Which layers book-keeping factors is read off the real path (a dry run of
  ``make_private``; ``T·(d+O) < d·O``: the last stage's convolutions and both linear
  layers) and asserted non-empty; by default (``train_layers="factored"``) only those
  layers train, so the canary's whole gradient goes through book-keeping's norms and
  clipped sums (``"all"`` trains every layer: broader, but a book-keeping bug then only
  scales part of the norm). The attacker scores each step by the released update
  ``θ_t − θ_{t+1}`` projected on the canary's gradient direction at ``θ_t`` (all
  iterates are covered by ε), and a run by the honest mechanism's likelihood ratio of
  those step scores. Control: :func:`misreported_bookkeeping_norms` makes book-keeping
  report per-example norms at 1/4 of their true value: the canary then adds 4C per step
  and the audit flags it (ε lower bound above the claim), while the honest path stays
  below its claim at the same settings.
- **One run** (:func:`one_run_audit`; Steinke, Nasr & Jagielski 2023): ``canaries``
  gradient canaries, each included with probability ½, in a single training run of a
  given size (N, batch, epochs: e.g. CIFAR-10's); the bound comes from how many
  inclusions the auditor guesses right.

What the convnet audit proves, and what it cannot:

- Each ``epsilon_lower`` is at most the mechanism's true ε with probability ≥
  ``confidence``, whatever the mechanism (the score is a function of the released
  iterates; runs are independent): if it exceeds the claimed ε, the training path leaks
  more than its accounting says (a clipping, noise, sampling or accounting bug on that
  path). The broken control shows that book-keeping norms under-reported 4x are caught
  at the default settings (ε ≥ 2.45 at 1,000 runs, 3.46 at 1,500, against a claim of 2).
- It cannot prove the claim. At q < 1 one canary's threshold test is far from tight
  (the honest path shows ε ≥ 0.1–0.3 against a claim of 2), so a leak smaller than the
  control's (say norms off by 20%, or a bug in a layer the canary's gradient barely
  touches) can pass: with ``train_layers="all"`` only 45% of the canary's squared
  gradient norm is factored, and the same 4x bug shows only ε ≥ 0.64 (missed, 1,000
  runs). It covers the layers it trains: by default book-keeping's (Gram-matrix norms
  of a convolution, ``‖a‖·‖b‖`` of linear layers, their clipped sums), not the
  non-factored convolution samplers (frozen), GroupNorm, augmentation, augmentation
  multiplicity, physical-batch splitting (BatchMemoryManager), distributed training,
  the ghost/functorch/ew engines or other models. It audits add/remove of one example
  whose influence is a single clipped gradient; bias-free zero examples make that
  worst case reachable (other examples' gradients would only add to the score's noise).

An audit can refute a claim (lower bound > claimed ε: the mechanism or its accounting
is broken) but never prove one: a lower bound below the claim is what a correct
implementation gives, and also what a subtly broken one might give.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
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
from omegaconf import OmegaConf

from dp_sweeps.grad_sample import bookkeeping
from dp_sweeps.models import create_model
from dp_sweeps.privacy import (
    PrivacyPlan,
    calibrate_noise_multiplier,
    epsilon_for,
    make_private,
    plan_privacy,
    resolve_grad_sample_mode,
    steps_per_epoch,
)
from dp_sweeps.privacy.audit_stats import one_run_epsilon_lower, threshold_audit
from dp_sweeps.privacy.randomness import mechanism_generator

CANARY_GRADIENT_SCALE = 2.0  # the canary's raw gradient norm, in units of max_grad_norm (≥ 1: clipped to C)


def _plan(*, noise_multiplier: float, max_grad_norm: float, sample_rate: float, steps: int,
          delta: float) -> PrivacyPlan:
    return PrivacyPlan(private=True, accountant="prv", delta=delta, max_grad_norm=max_grad_norm,
                       noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                       steps_per_epoch=round(1 / sample_rate), steps=steps, target_epsilon=None,
                       planned_epsilon=None, poisson_sampling=True)


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
        model = nn.Linear(num_features, 1, bias=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, self.model, self.optimizer, _, self.loader = make_private(
                plan=plan, module=model, optimizer=optimizer, criterion=nn.MSELoss(), num_samples=num_examples,
                grad_sample_mode="hooks", noise_generator=mechanism_generator("noise", noise_seed=seed),
                sampler_generator=mechanism_generator("sampler", noise_seed=seed))
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
                # make_private's Poisson sampler itself (dp_sweeps.privacy.sampling); skipping the
                # loader's per-index fetch of an index data set (the identity) saves most of
                # a step's time.
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

    kind: str  # "many-run", "one-run" or "convnet"
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
    details: Optional[dict] = None  # the convnet audit's setup and diagnostics

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


# --- The audit through the project's training path (a ConvNet, book-keeping, Poisson sampling) ---

CONVNET_MODEL = "convnet"  # dp_sweeps.models' registered ConvNet; the engine is resolve_grad_sample_mode("auto", ·)
TRAIN_LAYERS = ("factored", "all")


@contextlib.contextmanager
def misreported_bookkeeping_norms(factor: float = 0.25):
    """The convnet audit's broken control: inside the block, book-keeping reports every
    factored per-example weight-gradient norm at ``factor`` times its true value (its
    Gram-matrix norm function scaled), so those examples are clipped too little. The
    noise and the claimed ε are unchanged: a correct audit must flag it."""
    original = bookkeeping.gram_squared_norms

    def scaled(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return original(a, b) * factor ** 2

    bookkeeping.gram_squared_norms = scaled
    try:
        yield
    finally:
        bookkeeping.gram_squared_norms = original


def _bias_free_convnet(*, num_classes: int, width: int, hidden: int, image_size: int, seed: int) -> nn.Module:
    """The registered ConvNet (tanh), initialised from ``seed``, with every bias set to 0 and
    frozen: an all-zero image then has all-zero activations, hence a per-example gradient
    of exactly 0 whatever the weights are (tanh(0) = max-pool(0) = 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(CONVNET_MODEL, num_classes=num_classes, width=width, hidden=hidden,
                             image_size=image_size, activation="tanh")
    for module in model.modules():
        if getattr(module, "bias", None) is not None:
            with torch.no_grad():
                module.bias.zero_()
            module.bias.requires_grad_(False)
    return model


def _factored_parameters(model: nn.Module, engine: str, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """The trainable parameters whose per-example gradients book-keeping factors, as the
    real path decides it: a copy of ``model`` wrapped by :func:`make_private` with the same
    engine, one backward pass on ``x``, and the names of the parameters whose
    ``grad_sample`` is a :class:`~dp_sweeps.grad_sample.bookkeeping.FactoredGradSample`."""
    probe = copy.deepcopy(model)
    plan = PrivacyPlan(private=True, accountant="prv", delta=1e-5, max_grad_norm=1.0, noise_multiplier=1.0,
                       sample_rate=1.0, steps_per_epoch=1, steps=1, target_epsilon=None, planned_epsilon=None,
                       poisson_sampling=True)
    optimizer = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad], lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, module, _, criterion, _ = make_private(
            plan=plan, module=probe, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), num_samples=len(x),
            grad_sample_mode=engine, noise_generator=torch.Generator().manual_seed(0),
            sampler_generator=torch.Generator().manual_seed(0))
        criterion(module(x), y).backward()
    return [name for name, p in module._module.named_parameters()
            if p.requires_grad and isinstance(getattr(p, "grad_sample", None), bookkeeping.FactoredGradSample)]


class _ConvnetMechanism:
    """DP-SGD as a training run does it, on a small ConvNet: :func:`plan_privacy` decides σ
    (and q, steps), :func:`make_private` wraps the model with the ``auto`` engine (hooks,
    book-keeping clipping active) and builds the Poisson loader, and each step takes
    that loader's batch (an empty one included) as :func:`dp_sweeps.training.fit` does.

    The data set: ``num_train`` images, all zero (gradient exactly 0 through the bias-free
    network) except the last, the canary slot, which holds the canary in runs with the
    canary and zeros in runs without it. A zero image changes nothing in the released
    model (its clipped gradient is 0, and Opacus divides by the expected batch size, a
    constant of the plan), so a run without the canary is distributed as the same
    training without that example: the pair is add/remove-adjacent, as ε assumes.

    The attacker knows θ_0, the canary, C, the learning rate and every released iterate
    θ_t (DP-SGD's ε covers all of them). Before each step it takes the canary's gradient
    at θ_t (plain autograd on a separate copy of the network), ``u_t`` its direction, and
    scores the step by ``⟨θ_t - θ_{t+1}, u_t⟩ · B / (lr · C)`` (B: Opacus's expected batch
    size): the released clipped-sum-plus-noise projected on ``u_t`` in units of C. With
    the canary sampled that is ``1 + σ·z`` (its clipped gradient, norm C, lies along
    ``u_t``; every other example contributes 0), else ``σ·z``.
    """

    def __init__(self, *, target_epsilon: Optional[float], noise_multiplier: Optional[float], delta: float,
                 num_train: int, batch_size: int, epochs: int, num_classes: int, width: int, hidden: int,
                 image_size: int, train_layers: str, canary_gradient_scale: float, learning_rate: float,
                 seed: int, noise_seed: Optional[int]):
        if train_layers not in TRAIN_LAYERS:
            raise ValueError(f"train_layers={train_layers!r}: one of {TRAIN_LAYERS}")
        if num_train < 2:
            raise ValueError("num_train must be ≥ 2 (the canary slot and at least one other example)")
        self.engine = resolve_grad_sample_mode("auto", CONVNET_MODEL)
        model = _bias_free_convnet(num_classes=num_classes, width=width, hidden=hidden, image_size=image_size,
                                   seed=seed)
        canary = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed + 11))
        with torch.no_grad():  # the label the network least expects: the largest loss gradient
            label = model(canary).argmin(dim=1)
        factored = _factored_parameters(model, self.engine, canary, label)
        if not factored:
            raise RuntimeError(f"book-keeping factors no layer of this ConvNet (width={width}, hidden={hidden}, "
                               f"image_size={image_size}, engine={self.engine!r}): the audit would not cover it")
        if train_layers == "factored":  # the canary's whole gradient then goes through book-keeping
            for name, p in model.named_parameters():
                if name not in factored:
                    p.requires_grad_(False)
        self.factored = factored
        self.trainable = [name for name, p in model.named_parameters() if p.requires_grad]

        # The attacker's copy of the network (no Opacus hooks): the canary's gradient at θ_t.
        self.probe = copy.deepcopy(model)
        self.probe_params = [dict(self.probe.named_parameters())[name] for name in self.trainable]
        self.canary, self.label = canary, label
        squares = {name: g.double().pow(2).sum().item() for name, g in zip(self.trainable, self._canary_gradient())}
        norm = math.sqrt(sum(squares.values()))
        self.factored_share = sum(v for name, v in squares.items() if name in factored) / norm ** 2
        # C below the canary's gradient norm: it is clipped at every step (checked per step).
        max_grad_norm = norm / canary_gradient_scale

        privacy = OmegaConf.create({"enabled": True, "epsilon": target_epsilon, "delta": delta,
                                    "max_grad_norm": max_grad_norm, "accountant": "prv",
                                    "noise_multiplier": noise_multiplier, "poisson_sampling": True})
        self.plan = plan_privacy(privacy, num_train=num_train, batch_size=batch_size, epochs=epochs)
        self.epochs, self.learning_rate = epochs, learning_rate
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, self.model, self.optimizer, self.criterion, self.loader = make_private(
                plan=self.plan, module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
                num_samples=num_train, grad_sample_mode=self.engine,
                noise_generator=mechanism_generator("noise", noise_seed=noise_seed),
                sampler_generator=mechanism_generator("sampler", noise_seed=noise_seed))
        if not isinstance(self.optimizer, bookkeeping.BookkeepingDPOptimizer):
            raise RuntimeError(f"make_private gave {type(self.optimizer).__name__}, not book-keeping's optimizer")
        named = dict(self.model._module.named_parameters())
        self.params = [named[name] for name in self.trainable]
        self.initial = [p.detach().clone() for p in self.params]
        self.x = torch.zeros(num_train, 3, image_size, image_size)
        self.y = torch.full((num_train,), int(label))
        self.canary_index = num_train - 1
        self.scale = self.optimizer.expected_batch_size / (learning_rate * self.plan.max_grad_norm)
        self.factored_seen: set[str] = set()
        self.min_canary_norm = math.inf  # in units of C, over every step of every run

    def _canary_gradient(self) -> tuple[torch.Tensor, ...]:
        loss = nn.functional.cross_entropy(self.probe(self.canary), self.label)
        return torch.autograd.grad(loss, self.probe_params)

    def run(self, with_canary: bool) -> np.ndarray:
        """One training run from θ_0 (``plan.steps`` steps); its per-step scores."""
        with torch.no_grad():
            self.x[self.canary_index] = self.canary[0] if with_canary else 0.0
            for p, p0 in zip(self.params, self.initial):
                p.copy_(p0)
        scores = []
        for _ in range(self.epochs):
            for (idx,) in self.loader:
                with torch.no_grad():
                    for q, p in zip(self.probe_params, self.params):
                        q.copy_(p)
                    before = [p.detach().clone() for p in self.params]
                gradient = self._canary_gradient()
                norm = torch.sqrt(sum(g.pow(2).sum() for g in gradient))
                self.min_canary_norm = min(self.min_canary_norm, norm.item() / self.plan.max_grad_norm)
                if len(idx) == 0:  # an empty Poisson batch: a pure-noise step, as in training
                    for p in self.optimizer.params:
                        p.grad_sample = p.new_zeros((0, *p.shape))
                else:
                    self.criterion(self.model(self.x[idx]), self.y[idx]).backward()
                    self.factored_seen.update(name for name, p in zip(self.trainable, self.params)
                                              if isinstance(p.grad_sample, bookkeeping.FactoredGradSample))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    step = sum(((b - p) * g).sum() for b, p, g in zip(before, self.params, gradient)) / norm
                scores.append(step.item() * self.scale)
        return np.asarray(scores)


def honest_likelihood_ratio(step_scores: np.ndarray, *, noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Per run, log of the likelihood ratio "canary in" / "canary out" of its per-step
    scores under the honest mechanism (each step ``1 + σz`` with probability q, else
    ``σz``): the Neyman–Pearson test of the claimed mechanism. Any fixed function of the
    released iterates is a valid test; this one is the most powerful against the claim."""
    shift = (np.asarray(step_scores, dtype=float) - 0.5) / noise_multiplier ** 2
    if sample_rate >= 1.0:
        return shift.sum(axis=-1)
    return np.logaddexp(math.log1p(-sample_rate), math.log(sample_rate) + shift).sum(axis=-1)


def convnet_canary_scores(*, runs: int, target_epsilon: Optional[float] = 2.0,
                          noise_multiplier: Optional[float] = None, delta: float = 1e-5, num_train: int = 12,
                          batch_size: int = 4, epochs: int = 1, num_classes: int = 4, width: int = 4,
                          hidden: int = 16, image_size: int = 8, train_layers: str = "factored",
                          canary_gradient_scale: float = 8.0, learning_rate: float = 0.1, seed: int = 0,
                          noise_seed: Optional[int] = 0) -> dict:
    """``runs`` training runs with the canary and ``runs`` without, alternating, through
    :class:`_ConvnetMechanism`; their per-step scores (runs x steps) and the setup."""
    mechanism = _ConvnetMechanism(
        target_epsilon=target_epsilon, noise_multiplier=noise_multiplier, delta=delta, num_train=num_train,
        batch_size=batch_size, epochs=epochs, num_classes=num_classes, width=width, hidden=hidden,
        image_size=image_size, train_layers=train_layers, canary_gradient_scale=canary_gradient_scale,
        learning_rate=learning_rate, seed=seed, noise_seed=noise_seed)
    with_canary, without_canary = [], []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(runs):
            with_canary.append(mechanism.run(True))
            without_canary.append(mechanism.run(False))
    if set(mechanism.factored) - mechanism.factored_seen:
        raise RuntimeError(f"book-keeping did not factor {sorted(set(mechanism.factored) - mechanism.factored_seen)} "
                           f"during the audit")
    return {"with_canary": np.stack(with_canary), "without_canary": np.stack(without_canary),
            "plan": mechanism.plan, "engine": mechanism.engine, "factored": mechanism.factored,
            "trainable": mechanism.trainable, "factored_share": mechanism.factored_share,
            "min_canary_norm": mechanism.min_canary_norm,
            "expected_batch_size": mechanism.optimizer.expected_batch_size}


def convnet_audit(*, target_epsilon: Optional[float] = 2.0, noise_multiplier: Optional[float] = None,
                  delta: float = 1e-5, runs: int = 1000, num_train: int = 12, batch_size: int = 4, epochs: int = 1,
                  num_classes: int = 4, width: int = 4, hidden: int = 16, image_size: int = 8,
                  train_layers: str = "factored", canary_gradient_scale: float = 8.0, learning_rate: float = 0.1,
                  confidence: float = 0.95, seed: int = 0, noise_seed: Optional[int] = 0,
                  broken: bool = False) -> AuditResult:
    """Many-run audit of the project's training path on a small ConvNet (see the module
    docstring): σ, q and the steps from :func:`plan_privacy` (``num_train``,
    ``batch_size``, ``epochs``; σ calibrated to ``target_epsilon`` unless
    ``noise_multiplier`` is given), claimed ε = the plan's. ``broken``: the book-keeping
    control, run under :func:`misreported_bookkeeping_norms` (norms reported at ¼).

    ``noise_seed``: the mechanism's generators (:func:`dp_sweeps.privacy.randomness.mechanism_generator`;
    a fixed int replays the audit, None draws fresh OS entropy). ``seed``: the network's
    initial weights and the canary image.

    Guarantee: as :func:`audit_mechanism`'s: for a mechanism that keeps its claim,
    ``epsilon_lower`` ≤ the claimed ε with probability ≥ ``confidence``.
    """
    started = time.perf_counter()
    with misreported_bookkeeping_norms() if broken else contextlib.nullcontext():
        scores = convnet_canary_scores(
            runs=runs, target_epsilon=target_epsilon, noise_multiplier=noise_multiplier, delta=delta,
            num_train=num_train, batch_size=batch_size, epochs=epochs, num_classes=num_classes, width=width,
            hidden=hidden, image_size=image_size, train_layers=train_layers,
            canary_gradient_scale=canary_gradient_scale, learning_rate=learning_rate, seed=seed,
            noise_seed=noise_seed)
    plan = scores["plan"]
    statistic = functools.partial(honest_likelihood_ratio, noise_multiplier=plan.noise_multiplier,
                                  sample_rate=plan.sample_rate)
    bounds = threshold_audit(statistic(scores["with_canary"]), statistic(scores["without_canary"]), delta=delta,
                             confidence=confidence, seed=seed)
    in_steps, out_steps = scores["with_canary"], scores["without_canary"]
    details = {
        "model": CONVNET_MODEL, "engine": scores["engine"], "train_layers": train_layers,
        "factored_parameters": scores["factored"], "trainable_parameters": scores["trainable"],
        "canary_share_in_factored": scores["factored_share"],
        "min_canary_norm_over_C": scores["min_canary_norm"], "max_grad_norm": plan.max_grad_norm,
        "num_train": num_train, "batch_size": batch_size, "epochs": epochs,
        "expected_batch_size": scores["expected_batch_size"],
        # Per step, in units of C: the canary adds 1 when sampled (mean q), the noise has std σ.
        "step_score_mean_with_canary": float(in_steps.mean()),
        "step_score_mean_without_canary": float(out_steps.mean()),
        "step_score_std_without_canary": float(out_steps.std()),
        "mu_lower": bounds["mu_lower"], "threshold_test": bounds["test"],
    }
    return AuditResult(kind="convnet", mechanism="broken" if broken else "honest",
                       claimed_epsilon=float(plan.planned_epsilon), delta=delta,
                       noise_multiplier=float(plan.noise_multiplier), sample_rate=plan.sample_rate, steps=plan.steps,
                       epsilon_lower=bounds["epsilon_lower"], epsilon_gdp_lower=bounds["epsilon_gdp_lower"],
                       epsilon_gdp_estimate=bounds["epsilon_gdp_estimate"], confidence=confidence, runs=runs,
                       seconds=time.perf_counter() - started, details=details)


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
            f"{num(result.epsilon_gdp_lower):>9s} {num(result.epsilon_gdp_estimate):>9s} "
            f"{result.seconds:6.1f}  {verdict}")


HEADER = (f"{'audit':8s} {'mech.':7s} {'claimed':>8s} {'sigma':>7s} {'q':>7s} {'steps':>6s} {'runs':>7s} "
          f"{'eps_lower':>9s} {'gdp_lower':>9s} {'gdp_est':>9s} {'sec':>6s}  verdict")


AUDITS = ("linear", "convnet", "one-run")


def _describe_convnet(result: AuditResult) -> str:
    d = result.details
    return (f"         ↳ {d['model']} via make_private, engine {d['engine']!r} (auto), book-keeping factored "
            f"{', '.join(d['factored_parameters'])}; trained: {d['train_layers']} "
            f"({d['canary_share_in_factored']:.0%} of the canary's squared gradient norm factored); "
            f"N={d['num_train']}, q={result.sample_rate:.3g}, {result.steps} steps, C={d['max_grad_norm']:.3g}; "
            f"canary's norm ≥ {d['min_canary_norm_over_C']:.1f}·C; step score mean in/out "
            f"{d['step_score_mean_with_canary']:.2f}/{d['step_score_mean_without_canary']:.2f} "
            f"(honest: q/0), std out {d['step_score_std_without_canary']:.2f} (σ)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dp_sweeps.privacy.audit",
        description="Empirical lower bounds on the ε of the DP-SGD mechanism, beside the accountant's claim. "
                    "Exit status 0: no honest audit refuted its claim and every broken control was caught. "
                    "By default: the linear many-run audit of the noise and accounting, then the convnet audit "
                    "of the training path (make_private, auto engine, book-keeping, Poisson sampling).")
    parser.add_argument("--audits", nargs="+", choices=AUDITS, default=["linear", "convnet"],
                        help="which audits to run (default: linear convnet). linear: nn.Linear canaries, many "
                             "runs (Opacus's clipping, noise and accounting only; never reaches book-keeping or "
                             "the conv samplers). convnet: a ConvNet trained through the project's own path with "
                             "book-keeping clipping, Poisson sampling and several steps, plus a control whose "
                             "book-keeping under-reports norms 4x. one-run: Steinke et al. 2023 (slow)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0],
                        help="linear / one-run: claimed ε values to audit (σ calibrated by the PRV accountant)")
    parser.add_argument("--broken-epsilons", type=float, nargs="*", default=[2.0],
                        help="linear: claimed ε values at which to audit the broken control (noise halved)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--runs", type=int, default=50000, help="linear: runs with and runs without the canary, each")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="linear: 1/k, Poisson sampling rate of each run")
    parser.add_argument("--steps", type=int, default=1, help="linear: DP-SGD steps per run")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights, canaries and (through dp_sweeps.privacy.randomness's noise_seed) the "
                             "mechanism's noise and sampling: the audit replays exactly")
    parser.add_argument("--one-run", action="store_true", help="same as --audits one-run")
    parser.add_argument("--num-train", type=int, default=50000, help="one-run: training set size")
    parser.add_argument("--batch-size", type=int, default=256, help="one-run: batch size")
    parser.add_argument("--epochs", type=int, default=100, help="one-run: epochs")
    parser.add_argument("--canaries", type=int, default=1000, help="one-run: canaries")
    convnet = parser.add_argument_group("convnet audit")
    convnet.add_argument("--convnet-epsilons", type=float, nargs="*", default=[2.0],
                         help="claimed ε values to audit (σ calibrated by plan_privacy, PRV)")
    convnet.add_argument("--convnet-broken-epsilons", type=float, nargs="*", default=[2.0],
                         help="claimed ε values for the control whose book-keeping reports norms at 1/4")
    convnet.add_argument("--convnet-runs", type=int, default=1500,
                         help="training runs with and runs without the canary, each (about 5 ms per run "
                              "and step on one CPU thread)")
    convnet.add_argument("--convnet-num-train", type=int, default=12)
    convnet.add_argument("--convnet-batch-size", type=int, default=4, help="expected batch: q = 1/ceil(N/B)")
    convnet.add_argument("--convnet-epochs", type=int, default=1)
    convnet.add_argument("--convnet-train-layers", choices=TRAIN_LAYERS, default="factored",
                         help="factored: only the layers book-keeping factors train (the others are frozen), "
                              "so the canary's whole gradient is book-keeping's; all: every layer trains")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    audits = ["one-run"] if args.one_run else list(dict.fromkeys(args.audits))
    torch.set_num_threads(1)

    print(HEADER, flush=True)
    results = []
    if "linear" in audits:
        cases = [(eps, False) for eps in args.epsilons] + [(eps, True) for eps in args.broken_epsilons]
        for eps, broken in cases:
            results.append(audit_mechanism(target_epsilon=eps, delta=args.delta, sample_rate=args.sample_rate,
                                           steps=args.steps, runs=args.runs, broken=broken,
                                           confidence=args.confidence, seed=args.seed))
            print(_format(results[-1]), flush=True)
    if "convnet" in audits:
        cases = ([(eps, False) for eps in args.convnet_epsilons]
                 + [(eps, True) for eps in args.convnet_broken_epsilons])
        for eps, broken in cases:
            results.append(convnet_audit(target_epsilon=eps, delta=args.delta, runs=args.convnet_runs,
                                         num_train=args.convnet_num_train, batch_size=args.convnet_batch_size,
                                         epochs=args.convnet_epochs, train_layers=args.convnet_train_layers,
                                         confidence=args.confidence, seed=args.seed, noise_seed=args.seed,
                                         broken=broken))
            print(_format(results[-1]), flush=True)
            print(_describe_convnet(results[-1]), flush=True)
    if "one-run" in audits:
        for eps in args.epsilons:
            results.append(one_run_audit(num_train=args.num_train, batch_size=args.batch_size, epochs=args.epochs,
                                         target_epsilon=eps, delta=args.delta, canaries=args.canaries,
                                         confidence=args.confidence, seed=args.seed))
            print(_format(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.as_dict() for r in results], fh, indent=2)
    false_alarms = [r for r in results if r.mechanism == "honest" and r.violated]
    missed = [r for r in results if r.mechanism == "broken" and not r.violated]
    print(f"eps_lower: {args.confidence:.0%} Clopper-Pearson (held-out threshold) lower bound on the mechanism's ε; "
          "gdp_lower/gdp_est: the ε of the Gaussian-DP fit (bound / point estimate). Broken controls: linear = "
          "half the noise; convnet = book-keeping norms reported at 1/4.")
    if false_alarms:
        print(f"FAIL: {len(false_alarms)} honest audit(s) refuted the accountant's ε", file=sys.stderr)
    if missed:
        print(f"FAIL: {len(missed)} broken control(s) not caught: the audit lacks power", file=sys.stderr)
    return 1 if false_alarms or missed else 0


if __name__ == "__main__":
    sys.exit(main())
