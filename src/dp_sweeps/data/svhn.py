"""SVHN (cropped digits, 32x32 RGB) through torchvision: ``train_32x32.mat`` and
``test_32x32.mat`` under ``<data.root>/svhn``, downloaded when missing; with
``data.verify_checksums`` both must match torchvision's official md5. torchvision maps
the files' label 10 (the digit 0) to 0. The ``extra`` split is not read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from torchvision.datasets import SVHN

from dp_sweeps.data.integrity import one_line_errors, verify_md5
from dp_sweeps.data.registry import RawSplits, register_dataset
from dp_sweeps.errors import ConfigError

SPLITS = ("train", "test")


class _PresentSVHN(SVHN):
    """torchvision's SVHN with the md5 check replaced by a presence check (run after
    :func:`verify_md5` when checksums are on, instead of it when they are off)."""

    def _check_integrity(self) -> bool:
        return (Path(self.root) / self.filename).is_file()


@register_dataset("svhn")
def read_svhn(data_cfg: Mapping[str, Any]) -> RawSplits:
    root = Path(str(data_cfg["root"])).expanduser() / "svhn"
    files = [(root / SVHN.split_list[s][1], SVHN.split_list[s][2]) for s in SPLITS]
    if not all(path.is_file() for path, _ in files):
        if not data_cfg.get("download"):
            raise ConfigError(f"SVHN not found under {root} and data.download=false "
                              f"(set data.root to a copy, or data.download=true)")
        with one_line_errors("SVHN", root):  # torchvision checks the md5 as it downloads
            for split in SPLITS:
                SVHN(str(root), split=split, download=True)
    if data_cfg.get("verify_checksums", True):
        verify_md5(files, what="SVHN")
    with one_line_errors("SVHN", root):
        splits = [_PresentSVHN(str(root), split=s, download=False) for s in SPLITS]
        (train_x, train_y), (test_x, test_y) = [(np.asarray(d.data), np.asarray(d.labels, dtype=np.int64).ravel())
                                                for d in splits]
    return RawSplits(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                     class_names=[str(d) for d in range(10)])
