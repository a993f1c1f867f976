"""Shared fixtures: tiny CIFAR-10 in the official format, and configs composed in-process
and shrunk to seconds (CPU, tiny data, one epoch, output under tmp_path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dp_sweeps.paths import CONFIG_DIR
from tests.cifar_fixture import write_cifar10

REPO = Path(__file__).resolve().parents[1]

# Two cores, two xdist workers: one intra-op thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """500 training and 200 test images in the official format (not the official bytes)."""
    return write_cifar10(tmp_path_factory.mktemp("tiny_cifar"), per_batch=100, test=200)


@pytest.fixture(scope="session")
def full_size_cifar(tmp_path_factory) -> Path:
    """50,000 + 10,000 images: the real N, for σ calibration on the paper's setting."""
    return write_cifar10(tmp_path_factory.mktemp("full_cifar"), per_batch=10_000, test=10_000)


def tiny_overrides(data_root: Path) -> list[str]:
    return [f"data.root={data_root}", "data.download=false", "data.verify_checksums=false",
            "trainer.epochs=1", "trainer.batch_size=64", "trainer.device=cpu", "trainer.progress=false",
            "trainer.eval_batch_size=256"]


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR)):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture
def tiny_cfg(tiny_cifar):
    """Compose a tiny CPU config; extra overrides go after the shrinking ones."""
    def make(*overrides: str) -> DictConfig:
        return compose_config(tiny_overrides(tiny_cifar) + ["model=convnet", "model.width=4",
                                                            "model.hidden=16", *overrides])
    return make


def run_cli(args: list[str], *, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m dp_sweeps ARGS`` in a subprocess: the real entrypoint, end to end."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dp_sweeps", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)
