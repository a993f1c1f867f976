"""MNIST and Fashion-MNIST through torchvision (gzip idx files under
``<data.root>/MNIST/raw`` and ``<data.root>/FashionMNIST/raw``, torchvision's layout),
downloaded when missing; with ``data.verify_checksums`` every ``.gz`` archive must
match torchvision's official md5 before it is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from torchvision.datasets import MNIST, FashionMNIST
from torchvision.datasets.utils import extract_archive

from dp_sweeps.data.integrity import one_line_errors, verify_md5
from dp_sweeps.data.registry import RawSplits, register_dataset
from dp_sweeps.errors import ConfigError


def read_idx_dataset(dataset_cls: type[MNIST], data_cfg: Mapping[str, Any], *, what: str) -> RawSplits:
    """Both splits of an MNIST-format data set as uint8 N x 1 x 28 x 28 and labels."""
    root = Path(str(data_cfg["root"])).expanduser()
    raw = root / dataset_cls.__name__ / "raw"
    archives = [(raw / name, md5) for name, md5 in dataset_cls.resources]
    extracted = [raw / Path(name).stem for name, _ in dataset_cls.resources]  # x.gz -> x
    have_archives = all(path.is_file() for path, _ in archives)
    if not have_archives and not all(path.is_file() for path in extracted):
        if not data_cfg.get("download"):
            raise ConfigError(f"{what} not found under {raw} and data.download=false "
                              f"(set data.root to a copy, or data.download=true)")
        with one_line_errors(what, root):  # torchvision checks the archives' md5 as it downloads
            dataset_cls(str(root), train=True, download=True)
    if data_cfg.get("verify_checksums", True):
        verify_md5(archives, what=what)
    with one_line_errors(what, root):
        for (archive, _), target in zip(archives, extracted):
            if not target.is_file():  # torchvision reads the extracted idx files
                extract_archive(str(archive), str(raw))
        train = dataset_cls(str(root), train=True, download=False)
        test = dataset_cls(str(root), train=False, download=False)
        splits = [(ds.data.numpy()[:, None], ds.targets.numpy().astype(np.int64)) for ds in (train, test)]
    (train_x, train_y), (test_x, test_y) = splits
    return RawSplits(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                     class_names=list(dataset_cls.classes))


@register_dataset("mnist")
def read_mnist(data_cfg: Mapping[str, Any]) -> RawSplits:
    return read_idx_dataset(MNIST, data_cfg, what="MNIST")


@register_dataset("fashion_mnist")
def read_fashion_mnist(data_cfg: Mapping[str, Any]) -> RawSplits:
    return read_idx_dataset(FashionMNIST, data_cfg, what="Fashion-MNIST")
