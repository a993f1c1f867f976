"""The report on run folders laid out as Hydra writes them (``result.json`` beside
``.hydra/config.yaml`` and ``overrides.yaml``) and on an Optuna study in sqlite, with
known numbers: seeds averaged, unfinished runs kept but not plotted, invalid ε labelled,
trials joined to their runs, the Pareto set marked. Real sweeps feed the report in
tests/test_sweeps.py."""

from __future__ import annotations

import math
import sqlite3
import warnings

import optuna
import pandas as pd
import pytest
from omegaconf import OmegaConf

from dp_sweeps.analysis.report import (
    HONEST_EPSILON,
    INVALID_MARK,
    collect_runs,
    main,
    markdown_table,
    plot_pareto,
    seed_summary,
    write_report,
)
from dp_sweeps.training.results import write_result
from tests.helpers.runs import compose_config, tiny_overrides


def _run(root, name, *, tiny_cifar, overrides=(), **result):
    """A run folder as Hydra and dp_sweeps.run leave it."""
    run_dir = root / name
    overrides = [*tiny_overrides(tiny_cifar), "model=convnet", *overrides]
    cfg = compose_config(overrides)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    if result:
        record = {"model": "convnet", "private": cfg.privacy.enabled, "delta": cfg.privacy.delta,
                  "target_epsilon": cfg.privacy.epsilon, "epsilon_valid": bool(cfg.privacy.enabled),
                  "seed": cfg.seed, **result}
        write_result(run_dir, record)
    return run_dir


@pytest.fixture
def grid(tmp_path, tiny_cifar):
    root = tmp_path / "multiruns"
    make = lambda name, *o, **r: _run(root, name, tiny_cifar=tiny_cifar, overrides=o, **r)  # noqa: E731
    make("eps1_seed0", "privacy.epsilon=1", "seed=0", status="completed", epsilon=0.98, test_accuracy=0.50)
    make("eps1_seed1", "privacy.epsilon=1", "seed=1", status="completed", epsilon=0.98, test_accuracy=0.60)
    make("eps4_seed0", "privacy.epsilon=4", "seed=0", status="completed", epsilon=3.9, test_accuracy=0.70)
    make("eps4_seed1", "privacy.epsilon=4", "seed=1", status="completed", epsilon=3.9, test_accuracy=0.80)
    make("eps4_shuffled", "privacy.epsilon=4", "privacy.poisson_sampling=false", status="completed",
         epsilon=3.9, epsilon_valid=False, test_accuracy=0.75)
    make("nonprivate", "privacy=none", status="completed", epsilon=None, test_accuracy=0.95)
    make("eps1_diverged", "privacy.epsilon=1", "seed=2", status="diverged", epsilon=0.5, test_accuracy=0.10)
    make("eps8_failed", "privacy.epsilon=8", status="failed", error="ValueError: boom")
    make("killed", "privacy.epsilon=2")  # no result.json: killed or still running
    return root


def test_seeds_are_averaged_and_unfinished_runs_are_kept_but_not_summarised(grid, tmp_path):
    table = collect_runs([grid, grid / "eps1_seed0"])  # a run reached twice counts once
    assert len(table) == 9
    assert table["status"].value_counts().to_dict() == {"completed": 6, "diverged": 1, "failed": 1, "no_result": 1}
    summary = seed_summary(table).set_index("target_epsilon", drop=False)
    private = summary[summary["private"].astype(bool)]
    assert sorted(private["seeds"]) == [1, 2, 2]  # the shuffled run is a setting of its own
    paired = private[private["seeds"] == 2].sort_values("epsilon_mean")
    assert list(paired["test_accuracy_mean"]) == pytest.approx([0.55, 0.75])
    assert list(paired["test_accuracy_std"]) == pytest.approx([math.sqrt(0.005)] * 2)
    assert paired["epsilon_valid"].all() and not private[private["seeds"] == 1]["epsilon_valid"].any()
    assert summary[~summary["private"].astype(bool)]["test_accuracy_mean"].tolist() == [0.95]
    # The diverged run (seed 2) would have pulled the ε=1 mean down: it is not in it.
    assert 0.10 not in set(summary["test_accuracy_mean"])

    written = write_report(table, tmp_path / "report")
    csv = pd.read_csv(written["runs.csv"])
    assert len(csv) == 9 and {"overrides", "config.privacy.epsilon", "run_dir", "setting"} <= set(csv.columns)
    markdown = written["runs.md"].read_text()
    assert HONEST_EPSILON in markdown and f"3.9{INVALID_MARK}" in markdown
    assert "| no_result |" in markdown and "| diverged |" in markdown and "| failed |" in markdown
    assert "55.00 ± 7.07" in markdown and "non-private" in markdown
    assert written["accuracy_vs_epsilon.png"].stat().st_size > 10_000
    assert not any(name.startswith("pareto") for name in written)


