"""The audit's power against a book-keeping bug (security review): book-keeping made to
report per-example gradient norms at 1/4 of their true value, so that examples are
clipped 4x too little while the claimed ε stays the same. The convnet audit, which trains
through make_private, the auto engine, book-keeping and the Poisson loader, flags it;
the honest path passes at the same settings (tests/test_audit.py); the linear audit never
reaches book-keeping and cannot see it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from dp_sweeps.grad_sample import bookkeeping
from dp_sweeps.grad_sample.samplers import opacus_conv_grad_sample
from dp_sweeps.privacy.audit import audit_mechanism, canary_scores, convnet_audit, misreported_bookkeeping_norms
from tests.helpers.audit import CONVNET_AUDIT


def _quarter_norms(monkeypatch) -> list[int]:
    """The mutation: book-keeping's norm function (the Gram-matrix squared norms behind every
    factored per-example norm the optimizer clips with) scaled by 1/16, i.e. norms at 1/4.
    Returns a counter of its calls (a list of one int)."""
    original = bookkeeping.gram_squared_norms
    calls = [0]

    def mutated(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return original(a, b) / 16

    monkeypatch.setattr(bookkeeping, "gram_squared_norms", mutated)
    return calls


@pytest.fixture
def quarter_norms(monkeypatch):
    return _quarter_norms(monkeypatch)


def test_the_mutation_reports_bookkeeping_norms_at_a_quarter(quarter_norms):
    layer = nn.Conv2d(16, 32, 3, padding=1)
    layer._dp_sweeps_bookkeeping = True  # what enable_bookkeeping sets
    x = torch.randn(5, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    backprops = torch.randn(5, 32, 4, 4, generator=torch.Generator().manual_seed(1))
    factored = bookkeeping.factored_grad_sample(layer, [x], backprops)[layer.weight]
    true_norms = opacus_conv_grad_sample(layer, [x], backprops)[layer.weight].reshape(5, -1).norm(dim=1)
    torch.testing.assert_close(factored.reshape(-1), true_norms / 4, rtol=1e-4, atol=1e-6)
    assert quarter_norms[0] == 1


@pytest.mark.slow
def test_convnet_audit_catches_bookkeeping_norms_reported_at_a_quarter(quarter_norms):
    """Same settings and seeds as test_honest_training_path_passes_the_convnet_audit: there the
    bound stays below the claim; here it exceeds it."""
    result = convnet_audit(**CONVNET_AUDIT)
    assert quarter_norms[0] > 0  # the mutated norms fed the real path
    assert result.mechanism == "honest"  # the audit is not told: it finds out
    assert result.claimed_epsilon == pytest.approx(2.0, abs=0.02)
    assert result.violated and result.epsilon_lower > result.claimed_epsilon
    # Why: the canary, clipped against a quarter of its norm, adds 4C per sampled step (mean 4q).
    assert result.details["step_score_mean_with_canary"] == pytest.approx(4 / 3, abs=0.2)


def test_the_audits_own_bookkeeping_control_is_the_same_mutation(quarter_norms):
    """misreported_bookkeeping_norms (the CLI's convnet control) scales the same function,
    and restores it afterwards."""
    mutated = bookkeeping.gram_squared_norms
    a, b = torch.randn(3, 4, 6), torch.randn(3, 4, 5)
    with misreported_bookkeeping_norms():
        torch.testing.assert_close(bookkeeping.gram_squared_norms(a, b), mutated(a, b) / 16)
    assert bookkeeping.gram_squared_norms is mutated


def test_linear_audit_is_blind_to_the_mutation(monkeypatch):
    """The old audit (nn.Linear(d, 1), which book-keeping never factors) gives bit-identical
    scores, hence the same verdict, with the mutation: it never calls book-keeping's norms."""
    common = dict(noise_multiplier=1.0, sample_rate=0.5, steps=2, runs=1000, with_canary=True, seed=3)
    honest_scores = canary_scores(**common)
    honest = audit_mechanism(target_epsilon=2.0, runs=5000, seed=0)
    calls = _quarter_norms(monkeypatch)
    np.testing.assert_array_equal(canary_scores(**common), honest_scores)
    mutated_audit = audit_mechanism(target_epsilon=2.0, runs=5000, seed=0)
    assert calls[0] == 0
    assert mutated_audit.epsilon_lower == honest.epsilon_lower and not mutated_audit.violated
