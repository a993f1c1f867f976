"""CIFAR-10 through torchvision's real download and integrity check, held as tensors."""

from __future__ import annotations

import hashlib
import http.server
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from torchvision.datasets import CIFAR10

from dp_sweeps.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10, random_crop_flip
from dp_sweeps.errors import ConfigError


def test_loader_reads_the_official_format(tiny_cifar):
    data = load_cifar10(root=tiny_cifar, download=False, verify_checksums=False, val_size=50)
    assert data.train_x.shape == (450, 3, 32, 32) and data.train_x.dtype == torch.float32
    assert data.val_x.shape == (50, 3, 32, 32) and data.test_x.shape == (200, 3, 32, 32)
    assert data.num_classes == 10 and set(data.train_y.tolist()) == set(range(10))
    # Normalised with the public constants: a pixel of 0 maps to -mean/std.
    assert data.train_x.min().item() >= min(-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD)) - 1e-5
    # Validation is held out of training: no example in both.
    train_rows = {hash(x.numpy().tobytes()) for x in data.train_x}
    assert not any(hash(x.numpy().tobytes()) in train_rows for x in data.val_x)


def test_subsets_are_fixed_and_small(tiny_cifar):
    a = load_cifar10(root=tiny_cifar, download=False, verify_checksums=False, train_subset=64, test_subset=32)
    b = load_cifar10(root=tiny_cifar, download=False, verify_checksums=False, train_subset=64, test_subset=32)
    assert a.num_train == 64 and len(a.test_y) == 32
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)


def test_checksums_are_verified_by_default(tiny_cifar):
    with pytest.raises(ConfigError, match="fails its official md5"):
        load_cifar10(root=tiny_cifar, download=False)


@pytest.fixture
def served_archive(tiny_cifar, tmp_path, monkeypatch):
    """Serve a tar.gz of the tiny copy on loopback and point torchvision's CIFAR10
    download (URL, archive md5, per-file md5s) at it: the real download code runs."""
    archive = tmp_path / "serve" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_cifar / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = lambda p: hashlib.md5(Path(p).read_bytes()).hexdigest()  # noqa: E731
    folder = tiny_cifar / "cifar-10-batches-py"
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(archive.parent), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{server.server_port}/{archive.name}")
    monkeypatch.setattr(CIFAR10, "tgz_md5", md5(archive))
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(folder / n)] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5(folder / n)] for n, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(folder / "batches.meta")})
    yield server
    server.shutdown()


def test_download_then_verified_load(served_archive, tmp_path):
    root = tmp_path / "fresh"
    data = load_cifar10(root=root, download=True, verify_checksums=True)
    assert data.num_train == 500 and (root / "cifar-10-batches-py" / "data_batch_5").is_file()
    # A second load finds the verified files and downloads nothing.
    served_archive.shutdown()
    assert load_cifar10(root=root, download=True, verify_checksums=True).num_train == 500


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # discard port: refused
    with pytest.raises(ConfigError, match="could not download CIFAR-10") as info:
        load_cifar10(root=tmp_path / "r", download=True)
    assert "\n" not in str(info.value)


def test_random_crop_flip_is_per_example():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).view(2, 3, 8, 8).repeat(64, 1, 1, 1)
    out = random_crop_flip(x, padding=2, generator=g)
    assert out.shape == x.shape
    distinct = {hash(o.numpy().tobytes()) for o in out[::2]}
    assert len(distinct) > 10  # different crops/flips per example
    same = random_crop_flip(x[:4], padding=0, generator=g)  # no padding: identity or a flip
    for a, b in zip(same, x[:4]):
        assert torch.equal(a, b) or torch.equal(a, b.flip(2))
