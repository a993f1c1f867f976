"""Optuna pruning of the ordinary searches (hydra.sweeper.pruner): trials report their
per-epoch validation accuracy, a pruned trial stops with status "pruned" and is told
PRUNED, the report counts it; refusals for what pruning cannot do."""

from __future__ import annotations

import optuna
import pytest
from omegaconf import OmegaConf

from dp_sweeps.analysis.report import collect_runs, write_report
from dp_sweeps.errors import ConfigError
from dp_sweeps.privacy import epsilon_for
from dp_sweeps.run import run
from dp_sweeps.sweeps.pruning import build_pruner, check_pruning
from dp_sweeps.training.loop import StopTraining
from dp_sweeps.training.results import read_result
from tests.helpers.runs import TINY_FRONTIER, cli_in_process, run_main, search_overrides

TrialState = optuna.trial.TrialState
GOOD = dict(pruner="median", directions=["maximize"], storage="sqlite:///x.db", optimized_metric="val_accuracy",
            val_size=100)


@pytest.mark.parametrize("change, message", [
    (dict(directions=["maximize", "minimize"]), "multi-objective"),
    (dict(storage=None), "persistent"),
    (dict(optimized_metric="test_accuracy"), "val_"),
    (dict(optimized_metric=["val_accuracy", "epsilon"]), "val_"),
    (dict(val_size=0), "data.val_size"),
    (dict(pruner="fastest"), "'fastest' is not one of"),
])
def test_what_pruning_cannot_do_is_refused_in_one_line(change, message):
    check_pruning(**GOOD)  # the good case passes
    with pytest.raises(ConfigError, match=message) as refused:
        check_pruning(**{**GOOD, **change})
    assert "\n" not in str(refused.value)


def test_pruners_by_name_and_by_target():
    assert isinstance(build_pruner("median"), optuna.pruners.MedianPruner)
    assert isinstance(build_pruner("hyperband"), optuna.pruners.HyperbandPruner)
    assert build_pruner(None) is None
    threshold = build_pruner(OmegaConf.create({"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.5}))
    assert isinstance(threshold, optuna.pruners.ThresholdPruner)
    with pytest.raises(ConfigError):
        build_pruner(OmegaConf.create({"_target_": "os.system", "command": "true"}))


@pytest.mark.slow
def test_an_epoch_callback_stops_training_with_its_status(tiny_cfg, tmp_path, monkeypatch):
    """StopTraining after epoch 1 of 3: the run ends there, records "pruned", and its ε is
    the accountant's for the 8 steps it took."""
    seen = []

    def stop_after_first(row):
        seen.append(row)
        raise StopTraining("pruned", "test")

    monkeypatch.setattr("dp_sweeps.run.trial_epoch_callbacks", lambda cfg: [stop_after_first])
    result = run(tiny_cfg("trainer.epochs=3", "privacy.noise_multiplier=2.0", "data.val_size=100"), tmp_path)
    assert result["status"] == "pruned" and result["epochs_completed"] == 1 and result["steps"] == 7
    assert [row["epoch"] for row in seen] == [1] and "val_accuracy" in seen[0]
    assert result["epsilon"] == pytest.approx(epsilon_for(noise_multiplier=2.0, sample_rate=1 / 7, steps=7,
                                                          delta=1e-5))


@pytest.mark.slow
def test_pruned_trials_are_recorded_and_counted(tiny_cifar, tmp_path, capsys):
    """A threshold no accuracy reaches prunes every trial after its first epoch: each is
    PRUNED in the study with its reported value, "pruned" in its result.json after one
    of two epochs, and counted in optimization_results.yaml and the report."""
    out = tmp_path / "out"
    pruner = "hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:1.01}"
    log = run_main(search_overrides(tiny_cifar, out, "tune_at_epsilon", "privacy.epsilon=3", "trainer.epochs=2",
                                    "trainer.batch_size=64", "optimizer=adam", "hydra.sweeper.n_trials=2", pruner),
                   capsys)
    study = optuna.load_study(study_name="tune_at_epsilon_convnet_eps3",
                              storage=f"sqlite:///{out}/optuna/tune_at_epsilon_convnet_eps3.db")
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2, log[-3000:]
    for trial in study.trials:
        result = read_result(trial.user_attrs["run_dir"])
        assert result["status"] == "pruned" and result["epochs_completed"] == 1
        assert list(trial.intermediate_values) == [1]
        assert trial.intermediate_values[1] == pytest.approx(result["val_accuracy"])  # validation, not test
    summary = OmegaConf.load(out / "multiruns" / "tune_at_epsilon_convnet_eps3" / "optimization_results.yaml")
    assert summary.n_pruned == 2 and summary.n_complete == 0
    table = collect_runs([out])
    assert sorted(table["trial_state"]) == ["PRUNED", "PRUNED"]
    markdown = write_report(table, tmp_path / "report")["runs.md"].read_text()
    assert "2 pruned" in markdown


@pytest.mark.slow
def test_median_pruner_sees_every_epoch(tiny_cifar, tmp_path, capsys):
    """The named pruner: trials report each epoch's validation accuracy (Optuna's median
    pruner spares the first 5 trials, so both complete)."""
    out = tmp_path / "out"
    run_main(search_overrides(tiny_cifar, out, "tune_at_epsilon", "privacy.epsilon=3", "trainer.epochs=2",
                              "trainer.batch_size=64", "optimizer=adam", "hydra.sweeper.n_trials=2",
                              "hydra.sweeper.pruner=median"), capsys)
    study = optuna.load_study(study_name="tune_at_epsilon_convnet_eps3",
                              storage=f"sqlite:///{out}/optuna/tune_at_epsilon_convnet_eps3.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for trial in study.trials:
        assert sorted(trial.intermediate_values) == [1, 2]
        assert trial.intermediate_values[2] == pytest.approx(trial.value)


def test_frontier_with_a_pruner_is_refused_before_any_trial(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "out"
    done = cli_in_process(search_overrides(tiny_cifar, out, "frontier", *TINY_FRONTIER, "hydra.sweeper.pruner=median"),
                          capsys)
    assert done.returncode != 0
    assert "Optuna cannot prune a multi-objective search" in done.stderr.strip().splitlines()[-1]
    assert not list(out.rglob("result.json"))
