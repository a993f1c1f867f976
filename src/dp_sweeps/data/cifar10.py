"""CIFAR-10 (and, through :func:`read_cifar`, CIFAR-100) through torchvision's real
download and integrity check, then held in memory as normalised tensors (no per-image
PIL work, no DataLoader workers)."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity

from dp_sweeps.data.image_data import ImageData
from dp_sweeps.data.registry import RawSplits, load_data, register_dataset
from dp_sweeps.errors import ConfigError

log = logging.getLogger(__name__)

# Public constants (the per-channel statistics of the CIFAR-10 training set that every
# paper uses): fixed, so normalisation reads nothing from the private data.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# The facts conf/data/cifar10.yaml declares (for callers without a composed config).
CIFAR10_FACTS = {"name": "cifar10", "channels": 3, "image_size": 32, "num_classes": 10,
                 "hflip_preserves_label": True, "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
                 "normalization": "published", "classes": None}


def _unverified(dataset_cls: type[CIFAR10]) -> type[CIFAR10]:
    """``dataset_cls`` reading a copy in the official format whose bytes differ from the
    official files (checksums skipped: only presence is checked)."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name in _file_names(dataset_cls))

    def _load_meta(self) -> None:  # the parent re-checks the md5 of the meta file
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as fh:
            self.classes = pickle.load(fh, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return type(f"_Unverified{dataset_cls.__name__}", (dataset_cls,),
                {"_check_integrity": _check_integrity, "_load_meta": _load_meta})


def _official_files(dataset_cls: type[CIFAR10] = CIFAR10) -> list[tuple[str, str]]:
    """(file name, official md5) of every file torchvision reads."""
    return dataset_cls.train_list + dataset_cls.test_list + [[dataset_cls.meta["filename"], dataset_cls.meta["md5"]]]


def _file_names(dataset_cls: type[CIFAR10] = CIFAR10) -> list[str]:
    return [name for name, _ in _official_files(dataset_cls)]


def _first_corrupted_file(root: Path, dataset_cls: type[CIFAR10] = CIFAR10) -> Optional[Path]:
    folder = root / dataset_cls.base_folder
    for name, md5 in _official_files(dataset_cls):
        path = folder / name
        if path.is_file() and not check_integrity(str(path), md5):
            return path
    return None


def _all_present(root: Path, dataset_cls: type[CIFAR10] = CIFAR10) -> bool:
    folder = root / dataset_cls.base_folder
    return all((folder / name).is_file() for name in _file_names(dataset_cls))


def read_cifar(dataset_cls: type[CIFAR10], root: str | os.PathLike, *, train: bool, download: bool,
               verify_checksums: bool, what: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (uint8, N x 32 x 32 x 3), labels and class names of one split of a data set
    in CIFAR's python format (``dataset_cls``: torchvision's CIFAR10 or CIFAR100, whose
    labels are the fine ones), via torchvision.

    With ``verify_checksums`` (the default) every file must match the official md5;
    a missing dataset is downloaded when ``download`` is set. Errors are one line.
    """
    root = Path(root).expanduser()
    if not _all_present(root, dataset_cls) and not download:
        raise ConfigError(f"{what} not found under {root / dataset_cls.base_folder} and data.download=false "
                          f"(set data.root to a copy, or data.download=true)")
    if verify_checksums:
        bad = _first_corrupted_file(root, dataset_cls)
        if bad is not None:
            raise ConfigError(f"{what} file {bad} fails its official md5 checksum: corrupted, or not "
                              f"the official bytes (data.verify_checksums=false reads such a copy)")
    reader = dataset_cls if verify_checksums else _unverified(dataset_cls)
    try:
        dataset = reader(str(root), train=train, download=download and not _all_present(root, dataset_cls))
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} under {root} is corrupted: cannot read it ({type(err).__name__}: {err})") from err
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
        raise ConfigError(f"{what} under {root}: {str(err).splitlines()[0]}") from err
    except OSError as err:  # a failed download (no network, refused, ...)
        raise ConfigError(f"could not download {what} to {root}: {err}") from err
    x, y = np.asarray(dataset.data), np.asarray(dataset.targets, dtype=np.int64)
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(x) != len(y):
        raise ConfigError(f"{what} under {root} is corrupted: images of shape {x.shape}, {len(y)} labels")
    return x, y, list(dataset.classes)


def read_cifar10(root: str | os.PathLike, *, train: bool, download: bool,
                 verify_checksums: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, N x 32 x 32 x 3) and labels of one CIFAR-10 split (:func:`read_cifar`)."""
    x, y, _ = read_cifar(CIFAR10, root, train=train, download=download, verify_checksums=verify_checksums,
                         what="CIFAR-10")
    return x, y


def read_cifar_splits(dataset_cls: type[CIFAR10], data_cfg: Mapping[str, Any], *, what: str) -> RawSplits:
    """Both splits, as the registry's N x C x H x W uint8 arrays."""
    verify = bool(data_cfg.get("verify_checksums", True))
    if not verify:
        log.warning("data.verify_checksums=false: reading %s under %s without its official md5 "
                    "check; results are comparable only with runs on the same copy", what, data_cfg["root"])
    train_x, train_y, names = read_cifar(dataset_cls, data_cfg["root"], train=True,
                                         download=bool(data_cfg.get("download")), verify_checksums=verify, what=what)
    test_x, test_y, _ = read_cifar(dataset_cls, data_cfg["root"], train=False, download=False,
                                   verify_checksums=verify, what=what)
    return RawSplits(train_x=train_x.transpose(0, 3, 1, 2), train_y=train_y,
                     test_x=test_x.transpose(0, 3, 1, 2), test_y=test_y, class_names=names)


@register_dataset("cifar10")
def read_cifar10_splits(data_cfg: Mapping[str, Any]) -> RawSplits:
    return read_cifar_splits(CIFAR10, data_cfg, what="CIFAR-10")


def normalise(images_uint8_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x C -> float32 N x C x H x W, standardised with the public constants."""
    x = torch.from_numpy(images_uint8_nhwc).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def load_cifar10(*, root: str | os.PathLike, download: bool = True, verify_checksums: bool = True,
                 train_subset: Optional[int] = None, test_subset: Optional[int] = None,
                 val_size: int = 0, split_seed: int = 0) -> ImageData:
    """CIFAR-10 as :class:`ImageData`: :func:`dp_sweeps.data.load_data` with
    ``conf/data/cifar10.yaml``'s facts (same splits and subsets)."""
    return load_data({**CIFAR10_FACTS, "root": root, "download": download, "verify_checksums": verify_checksums,
                      "train_subset": train_subset, "test_subset": test_subset, "val_size": val_size,
                      "split_seed": split_seed})
