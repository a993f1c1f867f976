"""Refuse bad input before any training starts, with one line naming the bad value."""

from __future__ import annotations

import logging
import math
from numbers import Integral, Real
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from dp_sweeps.classical import is_classical, load_classifier
from dp_sweeps.data.registry import declared_facts
from dp_sweeps.errors import ConfigError
from dp_sweeps.privacy import (
    ACCOUNTANTS,
    GRAD_SAMPLE_MODES,
    MAX_EPSILON,
    MAX_NOISE_MULTIPLIER,
    MIN_DELTA,
    MIN_EPSILON,
    check_mechanism_settings,
)
from dp_sweeps.privacy.randomness import secure_mode_unavailable

log = logging.getLogger(__name__)

MAX_OPTIMIZER_VALUE = 1e6
# torch.optim's boolean options; every other optimizer key is a number (or a list of numbers).
OPTIMIZER_FLAGS = ("nesterov", "amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
                   "centered", "decoupled_weight_decay")
# Seeds go to torch/numpy generators (seed + 1..3 for the run's own generators).
MAX_SEED = 2**32


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def require_number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                   low_open: bool = True, high_open: bool = True, integer: bool = False) -> None:
    """``value`` must be a finite number (an int if ``integer``) inside the given bounds."""
    kind = "an integer" if integer else "a number"
    # An integer key must hold an int: 3.0 epochs would reach range() and slicing as a float.
    if not _is_number(value) or (integer and not isinstance(value, Integral)) or not math.isfinite(value):
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
        # Bounded so that every accountant call terminates in seconds and bounded memory.
        if privacy.noise_multiplier is None:
            require_number("privacy.epsilon", privacy.epsilon, low=MIN_EPSILON, high=MAX_EPSILON, low_open=False,
                           high_open=False)
        else:
            require_number("privacy.noise_multiplier", privacy.noise_multiplier, low=0,
                           high=MAX_NOISE_MULTIPLIER, high_open=False)
        require_number("privacy.delta", privacy.delta, low=MIN_DELTA, low_open=False, high=1)
        require_number("privacy.max_grad_norm", privacy.max_grad_norm, low=0)
        if privacy.accountant == "gdp":
            raise ConfigError("privacy.accountant='gdp' can under-report ε (a CLT approximation; Opacus warns), so it "
                              "never calibrates σ nor reports a run's ε: use prv or rdp "
                              "(the dry run shows GDP beside them)")
        if privacy.get("mechanism", "gaussian") == "gaussian":
            require_choice("privacy.accountant", privacy.accountant, ACCOUNTANTS)
        if privacy.get("noise_seed") is not None:
            require_number("privacy.noise_seed", privacy.noise_seed, low=0, low_open=False, integer=True)
        reason = secure_mode_unavailable() if privacy.get("secure_mode") else None
        if reason:
            raise ConfigError(reason)
        require_choice("privacy.grad_sample_mode", privacy.grad_sample_mode, GRAD_SAMPLE_MODES)
        # Gaussian (L2) or Laplace (L1, PLD-accounted): its accountant and engine (dp_sweeps.privacy.laplace).
        check_mechanism_settings(mechanism=privacy.get("mechanism", "gaussian"), accountant=privacy.accountant,
                                 grad_sample_mode=privacy.grad_sample_mode)
    if "lr" in cfg.optimizer:
        require_number("optimizer.lr", cfg.optimizer.lr, low=0)
    for key, value in cfg.optimizer.items():
        if key.startswith("_"):
            continue
        if key in OPTIMIZER_FLAGS:
            if not isinstance(value, bool):
                raise ConfigError(f"optimizer.{key}={value!r} must be true or false")
            continue
        # torch.optim checks signs but not size or type: 1e300 overflows float32 in step(),
        # 10**30 overflows int64, True is taken as 1.
        for item in (value if isinstance(value, ListConfig) else [value]):
            require_number(f"optimizer.{key}", item, low=-MAX_OPTIMIZER_VALUE, high=MAX_OPTIMIZER_VALUE,
                           low_open=False, high_open=False)
    require_number("trainer.epochs", trainer.epochs, low=1, low_open=False, integer=True)
    require_number("trainer.batch_size", trainer.batch_size, low=1, low_open=False, integer=True)
    if trainer.physical_batch_size is not None:
        require_number("trainer.physical_batch_size", trainer.physical_batch_size, low=1,
                       low_open=False, integer=True)
    require_number("trainer.eval_batch_size", trainer.eval_batch_size, low=1, low_open=False, integer=True)
    require_number("trainer.augmult", trainer.augmult, low=1, low_open=False, integer=True)
    if not isinstance(trainer.eval_flip, bool):
        raise ConfigError(f"trainer.eval_flip={trainer.eval_flip!r} must be true or false")
    if trainer.eval_flip and is_classical(cfg.model.name):
        raise ConfigError(f"trainer.eval_flip=true: model={cfg.model.name} is a classical classifier, "
                          "which evaluates without it; set trainer.eval_flip=false")
    validate_data_facts(cfg)
    if is_classical(cfg.model.name):
        load_classifier(cfg.model.name)  # its optional packages (an extra), before any data is read
    if trainer.ema_decay is not None:
        require_number("trainer.ema_decay", trainer.ema_decay, low=0, high=1, low_open=False, high_open=False)
    require_number("trainer.checkpoint_every", trainer.checkpoint_every, low=0, low_open=False,
                   integer=True)
    require_choice("trainer.device", trainer.device, ("auto", "cpu", "cuda"))
    if trainer.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device='cuda' but no CUDA device is available")
    require_choice("trainer.precision", trainer.get("precision", "fp32"), ("fp32", "bf16"))
    if trainer.get("precision", "fp32") == "bf16" and privacy.enabled and privacy.grad_sample_mode == "ew":
        raise ConfigError("trainer.precision=bf16 keeps per-example gradients in fp32 through Opacus's hooks: "
                          "use privacy.grad_sample_mode auto, hooks, functorch or ghost, not 'ew'")
    require_number("seed", cfg.seed, low=0, low_open=False, high=MAX_SEED, integer=True)
    require_number("data.split_seed", cfg.data.get("split_seed", 0), low=0, low_open=False, high=MAX_SEED,
                   integer=True)
    for key in ("train_subset", "test_subset"):
        if cfg.data.get(key) is not None:
            require_number(f"data.{key}", cfg.data[key], low=1, low_open=False, integer=True)
    require_number("data.val_size", cfg.data.get("val_size", 0), low=0, low_open=False, integer=True)
    if cfg.model.get("norm") == "data" and privacy.enabled:
        settings = privacy.get("data_norm")
        if settings is None:
            raise ConfigError("model.norm='data' needs privacy.data_norm (noise_multiplier, clip_mean, clip_square)")
        for key in ("noise_multiplier", "clip_mean", "clip_square"):
            require_number(f"privacy.data_norm.{key}", settings.get(key), low=0, high_open=False,
                           high=MAX_NOISE_MULTIPLIER if key == "noise_multiplier" else None)


