"""The empirical audit: its statistics against closed forms, its canary runs through the
real mechanism, an honest mechanism passing and a broken one (half the noise, the full
noise's ε claimed) caught; the convnet audit's runs going through the project's training
path (make_private, auto engine, book-keeping, Poisson loader) and an honest path passing
it. Its power against a book-keeping bug: tests/test_audit_mutation.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dp_sweeps.privacy import epsilon_for
from dp_sweeps.privacy.audit import (
    audit_mechanism,
    canary_scores,
    convnet_audit,
    convnet_canary_scores,
    honest_likelihood_ratio,
    main,
    one_run_audit,
)
from dp_sweeps.privacy.audit_stats import (
    clopper_pearson_lower,
    clopper_pearson_upper,
    gdp_epsilon,
    one_run_epsilon_lower,
    one_run_p_value,
    threshold_audit,
)
from tests.helpers.audit import CONVNET_AUDIT


def test_clopper_pearson_matches_closed_forms():
    # No successes in n trials: the upper bound is 1 - α^(1/n); all successes: the lower is α^(1/n).
    assert float(clopper_pearson_upper(0, 100, 0.05)) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    assert float(clopper_pearson_lower(100, 100, 0.05)) == pytest.approx(0.05 ** (1 / 100), rel=1e-9)
    assert float(clopper_pearson_lower(0, 100, 0.05)) == 0.0
    assert float(clopper_pearson_upper(100, 100, 0.05)) == 1.0
    assert float(clopper_pearson_lower(50, 100, 0.025)) < 0.5 < float(clopper_pearson_upper(50, 100, 0.025))


@pytest.mark.parametrize("sigma", [0.6, 1.0, 2.0, 4.0])
def test_gdp_conversion_matches_the_accountant_on_the_gaussian_mechanism(sigma):
    """One full-batch step is the Gaussian mechanism, which is exactly (1/σ)-GDP."""
    accountant = epsilon_for(noise_multiplier=sigma, sample_rate=1.0, steps=1, delta=1e-5)
    assert gdp_epsilon(mu=1 / sigma, delta=1e-5) == pytest.approx(accountant, abs=0.02)
    assert gdp_epsilon(mu=0.0, delta=1e-5) == 0.0


def test_threshold_audit_on_separated_and_identical_scores():
    rng = np.random.default_rng(0)
    same = threshold_audit(rng.normal(size=4000), rng.normal(size=4000), delta=1e-5)
    assert same["epsilon_lower"] < 0.2 and same["mu_lower"] < 0.2
    apart = threshold_audit(rng.normal(size=4000) + 100, rng.normal(size=4000), delta=1e-5)
    # Perfect separation on 3,200 held-out runs per side: ε ≥ ln(TPR_lo / FPR_hi) ≈ ln(3200 / 3.7).
    assert apart["epsilon_lower"] == pytest.approx(math.log(0.99953 / (1 - 0.025 ** (1 / 3200))), rel=0.01)


def test_one_run_bound_follows_steinke_et_al():
    # δ = 0: the p-value is the Binomial(r, e^ε/(1+e^ε)) tail.
    p = one_run_p_value(canaries=1000, guesses=100, correct=80, epsilon=1.0, delta=0.0)
    from scipy import stats
    assert p == pytest.approx(stats.binom.sf(79, 100, math.e / (1 + math.e)), rel=1e-9)
    assert one_run_p_value(canaries=1000, guesses=100, correct=80, epsilon=1.0, delta=1e-5) > p
    assert one_run_epsilon_lower(canaries=1000, guesses=100, correct=50, delta=1e-5) == 0.0
    more = [one_run_epsilon_lower(canaries=1000, guesses=100, correct=c, delta=1e-5) for c in (70, 85, 100)]
    assert 0 < more[0] < more[1] < more[2] < math.log(100)  # 100 guesses cannot prove much


def test_canary_scores_come_from_the_opacus_mechanism():
    """With the canary, each step adds its clipped gradient (1 in units of C) plus noise
    of std σ; without, noise only; q < 1 samples the canary in a fraction q of steps."""
    sigma = 1.5
    with_canary = canary_scores(noise_multiplier=sigma, sample_rate=1.0, steps=2, runs=4000, with_canary=True)
    without = canary_scores(noise_multiplier=sigma, sample_rate=1.0, steps=2, runs=4000, with_canary=False, seed=1)
    assert with_canary.mean() == pytest.approx(2.0, abs=0.12)  # 4 standard errors
    assert without.mean() == pytest.approx(0.0, abs=0.12)
    assert with_canary.std() == pytest.approx(sigma * math.sqrt(2), rel=0.05)
    assert without.std() == pytest.approx(sigma * math.sqrt(2), rel=0.05)
    subsampled = canary_scores(noise_multiplier=sigma, sample_rate=0.25, steps=4, runs=4000, with_canary=True)
    assert subsampled.mean() == pytest.approx(1.0, abs=0.2)
    broken = canary_scores(noise_multiplier=sigma, sample_rate=1.0, steps=1, runs=4000, with_canary=False,
                           broken_noise_factor=0.5)
    assert broken.std() == pytest.approx(sigma / 2, rel=0.05)


def test_honest_mechanism_passes_its_audit():
    result = audit_mechanism(target_epsilon=2.0, runs=50000, seed=0)
    assert result.claimed_epsilon == pytest.approx(2.0, abs=0.02)
    assert not result.violated
    assert 0.8 < result.epsilon_lower <= result.claimed_epsilon  # not vacuous: the attack is strong
    # Full batch: the Gaussian fit recovers the accountant's ε.
    assert result.epsilon_gdp_estimate == pytest.approx(result.claimed_epsilon, rel=0.1)
    assert result.epsilon_gdp_lower <= result.claimed_epsilon


def test_broken_mechanism_is_flagged():
    """Half the noise, the full noise's ε claimed: the true ε is 4.36, the claim 1.99."""
    result = audit_mechanism(target_epsilon=2.0, runs=50000, broken=True, seed=0)
    assert result.violated
    assert result.epsilon_lower > result.claimed_epsilon + 0.2
    assert result.epsilon_gdp_estimate == pytest.approx(
        epsilon_for(noise_multiplier=result.noise_multiplier / 2, sample_rate=1.0, steps=1, delta=1e-5), rel=0.1)


