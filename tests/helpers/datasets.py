"""Tiny data sets written in each real format that the ``data`` group reads, so tests
exercise torchvision's readers and ours: gzip idx (MNIST, Fashion-MNIST; torchvision's
``raw/`` layout), the CIFAR-100 pickle with fine labels, SVHN's ``.mat`` (label 10 is the
digit 0), and folders of PNG / JPEG images. Class k's images carry a class-specific
brightness and stripe pattern plus noise: learnable, so a few DP steps beat chance."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from torchvision.datasets import MNIST, SVHN, FashionMNIST


def class_images(labels: np.ndarray, rng: np.random.Generator, *, size: int, channels: int,
                 signal: float = 60.0) -> np.ndarray:
    """uint8 N x size x size x channels images whose pattern depends on the label."""
    n = len(labels)
    base = rng.normal(128, 30, size=(n, size, size, channels))
    palette = np.random.default_rng(1234).uniform(-1, 1, size=(max(100, int(labels.max()) + 1), channels))
    stripes = np.sin(np.arange(size)[None, :] * ((labels[:, None] % 10) + 1) * np.pi / size)  # n x size
    base += signal * palette[labels][:, None, None, :]
    base += signal * stripes[:, :, None, None]  # horizontal stripes: the same in a mirror
    return np.clip(base, 0, 255).astype(np.uint8)


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    return labels


def _write_idx_images(path: Path, images: np.ndarray) -> None:
    n, rows, cols = images.shape
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">IIII", 0x00000803, n, rows, cols) + images.astype(np.uint8).tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes())


def write_idx(root: Path, *, fashion: bool = False, train: int = 300, test: int = 100, seed: int = 0,
              labels_override: Sequence[int] | None = None) -> Path:
    """``root/MNIST/raw`` (or ``FashionMNIST/raw``) with the four gzip idx files under
    torchvision's names; ``labels_override`` replaces the first training labels (bad input)."""
    rng = np.random.default_rng(seed)
    raw = root / (FashionMNIST if fashion else MNIST).__name__ / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("t10k", test)):
        labels = balanced_labels(n, 10, rng)
        images = class_images(labels, rng, size=28, channels=1)[..., 0]
        if split == "train" and labels_override is not None:
            labels[:len(labels_override)] = labels_override
        _write_idx_images(raw / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx_labels(raw / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def write_cifar100(root: Path, *, train: int = 500, test: int = 200, seed: int = 0) -> Path:
    """``root/cifar-100-python`` with ``train``, ``test`` and ``meta`` pickles (fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", train), ("test", test)):
        fine = balanced_labels(n, 100, rng)
        x = class_images(fine, rng, size=32, channels=3)
        with open(folder / name, "wb") as fh:
            pickle.dump({"filenames": [f"{name}_{i}.png" for i in range(n)], "batch_label": name,
                         "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                         "data": x.transpose(0, 3, 1, 2).reshape(n, 3072)}, fh, protocol=2)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"fine_{i}" for i in range(100)],
                     "coarse_label_names": [f"coarse_{i}" for i in range(20)]}, fh, protocol=2)
    return root


def write_svhn(root: Path, *, train: int = 300, test: int = 100, seed: int = 0) -> Path:
    """``root/svhn/{train,test}_32x32.mat`` as SVHN publishes them: X is 32 x 32 x 3 x N,
    y is N x 1 with the digit 0 stored as 10."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder = root / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        labels = balanced_labels(n, 10, rng)
        x = class_images(labels, rng, size=32, channels=3)
        stored = np.where(labels == 0, 10, labels).reshape(n, 1).astype(np.uint8)
        savemat(folder / SVHN.split_list[split][1], {"X": x.transpose(1, 2, 3, 0), "y": stored})
    return root


def write_image_folder(folder: Path, *, classes: Sequence[str] = ("cat", "dog", "fish"), per_class: int = 40,
                       size: int = 40, fmt: str = "png", mode: str = "RGB", seed: int = 0) -> Path:
    """``folder/<class>/<i>.<fmt>`` images of ``size`` x ``size`` (resized by the reader)."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    for k, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        images = class_images(np.full(per_class, k), rng, size=size, channels=channels)
        options = {"quality": 95} if fmt in ("jpg", "jpeg") else {}
        for i, image in enumerate(images):
            Image.fromarray(image if channels == 3 else image[..., 0]).convert(mode).save(
                folder / name / f"{i}.{fmt}", **options)
    return folder
