"""The task: compose -> validate -> load data -> plan privacy -> train -> record.

:func:`train` is what the entrypoint, sweeps, benchmarks and the paper targets call;
it returns the run's ``result.json`` content. :func:`task` wraps it for Hydra: bad
input becomes one line and a non-zero exit, and the sweeper gets the named metric.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dp_sweeps.data import load_cifar10
from dp_sweeps.data_normalization import fit_data_normalization
from dp_sweeps.errors import ConfigError
from dp_sweeps.features import apply_feature_map
from dp_sweeps.models import create_model
from dp_sweeps.privacy import plan_privacy, resolve_grad_sample_mode
from dp_sweeps.results import NON_PRIVATE, MetricsLog, non_private_stats_enabled, write_result
from dp_sweeps import checkpoint as ckpt
from dp_sweeps import distributed
from dp_sweeps.results import read_result
from dp_sweeps.training import LoopSettings, configure_backend, fit, resolve_device
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


def load_data(data_cfg: DictConfig):
    return load_cifar10(root=data_cfg.root, download=data_cfg.download,
                        verify_checksums=data_cfg.verify_checksums, train_subset=data_cfg.train_subset,
                        test_subset=data_cfg.test_subset, val_size=data_cfg.val_size,
                        split_seed=data_cfg.split_seed)


def build_model(model_cfg: DictConfig, *, num_classes: int) -> torch.nn.Module:
    kwargs = OmegaConf.to_container(model_cfg, resolve=True)
    name = kwargs.pop("name")
    for key in ("family", "features", "data_norm"):  # read by train(), not by the builder
        kwargs.pop(key, None)
    try:
        return create_model(name, num_classes=num_classes, **kwargs)
    except (ValueError, TypeError, RuntimeError) as err:  # RuntimeError: torch refusing a size
        raise ConfigError(f"model.name={name!r}: {str(err).splitlines()[0]}") from err


def build_optimizer(optimizer_cfg: DictConfig, params) -> torch.optim.Optimizer:
    """Instantiate the ``optimizer/`` config; only ``torch.optim`` classes may be named."""
    try:
        factory = instantiate(optimizer_cfg, _execution_whitelist_=["torch.optim.*"])
        return factory(params)
    except Exception as err:  # an unknown class or keyword
        raise ConfigError(f"optimizer {optimizer_cfg.get('_target_')!r}: {str(err).splitlines()[0]}") from err


def _choice(group: str) -> Optional[str]:
    try:
        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:  # composed outside a Hydra run (tests, notebooks)
        return None


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by torch. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loop_settings(cfg: DictConfig, *, grad_sample_mode: str) -> LoopSettings:
    trainer = cfg.trainer
    return LoopSettings(
        epochs=trainer.epochs, batch_size=trainer.batch_size, physical_batch_size=trainer.physical_batch_size,
        seed=cfg.seed, grad_sample_mode=grad_sample_mode, augment=cfg.data.augment,
        augmult=trainer.get("augmult", 1), ema_decay=trainer.get("ema_decay"),
        noise_seed=cfg.privacy.get("noise_seed"),
        non_private_stats=non_private_stats_enabled(trainer.get("non_private_stats"), private=bool(cfg.privacy.enabled)),
        eval_batch_size=trainer.eval_batch_size,
        progress=trainer.progress, checkpoint_every=trainer.get("checkpoint_every") or 0,
        resume=bool(trainer.get("resume", False)), channels_last=bool(trainer.get("channels_last", False)))


def train(cfg: DictConfig, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Run one job described by ``cfg`` into ``output_dir``; returns its result record."""
    wall_start = time.perf_counter()
    output_dir = Path(output_dir)
    validate_config(cfg)
    if cfg.trainer.get("resume") and (output_dir / "result.json").is_file():
        previous = read_result(output_dir)
        if previous.get("status") in ("completed", "diverged"):
            log.info("trainer.resume=true: %s already finished (%s); not run again", output_dir, previous["status"])
            return previous
    seed_everything(cfg.seed)
    _, world, device_name = distributed.init_from_env(cfg.trainer.device)
    device = resolve_device(device_name)
    data = load_data(cfg.data)
    validate_against_data(cfg, num_train=data.num_train)
    if cfg.trainer.get("eval_flip"):  # mirrored val/test images (mapped to features below too)
        data = data.with_mirrors()
    # A fixed, data-independent feature map (model.features): no privacy cost; cached.
    features = cfg.model.get("features")
    if features:
        data = apply_feature_map(data, OmegaConf.to_container(features, resolve=True),
                                 cache_dir=cfg.data.get("feature_cache"))
    if cfg.model.get("family", "deep") == "classical":
        # SVM, KNN, Naive Bayes: their own DP mechanisms (dp_sweeps.classical), same record.
        from dp_sweeps.classical import run_classical

        result = run_classical(cfg, data=data, device=device, output_dir=output_dir)
    else:
        model = build_model(cfg.model, num_classes=data.num_classes)
        result = train_network(cfg, model=model, data=data, device=device, output_dir=output_dir)
    result.setdefault("experiment", cfg.get("experiment_name"))
    result["wall_seconds"] = time.perf_counter() - wall_start
    if distributed.is_main_process():  # one record per run, also under torchrun
        write_result(output_dir, result)
    return result


