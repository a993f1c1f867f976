"""Tiny CIFAR-10 datasets written in the official python format ("cifar-10-batches-py"),
so tests exercise the real loader. Class k's images carry a class-specific colour and
stripe pattern plus noise: learnable, so a few DP steps beat chance."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_images(labels: np.ndarray, rng: np.random.Generator, *, signal: float = 60.0) -> np.ndarray:
    n = len(labels)
    base = rng.normal(128, 40, size=(n, 32, 32, 3))
    palette = np.random.default_rng(1234).uniform(-1, 1, size=(10, 3))
    stripes = np.sin(np.arange(32)[None, :] * (labels[:, None] + 1) * np.pi / 16)  # n x 32
    base += signal * palette[labels][:, None, None, :]
    base += signal * 0.5 * stripes[:, None, :, None]
    return np.clip(base, 0, 255).astype(np.uint8)


def _dump(path: Path, payload: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(payload, fh, protocol=2)


def write_cifar10(root: Path, *, per_batch: int, test: int, seed: int = 0, signal: float = 60.0) -> Path:
    """Write root/cifar-10-batches-py with 5 training batches of ``per_batch`` images and
    a test batch of ``test`` images; returns ``root``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(1, 6):
        labels = np.arange(per_batch) % 10
        rng.shuffle(labels)
        x = make_images(labels, rng, signal=signal)
        _dump(folder / f"data_batch_{k}", {"batch_label": f"training batch {k} of 5",
                                            "labels": labels.tolist(),
                                            "data": x.transpose(0, 3, 1, 2).reshape(per_batch, 3072),
                                            "filenames": [f"img_{k}_{i}.png" for i in range(per_batch)]})
    labels = np.arange(test) % 10
    x = make_images(labels, rng, signal=signal)
    _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": labels.tolist(),
                                   "data": x.transpose(0, 3, 1, 2).reshape(test, 3072),
                                   "filenames": [f"test_{i}.png" for i in range(test)]})
    _dump(folder / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": CLASSES, "num_vis": 3072})
    return root