def _study(storage: str, name: str) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_accuracy", "epsilon"])
    return study


def test_trials_join_their_runs_and_the_pareto_set_is_marked(tmp_path, tiny_cifar):
    storage = f"sqlite:///{tmp_path / 'optuna' / 'frontier.db'}"
    (tmp_path / "optuna").mkdir()
    study = _study(storage, "frontier_convnet")
    # (val accuracy, ε): trial 2 is dominated by trial 1 (worse accuracy, larger ε).
    points = {0: (0.40, 1.0), 1: (0.60, 2.0), 2: (0.55, 3.0), 3: (0.70, 6.0)}
    root = tmp_path / "multiruns" / "frontier_convnet"
    for number, (accuracy, epsilon) in points.items():
        trial = study.ask()
        run_dir = _run(root, f"trial_{number}", tiny_cifar=tiny_cifar,
                       overrides=[f"privacy.epsilon={epsilon}", "hparams_search=frontier",
                                  "search.study=frontier_convnet", f"search.trial={number}"],
                       status="completed", epsilon=epsilon, val_accuracy=accuracy, test_accuracy=accuracy - 0.05)
        trial.set_user_attr("run_dir", str(run_dir))
        study.tell(trial, [accuracy, epsilon])
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # trial 4: no run folder

    table = collect_runs([tmp_path])  # finds the sqlite file itself
    assert len(table) == 5
    by_trial = table.set_index("trial")
    assert by_trial.loc[4, "source"] == "optuna" and by_trial.loc[4, "status"] == "failed"
    assert list(by_trial["pareto"].loc[[0, 1, 2, 3]]) == [True, True, False, True]
    assert list(by_trial["objective.val_accuracy"].loc[[0, 1, 2, 3]]) == [0.40, 0.60, 0.55, 0.70]
    assert by_trial.loc[3, "test_accuracy"] == pytest.approx(0.65)

    written = write_report(table, tmp_path / "report")
    assert written["pareto_frontier_convnet.png"].stat().st_size > 10_000
    markdown = written["runs.md"].read_text()
    best = markdown.split("Best trials of study `frontier_convnet`")[1].split("##")[0]
    rows = [line for line in best.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert [row.split(" | ")[0] for row in rows] == ["| trial", "| 0", "| 1", "| 3"]  # the Pareto set
    assert plot_pareto(table, "no_such_study", tmp_path / "x.png") is None


def test_a_foreign_sqlite_file_is_not_touched(tmp_path):
    path = tmp_path / "notes.db"
    with sqlite3.connect(path) as con:
        con.execute("create table notes (text)")
    before = path.read_bytes()
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = _study(storage, "s")
    study.tell(study.ask(), [0.5, 1.0])
    table = collect_runs([tmp_path])
    assert list(table["study"]) == ["s"] and path.read_bytes() == before


def test_cli_writes_the_report_and_fails_on_nothing(grid, tmp_path, capsys):
    assert main([str(grid), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "9 rows" in out and "runs.csv" in out and "Papernot & Steinke 2022" in out
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"runs.csv", "runs.md", "accuracy_vs_epsilon.png"}
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 1
    assert "no runs or studies" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


def test_markdown_table_needs_no_tabulate():
    frame = pd.DataFrame({"a": [1.23456, math.nan], "b": ["x|y", None]})
    assert markdown_table(frame, {"a": "A", "b": "B"}) == (
        "| A | B |\n| --- | --- |\n| 1.235 | x\\|y |\n|  |  |\n")
