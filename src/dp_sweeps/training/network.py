"""Plan the privacy of a network's training, train it with the one loop, and record
the run: what the job (:mod:`dp_sweeps.run`) and the DP-SGD linear SVM
(:mod:`dp_sweeps.classical.svm`) share.

Guarantee: the record's ``epsilon`` is the accountant's for the steps the loop actually
took (``planned_epsilon`` is the plan's); ``epsilon_valid`` is false whenever the
mechanism's assumptions do not hold (fixed-size batches, a replayable ``noise_seed``).
Figures computed from the private training data outside the mechanism appear only under
``non_private`` and only when asked for.
"""

from __future__ import annotations

import logging
import platform
import resource
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from dp_sweeps.errors import ConfigError
from dp_sweeps.models.frozen_batchnorm import guard_batch_statistics, refuse_batch_statistics
from dp_sweeps.models.trainable import count_trainable, refuse_unsupported_layers, trainable_parameters
from dp_sweeps.privacy.accounting import cross_check_epsilon
from dp_sweeps.privacy.data_normalization import fit_data_normalization
from dp_sweeps.privacy.engine import resolve_grad_sample_mode
from dp_sweeps.privacy.noisy_score import noisy_score_record
from dp_sweeps.privacy.plan import plan_privacy
from dp_sweeps.sweeps.reduced_batch import batch_scale
from dp_sweeps.training import checkpoint as ckpt
from dp_sweeps.training import distributed
from dp_sweeps.training.backend import configure_backend
from dp_sweeps.training.loggers import RunLoggers, open_loggers, run_params
from dp_sweeps.training.loop import LoopSettings, fit
from dp_sweeps.training.results import NON_PRIVATE, non_private_stats_enabled

log = logging.getLogger(__name__)


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
    """The loop's settings from the composed config (its YAML is the one place for defaults)."""
    trainer = cfg.trainer
    return LoopSettings(
        epochs=trainer.epochs, batch_size=trainer.batch_size, physical_batch_size=trainer.physical_batch_size,
        seed=cfg.seed, grad_sample_mode=grad_sample_mode, augment=cfg.data.augment, augmult=trainer.augmult,
        ema_decay=trainer.ema_decay, noise_seed=cfg.privacy.noise_seed,
        non_private_stats=non_private_stats_enabled(trainer.non_private_stats, private=bool(cfg.privacy.enabled)),
        eval_batch_size=trainer.eval_batch_size, progress=trainer.progress,
        checkpoint_every=trainer.checkpoint_every, resume=trainer.resume, channels_last=trainer.channels_last,
        precision=trainer.get("precision", "fp32"))


