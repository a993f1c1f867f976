"""An installed (non-editable) wheel finds its configs: conf/ ships as dp_sweeps/conf."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

from tests.helpers.runs import REPO, tiny_overrides


@pytest.mark.slow  # builds and installs a wheel, then starts a fresh interpreter
def test_wheel_ships_configs_and_runs_from_anywhere(tiny_cifar, tmp_path):
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheel_dir), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheel_dir.glob("dp_sweeps-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dp_sweeps/conf/config.yaml" in names and "dp_sweeps/conf/model/vit.yaml" in names
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # PYTHONPATH puts the installed copy ahead of the editable source checkout.
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import dp_sweeps.paths as p; print(p.__file__, p.CONFIG_DIR)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert where[0].startswith(str(site)) and where[1] == str(site / "dp_sweeps" / "conf")
    proc = subprocess.run([sys.executable, "-m", "dp_sweeps", *tiny_overrides(tiny_cifar), "model=convnet",
                           "dry_run=true", f"paths.output_dir={tmp_path / 'out'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = (tmp_path / "out").glob("runs/*/*/result.json")
    assert json.loads(result.read_text())["status"] == "planned"
