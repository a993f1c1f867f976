"""The paper's experiments: every experiment config composes with the grid it names;
`make paper-table` (dp_sweeps.analysis.paper) builds the tables from run folders with
known numbers; and (slow) `make paper SCALE=smoke` runs them all end to end, then
`make paper-table` builds the tables; running an experiment again repeats nothing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dp_sweeps.paths import CONFIG_DIR
from tests.helpers.runs import REPO

GRIDS = {  # experiment -> (number of settings at full scale, at smoke scale)
    "paper_epsilon": (25, 25), "paper_batch": (20, 20), "paper_clip": (25, 25), "paper_lr": (20, 20),
    "paper_epochs": (20, 10), "paper_optimizer": (20, 20), "paper_classical": (15, 15),
}


def _grid_size(cfg, *, seeds: int) -> int:
    size = 1
    for values in cfg.hydra.sweeper.params.values():
        size *= len(str(values).split(","))
    return size // seeds


@pytest.mark.parametrize("experiment", sorted(GRIDS))
@pytest.mark.parametrize("scale", ["smoke", "full"])
def test_paper_experiment_composes(experiment, scale):
    with initialize_config_dir(config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}", f"scale={scale}"],
                      return_hydra_config=True)
    seeds = 3 if scale == "full" else 1
    assert _grid_size(cfg, seeds=seeds) * seeds == GRIDS[experiment][scale == "smoke"] * seeds
    assert cfg.experiment_name == experiment and cfg.trainer.resume is True
    # Settings not varied stay at the paper's best.
    assert cfg.optimizer.lr == 1e-3 and cfg.privacy.delta == 1e-5 and cfg.privacy.max_grad_norm == 1.0
    if scale == "full":
        assert cfg.trainer.epochs == 100 and cfg.trainer.batch_size == 256 and cfg.data.train_subset is None


def test_paper_tables_average_seeds_and_set_the_papers_figure_beside_ours(tmp_path, capsys):
    """Run folders as the paper targets leave them (result.json only), with known numbers:
    seeds averaged per model and varied value, a failed run counted but not averaged, a
    categorical parameter (optimizer) kept as such, the paper's figure in the summary."""
    from dp_sweeps.analysis.paper import main
    from dp_sweeps.training.results import write_result

    root = tmp_path / "smoke"
    accuracies = {("efficientnet", 1.0): (0.30, 0.40), ("efficientnet", 5.0): (0.50, 0.60),
                  ("convnet", 5.0): (0.45, 0.55)}
    for (model, epsilon), values in accuracies.items():
        for seed, accuracy in enumerate(values):
            write_result(root / "paper_epsilon" / f"{model}_eps{epsilon:g}_seed{seed}", {
                "experiment": "paper_epsilon", "model": model, "status": "completed", "target_epsilon": epsilon,
                "epsilon": 0.98 * epsilon, "test_accuracy": accuracy, "seed": seed})
    write_result(root / "paper_epsilon" / "convnet_eps1_seed0", {
        "experiment": "paper_epsilon", "model": "convnet", "status": "failed", "error": "boom", "target_epsilon": 1.0})
    for optimizer, accuracy in (("adam", 0.5), ("sgd", 0.3)):
        write_result(root / "paper_optimizer" / optimizer, {
            "experiment": "paper_optimizer", "model": "convnet", "status": "completed", "optimizer": optimizer,
            "test_accuracy": accuracy, "epsilon": 4.9, "seed": 0})

    assert main([str(root)]) == 0
    assert capsys.readouterr().out.count("wrote ") == 4  # two experiments, the summary, the README
    summary = (root / "summary.md").read_text()
    assert "| data_name | model | ε=1 | ε=5 | paper_reported |" in summary
    assert "| cifar10 | efficientnet | 35.00 ± 7.07 | 55.00 ± 7.07 | ε=5: 59.63 |" in summary
    assert "| cifar10 | convnet |  | 50.00 ± 7.07 |  |" in summary  # its failed ε=1 run is not a result
    table = (root / "paper_epsilon.md").read_text()
    assert "| cifar10 | efficientnet | 1 | 35.00 ± 7.07 | 0.98 | 2 |" in table
    # One seed: no std.
    assert "| cifar10 | convnet | sgd | 30.00 | 4.9 | 1 |" in (root / "paper_optimizer.md").read_text()
    assert (root / "paper_epsilon.csv").read_text().splitlines()[0] == (
        "data_name,model,target_epsilon,epsilon_mean,seeds,test_accuracy")
    for experiment in ("paper_epsilon", "paper_optimizer"):
        assert (root / f"{experiment}.png").stat().st_size > 10_000
    readme = (root / "README.md").read_text()
    assert "Runs: 6 completed, 1 failed" in readme and "![paper_optimizer](paper_optimizer.png)" in readme
    assert not (root / "paper_batch.md").exists()  # an experiment not run yet: nothing written
    assert main([str(tmp_path / "missing")]) == 2
    assert "run `make paper` first" in capsys.readouterr().err


def _results(root: Path) -> dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in root.rglob("result.json")}


@pytest.mark.slow
def test_smoke_scale_end_to_end(tiny_cifar, tmp_path):
    out = tmp_path / "outputs"
    # Without the variables of a make that runs this test (make test-all ARGS=...): the
    # child makes would inherit its ARGS.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["OMP_NUM_THREADS"] = "1"
    args = f"ARGS=data.root={tiny_cifar} data.download=false data.verify_checksums=false"
    make = ["make", "-s", "-C", str(REPO), "SCALE=smoke", f"OUTPUT_DIR={out}"]
    subprocess.run([*make, "paper", args], check=True, env=env, capture_output=True, timeout=1500)
    results = _results(out / "paper" / "smoke")
    for experiment, (_, smoke) in GRIDS.items():
        mine = [r for r in results.values() if r.get("experiment") == experiment]
        assert len(mine) == smoke, experiment
        assert all(r["status"] == "completed" for r in mine), [r for r in mine if r["status"] != "completed"][:1]
    subprocess.run([*make, "paper-table"], check=True, env=env, capture_output=True, timeout=300)
    tables = out / "paper" / "smoke"
    for experiment in GRIDS:
        assert (tables / f"{experiment}.csv").is_file() and (tables / f"{experiment}.png").is_file()
    summary = (tables / "summary.md").read_text()
    for model in ("convnet", "resnet18", "efficientnet", "vit", "densenet121"):
        assert f"| {model} |" in summary
    assert "59.63" in summary  # the paper's figure beside ours
    # Again: finished runs are skipped, not repeated.
    stamps = {p: p.stat().st_mtime_ns for p in results}
    subprocess.run([*make, "paper-epsilon", args], check=True, env=env, capture_output=True, timeout=600)
    assert {p: p.stat().st_mtime_ns for p in _results(out / "paper" / "smoke")} == stamps
