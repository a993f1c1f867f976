"""CIFAR-100 through torchvision (``cifar-100-python`` under ``data.root``, the 100
fine labels), with the same download and md5 rules as CIFAR-10."""

from __future__ import annotations

from typing import Any, Mapping

from torchvision.datasets import CIFAR100

from dp_sweeps.data.cifar10 import read_cifar_splits
from dp_sweeps.data.registry import RawSplits, register_dataset


@register_dataset("cifar100")
def read_cifar100(data_cfg: Mapping[str, Any]) -> RawSplits:
    return read_cifar_splits(CIFAR100, data_cfg, what="CIFAR-100")