def train_network(cfg: DictConfig, *, model: torch.nn.Module, data, device: torch.device, output_dir: Path,
                  criterion: Optional[torch.nn.Module] = None, model_name: Optional[str] = None,
                  loggers: Optional[RunLoggers] = None,
                  epoch_callbacks: Sequence[Callable[[dict], None]] = ()) -> dict[str, Any]:
    """Plan the privacy of ``model``'s training, then train it with the one loop (or, on
    a dry run, stop after planning). Returns the run's record; the caller writes it.
    ``loggers`` (the ``logger`` group's, :mod:`dp_sweeps.training.loggers`) stay open for
    the caller to log the final record; without them the run opens and closes its own.
    ``epoch_callbacks`` go to :func:`dp_sweeps.training.loop.fit` (e.g. a search trial's pruning)."""
    model_name = model_name or cfg.model.name
    noise_seed = cfg.privacy.noise_seed
    # DP data normalisation (model.norm=data): released before training, charged to ε.
    prior_releases = fit_data_normalization(model, data.train_x, private=bool(cfg.privacy.enabled),
                                            settings=cfg.privacy.get("data_norm"), noise_seed=noise_seed)
    # ... after any release made while preparing the data (data.normalization=dp).
    prior_releases = tuple(getattr(data, "prior_releases", ())) + prior_releases
    # A reduced-batch search trial (search.batch_scale k > 1) runs the trainer's B and E, already
    # divided by k (dp_sweeps.sweeps.reduced_batch), with σ/k of the full run's σ.
    plan = plan_privacy(cfg.privacy, num_train=data.num_train, batch_size=cfg.trainer.batch_size,
                        epochs=cfg.trainer.epochs, prior_releases=prior_releases, batch_scale=batch_scale(cfg))
    # Only the trainable parameters (model.trainable): frozen ones get no update, noise or per-example gradient.
    optimizer = build_optimizer(cfg.optimizer, trainable_parameters(model))
    grad_sample_mode = (resolve_grad_sample_mode(cfg.privacy.grad_sample_mode, model_name, mechanism=plan.mechanism)
                        if plan.private else None)
    if plan.private:  # a BatchNorm computing batch statistics mixes examples: refused, and guarded at run time
        refuse_batch_statistics(model)
        refuse_unsupported_layers(model, grad_sample_mode=grad_sample_mode)
        guard_batch_statistics(model)
    result: dict[str, Any] = {
        "experiment": cfg.get("experiment_name"), "model": model_name,
        "optimizer": _choice("optimizer") or cfg.optimizer._target_.rsplit(".", 1)[-1].lower(),
        "lr": cfg.optimizer.get("lr"), "private": plan.private, "mechanism": plan.mechanism,
        "accountant": plan.accountant,
        "target_epsilon": plan.target_epsilon, "planned_epsilon": plan.planned_epsilon, "delta": plan.delta,
        "noise_multiplier": plan.noise_multiplier, "max_grad_norm": plan.max_grad_norm,
        "sample_rate": plan.sample_rate, "poisson_sampling": plan.poisson_sampling,
        "epsilon_valid": plan.private and plan.poisson_sampling and noise_seed is None,
        "batch_size": cfg.trainer.batch_size, "physical_batch_size": cfg.trainer.physical_batch_size,
        "epochs": cfg.trainer.epochs, "planned_steps": plan.steps, "seed": cfg.seed,
        "grad_sample_mode": grad_sample_mode, "num_train": data.num_train, "num_val": len(data.val_y),
        "num_test": len(data.test_y), "device": str(device), "world_size": distributed.world_size(),
        "host": platform.node(), "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": count_trainable(model),
        "torch_version": torch.__version__, "precision": cfg.trainer.get("precision", "fp32"),
        "tf32": bool(cfg.trainer.tf32) and device.type == "cuda",
        "prior_releases": [list(r) for r in plan.prior_releases] or None,
    }
    if plan.private and noise_seed is not None:
        log.warning("privacy.noise_seed is set: the noise and the sampling can be replayed by anyone who reads "
                    "the config, so the reported ε is NOT a guarantee (epsilon_valid=false); for debugging only")
    if plan.private and not plan.poisson_sampling:
        log.warning("privacy.poisson_sampling=false: the reported ε assumes Poisson sampling and is "
                    "NOT a valid guarantee for shuffled fixed-size batches (epsilon_valid=false)")
    if plan.batch_scale != 1:  # a reduced-batch trial: the full run it stands for
        result.update(batch_scale=plan.batch_scale, full_scale=plan.full_scale)
    if cfg.dry_run:
        if plan.private and plan.mechanism == "gaussian":  # the spread between accountants, for the planned run
            result["epsilon_cross_check"] = cross_check_epsilon(
                noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps,
                delta=plan.delta, prior=plan.prior_releases)
            log.info("ε of the planned run: %s", ", ".join(
                f"{k} {'n/a' if v is None else format(v, '.3f')}" for k, v in result["epsilon_cross_check"].items()))
        log.info("dry run: σ=%s, planned ε=%s over %d steps", plan.noise_multiplier, plan.planned_epsilon, plan.steps)
        return {**result, "status": "planned", "epsilon": plan.planned_epsilon, "steps": 0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    configure_backend(device, tf32=cfg.trainer.tf32,
                      reuse_cpu_memory=cfg.trainer.reuse_cpu_memory)
    settings = loop_settings(cfg, grad_sample_mode=grad_sample_mode or "hooks")
    identity = {key: result.get(key) for key in ckpt.PRIVACY_KEYS}
    # A resumed run rewrites metrics.csv from its checkpoint's history (rows written after
    # the checkpoint by the interrupted attempt are dropped, as their steps are redone).
    metrics = None
    if distributed.is_main_process():
        metrics = loggers if loggers is not None else open_loggers(cfg, run_dir=output_dir)
        metrics.log_params(run_params(cfg, result))  # the config and the mechanism (σ, q, C, δ, ...)
    ok = False
    try:
        outcome = fit(model=model, optimizer=optimizer, data=data.to(device), plan=plan, settings=settings,
                      device=device, criterion=criterion, metrics=metrics, run_dir=output_dir,
                      run_identity=identity, epoch_callbacks=epoch_callbacks)
        ok = True
    finally:
        if metrics is not None and loggers is None:
            metrics.close(ok=ok)
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
    tuning = cfg.get("tuning")
    if (plan.private and tuning is not None and tuning.get("score_noise") is not None
            and outcome.status == "completed" and distributed.is_main_process()):
        # A trial of hparams_search=private_tuning: its score is a DP release (noisy count on
        # the validation split) and its weights are kept for the sweeper to release or not.
        result.update(noisy_score_record(val_accuracy=last["val_accuracy"], num_val=len(data.val_y),
                                         mechanism=str(tuning.score_mechanism), noise=float(tuning.score_noise),
                                         noise_seed=noise_seed))
        torch.save(model.state_dict(), Path(output_dir) / "model.pt")
    return result