def validate_data_facts(cfg: DictConfig) -> None:
    """The facts ``conf/data/<name>.yaml`` declares, and what they rule out: evaluation
    on mirrors of data whose mirror is another class, and a DP pixel normalisation that
    only DP-SGD's accountant charges."""
    facts = declared_facts(cfg.data)
    if cfg.trainer.eval_flip and not facts.hflip_preserves_label:
        raise ConfigError(f"trainer.eval_flip=true: data={facts.name} declares hflip_preserves_label=false "
                          f"(a mirrored image is another class); set trainer.eval_flip=false")
    if facts.normalization == "dp":
        if is_classical(cfg.model.name):
            raise ConfigError(f"data.normalization=dp is charged to DP-SGD's accountant; model={cfg.model.name} "
                              f"spends its own ε: use data.normalization=fixed")
        if cfg.privacy.enabled:
            settings = cfg.data.get("dp_normalization") or {}
            require_number("data.dp_normalization.noise_multiplier", settings.get("noise_multiplier"), low=0,
                           high=MAX_NOISE_MULTIPLIER, high_open=False)


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


def check_tuning_metric(cfg: DictConfig) -> None:
    """A search must tune on the validation split held out of the training set: refuse
    an ``optimized_metric`` read from the test set, or a ``val_*`` one with no split."""
    metric = cfg.get("optimized_metric")
    names = [metric] if isinstance(metric, str) else list(metric or [])
    for name in names:
        if str(name).startswith("test_"):
            raise ConfigError(f"optimized_metric={name!r}: a search must not tune on the test set; "
                              f"use val_{str(name)[len('test_'):]} with data.val_size > 0")
        if str(name).startswith("val_") and not cfg.data.get("val_size"):
            raise ConfigError(f"optimized_metric={name!r} needs data.val_size > 0 (examples held out of "
                              f"the training set), got data.val_size={cfg.data.get('val_size')!r}")
