"""Hydra multirun grids and Optuna searches, end to end through the CLI's ``main`` on tiny
data: a grid with a failing job, a frontier search resumed from 2 to 3 trials, a search
with failing trials, and two ``python -m dp_sweeps`` processes sharing one study (slow). Trials
use the RDP accountant (its σ calibration takes milliseconds, PRV's seconds): the sweep
machinery is under test here, the accountants in test_privacy.py."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
import warnings

import optuna
import pandas as pd
import pytest
from omegaconf import OmegaConf

from dp_sweeps.analysis.report import collect_runs, write_report
from dp_sweeps.errors import ConfigError
from dp_sweeps.sweeps.search import check_tuning_metric, last_override_wins, trial_outcome
from dp_sweeps.training.results import read_result
from tests.helpers.runs import (
    TINY_FRONTIER,
    compose_config,
    run_main,
    search_overrides,
    tiny_overrides,
    tiny_sweep_overrides,
)

TrialState = optuna.trial.TrialState


def _study(out, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out}/optuna/{name}.db")


def test_grid_sweep_records_every_job_and_goes_on_past_a_failure(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "out"
    # The user's example shape (model=vit privacy.epsilon=1,2,5,10 -m), one value invalid.
    log = run_main([*tiny_sweep_overrides(tiny_cifar, out), "privacy.epsilon=1,4,-1", "-m"], capsys)
    jobs = sorted((out / "multiruns").glob("*/*/[0-9]"))
    assert [j.name for j in jobs] == ["0", "1", "2"], log[-2000:]
    results = [read_result(j) for j in jobs]
    assert [r["status"] for r in results] == ["completed", "completed", "failed"]
    for result, target in zip(results[:2], (1.0, 4.0)):
        assert result["target_epsilon"] == target and 0 < result["epsilon"] <= target + 1e-6
    assert "privacy.epsilon=-1" in results[2]["error"]

    # The report built from this sweep: every job a row, the failed one kept but not plotted.
    table = collect_runs([out / "multiruns"])
    assert len(table) == 3 and sorted(table["status"]) == ["completed", "completed", "failed"]
    written = write_report(table, tmp_path / "report")
    assert len(pd.read_csv(written["runs.csv"])) == 3
    markdown = written["runs.md"].read_text()
    assert markdown.count("| convnet | failed |") == 1 and "does not include the privacy cost" in markdown
    assert written["accuracy_vs_epsilon.png"].stat().st_size > 10_000


def test_frontier_search_persists_and_resumes_to_n_trials(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "out"
    args = search_overrides(tiny_cifar, out, "frontier", *TINY_FRONTIER)
    run_main([*args, "hydra.sweeper.n_trials=2"], capsys)
    study = _study(out, "frontier_convnet")
    assert [t.number for t in study.trials] == [0, 1]
    assert study.metric_names == ["val_accuracy", "epsilon"]

    log = run_main([*args, "hydra.sweeper.n_trials=3"], capsys)
    assert "2 trial(s) so far" in log and "This process ran 1 trial(s); the study has 3" in log
    study = _study(out, "frontier_convnet")
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    for trial in study.trials:
        run_dir = out / "multiruns" / "frontier_convnet" / f"trial_{trial.number}"
        assert trial.user_attrs["run_dir"] == str(run_dir.resolve())
        result = read_result(run_dir)
        # The objectives are the held-out validation accuracy and the ε the run spent.
        assert result["num_val"] == 100 and result["num_test"] == 200 and math.isfinite(result["test_loss"])
        assert trial.values == pytest.approx([result["val_accuracy"], result["epsilon"]])
        assert result["target_epsilon"] == pytest.approx(trial.params["privacy.epsilon"])
        assert result["batch_size"] == trial.params["trainer.batch_size"] in (32, 64)
    summary = OmegaConf.load(out / "multiruns" / "frontier_convnet" / "optimization_results.yaml")
    assert {s.trial for s in summary.solutions} == {t.number for t in study.best_trials}

    table = collect_runs([out])
    assert len(table) == 3 and set(table["trial_state"]) == {"COMPLETE"}
    assert table["pareto"].sum() == len(study.best_trials)
    written = write_report(table, tmp_path / "report")
    assert written["pareto_frontier_convnet.png"].stat().st_size > 10_000
    assert "accuracy_vs_epsilon.png" not in written  # search trials are shown by their frontier
    assert "Best trials of study `frontier_convnet`" in written["runs.md"].read_text()


def test_failing_trials_are_marked_failed_and_the_search_goes_on(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "out"
    log = run_main(search_overrides(tiny_cifar, out, "tune_at_epsilon", "privacy.epsilon=3",
                                    "optimizer.lr=choice(0.001,-1.0)", "hydra.sweeper.n_trials=4",
                                    "hydra.sweeper.sampler.seed=1"), capsys)
    study = _study(out, "tune_at_epsilon_convnet_eps3")
    assert len(study.trials) == 4
    states = {t.number: t.state for t in study.trials}
    assert set(states.values()) == {TrialState.COMPLETE, TrialState.FAIL}, log[-3000:]
    for trial in study.trials:
        result = read_result(trial.user_attrs["run_dir"])
        if trial.params["optimizer.lr"] < 0:
            assert trial.state == TrialState.FAIL and trial.values is None
            assert result["status"] == trial.user_attrs["status"] == "failed"
            assert "optimizer.lr=-1.0" in trial.user_attrs["error"]
            assert "non-finite objective" in trial.user_attrs["fail_reason"]
        else:
            assert trial.state == TrialState.COMPLETE
            assert trial.value == pytest.approx(result["val_accuracy"])
    assert study.best_trial.state == TrialState.COMPLETE


@pytest.mark.slow
def test_two_processes_share_one_study(tiny_cifar, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "dp_sweeps", *search_overrides(tiny_cifar, out, "frontier", *TINY_FRONTIER,
                                                        "hydra.sweeper.n_trials=4")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    workers = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env) for _ in range(2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    study = _study(out, "frontier_convnet")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    ran = [int(re.search(r"This process ran (\d+) trial", log).group(1)) for log in logs]
    assert sum(ran) == 4
    folders = sorted(p.name for p in (out / "multiruns" / "frontier_convnet").glob("trial_*"))
    assert folders == [f"trial_{n}" for n in range(4)]
    assert len({t.user_attrs["run_dir"] for t in study.trials}) == 4


@pytest.mark.parametrize("metric, val_size, message", [
    ("test_accuracy", 100, "must not tune on the test set"),
    ("val_accuracy", 0, "needs data.val_size > 0"),
])
def test_a_search_refuses_to_tune_on_the_test_set(tiny_cifar, metric, val_size, message):
    cfg = compose_config(tiny_overrides(tiny_cifar) + ["hparams_search=tune_at_epsilon",
                                                       f"optimized_metric={metric}", f"data.val_size={val_size}"])
    with pytest.raises(ConfigError, match=message):
        check_tuning_metric(cfg)
    check_tuning_metric(compose_config(tiny_overrides(tiny_cifar) + ["hparams_search=frontier"]))


def test_bad_search_input_stops_with_one_line_before_any_trial(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="^dp_sweeps: error: optimized_metric='test_accuracy': a search must not"):
        run_main(search_overrides(tiny_cifar, out, "tune_at_epsilon", "optimized_metric=test_accuracy"), capsys)
    assert not out.exists()
    # A study name already used by a search with other directions is not silently mixed in.
    optuna.create_study(study_name="frontier_convnet", storage=f"sqlite:///{tmp_path / 'other.db'}")
    (out / "optuna").mkdir(parents=True)
    (tmp_path / "other.db").rename(out / "optuna" / "frontier_convnet.db")
    with pytest.raises(SystemExit, match=r"direction=\['maximize', 'minimize'\] but study 'frontier_convnet'"):
        run_main(search_overrides(tiny_cifar, out, "frontier"), capsys)
    assert len(_study(out, "frontier_convnet").trials) == 0 and not (out / "multiruns").exists()


def test_trial_outcome_fails_non_finite_and_malformed_objectives():
    assert trial_outcome(0.5, n_objectives=1) == (TrialState.COMPLETE, [0.5], None)
    assert trial_outcome((0.5, 2.0), n_objectives=2)[:2] == (TrialState.COMPLETE, [0.5, 2.0])
    for value, n in ((math.nan, 1), ((0.5, math.nan), 2), ((0.5, math.inf), 2), ((0.5,), 2), ("x", 1), (None, 1)):
        state, values, reason = trial_outcome(value, n_objectives=n)
        assert state == TrialState.FAIL and values is None and reason


def test_search_configs_compose_with_their_spaces(tiny_cifar):
    frontier = compose_config(["hparams_search=frontier"], return_hydra_config=True)
    tune = compose_config(["hparams_search=tune_at_epsilon", "privacy.epsilon=3"], return_hydra_config=True)
    assert list(frontier.optimized_metric) == ["val_accuracy", "epsilon"]
    assert list(frontier.hydra.sweeper.direction) == ["maximize", "minimize"]
    assert set(frontier.hydra.sweeper.params) == {"privacy.epsilon", "privacy.max_grad_norm",
                                                  "trainer.batch_size", "optimizer.lr"}
    assert tune.optimized_metric == "val_accuracy" and tune.hydra.sweeper.direction == "maximize"
    assert set(tune.hydra.sweeper.params) == {"privacy.max_grad_norm", "trainer.batch_size", "optimizer.lr",
                                              "trainer.epochs", "optimizer"}
    for cfg in (frontier, tune):
        assert cfg.data.val_size > 0 and cfg.hydra.mode.name == "MULTIRUN"
        assert cfg.hydra.sweeper._target_ == "dp_sweeps.sweeps.search.ResumableOptunaSweeper"
    assert tune.hydra.sweeper.study_name == "tune_at_epsilon_efficientnet_eps3"
    assert frontier.hydra.sweeper.storage == f"sqlite:///{frontier.paths.output_dir}/optuna/frontier_efficientnet.db"


def test_a_later_override_replaces_a_search_range_or_a_fixed_value():
    assert last_override_wins(["trainer.batch_size=64", "trainer.batch_size=choice(32,64)", "seed=1",
                               "optimizer.lr=tag(log, interval(1e-4, 1))", "optimizer.lr=0.01", "~data.augment"]) == [
        "trainer.batch_size=choice(32,64)", "seed=1", "optimizer.lr=0.01", "~data.augment"]


def test_a_trial_whose_process_died_is_failed_after_the_grace_period(tmp_path, monkeypatch):
    from dp_sweeps.sweeps import search

    monkeypatch.setattr(search, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(search, "GRACE_SECONDS", 2)  # sqlite's clock ticks in whole seconds
    url = f"sqlite:///{tmp_path / 'new' / 'study.db'}"  # its folder does not exist yet
    study = search.open_study(storage=search.storage_for(url), study_name="s", directions=["maximize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dead, alive = study.ask(), study.ask()
    with search._Heartbeat(study, [dead._trial_id]):
        pass  # one beat, then the "process" is gone
    with search._Heartbeat(study, [alive._trial_id]):
        time.sleep(4)  # alive keeps beating; dead's last beat is now older than the grace period
        assert search.counted_trials(study) == 2
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {dead.number: TrialState.FAIL, alive.number: TrialState.RUNNING}


def test_the_default_metric_is_a_validation_one_and_no_sweeper_tunes_on_the_test_set(tiny_cifar, tmp_path, capsys,
                                                                                      monkeypatch):
    """A stock sweeper (hydra-optuna-sweeper's own, not hparams_search=...) returns the
    task's value to its optimiser: on 89ac991 the default optimized_metric was
    test_accuracy, so such a search tuned on the test set. With the default, the value
    handed to the optimiser is the run's validation accuracy."""
    from dp_sweeps import run as run_module

    returned = []
    real_objective = run_module.objective

    def recording(result, metric):
        value = real_objective(result, metric)
        returned.append((result, metric, value))
        return value

    monkeypatch.setattr(run_module, "objective", recording)
    run_main([*tiny_sweep_overrides(tiny_cifar, tmp_path / "default"), "hydra/sweeper=optuna",
              "hydra.sweeper.n_trials=1", "data.val_size=100", "-m"], capsys)
    ((result, metric, value),) = returned
    assert result["status"] == "completed" and result["num_val"] == 100
    assert metric == "val_accuracy" and value == result["val_accuracy"]

    out = tmp_path / "stock"
    with pytest.raises(SystemExit):  # the stock sweeper gives up: its only trial failed
        run_main([*tiny_sweep_overrides(tiny_cifar, out), "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1",
                  "optimized_metric=test_accuracy", "data.val_size=100", "-m"], capsys)
    (result_file,) = out.glob("multiruns/*/*/*/result.json")
    result = read_result(result_file.parent)
    assert result["status"] == "failed" and "must not tune on the test set" in result["error"]
    assert "test_accuracy" not in result
