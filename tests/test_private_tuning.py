"""hparams_search=private_tuning (Papernot & Steinke 2022): the search's accounting against
the paper's formulas written out here, the secret draw of K, the noisy score, the
refusals, and one tiny end-to-end search."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize, stats

from dp_sweeps.errors import ConfigError
from dp_sweeps.privacy import noisy_score, tuning
from dp_sweeps.sweeps import private_tuning as sweeper
from tests.helpers.runs import cli_in_process, tiny_sweep_overrides

ORDERS = np.array(tuning.ORDERS)
DELTA = 1e-5


# ---------------------------------------------------------------- the paper's formulas, independently

def gaussian_rdp(sigma: float) -> np.ndarray:
    """The Gaussian mechanism (sensitivity 1) is (λ, λ/(2σ²))-RDP (Mironov 2017)."""
    return ORDERS / (2 * sigma**2)


def tnb_gamma(eta: float, mean: float) -> float:
    """γ of the truncated negative binomial with this mean (P&S Definition 1):
    E[K] = η(1−γ)/(γ(1−γ^η)); η = 0 (logarithmic): E[K] = (1−γ)/(γ log(1/γ))."""
    def mean_of(gamma: float) -> float:
        if eta == 0:
            return (1 - gamma) / (gamma * math.log(1 / gamma))
        return eta * (1 - gamma) / (gamma * (1 - gamma**eta))
    return optimize.brentq(lambda g: mean_of(g) - mean, 1e-12, 1 - 1e-12, xtol=1e-15, rtol=1e-14)


def rdp_to_epsilon(rdp: np.ndarray, delta: float) -> float:
    """(ε, δ) from an RDP curve (Canonne, Kamath & Steinke 2020, Proposition 12):
    ε = min_λ ρ(λ) + log(1 − 1/λ) − (log δ + log λ)/(λ − 1)."""
    return float(np.min(rdp + np.log1p(-1 / ORDERS) - (math.log(delta) + np.log(ORDERS)) / (ORDERS - 1)))


def rdp_to_delta(rdp: np.ndarray, epsilon: float) -> float:
    """δ at ``epsilon`` from an RDP curve (the same proposition, solved for δ; and the KL bound
    δ ≤ sqrt(1 − exp(−ρ)))."""
    log_delta = (ORDERS - 1) * (rdp - epsilon + np.log1p(-1 / ORDERS)) - np.log(ORDERS)
    kl = 0.5 * np.log1p(-np.exp(-rdp))
    return float(min(1.0, math.exp(min(log_delta.min(), kl.min()))))


def paper_tnb_total(rdp: np.ndarray, *, eta: float, mean: float) -> np.ndarray:
    """Theorem 2: ε'(λ) = ε(λ) + (1+η)(1−1/λ̂)ε(λ̂) + (1+η)log(1/γ)/λ̂ + log E[K]/(λ−1), best λ̂;
    then RDP's monotonicity in λ (a lower order is at most a higher order's value)."""
    gamma = tnb_gamma(eta, mean)
    best_hat = min((1 + eta) * (1 - 1 / lh) * eh + (1 + eta) * math.log(1 / gamma) / lh
                   for lh, eh in zip(ORDERS, rdp))
    out = rdp + best_hat + math.log(mean) / (ORDERS - 1)
    return np.array([out[i:].min() for i in range(len(out))])


def paper_poisson_total(rdp: np.ndarray, *, mean: float) -> np.ndarray:
    """Theorem 6: ε'(λ) = ε(λ) + μ·δ̂ + log μ/(λ−1), Q being (log(1 + 1/(λ−1)), δ̂)-DP."""
    return np.array([r + mean * rdp_to_delta(rdp, math.log1p(1 / (lam - 1))) + math.log(mean) / (lam - 1)
                     for lam, r in zip(ORDERS, rdp)])


@pytest.mark.parametrize("eta,mean,sigma", [(0.5, 10, 2.0), (1.0, 5, 1.0), (0.0, 20, 3.0), (2.0, 10, 1.5)])
def test_truncated_negative_binomial_total_matches_theorem_2(eta, mean, sigma):
    distribution = {0.0: "logarithmic", 1.0: "geometric"}.get(eta, "truncated_negative_binomial")
    law = tuning.TrialCount(distribution, mean, eta if distribution == "truncated_negative_binomial" else None)
    event = dp_event.GaussianDpEvent(sigma)
    expected = paper_tnb_total(gaussian_rdp(sigma), eta=eta, mean=mean)
    got = tuning.tuning_rdp(tuning.rdp_curve(event), law=law)
    for lam in (2.0, 8.0, 32.0):
        i = int(np.argmin(abs(ORDERS - lam)))
        assert got[i] == pytest.approx(expected[i], rel=1e-6)
    spent = tuning.tuning_privacy(trial_events=[event], law=law, delta=DELTA)
    assert spent.epsilon == pytest.approx(rdp_to_epsilon(expected, DELTA), rel=1e-6)
    assert spent.per_trial_epsilon == pytest.approx(rdp_to_epsilon(gaussian_rdp(sigma), DELTA), rel=1e-9)


