"""CIFAR-10 through torchvision's real download and integrity check, then held in
memory as normalised tensors (no per-image PIL work, no DataLoader workers)."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity

from dp_sweeps.data.image_data import ImageData
from dp_sweeps.errors import ConfigError

log = logging.getLogger(__name__)

# Public constants (the per-channel statistics of the CIFAR-10 training set that every
# paper uses): fixed, so normalisation reads nothing from the private data.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


class _UnverifiedCIFAR10(CIFAR10):
    """Reads a CIFAR-10 copy in the official format whose bytes differ from the
    official files (checksums skipped: only presence is checked)."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name in _file_names())

    def _load_meta(self) -> None:  # the parent re-checks the md5 of batches.meta
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as fh:
            self.classes = pickle.load(fh, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def _official_files() -> list[tuple[str, str]]:
    """(file name, official md5) of every CIFAR-10 file torchvision reads."""
    return CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]


def _file_names() -> list[str]:
    return [name for name, _ in _official_files()]


def _first_corrupted_file(root: Path) -> Optional[Path]:
    folder = root / CIFAR10.base_folder
    for name, md5 in _official_files():
        path = folder / name
        if path.is_file() and not check_integrity(str(path), md5):
            return path
    return None


def _all_present(root: Path) -> bool:
    folder = root / CIFAR10.base_folder
    return all((folder / name).is_file() for name in _file_names())


def read_cifar10(root: str | os.PathLike, *, train: bool, download: bool,
                 verify_checksums: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, N x 32 x 32 x 3) and labels of one CIFAR-10 split, via torchvision.

    With ``verify_checksums`` (the default) every file must match the official md5;
    a missing dataset is downloaded when ``download`` is set. Errors are one line.
    """
    root = Path(root).expanduser()
    if not _all_present(root) and not download:
        raise ConfigError(f"CIFAR-10 not found under {root / CIFAR10.base_folder} and data.download=false "
                          f"(set data.root to a copy, or data.download=true)")
    if verify_checksums:
        bad = _first_corrupted_file(root)
        if bad is not None:
            raise ConfigError(f"CIFAR-10 file {bad} fails its official md5 checksum: corrupted, or not "
                              f"the official bytes (data.verify_checksums=false reads such a copy)")
    dataset_cls = CIFAR10 if verify_checksums else _UnverifiedCIFAR10
    try:
        dataset = dataset_cls(str(root), train=train, download=download and not _all_present(root))
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"CIFAR-10 under {root} is corrupted: cannot read it ({type(err).__name__}: {err})") from err
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
        raise ConfigError(f"CIFAR-10 under {root}: {str(err).splitlines()[0]}") from err
    except OSError as err:  # a failed download (no network, refused, ...)
        raise ConfigError(f"could not download CIFAR-10 to {root}: {err}") from err
    x, y = np.asarray(dataset.data), np.asarray(dataset.targets, dtype=np.int64)
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(x) != len(y):
        raise ConfigError(f"CIFAR-10 under {root} is corrupted: images of shape {x.shape}, {len(y)} labels")
    return x, y


def normalise(images_uint8_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x C -> float32 N x C x H x W, standardised with the public constants."""
    x = torch.from_numpy(images_uint8_nhwc).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def load_cifar10(*, root: str | os.PathLike, download: bool = True, verify_checksums: bool = True,
                 train_subset: Optional[int] = None, test_subset: Optional[int] = None,
                 val_size: int = 0, split_seed: int = 0) -> ImageData:
    """CIFAR-10 as :class:`ImageData`.

    ``val_size`` examples are held out of the training set by a permutation seeded
    with ``split_seed`` (data-independent, so it costs no privacy); ``train_subset``
    and ``test_subset`` then keep the first examples of that permutation, for quick runs.
    """
    if not verify_checksums:
        log.warning("data.verify_checksums=false: reading CIFAR-10 under %s without its official md5 "
                    "check; results are comparable only with runs on the same copy", root)
    train_x, train_y = read_cifar10(root, train=True, download=download, verify_checksums=verify_checksums)
    test_x, test_y = read_cifar10(root, train=False, download=False, verify_checksums=verify_checksums)
    if not 0 <= val_size < len(train_y):
        raise ConfigError(f"data.val_size={val_size} must be in [0, {len(train_y)})")
    order = np.random.default_rng(split_seed).permutation(len(train_y))
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    test_idx = np.arange(len(test_y))
    if test_subset is not None:
        test_idx = np.random.default_rng(split_seed + 1).permutation(len(test_y))[:test_subset]
    return ImageData(
        train_x=normalise(train_x[train_idx]), train_y=torch.from_numpy(train_y[train_idx]),
        val_x=normalise(train_x[val_idx]), val_y=torch.from_numpy(train_y[val_idx]),
        test_x=normalise(test_x[test_idx]), test_y=torch.from_numpy(test_y[test_idx]),
        num_classes=len(CIFAR10_CLASSES))
