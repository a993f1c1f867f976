"""Reduced-batch search (search.batch_scale, Sander et al. 2023): a trial at B/k keeps
the full run's σ/B and step count; the best hyperparameters are trained once at full
scale; bad scales are refused."""

from __future__ import annotations

import optuna
import pytest
from omegaconf import OmegaConf

from dp_sweeps.errors import ConfigError
from dp_sweeps.privacy import epsilon_for, plan_privacy
from dp_sweeps.sweeps.reduced_batch import batch_scale, shrink_trial
from dp_sweeps.training.results import read_result
from tests.helpers.runs import compose_config, run_main, search_overrides


def _privacy(*overrides: str):
    # A given σ (no calibration: seconds on a busy CPU) and RDP; the slow end-to-end test
    # below calibrates σ to ε.
    return compose_config(["privacy.noise_multiplier=1.5", "privacy.accountant=rdp", *overrides]).privacy


@pytest.mark.parametrize("num_train, batch_size, epochs, k", [(1024, 256, 8, 4), (50_000, 256, 4, 4),
                                                              (1100, 256, 8, 4), (999, 100, 6, 2)])
def test_trial_keeps_sigma_over_batch_and_the_steps(num_train, batch_size, epochs, k):
    full = plan_privacy(_privacy(), num_train=num_train, batch_size=batch_size, epochs=epochs)
    trial = plan_privacy(_privacy(), num_train=num_train, batch_size=batch_size // k, epochs=epochs // k,
                         batch_scale=k)
    assert trial.noise_multiplier / (batch_size // k) == pytest.approx(full.noise_multiplier / batch_size, rel=1e-12)
    # Steps: equal up to the rounding of each epoch's last batch (equal when B divides N).
    assert abs(trial.steps - full.steps) < trial.steps_per_epoch
    if num_train % batch_size == 0:
        assert trial.steps == full.steps
    assert trial.full_scale["noise_multiplier"] == full.noise_multiplier
    assert trial.full_scale["steps"] == full.steps and trial.full_scale["planned_epsilon"] == full.planned_epsilon
    # Not a privacy saving: the trial spends more than the full run, by its own accountant (RDP).
    assert trial.accountant == "rdp" and trial.full_scale["target_epsilon"] == full.target_epsilon
    assert trial.planned_epsilon == pytest.approx(epsilon_for(noise_multiplier=trial.noise_multiplier,
                                                              sample_rate=trial.sample_rate, steps=trial.steps,
                                                              delta=1e-5, accountant="rdp"))
    assert trial.planned_epsilon > full.planned_epsilon


def test_shrink_trial_divides_batch_and_epochs():
    cfg = compose_config(["hparams_search=tune_at_epsilon_tan", "trainer.batch_size=512", "trainer.epochs=20"])
    assert batch_scale(cfg) == 4
    shrunk = shrink_trial(cfg)
    assert (shrunk.trainer.batch_size, shrunk.trainer.epochs) == (128, 5)
    assert (cfg.trainer.batch_size, cfg.trainer.epochs) == (512, 20)  # the caller's config is untouched
    plain = OmegaConf.merge(cfg, {"search": {"batch_scale": 1}})
    assert batch_scale(plain) == 1 and shrink_trial(plain) is plain


@pytest.mark.parametrize("overrides, message", [
    (["trainer.batch_size=510"], "must divide trainer.batch_size=510"),
    (["trainer.epochs=10"], "must divide trainer.epochs=10"),
    (["search.batch_scale=0"], "search.batch_scale=0"),
    (["privacy=none"], "needs privacy=dp"),
])
def test_bad_scales_are_refused_in_one_line(overrides, message):
    cfg = compose_config(["hparams_search=tune_at_epsilon_tan", "trainer.batch_size=512", "trainer.epochs=20",
                          *overrides])
    with pytest.raises(ConfigError, match=message) as refused:
        shrink_trial(cfg)
    assert "\n" not in str(refused.value)


def test_laplace_is_not_scaled():
    with pytest.raises(ConfigError, match="Gaussian"):
        plan_privacy(compose_config(["privacy=laplace", "privacy.noise_multiplier=3"]).privacy, num_train=1024,
                     batch_size=64, epochs=2, batch_scale=4)


@pytest.mark.slow
def test_search_runs_small_trials_then_the_best_at_full_scale(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "out"
    log = run_main(search_overrides(tiny_cifar, out, "tune_at_epsilon_tan", "privacy.epsilon=3",
                                    "search.batch_scale=2", "trainer.batch_size=choice(80)",
                                    "trainer.epochs=choice(2)", "optimizer=adam",
                                    "optimizer.lr=tag(log, interval(1e-3, 1e-2))", "hydra.sweeper.n_trials=1"),
                   capsys)
    study_name = "tune_at_epsilon_tan_convnet_eps3"
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{out}/optuna/{study_name}.db")
    assert len(study.trials) == 1, log[-3000:]
    folder = out / "multiruns" / study_name
    trials = [read_result(folder / f"trial_{t.number}") for t in study.trials]
    full = read_result(folder / "trial_full_scale")
    for trial in trials:
        assert trial["status"] == "completed" and trial["batch_size"] == 40 and trial["epochs"] == 1
        assert trial["batch_scale"] == 2 and trial["steps"] == full["steps"] == 10  # 400 examples: 10 or 5 per epoch
        assert trial["noise_multiplier"] == pytest.approx(full["noise_multiplier"] / 2, rel=1e-9)
        assert trial["epsilon"] > full["epsilon"]
    assert full["status"] == "completed" and full["batch_size"] == 80 and full["epochs"] == 2
    assert full.get("batch_scale") is None and full["epsilon"] <= 3.0 + 1e-9
    assert full["lr"] == pytest.approx(study.best_trial.params["optimizer.lr"])
    summary = OmegaConf.load(folder / "optimization_results.yaml")
    assert summary.full_scale_run.best_trial == study.best_trial.number
    assert summary.full_scale_run.test_accuracy == pytest.approx(full["test_accuracy"])
    # Run again: the study is complete and its full-scale run finished, so nothing runs.
    log = run_main(search_overrides(tiny_cifar, out, "tune_at_epsilon_tan", "privacy.epsilon=3",
                                    "search.batch_scale=2", "trainer.batch_size=choice(80)",
                                    "trainer.epochs=choice(2)", "optimizer=adam",
                                    "optimizer.lr=tag(log, interval(1e-3, 1e-2))", "hydra.sweeper.n_trials=1"),
                   capsys)
    assert "training the best trial" not in log