@pytest.mark.parametrize("mean,sigma", [(10, 2.0), (3, 5.0)])
def test_poisson_total_matches_theorem_6(mean, sigma):
    law = tuning.TrialCount("poisson", mean)
    expected = paper_poisson_total(gaussian_rdp(sigma), mean=mean)
    spent = tuning.tuning_privacy(trial_events=[dp_event.GaussianDpEvent(sigma)], law=law, delta=DELTA)
    assert spent.epsilon == pytest.approx(rdp_to_epsilon(expected, DELTA), rel=1e-6)


@pytest.mark.parametrize("distribution,shape", [("poisson", None), ("truncated_negative_binomial", 0.5)])
def test_one_trial_mechanism_equals_dp_accountings_public_path(distribution, shape):
    law = tuning.TrialCount(distribution, 10, shape)
    event = tuning.trial_event(noise_multiplier=1.1, sample_rate=0.01, steps=300, prior_releases=[(8.0, 1.0, 2)],
                               score=tuning.score_event(mechanism="gaussian", noise=20.0))
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.RepeatAndSelectDpEvent(event, 10, law.eta))
    assert tuning.tuning_privacy(trial_events=[event], law=law, delta=DELTA).epsilon == pytest.approx(
        accountant.get_epsilon(DELTA), rel=1e-12)


def test_total_exceeds_per_run_and_grows_with_log_mean():
    event = tuning.trial_event(noise_multiplier=1.0, sample_rate=256 / 45000, steps=1760,
                               score=tuning.score_event(mechanism="gaussian", noise=20.0))
    for distribution, shape in (("poisson", None), ("truncated_negative_binomial", 0.5)):
        totals = []
        for mean in (2, 10, 100, 1000):
            spent = tuning.tuning_privacy(trial_events=[event], law=tuning.TrialCount(distribution, mean, shape),
                                          delta=DELTA)
            assert spent.epsilon > spent.per_trial_epsilon
            totals.append(spent.epsilon)
        steps = np.diff(totals)  # each a factor 10 in E[K] (a step of log 10 in log E[K])
        assert (steps > 0).all()
        assert steps.max() < 3 * steps[1:].min()  # roughly linear in log E[K], not in E[K]


def test_worst_case_is_the_pointwise_maximum_over_the_choices():
    score = tuning.score_event(mechanism="laplace", noise=10.0)
    small_q = tuning.trial_event(noise_multiplier=1.0, sample_rate=0.005, steps=2000, score=score)
    large_q = tuning.trial_event(noise_multiplier=1.0, sample_rate=0.02, steps=200, score=score)
    worst = tuning.worst_case_rdp([small_q, large_q])
    curves = [tuning.rdp_curve(small_q), tuning.rdp_curve(large_q)]
    assert np.array_equal(worst, np.maximum(*curves))
    assert not (curves[0] >= curves[1]).all() and not (curves[1] >= curves[0]).all()  # they cross
    law = tuning.TrialCount("poisson", 10)
    both = tuning.tuning_privacy(trial_events=[small_q, large_q], law=law, delta=DELTA).epsilon
    assert both >= max(tuning.tuning_privacy(trial_events=[e], law=law, delta=DELTA).epsilon
                       for e in (small_q, large_q))


def test_total_epsilon_calibrates_one_noise_multiplier():
    law = tuning.TrialCount("truncated_negative_binomial", 10, 1.0)
    score = tuning.score_event(mechanism="gaussian", noise=20.0)

    def events(sigma):
        return [tuning.trial_event(noise_multiplier=sigma, sample_rate=q, steps=s, score=score)
                for q, s in ((0.01, 500), (0.02, 500))]
    sigma = tuning.calibrate_common_noise(target_epsilon=4.0, events_for=events, law=law, delta=DELTA,
                                          tolerance=0.05)
    spent = tuning.tuning_privacy(trial_events=events(sigma), law=law, delta=DELTA).epsilon
    assert 4.0 - 0.05 <= spent <= 4.0
    assert tuning.tuning_privacy(trial_events=events(sigma * 0.9), law=law, delta=DELTA).epsilon > 4.0
    with pytest.raises(ConfigError, match="tuning.total_epsilon=0.1"):
        tuning.calibrate_common_noise(target_epsilon=0.1, events_for=events, law=law, delta=DELTA)


# --------------------------------------------------------------------------- K and the score

@pytest.mark.parametrize("distribution,shape", [("poisson", None), ("geometric", None), ("logarithmic", None),
                                                ("truncated_negative_binomial", 0.5)])
