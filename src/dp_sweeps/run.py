"""One job: validate → load data → plan privacy → train → ``result.json``.

:func:`run` is what the entrypoint, sweeps, benchmarks and the paper targets call; it
returns the run's ``result.json`` content. :func:`task` wraps it for Hydra: bad input
becomes one line and a non-zero exit, and the sweeper gets the named metric.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dp_sweeps.classical import is_classical, run_classical
from dp_sweeps.data import DataFacts, ImageData
from dp_sweeps.data import load_data as load_dataset
from dp_sweeps.data.dp_normalization import release_normalization
from dp_sweeps.data.features import apply_feature_map
from dp_sweeps.errors import ConfigError
from dp_sweeps.models import create_model
from dp_sweeps.sweeps.reduced_batch import shrink_trial
from dp_sweeps.sweeps.trial_pruning import trial_epoch_callbacks
from dp_sweeps.training import distributed
from dp_sweeps.training.backend import resolve_device
from dp_sweeps.training.loggers import open_loggers
from dp_sweeps.training.network import train_network
from dp_sweeps.training.results import read_result, write_result
from dp_sweeps.validation import check_tuning_metric, validate_against_data, validate_config

log = logging.getLogger(__name__)

# Hydra's grid sweeper runs every job and ignores what the task returns.
GRID_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(data_cfg: DictConfig) -> ImageData:
    """The ``data`` group's data set (:func:`dp_sweeps.data.load_data`), with its facts."""
    return load_dataset(OmegaConf.to_container(data_cfg, resolve=True))


def build_model(model_cfg: DictConfig, facts: Optional[DataFacts] = None, *,
                num_classes: Optional[int] = None) -> torch.nn.Module:
    """The ``model`` group's network for data with ``facts`` (its channels, image size
    and class count); without facts, for 32x32 RGB images of ``num_classes`` classes.
    A model that cannot take that data is one ConfigError line naming both."""
    if facts is None:
        facts = DataFacts(name="unspecified", channels=3, image_size=32, num_classes=num_classes or 10,
                          hflip_preserves_label=True)
    kwargs = OmegaConf.to_container(model_cfg, resolve=True)
    name = kwargs.pop("name")
    try:
        return create_model(name, num_classes=facts.num_classes, in_channels=facts.channels,
                            image_size=facts.image_size, data_facts=facts, **kwargs)
    except (ValueError, TypeError, RuntimeError) as err:  # RuntimeError: torch refusing a size
        raise ConfigError(f"model.name={name!r} on data={facts.name} ({facts.channels}x{facts.image_size}x"
                          f"{facts.image_size}, {facts.num_classes} classes): {str(err).splitlines()[0]}") from err


def run(cfg: DictConfig, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Run one job described by ``cfg`` into ``output_dir``; returns its result record."""
    wall_start = time.perf_counter()
    output_dir = Path(output_dir)
    validate_config(cfg)
    # A reduced-batch search trial (search.batch_scale=k) trains at B/k for E/k epochs.
    cfg = shrink_trial(cfg)
    # The logger group (csv, tensorboard, mlflow): an unknown one or a missing extra is
    # refused here, before any training; their files appear when training starts.
    loggers = open_loggers(cfg, run_dir=output_dir)
    if cfg.trainer.resume and (output_dir / "result.json").is_file():
        previous = read_result(output_dir)
        if previous.get("status") in ("completed", "diverged", "pruned"):
            log.info("trainer.resume=true: %s already finished (%s); not run again", output_dir, previous["status"])
            return previous
    seed_everything(cfg.seed)
    _, world, device_name = distributed.init_from_env(cfg.trainer.device)
    device = resolve_device(device_name)
    data = load_data(cfg.data)
    validate_against_data(cfg, num_train=data.num_train)
    if cfg.trainer.eval_flip:  # mirrored val/test images (mapped to features below too)
        data = data.with_mirrors()
    # data.normalization=dp: the pixels' channel statistics released under DP (the run's
    # accountant charges it, from data.prior_releases); a no-op for published constants.
    data = release_normalization(data, settings=cfg.data.get("dp_normalization"),
                                 private=bool(cfg.privacy.enabled), noise_seed=cfg.privacy.noise_seed)
    facts = data.facts
    # A fixed, data-independent feature map (the features group): no privacy cost; cached.
    if cfg.features.name is not None:
        data = apply_feature_map(data, OmegaConf.to_container(cfg.features, resolve=True),
                                 cache_dir=cfg.data.feature_cache)
    with loggers:  # closed when the run ends or fails (an MLflow run is then FAILED)
        if is_classical(cfg.model.name):
            # SVM, KNN, Naive Bayes: their own DP mechanisms (dp_sweeps.classical), same record.
            result = run_classical(cfg, data=data, device=device, output_dir=output_dir)
        else:
            model = build_model(cfg.model, facts)
            result = train_network(cfg, model=model, data=data, device=device, output_dir=output_dir,
                                   loggers=loggers, epoch_callbacks=trial_epoch_callbacks(cfg))
        result.setdefault("experiment", cfg.get("experiment_name"))
        # Which data, and how much of it: the report and the paper tables group by data set.
        result.update(facts.record(), num_train=data.num_train, num_val=len(data.val_y), num_test=len(data.test_y))
        result["wall_seconds"] = time.perf_counter() - wall_start
        if distributed.is_main_process():  # one record per run, also under torchrun
            write_result(output_dir, result)
            loggers.log_result(result)  # the record as written, to the loggers that trained
    return result


def objective(result: dict[str, Any], optimized_metric: Any) -> Any:
    """The value(s) a sweeper optimises: ``optimized_metric`` names one result key or a list."""
    def value(key: str) -> float:
        v = result.get(key)
        return float(v) if isinstance(v, (int, float)) and result.get("status") == "completed" else math.nan
    if optimized_metric is None:
        return value("val_accuracy")
    if isinstance(optimized_metric, str):
        return value(optimized_metric)
    return tuple(value(k) for k in optimized_metric)


def task(cfg: DictConfig) -> Any:
    """The Hydra task function."""
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    metric = cfg.get("optimized_metric")
    try:
        # Any sweeper that optimises the returned value (all but Hydra's grid sweeper) tunes
        # on it: never on the test set, whichever sweeper it is.
        if multirun and hydra_cfg.sweeper.get("_target_") != GRID_SWEEPER:
            check_tuning_metric(cfg)
        result = run(cfg, output_dir)
    except ConfigError as err:
        log.error("%s", err)
        if not multirun:
            raise SystemExit(f"dp_sweeps: error: {err}") from None
        write_result(output_dir, {"status": "failed", "error": str(err), "model": cfg.model.name})
        return objective({"status": "failed"}, metric)
    except Exception as err:
        log.exception("run failed")
        write_result(output_dir, {"status": "failed", "error": f"{type(err).__name__}: {err}",
                                  "model": cfg.model.name})
        if not multirun:
            raise
        return objective({"status": "failed"}, metric)
    return objective(result, metric)
