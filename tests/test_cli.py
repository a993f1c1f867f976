"""The real entrypoint end to end: `python -m dp_sweeps` writes a run folder (the CLI's
``main`` in this process; the same as a subprocess, slow), and `-m` writes one folder per
job (a subprocess, slow; in-process sweeps are in tests/test_sweeps.py)."""

from __future__ import annotations

import csv
import json

import pytest

from tests.helpers.runs import TINY_CONVNET, cli_in_process, run_cli, tiny_overrides

RESULT_FIELDS = {"status", "model", "private", "test_accuracy", "test_loss", "val_accuracy", "epsilon",
                 "epsilon_valid", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "batch_size", "epochs",
                 "steps", "seed", "device", "wall_seconds", "train_expected_samples_per_second", "peak_memory_mb"}
# Functions of the private training data outside the mechanism: absent from a DP run's records.
NON_PRIVATE_FIELDS = {"train_loss", "train_accuracy", "train_samples_per_second", "samples_seen", "non_private"}


@pytest.mark.parametrize("how", ["in_process", pytest.param("subprocess", marks=pytest.mark.slow)])
def test_single_run_writes_its_folder(how, tiny_cifar, tmp_path, capsys):
    args = tiny_overrides(tiny_cifar) + TINY_CONVNET + ["trainer.epochs=2", f"paths.output_dir={tmp_path}"]
    proc = cli_in_process(args, capsys) if how == "in_process" else run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = [p.parent for p in tmp_path.glob("runs/*/*/result.json")]
    result = json.loads((run_dir / "result.json").read_text())
    assert RESULT_FIELDS <= set(result) and not NON_PRIVATE_FIELDS & set(result)
    assert result["status"] == "completed" and result["private"] is True and result["epsilon_valid"] is True
    assert result["steps"] == 16 and result["epochs"] == 2
    assert 0 < result["epsilon"] <= 5.0
    assert result["sample_rate"] == pytest.approx(1 / 8)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[0]["epsilon"]) < float(rows[1]["epsilon"]) == pytest.approx(result["epsilon"])
    assert float(rows[1]["test_accuracy"]) == pytest.approx(result["test_accuracy"])  # the last epoch's
    assert {"epoch", "val_accuracy", "test_loss", "test_accuracy", "epsilon", "seconds"} <= set(rows[0])
    assert not {"train_loss", "train_accuracy"} & set(rows[0])
    assert all(r["non_private_train_loss"] == r["non_private_train_accuracy"] == "" for r in rows)
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()


@pytest.mark.slow
def test_epsilon_grid_sweep_writes_one_run_per_value(tiny_cifar, tmp_path):
    proc = run_cli(tiny_overrides(tiny_cifar) + TINY_CONVNET + ["privacy.epsilon=1,8",
                                                                f"paths.output_dir={tmp_path}", "-m"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("multiruns/*/*/*/result.json"))]
    assert len(results) == 2
    by_target = {r["target_epsilon"]: r for r in results}
    assert set(by_target) == {1.0, 8.0}
    assert by_target[1.0]["noise_multiplier"] > by_target[8.0]["noise_multiplier"]
    for target, r in by_target.items():
        assert r["status"] == "completed"
        assert 0 < r["epsilon"] <= target