def test_trial_count_follows_its_law(distribution, shape):
    law = tuning.TrialCount(distribution, 10, shape)
    draws = np.array([tuning.draw_trial_count(law, random_state=np.random.RandomState(seed))
                      for seed in range(4000)])
    assert draws.min() >= (0 if distribution == "poisson" else 1)
    assert abs(draws.mean() - 10) < 4 * draws.std() / math.sqrt(len(draws))
    if distribution == "truncated_negative_binomial":  # P&S Definition 1, up to k = 3
        gamma = tnb_gamma(0.5, 10)
        pmf = [(1 - gamma)**k / (gamma**-0.5 - 1) * math.prod((j + 0.5) / (j + 1) for j in range(k))
               for k in (1, 2, 3)]
        for k, p in zip((1, 2, 3), pmf):
            assert abs((draws == k).mean() - p) < 4 * math.sqrt(p * (1 - p) / len(draws))


def test_k_is_drawn_from_fresh_entropy_not_from_seed():
    law = tuning.TrialCount("poisson", 1000)
    # The function has no access to `seed`; two searches (same config) draw differently.
    assert len({tuning.draw_secret_trial_count(law) for _ in range(5)}) > 1
    # noise_seed (debugging only) replays it.
    assert tuning.draw_secret_trial_count(law, noise_seed=7) == tuning.draw_secret_trial_count(law, noise_seed=7)


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_noisy_count_has_the_stated_noise(mechanism):
    generator = torch.Generator().manual_seed(0)
    draws = np.array([noisy_score.noisy_count(100, mechanism=mechanism, noise=5.0, generator=generator)
                      for _ in range(4000)]) - 100
    law = stats.norm(scale=5.0) if mechanism == "gaussian" else stats.laplace(scale=5.0)
    assert stats.kstest(draws, law.cdf).pvalue > 1e-3


def test_noisy_accuracy_is_noised_and_never_seeded_by_seed():
    scores = {noisy_score.noisy_accuracy(correct=50, total=100, mechanism="gaussian", noise=5.0) for _ in range(3)}
    assert len(scores) == 3 and all(abs(s - 0.5) < 0.5 for s in scores)


# --------------------------------------------------------------------------- refusals

def test_refuses_adaptive_samplers_and_pruners():
    with pytest.raises(ConfigError, match="adaptive samplers"):
        sweeper.check_sampler({"_target_": "optuna.samplers.TPESampler"}, None)
    with pytest.raises(ConfigError, match="pruning"):
        sweeper.check_sampler({"_target_": sweeper.RANDOM_SAMPLER}, {"_target_": "optuna.pruners.MedianPruner"})
    sweeper.check_sampler({"_target_": sweeper.RANDOM_SAMPLER, "seed": 3}, None)


@pytest.mark.parametrize("noise", [None, 0.0, -1.0, math.inf])
def test_refuses_an_unnoised_score(noise):
    with pytest.raises(ConfigError, match="tuning.score_noise"):
        tuning.score_event(mechanism="gaussian", noise=noise)


@pytest.mark.parametrize("override,message", [
    ("trainer.batch_size=range(32,128)", "choice"),
    ("privacy.epsilon=tag(log, interval(0.5, 8))", "choice"),
    ("trainer.epochs=interval(1, 10)", "choice"),
    ("privacy.delta=choice(1e-5,1e-6)", "cannot vary"),
    ("data.val_size=choice(100,200)", "cannot vary"),
    ("privacy.accountant=choice(rdp,prv)", "cannot vary"),
])
def test_refuses_an_unbounded_or_unenumerable_privacy_space(override, message):
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    space, _, _ = create_params_from_overrides([override, "optimizer.lr=tag(log, interval(1e-4, 1e-1))"])
    with pytest.raises(ConfigError, match=message):
        sweeper.check_space(space)


def test_accepts_choices_over_privacy_keys_and_ranges_elsewhere():
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    space, _, _ = create_params_from_overrides(["trainer.batch_size=choice(32,64)", "privacy.epsilon=choice(1,2)",
                                                "privacy.max_grad_norm=interval(0.1, 10)",
                                                "optimizer=choice(adam,sgd)"])
    sweeper.check_space(space)


def test_released_copy_drops_the_exact_validation_figures():
    released = sweeper.redacted_result({"val_accuracy": 0.5, "val_loss": 1.0, "non_private": {}, "search": 1,
                                        "noisy_val_accuracy": 0.49, "test_accuracy": 0.4})
    assert released == {"noisy_val_accuracy": 0.49, "test_accuracy": 0.4}


# --------------------------------------------------------------------------- end to end

