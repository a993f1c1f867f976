"""The one door to every data set: :func:`load_data` reads ``data.name``'s files through
its registered reader, checks them against the facts its config declares, keeps
``data.classes``, splits off validation, takes subsets and standardises the pixels.

A reader (``@register_dataset("mnist")``) returns the raw splits as uint8 images
(N x C x H x W) and int64 labels; everything after that is shared, so every data set
gets the same split, subset and bad-input rules. Nothing here reads a statistic of the
private training set: the constants are public (``conf/data/<name>.yaml``), and
``data.normalization=dp`` leaves the pixels in [0, 1] for the DP release of
:mod:`dp_sweeps.data.dp_normalization`.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from dp_sweeps.data.facts import NORMALIZATIONS, DataFacts
from dp_sweeps.data.image_data import ImageData
from dp_sweeps.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawSplits:
    """What a reader returns: uint8 images N x C x H x W and int64 labels per split;
    ``test_x`` None when the data has no test split (image_folder without test_dir:
    :func:`load_data` then splits one off with ``data.test_fraction``)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: Optional[np.ndarray]
    test_y: Optional[np.ndarray]
    class_names: Optional[Sequence[str]] = None
    num_classes: Optional[int] = None  # for readers whose class count is found, not declared


# reader(data_cfg) -> RawSplits
Reader = Callable[[Mapping[str, Any]], RawSplits]
_READERS: Dict[str, Reader] = {}
_BUILTIN_MODULES = ("cifar10", "cifar100", "mnist", "svhn", "image_folder")


def register_dataset(name: str) -> Callable[[Reader], Reader]:
    def decorator(fn: Reader) -> Reader:
        if name in _READERS:
            raise ValueError(f"data set {name!r} is registered twice")
        _READERS[name] = fn
        return fn
    return decorator


def list_datasets() -> list[str]:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"dp_sweeps.data.{module}")
    return sorted(_READERS)


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"data.{key}={value!r} must be a positive integer")
    return value


def _constants(key: str, value: Any, channels: int) -> Optional[tuple[float, ...]]:
    if value is None:
        return None
    values = tuple(value)
    if len(values) != channels or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"data.{key}={list(values)!r} must list {channels} numbers (one per channel)")
    if key == "std" and min(values) <= 0:
        raise ConfigError(f"data.std={list(values)!r} must be > 0")
    return tuple(float(v) for v in values)


def check_classes(classes: Any, num_classes: Optional[int]) -> Optional[tuple[int, ...]]:
    """``data.classes``: null, or distinct labels in [0, num_classes) (kept in that order)."""
    if classes is None:
        return None
    kept = tuple(classes) if not isinstance(classes, (str, bytes)) else (classes,)
    if len(kept) < 2 or len(set(kept)) != len(kept) or \
            not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in kept):
        raise ConfigError(f"data.classes={list(kept)!r} must list at least two distinct labels >= 0")
    if num_classes is not None and max(kept) >= num_classes:
        raise ConfigError(f"data.classes={list(kept)!r}: label {max(kept)} is outside the {num_classes} classes")
    return kept


def declared_facts(data_cfg: Mapping[str, Any]) -> DataFacts:
    """The facts ``conf/data/<name>.yaml`` declares (``num_classes`` may be null for
    image_folder: then 0 here, the loader counts the class folders), before any file is
    read; ``data.classes`` already applied to ``num_classes``."""
    channels = _positive_int("channels", data_cfg.get("channels"))
    if channels not in (1, 3):
        raise ConfigError(f"data.channels={channels!r} must be 1 (grey) or 3 (RGB)")
    image_size = _positive_int("image_size", data_cfg.get("image_size"))
    num_classes = data_cfg.get("num_classes")
    if num_classes is not None:
        num_classes = _positive_int("num_classes", num_classes)
    classes = check_classes(data_cfg.get("classes"), num_classes)
    flip = data_cfg.get("hflip_preserves_label")
    if not isinstance(flip, bool):
        raise ConfigError(f"data.hflip_preserves_label={flip!r} must be true or false")
    normalization = data_cfg.get("normalization", "published")
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"data.normalization={normalization!r} is not one of: {', '.join(NORMALIZATIONS)}")
    mean, std = _constants("mean", data_cfg.get("mean"), channels), _constants("std", data_cfg.get("std"), channels)
    source = str(data_cfg.get("normalization_source") or "")
    if normalization == "fixed" and mean is None and std is None:  # maps [0, 1] onto [-1, 1]
        mean, std, source = (0.5,) * channels, (0.5,) * channels, "fixed 0.5 / 0.5"
    if normalization != "dp" and (mean is None or std is None):
        raise ConfigError(f"data.normalization={normalization}: data.mean and data.std must be set "
                          f"(public constants; data.normalization=dp releases them under DP instead)")
    if normalization == "dp":
        mean = std = None
    return DataFacts(name=str(data_cfg.get("name")), channels=channels, image_size=image_size,
                     num_classes=len(classes) if classes else (num_classes or 0), hflip_preserves_label=flip,
                     mean=mean, std=std, normalization=normalization,
                     normalization_source=source)


