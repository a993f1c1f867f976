"""Any folder of images: one subfolder per class (torchvision's ``ImageFolder``
convention) under ``data.train_dir`` and, optionally, ``data.test_dir``; each image
decoded by Pillow, converted to ``data.channels`` (grey ``L`` or ``RGB``) and resized to
``data.image_size`` x ``data.image_size`` (bilinear, antialiased; the aspect ratio is
not kept), then held in memory like every other data set.

Classes are the sorted subfolder names (ImageFolder's rule); the test folder must hold
the same ones. Without ``data.test_dir`` the registry splits off ``data.test_fraction``
of the images with the fixed split seed. Decoding runs in a torch ``DataLoader`` with
``data.workers`` processes.

Bad input, one line each: a missing or empty folder, a class folder with no image,
class folders that differ between train and test, an image Pillow cannot read (named
by its path), more class folders than ``data.num_classes``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as TF

from dp_sweeps.data.registry import RawSplits, register_dataset
from dp_sweeps.errors import ConfigError

log = logging.getLogger(__name__)

# Pillow's modes for data.channels.
MODES = {1: "L", 3: "RGB"}


class _Decode:
    """Pillow decode -> mode -> square resize -> uint8 C x H x W tensor; an unreadable
    file is a ConfigError naming its path. A class (not a closure) so that DataLoader
    workers can pickle it."""

    def __init__(self, channels: int, size: int):
        self.mode, self.size = MODES[channels], size

    def __call__(self, path: str) -> torch.Tensor:
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
                if image.size != (self.size, self.size):
                    image = TF.resize(image, [self.size, self.size], antialias=True)
                return TF.pil_to_tensor(image)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:  # PIL raises all four
            raise ConfigError(f"unreadable image {path}: {type(err).__name__}") from None


def _folder(data_cfg: Mapping[str, Any], key: str) -> Optional[ImageFolder]:
    """torchvision's ImageFolder over ``data.<key>`` (None when that key is null)."""
    value = data_cfg.get(key)
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise ConfigError(f"data.{key}={str(value)!r} is not a folder")
    decode = _Decode(int(data_cfg["channels"]), int(data_cfg["image_size"]))
    try:
        # loader=decode is only stored here; files are opened when read.
        return ImageFolder(str(path), loader=decode)
    except FileNotFoundError as err:  # no class folder, or a class folder without images
        raise ConfigError(f"data.{key}={str(value)!r}: {str(err).strip().splitlines()[0]}") from None


def _read(folder: ImageFolder, *, workers: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    loader = DataLoader(folder, batch_size=256, shuffle=False, num_workers=workers)
    images, labels = [], []
    try:
        for x, y in loader:
            images.append(x.numpy())
            labels.append(y.numpy())
    except ConfigError as err:  # raised in a worker: its message ends with our line
        last = str(err).strip().splitlines()[-1]
        raise ConfigError(last.split("ConfigError: ", 1)[-1]) from None
    if not images:
        raise ConfigError(f"data.{key}={folder.root!r} holds no images")
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


@register_dataset("image_folder")
def read_image_folder(data_cfg: Mapping[str, Any]) -> RawSplits:
    if data_cfg.get("train_dir") is None:
        raise ConfigError("data.train_dir=null: data=image_folder needs a folder with one subfolder per class")
    train, test = _folder(data_cfg, "train_dir"), _folder(data_cfg, "test_dir")
    if test is not None and test.classes != train.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise ConfigError(f"class folders differ between data.train_dir and data.test_dir: only in train "
                          f"{only_train[:5]}, only in test {only_test[:5]}" if only_train or only_test else
                          "class folders of data.train_dir and data.test_dir are in a different order")
    declared = data_cfg.get("num_classes")
    if declared is not None and len(train.classes) != declared:
        raise ConfigError(f"data.num_classes={declared} but data.train_dir holds {len(train.classes)} class folders")
    workers = data_cfg.get("workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"data.workers={workers!r} must be an integer >= 0")
    train_x, train_y = _read(train, workers=workers, key="train_dir")
    test_x, test_y = _read(test, workers=workers, key="test_dir") if test is not None else (None, None)
    log.info("image_folder: %d training images in %d classes%s", len(train_y), len(train.classes),
             f", {len(test_y)} test images" if test_y is not None else "")
    return RawSplits(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                     class_names=list(train.classes), num_classes=len(train.classes))
