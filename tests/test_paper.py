"""The paper's experiments: every experiment config composes with the grid it names,
and `make paper SCALE=smoke` runs them all end to end, then `make paper-table` builds
the tables; running an experiment again repeats nothing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dp_sweeps.paths import CONFIG_DIR
from tests.conftest import REPO

GRIDS = {  # experiment -> (number of settings at full scale, at smoke scale)
    "paper_epsilon": (25, 25), "paper_batch": (20, 20), "paper_clip": (25, 25), "paper_lr": (20, 20),
    "paper_epochs": (20, 10), "paper_optimizer": (20, 20), "paper_classical": (15, 15),
}


def _grid_size(cfg, *, seeds: int) -> int:
    size = 1
    for key, values in cfg.hydra.sweeper.params.items():
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


def _results(root: Path) -> dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in root.rglob("result.json")}


@pytest.mark.slow
def test_smoke_scale_end_to_end(tiny_cifar, tmp_path):
    out = tmp_path / "outputs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
