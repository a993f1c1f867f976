"""Shared fixtures: tiny CIFAR-10 in the official format, and configs composed in-process
and shrunk to seconds (CPU, tiny data, one epoch, output under tmp_path). The plain
functions behind them are in tests/helpers/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from tests.helpers.cifar import write_cifar10
from tests.helpers.runs import TINY_CONVNET, compose_config, tiny_overrides

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


@pytest.fixture
def tiny_cfg(tiny_cifar):
    """Compose a tiny CPU config; extra overrides go after the shrinking ones."""
    def make(*overrides: str) -> DictConfig:
        return compose_config(tiny_overrides(tiny_cifar) + [*TINY_CONVNET, *overrides])
    return make