def standardise(images: np.ndarray, facts: DataFacts) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 in [0, 1], then ``(x - mean) / std`` per channel
    with the public constants (left in [0, 1] when a DP release is still to come)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    if facts.mean is None:
        return x
    mean = torch.tensor(facts.mean).view(1, -1, 1, 1)
    std = torch.tensor(facts.std).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def _check_read(raw: RawSplits, facts: DataFacts, num_classes: int) -> None:
    """What was read must be what the config declares: image shape and label range."""
    for split, x, y in (("training", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        if x is None:
            continue
        if x.ndim != 4 or tuple(x.shape[1:]) != facts.image_shape:
            raise ConfigError(f"data={facts.name}: {split} images of shape {tuple(x.shape[1:])}, but the config "
                              f"declares {facts.image_shape} (data.channels, data.image_size)")
        if len(x) != len(y):
            raise ConfigError(f"data={facts.name}: {len(x)} {split} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            bad = int(y.max() if y.max() >= num_classes else y.min())
            raise ConfigError(f"data={facts.name}: {split} label {bad} is outside the {num_classes} classes "
                              f"(data.num_classes={num_classes})")
    if len(raw.train_y) == 0:
        raise ConfigError(f"data={facts.name}: the training split is empty")


def _keep_classes(x: np.ndarray, y: np.ndarray, classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Examples of ``classes`` only, relabelled 0..k-1 in the order given."""
    relabel = np.full(max(max(classes), int(y.max(initial=0))) + 1, -1, dtype=np.int64)
    relabel[list(classes)] = np.arange(len(classes))
    keep = relabel[y] >= 0
    return x[keep], relabel[y[keep]]


def load_data(data_cfg: Mapping[str, Any]) -> ImageData:
    """Data set ``data.name`` as :class:`ImageData` with its :class:`DataFacts`.

    Splits: ``data.val_size`` examples held out of the training set by a permutation
    seeded with ``data.split_seed`` (data-independent: no privacy cost), then the first
    ``data.train_subset`` of the rest; ``data.test_subset`` test examples drawn with
    ``split_seed + 1``. Bad input (a count larger than the data, a label outside the
    class count, images of another shape than declared) is one ConfigError line.
    """
    name = data_cfg.get("name")
    readers = list_datasets()
    if name not in _READERS:
        raise ConfigError(f"data.name={name!r} is not one of: {', '.join(readers)}")
    facts = declared_facts(data_cfg)
    raw = _READERS[name](data_cfg)
    num_classes = data_cfg.get("num_classes") or raw.num_classes
    classes = check_classes(data_cfg.get("classes"), num_classes)
    _check_read(raw, facts, num_classes)
    train_x, train_y = raw.train_x, raw.train_y.astype(np.int64)
    split_seed = int(data_cfg.get("split_seed", 0))
    if raw.test_x is None:  # split a test set off with the fixed seed (image_folder without test_dir)
        fraction = data_cfg.get("test_fraction")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ConfigError(f"data.test_fraction={fraction!r} must be a number in (0, 1) when there is no "
                              f"test set (data.test_dir=null)")
        order = np.random.default_rng(split_seed + 2).permutation(len(train_y))
        n_test = max(1, int(round(fraction * len(train_y))))
        test_x, test_y = train_x[order[:n_test]], train_y[order[:n_test]]
        train_x, train_y = train_x[order[n_test:]], train_y[order[n_test:]]
    else:
        test_x, test_y = raw.test_x, raw.test_y.astype(np.int64)
    class_names = tuple(raw.class_names) if raw.class_names is not None else None
    if classes is not None:
        train_x, train_y = _keep_classes(train_x, train_y, classes)
        test_x, test_y = _keep_classes(test_x, test_y, classes)
        class_names = tuple(class_names[c] for c in classes) if class_names else None
        num_classes = len(classes)
    facts = facts.replace(num_classes=int(num_classes), class_names=class_names)
    val_size = data_cfg.get("val_size", 0) or 0
    if not 0 <= val_size < len(train_y):
        raise ConfigError(f"data.val_size={val_size} must be in [0, {len(train_y)}) for data={name}")
    order = np.random.default_rng(split_seed).permutation(len(train_y))
    val_idx, train_idx = order[:val_size], order[val_size:]
    train_subset, test_subset = data_cfg.get("train_subset"), data_cfg.get("test_subset")
    if train_subset is not None:
        if train_subset > len(train_idx):
            raise ConfigError(f"data.train_subset={train_subset} exceeds the {len(train_idx)} training examples "
                              f"of data={name}" + (f" (after data.val_size={val_size})" if val_size else ""))
        train_idx = train_idx[:train_subset]
    test_idx = np.arange(len(test_y))
    if test_subset is not None:
        test_idx = np.random.default_rng(split_seed + 1).permutation(len(test_y))[:test_subset]
    return ImageData(
        train_x=standardise(train_x[train_idx], facts), train_y=torch.from_numpy(train_y[train_idx]),
        val_x=standardise(train_x[val_idx], facts), val_y=torch.from_numpy(train_y[val_idx]),
        test_x=standardise(test_x[test_idx], facts), test_y=torch.from_numpy(test_y[test_idx]),
        num_classes=facts.num_classes, facts=facts)
