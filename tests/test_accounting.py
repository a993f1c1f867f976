"""The accounting cross-check: Opacus PRV and Google's PLD agree, RDP is looser."""

from __future__ import annotations

import math
import time

import pytest

from dp_sweeps.privacy.accounting import PRV_MAX_RDP_EPSILON, cross_check_epsilon, pld_epsilon

PAPER_RATE = 256 / 50000
PAPER = dict(noise_multiplier=0.912, sample_rate=PAPER_RATE, steps=int(100 / PAPER_RATE), delta=1e-5)


def test_paper_setting_under_three_accountants():
    started = time.perf_counter()
    eps = cross_check_epsilon(**PAPER)
    seconds = time.perf_counter() - started
    assert set(eps) == {"prv", "rdp", "pld", "gdp"}
    assert eps["prv"] == pytest.approx(5.007, abs=0.005)
    assert eps["pld"] == pytest.approx(4.996, abs=0.005)
    assert eps["rdp"] == pytest.approx(5.430, abs=0.005)
    assert abs(eps["prv"] - eps["pld"]) <= 0.02
    assert eps["gdp"] < eps["pld"]  # the CLT approximation: below the upper bounds, shown for contrast
    assert seconds < 20  # ≈ 2.5 s on one free core


@pytest.mark.parametrize("noise_multiplier, sample_rate, steps, delta", [
    (2.0, 0.01, 1000, 1e-5),  # small ε
    (1.1, 0.001, 50000, 1e-5),  # many steps at a low rate
    (0.6, 0.05, 200, 1e-6),  # large ε, another δ
    (5.0, 1 / 8, 8, 1e-5),  # the tiny test runs' rate
    (1.0, 1.0, 3, 1e-5),  # full batch: no subsampling
])
def test_prv_and_pld_agree_and_rdp_is_an_upper_bound(noise_multiplier, sample_rate, steps, delta):
    eps = cross_check_epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta)
    assert all(math.isfinite(v) and v > 0 for v in eps.values())
    assert abs(eps["prv"] - eps["pld"]) <= 0.02
    # RDP converts Rényi DP to (ε, δ) loosely: never below the tight accountants.
    assert eps["rdp"] >= max(eps["prv"], eps["pld"]) - 0.01


def test_pld_discretization_is_converged():
    """The chosen discretization is within 0.002 of a 3x finer one (which is ~3x slower)."""
    setting = dict(noise_multiplier=1.1, sample_rate=0.001, steps=50000, delta=1e-5)
    assert pld_epsilon(**setting) == pytest.approx(pld_epsilon(**setting, value_discretization_interval=3e-5),
                                                   abs=0.002)


def test_less_noise_more_epsilon_in_every_accountant():
    less = cross_check_epsilon(noise_multiplier=0.8, sample_rate=0.01, steps=1000, delta=1e-5)
    more = cross_check_epsilon(noise_multiplier=1.6, sample_rate=0.01, steps=1000, delta=1e-5)
    assert all(less[k] > more[k] for k in ("prv", "rdp", "pld"))


@pytest.mark.parametrize("bad", [dict(noise_multiplier=0.0), dict(sample_rate=0.0), dict(sample_rate=1.5),
                                 dict(steps=0), dict(delta=0.0), dict(delta=1.0), dict(noise_multiplier=math.nan)])
def test_out_of_range_input_is_refused(bad):
    with pytest.raises(ValueError):
        cross_check_epsilon(**{**PAPER, **bad})


def test_prv_is_skipped_above_its_memory_safe_range():
    """Past RDP ε = 40 PRV is not run (at CIFAR scale its grid takes gigabytes there:
    σ = 0.3, 100 epochs, needs > 3 GB); RDP and PLD still answer."""
    eps = cross_check_epsilon(noise_multiplier=0.5, sample_rate=0.05, steps=500, delta=1e-5)
    assert eps["prv"] is None
    assert eps["rdp"] > PRV_MAX_RDP_EPSILON and eps["pld"] == pytest.approx(39.65, abs=0.05)
