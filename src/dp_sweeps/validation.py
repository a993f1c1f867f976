"""Refuse bad input before any training starts, with one line naming the bad value."""

from __future__ import annotations

import logging
import math
from numbers import Real
from typing import Any

import torch
from omegaconf import DictConfig

from dp_sweeps.errors import ConfigError
from dp_sweeps.privacy import ACCOUNTANTS, GRAD_SAMPLE_MODES

log = logging.getLogger(__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def require_number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                   low_open: bool = True, high_open: bool = True, integer: bool = False) -> None:
    """``value`` must be a finite number (an int if ``integer``) inside the given bounds."""
    kind = "an integer" if integer else "a number"
    if not _is_number(value) or (integer and not float(value).is_integer()) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be {kind}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{key}={value!r} must be {'>' if low_open else '>='} {low:g}")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"{key}={value!r} must be {'<' if high_open else '<='} {high:g}")


def require_choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")


def validate_config(cfg: DictConfig) -> None:
    """Checks that need no data: privacy, optimizer, trainer and data keys."""
    privacy, trainer = cfg.privacy, cfg.trainer
    if privacy.enabled:
        if privacy.noise_multiplier is None:
            require_number("privacy.epsilon", privacy.epsilon, low=0)
        else:
            require_number("privacy.noise_multiplier", privacy.noise_multiplier, low=0)
        require_number("privacy.delta", privacy.delta, low=0, high=1)
        require_number("privacy.max_grad_norm", privacy.max_grad_norm, low=0)
        require_choice("privacy.accountant", privacy.accountant, ACCOUNTANTS)
        require_choice("privacy.grad_sample_mode", privacy.grad_sample_mode, GRAD_SAMPLE_MODES)
    if "lr" in cfg.optimizer:
        require_number("optimizer.lr", cfg.optimizer.lr, low=0)
    require_number("trainer.epochs", trainer.epochs, low=1, low_open=False, integer=True)
    require_number("trainer.batch_size", trainer.batch_size, low=1, low_open=False, integer=True)
    if trainer.physical_batch_size is not None:
        require_number("trainer.physical_batch_size", trainer.physical_batch_size, low=1,
                       low_open=False, integer=True)
    require_number("trainer.augmult", trainer.get("augmult", 1), low=1, low_open=False, integer=True)
    if trainer.get("ema_decay") is not None:
        require_number("trainer.ema_decay", trainer.ema_decay, low=0, high=1, low_open=False, high_open=False)
    require_number("trainer.checkpoint_every", trainer.get("checkpoint_every") or 0, low=0, low_open=False,
                   integer=True)
    require_choice("trainer.device", trainer.device, ("auto", "cpu", "cuda"))
    if trainer.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device='cuda' but no CUDA device is available")
    require_number("seed", cfg.seed, integer=True)
    for key in ("train_subset", "test_subset"):
        if cfg.data.get(key) is not None:
            require_number(f"data.{key}", cfg.data[key], low=1, low_open=False, integer=True)
    require_number("data.val_size", cfg.data.get("val_size", 0), low=0, low_open=False, integer=True)


def validate_against_data(cfg: DictConfig, *, num_train: int) -> None:
    """Checks that need the training-set size N."""
    batch_size = cfg.trainer.batch_size
    if batch_size > num_train:
        raise ConfigError(f"trainer.batch_size={batch_size} exceeds the {num_train} training examples")
    if cfg.privacy.enabled:
        delta = cfg.privacy.delta
        if delta >= 1.0 / num_train:
            log.warning("privacy.delta=%g is >= 1/N = %g: such a δ allows releasing an example "
                        "outright; the usual choice is δ << 1/N", delta, 1.0 / num_train)
