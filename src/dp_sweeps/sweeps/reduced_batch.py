"""Reduced-batch search (Sander, Stock and Sablayrolles, "TAN without a burn: scaling
laws of DP-SGD", ICML 2023): search hyperparameters at batch B/k, then train once at B.

DP-SGD's accuracy at a fixed number of steps S depends mostly on the noise per expected
example, σ/B. A trial of the search runs at batch B/k with noise multiplier σ/k (σ: the
full run's, calibrated to the target ε) for E/k epochs, which keeps σ/B and, up to the
rounding of each epoch's last batch, S: it costs about 1/k of the full run's compute and
ranks hyperparameters (learning rate, clipping) as the full run would. The sweeper then
trains the best hyperparameters once at full scale (``search.trial=full_scale``).

This saves compute, not privacy: each trial is its own run on the private data, with k
times less noise per step than the final run, so its ε (recorded in its result.json,
accounted with RDP) is far larger than the final run's; the search's own cost is not in
either ε (docs/sweeps.md, "Honest ε").

The trial's σ is decided by :func:`dp_sweeps.privacy.plan.plan_privacy` (``batch_scale``);
this module only reads ``search.batch_scale`` and shrinks the trainer's batch and epochs.
"""

from __future__ import annotations

import copy
from numbers import Integral

from omegaconf import DictConfig, open_dict

from dp_sweeps.errors import ConfigError

# The trial folder (search.trial) of the final full-scale run.
FULL_SCALE_TRIAL = "full_scale"


def batch_scale(cfg: DictConfig) -> int:
    """``search.batch_scale`` (1 when unset): k, the factor a trial's batch and epochs are
    divided by."""
    search = cfg.get("search") or {}
    value = search.get("batch_scale") if hasattr(search, "get") else None
    if value is None:
        return 1
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"search.batch_scale={value!r} must be a positive integer")
    return int(value)


def shrink_trial(cfg: DictConfig) -> DictConfig:
    """``cfg`` for a reduced-batch trial: ``trainer.batch_size`` and ``trainer.epochs``
    divided by k (refused unless k divides both); unchanged when k = 1. The privacy
    settings stay the full run's (the plan derives σ/k from them)."""
    k = batch_scale(cfg)
    if k == 1:
        return cfg
    if not cfg.privacy.enabled:
        raise ConfigError(f"search.batch_scale={k} keeps σ/B of a private run: it needs privacy=dp")
    for key in ("batch_size", "epochs"):
        value = cfg.trainer[key]
        if isinstance(value, Integral) and value % k:
            raise ConfigError(f"search.batch_scale={k} must divide trainer.{key}={value} (a trial runs at 1/k of it)")
    shrunk = copy.deepcopy(cfg)  # the caller's config stays the full run's
    with open_dict(shrunk):
        shrunk.trainer.batch_size = cfg.trainer.batch_size // k
        shrunk.trainer.epochs = cfg.trainer.epochs // k
        phys = cfg.trainer.get("physical_batch_size")
        if phys is not None and phys > shrunk.trainer.batch_size:
            shrunk.trainer.physical_batch_size = shrunk.trainer.batch_size
    return shrunk