def test_one_run_audit_bounds_stay_below_the_claim():
    result = one_run_audit(num_train=500, batch_size=500, epochs=1, target_epsilon=8.0, canaries=1000)
    assert result.kind == "one-run" and result.runs == 1000 and result.steps == 1
    assert 1.0 < result.epsilon_lower <= result.claimed_epsilon


def test_cli_exit_status_reports_a_missed_broken_control(capsys):
    """Too few runs to catch the broken mechanism: the command says so and exits 1."""
    status = main(["--audits", "linear", "--epsilons", "2", "--broken-epsilons", "2", "--runs", "500"])
    out = capsys.readouterr()
    assert status == 1
    assert "broken control(s) not caught" in out.err
    assert "claimed" in out.out and out.out.count("many-run") == 2


@pytest.mark.slow
def test_convnet_canary_scores_come_from_the_training_path():
    """The auto engine (hooks) with book-keeping factoring every trained layer, the plan's
    q and steps, and step scores as the docstring says: the canary adds its clipped
    gradient (1 in units of C) when Poisson-sampled (mean q per step), noise std σ."""
    scores = convnet_canary_scores(runs=150, target_epsilon=2.0, seed=0, noise_seed=0)
    plan = scores["plan"]
    assert scores["engine"] == "hooks" and plan.poisson_sampling and plan.private
    assert plan.sample_rate == pytest.approx(1 / 3) and plan.steps == 3
    assert plan.planned_epsilon == pytest.approx(2.0, abs=0.02)
    assert scores["factored"] == ["10.weight", "12.weight", "16.weight", "18.weight"]  # last stage + head
    assert scores["trainable"] == scores["factored"] and scores["factored_share"] == pytest.approx(1.0)
    assert scores["min_canary_norm"] > 4  # clipped at every step, even if its norm were reported at 1/4
    with_canary, without = scores["with_canary"], scores["without_canary"]
    assert with_canary.shape == without.shape == (150, 3)
    standard_error = plan.noise_multiplier / math.sqrt(with_canary.size)
    assert with_canary.mean() == pytest.approx(1 / 3, abs=4 * standard_error)
    assert without.mean() == pytest.approx(0.0, abs=4 * standard_error)
    assert without.std() == pytest.approx(plan.noise_multiplier, rel=0.1)
    # The run statistic: more likely "in" for larger step scores.
    ratio = honest_likelihood_ratio(np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]]), noise_multiplier=1.7,
                                    sample_rate=1 / 3)
    assert ratio[1] > ratio[0]


def test_convnet_audit_trains_every_layer_on_request():
    """train_layers="all": the early convolutions (not factored) train too; book-keeping
    still factors the late layers, which then carry only part of the canary's gradient."""
    scores = convnet_canary_scores(runs=2, train_layers="all", seed=0, noise_seed=0)
    assert set(scores["factored"]) < set(scores["trainable"])
    assert {"0.weight", "2.weight", "5.weight", "7.weight"} <= set(scores["trainable"])
    assert 0 < scores["factored_share"] < 1


@pytest.mark.slow
def test_honest_training_path_passes_the_convnet_audit():
    result = convnet_audit(**CONVNET_AUDIT)
    assert result.kind == "convnet" and result.mechanism == "honest"
    assert result.claimed_epsilon == pytest.approx(2.0, abs=0.02)
    assert not result.violated and result.epsilon_lower <= result.claimed_epsilon
    assert result.details["engine"] == "hooks" and result.details["canary_share_in_factored"] == pytest.approx(1.0)
    # The canary's clipped gradient is C per sampled step: mean q per step.
    assert result.details["step_score_mean_with_canary"] == pytest.approx(1 / 3, abs=0.15)


@pytest.mark.slow
def test_cli_runs_the_convnet_audit_and_its_bookkeeping_control(capsys, tmp_path):
    """Too few runs for the control: it is reported missed (exit 1); the honest audit passes."""
    status = main(["--audits", "convnet", "--convnet-runs", "60", "--json", str(tmp_path / "audit.json")])
    out = capsys.readouterr()
    assert status == 1 and "broken control(s) not caught" in out.err and "honest audit" not in out.err
    assert out.out.count("convnet") >= 2 and "book-keeping factored 10.weight" in out.out
    import json
    rows = json.loads((tmp_path / "audit.json").read_text())
    assert [r["mechanism"] for r in rows] == ["honest", "broken"]
    assert rows[1]["details"]["step_score_mean_with_canary"] > rows[0]["details"]["step_score_mean_with_canary"]
