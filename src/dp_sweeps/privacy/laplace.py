"""The Laplace mechanism for DP-SGD (``privacy.mechanism=laplace``): per-example L1
clipping, Laplace noise on the sum, and its accountant.

Guarantee: with Poisson sampling at rate q, each step of :class:`LaplaceDPOptimizer`
clips every example's gradient to L1 norm ≤ C (``privacy.max_grad_norm``, over all
trainable parameters together), sums, and adds independent Laplace(0, b) noise to every
coordinate of the sum, b = ``noise_multiplier`` · C, once per logical batch (also for an
empty one). Adding or removing one example moves the sum by at most C in L1, so one step
is the Laplace mechanism with noise ratio b / C = ``noise_multiplier``, Poisson
subsampled. :class:`LaplacePLDAccountant` composes ``PoissonSampledDpEvent(q,
LaplaceDpEvent(noise_multiplier))`` over the steps taken, after the Gaussian releases made
before training (DP data normalisation), with Google's ``dp_accounting`` PLD accountant
(a pessimistic, i.e. upper, bound on ε for add/remove-one neighbours).

Opacus has no Laplace mechanism. What is written here is only what differs from its
``DPOptimizer`` (the clipping norm and the noise law) and from its accountants (a ledger
read by ``dp_accounting``); Opacus keeps hooks, sampling, scaling and the step hook.
"""

from __future__ import annotations

from typing import Optional

import torch
from opacus.accountants.accountant import IAccountant
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from dp_sweeps.errors import ConfigError
from dp_sweeps.privacy.accounting import ledger_epsilon

MECHANISMS = ("gaussian", "laplace")
# The accountants each mechanism may be accounted with (upper bounds on its ε).
MECHANISM_ACCOUNTANTS = {"gaussian": ("prv", "rdp"), "laplace": ("pld",)}
# Engines that materialise each example's gradient (an L1 norm needs the gradient itself;
# ghost clipping only ever computes L2 norms from factors).
LAPLACE_GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ew")


def check_mechanism_settings(*, mechanism: Optional[str], accountant: Optional[str],
                             grad_sample_mode: Optional[str]) -> None:
    """Refuse (ConfigError, one line) a mechanism with an accountant or an engine that
    cannot serve it."""
    mechanism = mechanism or "gaussian"
    if mechanism not in MECHANISMS:
        raise ConfigError(f"privacy.mechanism={mechanism!r} is not one of: {', '.join(MECHANISMS)}")
    allowed = MECHANISM_ACCOUNTANTS[mechanism]
    if accountant not in allowed:
        hint = ("privacy=laplace sets both" if mechanism == "laplace"
                else "pld is the Laplace mechanism's accountant (the dry run shows PLD beside them)")
        raise ConfigError(f"privacy.accountant={accountant!r} does not account privacy.mechanism={mechanism!r}: "
                          f"use {' or '.join(allowed)} ({hint})")
    if mechanism == "laplace" and grad_sample_mode not in LAPLACE_GRAD_SAMPLE_MODES:
        raise ConfigError(f"privacy.grad_sample_mode={grad_sample_mode!r} cannot clip in L1 (it never builds the "
                          f"per-example gradients): use {', '.join(LAPLACE_GRAD_SAMPLE_MODES)} with "
                          f"privacy.mechanism=laplace")


def laplace_noise(reference: torch.Tensor, *, scale: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """I.i.d. Laplace(0, ``scale``) noise shaped like ``reference``, drawn from ``generator``.

    ``torch.distributions.Laplace`` takes no generator (it would draw from torch's global
    one, which ``seed`` fixes), so the noise is the difference of two Exp(1) draws from the
    mechanism's own generator: X − Y ~ Laplace(0, 1) for independent X, Y ~ Exp(1)."""
    if scale == 0:
        return torch.zeros_like(reference)
    first = torch.empty_like(reference).exponential_(1.0, generator=generator)
    second = torch.empty_like(reference).exponential_(1.0, generator=generator)
    return (first - second) * scale


def l1_clip_factors(grad_samples: list[torch.Tensor], *, max_grad_norm: float) -> torch.Tensor:
    """Each example's factor ``min(1, C / (‖g_n‖₁ + 1e-6))``, the L1 norm taken over all
    parameters together (Opacus's flat L2 factor with the L1 norm)."""
    if len(grad_samples[0]) == 0:
        return torch.zeros((0,), device=grad_samples[0].device)
    device = grad_samples[0].device
    norms = torch.stack([g.reshape(len(g), -1).abs().sum(dim=-1).to(device) for g in grad_samples], dim=1).sum(dim=1)
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


class LaplaceDPOptimizer(DPOptimizer):
    """Opacus's ``DPOptimizer`` with per-example L1 clipping to ``max_grad_norm`` and
    Laplace(0, ``noise_multiplier`` · ``max_grad_norm``) noise per coordinate of the sum;
    the generator is the one Opacus was given (the mechanism's ``noise`` stream)."""

    def clip_and_accumulate(self) -> None:
        factors = l1_clip_factors(self.grad_samples, max_grad_norm=self.max_grad_norm)
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factors.to(grad_sample.device).to(p.dtype), grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = laplace_noise(p.summed_grad, scale=self.noise_multiplier * self.max_grad_norm,
                                  generator=self.generator)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


def use_laplace_mechanism(optimizer: torch.optim.Optimizer) -> LaplaceDPOptimizer:
    """Turn the flat-clipping ``DPOptimizer`` Opacus built into a :class:`LaplaceDPOptimizer`
    (same state; only clipping and noise differ). Any other optimizer class (ghost
    clipping's, the distributed one) is refused: it would clip in L2 or noise on every rank."""
    if type(optimizer) is not DPOptimizer:
        raise ConfigError(f"privacy.mechanism=laplace needs Opacus's flat DPOptimizer on one process, got "
                          f"{type(optimizer).__name__} (ghost clipping and torchrun are not supported)")
    optimizer.__class__ = LaplaceDPOptimizer
    return optimizer


class LaplacePLDAccountant(IAccountant):
    """An Opacus accountant (so the engine, the loop and checkpoints use it unchanged)
    whose ledger is read by ``dp_accounting``'s PLD accountant.

    ``history`` holds ``(noise_multiplier, sample_rate, steps)`` entries, as Opacus's:
    the first ``len(prior_releases)`` are the Gaussian releases made before training, the
    others Poisson-subsampled Laplace steps (their noise multiplier is b / C)."""

    def __init__(self, *, prior_releases: tuple[tuple[float, float, int], ...] = ()) -> None:
        self.prior = tuple(tuple(r) for r in prior_releases)
        self.history = [*self.prior]

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        last = self.history[-1] if len(self.history) > len(self.prior) else None
        if last is not None and last[0] == noise_multiplier and last[1] == sample_rate:
            self.history[-1] = (noise_multiplier, sample_rate, last[2] + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    def _split(self) -> tuple[list, list]:
        head = [tuple(r) for r in self.history[:len(self.prior)]]
        if head != [tuple(r) for r in self.prior]:
            raise RuntimeError(f"the Laplace ledger does not start with its prior releases {self.prior}: {head}")
        return head, [tuple(r) for r in self.history[len(self.prior):]]

    def get_epsilon(self, delta: float, *args, **kwargs) -> float:
        gaussian, laplace = self._split()
        return ledger_epsilon(gaussian=gaussian, laplace=laplace, delta=delta)

    def __len__(self) -> int:
        return sum(int(n) for _, _, n in self._split()[1])

    @classmethod
    def mechanism(cls) -> str:
        return "laplace_pld"