def _search(tiny_cifar, out, *extra):
    return ["hparams_search=private_tuning", *tiny_sweep_overrides(tiny_cifar, out), "data.val_size=100",
            "trainer.epochs=1", "trainer.batch_size=choice(32,64)", "tuning.mean_trials=1.5",
            "tuning.distribution=geometric", *extra, "-m"]  # K ≥ 1 (Poisson may draw 0), 1.5 on average


@pytest.mark.slow
def test_tiny_private_search_releases_only_the_best_trial(tiny_cifar, tmp_path, capsys):
    from dp_sweeps.analysis.report import collect_runs
    from dp_sweeps.run import build_model, load_data
    from dp_sweeps.training.evaluate import evaluate
    from tests.helpers.runs import compose_config

    done = cli_in_process(_search(tiny_cifar, tmp_path, "tuning.total_epsilon=8", "tuning.baseline=true"), capsys)
    assert done.returncode == 0, done.stderr[-2000:]
    (sweep,) = (tmp_path / "multiruns" / "private_tuning_convnet").iterdir()
    summary = json.loads((sweep / sweeper.PRIVACY_FILE).read_text())
    secret = json.loads((sweep / "private" / sweeper.TRIALS_FILE).read_text())
    released = json.loads((sweep / "released" / "result.json").read_text())
    # The whole search's ε: at most the target, more than one trial's; K is not in the public file.
    assert summary["per_trial_worst_case_epsilon_rdp"] < summary["epsilon"] <= 8.0
    assert summary["released"]["per_run_epsilon"] < summary["epsilon"]
    assert "trials_run" not in json.dumps(summary) and "secret" in summary["trial_count"]["drawn"]
    assert summary["worst_case_over"]["combinations"] == [[32], [64]]
    # Released: the best noisy score of the trials that ran, without its exact validation figures.
    scores = {t["trial"]: t["score"] for t in secret["trials"] if t["score"] is not None}
    assert secret["released_trial"] == max(scores, key=scores.get)
    assert released["noisy_val_accuracy"] == scores[secret["released_trial"]]
    assert "val_accuracy" not in released and released["noise_multiplier"] == summary["common_noise_multiplier"]
    assert len(list((sweep / "private").glob("trial_*"))) == secret["trials_run"]
    # The released weights are the model whose test accuracy is reported.
    cfg = compose_config([*tiny_sweep_overrides(tiny_cifar, tmp_path), "data.val_size=100"])
    data = load_data(cfg.data)
    model = build_model(cfg.model, num_classes=data.num_classes)
    model.load_state_dict(torch.load(sweep / "released" / "model.pt", weights_only=True))
    assert evaluate(model, data.test_x, data.test_y)[1] == pytest.approx(released["test_accuracy"])
    # The report shows the released model and the baseline, never the private trials.
    table = collect_runs([sweep], studies=False)
    assert not table["run_dir"].str.contains("/private/").any()
    assert set(table["source"]) == {"released", "run"}  # the released copy and the baseline
    assert table.loc[table["source"] == "released", "epsilon"].item() == summary["epsilon"]


@pytest.mark.slow
def test_refusals_stop_the_search_before_any_trial(tiny_cifar, tmp_path, capsys):
    for extra, message in ((["hydra/sweeper/sampler=tpe"], "adaptive samplers"),
                           (["tuning.score_noise=null"], "tuning.score_noise"),
                           (["trainer.batch_size=range(32,96,32)"], "choice(...)")):
        done = cli_in_process(_search(tiny_cifar, tmp_path, *extra), capsys)
        assert done.returncode != 0 and message in done.stderr.strip().splitlines()[-1], done.stderr[-1000:]
        assert not list(tmp_path.rglob("result.json"))


def test_config_selects_the_private_sweeper_with_a_random_sampler_and_a_noised_score():
    from tests.helpers.runs import compose_config

    cfg = compose_config(["hparams_search=private_tuning", "model=convnet"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == "dp_sweeps.sweeps.private_tuning.PrivateTuningSweeper"
    sweeper.check_sampler(cfg.hydra.sweeper.sampler, cfg.hydra.sweeper.pruner)
    assert cfg.tuning.score_noise > 0 and cfg.optimized_metric == "noisy_val_accuracy"
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    space, _, _ = create_params_from_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    sweeper.check_space(space)
    assert {"trainer.batch_size", "trainer.epochs"} <= set(space)


def test_baseline_sits_at_the_centre_of_the_space():
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    space, _, _ = create_params_from_overrides(["trainer.batch_size=choice(64,128,256)", "trainer.epochs=choice(2,3)",
                                                "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
                                                "privacy.max_grad_norm=interval(0.5, 1.5)"])
    centre = sweeper.space_centre(space)
    assert centre["trainer.batch_size"] == 128 and centre["trainer.epochs"] == 3
    assert centre["optimizer.lr"] == pytest.approx(1e-3) and centre["privacy.max_grad_norm"] == pytest.approx(1.0)