def train_network(cfg: DictConfig, *, model: torch.nn.Module, data, device: torch.device, output_dir: Path,
                  criterion: Optional[torch.nn.Module] = None, model_name: Optional[str] = None) -> dict[str, Any]:
    """Plan the privacy of ``model``'s training, then train it with the one loop (or, on
    a dry run, stop after planning). Returns the run's record; the caller writes it."""
    model_name = model_name or cfg.model.name
    noise_seed = cfg.privacy.get("noise_seed")
    # DP data normalisation (model.norm=data): released before training, charged to ε.
    prior_releases = fit_data_normalization(model, data.train_x, private=bool(cfg.privacy.enabled),
                                            settings=cfg.model.get("data_norm"),
                                            noise_seed=cfg.privacy.get("noise_seed"))
    plan = plan_privacy(cfg.privacy, num_train=data.num_train, batch_size=cfg.trainer.batch_size,
                        epochs=cfg.trainer.epochs, prior_releases=prior_releases)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    grad_sample_mode = resolve_grad_sample_mode(cfg.privacy.grad_sample_mode, model_name) if plan.private else None
    result: dict[str, Any] = {
        "experiment": cfg.get("experiment_name"), "model": model_name,
        "optimizer": _choice("optimizer") or cfg.optimizer._target_.rsplit(".", 1)[-1].lower(),
        "lr": cfg.optimizer.get("lr"), "private": plan.private, "accountant": plan.accountant,
        "target_epsilon": plan.target_epsilon, "planned_epsilon": plan.planned_epsilon, "delta": plan.delta,
        "noise_multiplier": plan.noise_multiplier, "max_grad_norm": plan.max_grad_norm,
        "sample_rate": plan.sample_rate, "poisson_sampling": plan.poisson_sampling,
        "epsilon_valid": plan.private and plan.poisson_sampling and noise_seed is None,
        "batch_size": cfg.trainer.batch_size, "physical_batch_size": cfg.trainer.physical_batch_size,
        "epochs": cfg.trainer.epochs, "planned_steps": plan.steps, "seed": cfg.seed,
        "grad_sample_mode": grad_sample_mode, "num_train": data.num_train, "num_val": len(data.val_y),
        "num_test": len(data.test_y), "device": str(device), "world_size": distributed.world_size(),
        "host": platform.node(), "parameters": sum(p.numel() for p in model.parameters()),
        "torch_version": torch.__version__, "prior_releases": [list(r) for r in plan.prior_releases] or None,
    }
    if plan.private and noise_seed is not None:
        log.warning("privacy.noise_seed is set: the noise and the sampling can be replayed by anyone who reads "
                    "the config, so the reported ε is NOT a guarantee (epsilon_valid=false); for debugging only")
    if plan.private and not plan.poisson_sampling:
        log.warning("privacy.poisson_sampling=false: the reported ε assumes Poisson sampling and is "
                    "NOT a valid guarantee for shuffled fixed-size batches (epsilon_valid=false)")
    if cfg.dry_run:
        if plan.private:  # the spread between accountants, for the planned run
            from dp_sweeps.accounting import cross_check_epsilon

            result["epsilon_cross_check"] = cross_check_epsilon(
                noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps,
                delta=plan.delta, prior=plan.prior_releases)
            log.info("ε of the planned run: %s", ", ".join(
                f"{k} {'n/a' if v is None else format(v, '.3f')}" for k, v in result["epsilon_cross_check"].items()))
        log.info("dry run: σ=%s, planned ε=%s over %d steps", plan.noise_multiplier, plan.planned_epsilon, plan.steps)
        return {**result, "status": "planned", "epsilon": plan.planned_epsilon, "steps": 0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    configure_backend(device, tf32=cfg.trainer.get("tf32", True),
                      reuse_cpu_memory=cfg.trainer.get("reuse_cpu_memory", False))
    settings = loop_settings(cfg, grad_sample_mode=grad_sample_mode or "hooks")
    identity = {key: result.get(key) for key in ckpt.PRIVACY_KEYS}
    # A resumed run rewrites metrics.csv from its checkpoint's history (rows written after
    # the checkpoint by the interrupted attempt are dropped, as their steps are redone).
    metrics = MetricsLog(output_dir) if distributed.is_main_process() else None
    try:
        outcome = fit(model=model, optimizer=optimizer, data=data.to(device), plan=plan, settings=settings,
                      device=device, criterion=criterion, metrics=metrics, run_dir=output_dir,
                      run_identity=identity)
    finally:
        if metrics is not None:
            metrics.close()
    last = outcome.last
    seconds = outcome.train_seconds
    result.update(
        status=outcome.status, epsilon=outcome.epsilon, steps=outcome.steps,
        test_accuracy=last.get("test_accuracy"), test_loss=last.get("test_loss"),
        val_accuracy=last.get("val_accuracy"), val_loss=last.get("val_loss"),
        epochs_completed=len(outcome.history), resumed_from_epoch=outcome.resumed_from_epoch or None,
        # Throughput from public quantities only: steps × the expected batch B per second.
        train_expected_samples_per_second=outcome.steps * cfg.trainer.batch_size / seconds if seconds else None,
        train_seconds=seconds, peak_memory_mb=peak_memory_mb(device))
    if settings.non_private_stats:
        result[NON_PRIVATE] = {
            "train_loss": last.get(f"{NON_PRIVATE}_train_loss"),
            "train_accuracy": last.get(f"{NON_PRIVATE}_train_accuracy"),
            "samples_seen": outcome.samples_seen,  # the sum of the sampled batch sizes
            "train_samples_per_second": outcome.samples_seen / seconds if seconds else None}
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
        result = train(cfg, output_dir)
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
