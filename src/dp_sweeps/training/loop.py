"""The one training loop, shared by every deep model, by DP-SGD and by ``privacy=none``.

:func:`fit` reads top-down: wrap the objects (:func:`_wrap`), restore a checkpoint
(:func:`_restore`), then per epoch train (:func:`_train_epoch`), evaluate and save.
The two DP-critical cases of a step are in :func:`_forward_backward` and
:func:`_train_epoch`: an empty Poisson batch still takes a (noise-only) step, and a
physical batch that does not end its logical batch takes none.

Data stay as tensors on the training device; a loader over example *indices* drives
sampling (our Poisson sampler when private, shuffled batches otherwise), and Opacus's
BatchMemoryManager splits large logical batches into physical ones. Augmentation
multiplicity, EMA and checkpoint/resume leave the mechanism unchanged (see docstrings).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dp_sweeps.data import ImageData, random_crop_flip
from dp_sweeps.errors import ConfigError
from dp_sweeps.grad_sample.bookkeeping import FactoredGradSample
from dp_sweeps.privacy.engine import make_private
from dp_sweeps.privacy.plan import PrivacyPlan
from dp_sweeps.privacy.randomness import mechanism_generator
from dp_sweeps.privacy.sampling import shuffled_index_loader
from dp_sweeps.training import checkpoint as ckpt
from dp_sweeps.training import distributed
from dp_sweeps.training.ema import averaged_model
from dp_sweeps.training.estimate import RunClock, estimate_message, faster_ways_hint, format_duration
from dp_sweeps.training.evaluate import evaluate
from dp_sweeps.training.precision import autocast, per_example_math_in_fp32
from dp_sweeps.training.results import NON_PRIVATE, MetricsLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    """The settings the loop reads; built from the config by
    :func:`dp_sweeps.training.network.loop_settings` (conf/trainer/default.yaml holds the
    defaults, once)."""

    epochs: int
    batch_size: int
    physical_batch_size: Optional[int]
    seed: int
    grad_sample_mode: str
    augment: bool
    augmult: int
    ema_decay: Optional[float]
    noise_seed: Optional[int]  # debugging only: replays the mechanism (dp_sweeps.privacy.randomness)
    non_private_stats: bool  # training loss/accuracy: functions of the private batches, outside the guarantee
    eval_batch_size: int
    progress: bool
    checkpoint_every: int
    resume: bool
    channels_last: bool
    precision: str = "fp32"  # fp32 | bf16 (dp_sweeps.training.precision)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


class StopTraining(Exception):
    """Raised by an epoch callback (``fit(epoch_callbacks=...)``) to end training cleanly
    after the current epoch, with ``status`` as the run's status (e.g. ``"pruned"`` by an
    Optuna pruner, :mod:`dp_sweeps.sweeps.pruning`). The epochs already trained stand: ε
    is the accountant's for the steps taken."""

    def __init__(self, status: str, reason: str = "") -> None:
        super().__init__(reason or status)
        self.status = status


@dataclass
class TrainingOutcome:
    status: str  # "completed", "diverged", or a StopTraining status such as "pruned"
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    samples_seen: int = 0
    train_seconds: float = 0.0
    epsilon: Optional[float] = None
    resumed_from_epoch: int = 0

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


@dataclass
class _Wrapped:
    """The objects one run trains with, after Opacus (and DDP) wrapped them."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    eval_criterion: nn.Module  # before Opacus may wrap it (ghost clipping)
    loader: DataLoader
    engine: Any  # Opacus's PrivacyEngine, or None without DP
    ema: Optional[nn.Module]
    generators: dict[str, torch.Generator]

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "original_optimizer", self.optimizer)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model


def _physical_batches(loader: DataLoader, *, cap: int, private: bool,
                      optimizer: torch.optim.Optimizer) -> Iterator[tuple[torch.Tensor, float, bool]]:
    """Yield (indices, loss weight, take a step) per physical batch.

    Private: Opacus's BatchMemoryManager tells the DPOptimizer which physical batches
    end a logical one (it clips each, accumulates, and noises once per logical batch).
    Non-private: plain gradient accumulation with losses weighted by chunk size; with
    several processes each takes its slice of the logical batch (DDP averages).
    """
    rank, world = distributed.rank(), distributed.world_size()
    if private:
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=cap, optimizer=optimizer) as batches:
            for (idx,) in batches:
                yield idx, 1.0, True
        return
    for (idx,) in loader:
        idx = idx[rank::world]
        chunks = idx.split(cap) if len(idx) else (idx,)
        for k, chunk in enumerate(chunks):
            yield chunk, len(chunk) / len(idx), k == len(chunks) - 1


def average_augmented_copies(module: nn.Module, copies: int) -> None:
    """Augmentation multiplicity (De et al. 2022): each example enters the batch as
    ``copies`` augmented views; average their per-example gradients *before* clipping,
    so each example still contributes one gradient of norm ≤ C (sensitivity unchanged).
    Factored gradients (book-keeping clipping) are built first: the norm of an average is
    not the average of the copies' norms."""
    for p in module.parameters():
        grad_sample = getattr(p, "grad_sample", None)
        if isinstance(grad_sample, FactoredGradSample):
            grad_sample = grad_sample.materialize()
        if isinstance(grad_sample, torch.Tensor):
            p.grad_sample = grad_sample.reshape(-1, copies, *grad_sample.shape[1:]).mean(1)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The plain model inside Opacus's GradSampleModule and (DP-)DDP wrappers."""
    while True:
        inner = getattr(model, "_module", None)
        if inner is None and isinstance(model, (DPDDP, nn.parallel.DistributedDataParallel)):
            inner = model.module
        if inner is None:
            return model
        model = inner


def _wrap(*, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, data: ImageData,
          plan: PrivacyPlan, settings: LoopSettings, device: torch.device) -> _Wrapped:
    """Generators, EMA copy, DDP and Opacus around the caller's objects."""
    rank, world = distributed.rank(), distributed.world_size()
    # The mechanism's noise and sampling coins are secret: fresh OS entropy per run, stream
    # and rank (dp_sweeps.privacy.randomness), never ``seed``. ``seed`` fixes augmentation and
    # the non-private data order (the same on every rank: each takes its slice of a batch).
    generators = {"augment": torch.Generator(device=device).manual_seed(settings.seed + 3)}
    if plan.private:
        generators["noise"] = mechanism_generator("noise", noise_seed=settings.noise_seed, rank=rank, device=device)
        generators["sampler"] = mechanism_generator("sampler", noise_seed=settings.noise_seed, rank=rank)
    else:
        generators["order"] = torch.Generator().manual_seed(settings.seed + 1)
    # The EMA copy is taken before Opacus attaches its hooks, so it carries none.
    ema = averaged_model(model, settings.ema_decay) if settings.ema_decay is not None else None
    if world > 1:
        # Non-private: DDP averages gradients. Private: DPDDP only syncs the start weights;
        # the DistributedDPOptimizer sums clipped gradients and rank 0's noise.
        model = DPDDP(model) if plan.private else nn.parallel.DistributedDataParallel(model)
    eval_criterion, engine = criterion, None
    if plan.private:
        engine, model, optimizer, criterion, loader = make_private(
            plan=plan, module=model, optimizer=optimizer, criterion=criterion, num_samples=data.num_train,
            grad_sample_mode=settings.grad_sample_mode, noise_generator=generators["noise"],
            sampler_generator=generators["sampler"], rank=rank, world_size=world)
        if settings.precision != "fp32" and not per_example_math_in_fp32(model):
            raise ConfigError(f"trainer.precision={settings.precision} needs Opacus's hooks for per-example "
                              f"gradients in fp32: use privacy.grad_sample_mode hooks, functorch or ghost, "
                              f"not {settings.grad_sample_mode!r}")
    else:
        loader = shuffled_index_loader(num_samples=data.num_train, batch_size=settings.batch_size,
                                       generator=generators["order"])
    return _Wrapped(model=model, optimizer=optimizer, criterion=criterion, eval_criterion=eval_criterion,
                    loader=loader, engine=engine, ema=ema, generators=generators)


def _restore(run: _Wrapped, *, run_dir, settings: LoopSettings, identity: Mapping[str, Any],
             metrics: Optional[MetricsLog], outcome: TrainingOutcome) -> int:
    """Continue from ``run_dir``'s checkpoint when resuming: weights, optimizer, the
    accountant's ledger, EMA and every generator's state (continued, never redrawn).
    Returns the first epoch to train."""
    saved = ckpt.maybe_load(run_dir, resume=settings.resume)
    if saved is None:
        return 1
    path = ckpt.checkpoint_path(run_dir)
    ckpt.check_privacy_settings(saved["identity"], identity, path=path)
    rank, world = distributed.rank(), distributed.world_size()
    rng_by_rank = saved["rng_by_rank"]
    if len(rng_by_rank) != world:
        raise ConfigError(f"checkpoint {path} was written by {len(rng_by_rank)} processes, this run has {world}: "
                          f"resume with the same number")
    _unwrapped(run.model).load_state_dict(saved["model"])
    run.base_optimizer.load_state_dict(saved["optimizer"])
    if run.engine is not None:
        run.engine.accountant.load_state_dict(saved["accountant"])
    if run.ema is not None and "ema" in saved:
        run.ema.load_state_dict(saved["ema"])
    ckpt.restore_generator_states(rng_by_rank[rank], run.generators)  # each rank its own streams
    outcome.history = list(saved["history"])
    if metrics is not None and rank == 0:  # rows after the checkpoint were never kept
        for row in outcome.history:
            metrics.write(row)
    outcome.steps, outcome.samples_seen = int(saved["steps"]), int(saved["samples_seen"])
    outcome.train_seconds, outcome.epsilon = float(saved["train_seconds"]), saved.get("epsilon")
    outcome.resumed_from_epoch = int(saved["epoch"]) + 1
    log.info("resumed from %s after epoch %d (%d steps)", path, saved["epoch"], outcome.steps)
    return outcome.resumed_from_epoch


def _forward_backward(run: _Wrapped, x: torch.Tensor, y: torch.Tensor, *, weight: float, private: bool,
                      settings: LoopSettings) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Per-example gradients of one physical batch (or summed ones without DP); returns
    (logits, loss), or None for an empty private batch.

    An empty Poisson batch still takes a (pure-noise) step: skipping it would reveal that
    the batch was empty. The hooks, ew and functorch engines get empty per-example
    gradients directly (no forward on zero examples needed); ghost clipping runs its
    two backward passes on the empty batch (dp_sweeps.grad_sample handles zero rows).
    """
    if len(y) == 0 and private and settings.grad_sample_mode != "ghost":
        for p in run.optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
        return None
    # Autocast around the forward only: the backward follows its dtypes (bf16 where the
    # forward ran in bf16) and the hooks hand the per-example math fp32 tensors.
    with autocast(settings.precision, x.device):
        logits = run.model(x)
        loss = run.criterion(logits, y)
    (loss * weight).backward()
    if settings.augmult > 1 and private:
        average_augmented_copies(run.model, settings.augmult)
    return logits, loss


def _train_epoch(run: _Wrapped, *, epoch: int, data: ImageData, plan: PrivacyPlan, settings: LoopSettings,
                 device: torch.device, outcome: TrainingOutcome, clock: RunClock) -> tuple[dict, bool]:
    """One pass of ``plan.steps_per_epoch`` logical steps. Returns the epoch's non-private
    statistics (empty unless ``settings.non_private_stats``) and whether it diverged.
    ``clock`` times the steps: the whole run's estimate is logged after the first few."""
    copies = settings.augmult
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(total=plan.steps_per_epoch, desc=f"epoch {epoch}/{settings.epochs}", leave=False,
               disable=not settings.progress, unit="step")
    diverged = False
    batches = _physical_batches(run.loader, cap=settings.physical_batch_size or settings.batch_size,
                                private=plan.private, optimizer=run.optimizer)
    for idx, weight, take_step in batches:
        idx = idx.to(device, non_blocking=True)
        x, y = data.train_x[idx], data.train_y[idx]
        if copies > 1:
            x, y = x.repeat_interleave(copies, 0), y.repeat_interleave(copies, 0)
        if settings.augment:
            x = random_crop_flip(x, generator=run.generators["augment"], flip=data.facts.hflip_preserves_label)
        output = _forward_backward(run, x.contiguous(memory_format=settings.memory_format), y, weight=weight,
                                   private=plan.private, settings=settings)
        if output is not None and len(y) > 0:  # an empty batch's loss is nan by definition, not divergence
            logits, loss = output
            if not torch.isfinite(loss.detach()):
                diverged = True
                break
            seen += len(y)
            if settings.non_private_stats:  # functions of the private batches (not DP)
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
        if not take_step:
            continue
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        if plan.private and getattr(run.optimizer, "_is_last_step_skipped", False):
            continue  # a physical batch inside a logical one: clipped and accumulated, no step
        outcome.steps += 1
        if run.ema is not None:
            run.ema.update_parameters(_unwrapped(run.model))
        clock.step_done()
        if clock.wants_estimate():
            _log_run_estimate(run, clock=clock, data=data, settings=settings, device=device)
        if settings.progress:  # before update(), which draws the bar with it
            bar.set_postfix_str(f"run ETA {format_duration(clock.remaining_seconds(steps_into_epoch=bar.n + 1))}",
                                refresh=False)
        bar.update(1)
    bar.close()
    outcome.samples_seen += seen // copies
    stats = {}
    if settings.non_private_stats:
        stats = {f"{NON_PRIVATE}_train_loss": loss_sum / seen if seen else math.nan,
                 f"{NON_PRIVATE}_train_accuracy": correct / seen if seen else math.nan}
    return stats, diverged


def _evaluate_splits(run: _Wrapped, *, data: ImageData, settings: LoopSettings, limit: Optional[int] = None) -> dict:
    """Loss and accuracy on the validation and test sets (the first ``limit`` images of
    each when given), under the run's precision."""
    row = {}
    with autocast(settings.precision, data.train_x.device):
        for split in ("val", "test"):
            x, y, mirror = (getattr(data, f"{split}_x"), getattr(data, f"{split}_y"),
                            getattr(data, f"{split}_x_mirror"))
            if limit is not None:
                x, y, mirror = x[:limit], y[:limit], (None if mirror is None else mirror[:limit])
            row[f"{split}_loss"], row[f"{split}_accuracy"] = evaluate(
                run.eval_model, x, y, batch_size=settings.eval_batch_size, memory_format=settings.memory_format,
                criterion=run.eval_criterion, x_mirror=mirror)
    return row


def _eval_images_per_epoch(data: ImageData) -> int:
    return sum(len(getattr(data, f"{split}_y")) * (1 if getattr(data, f"{split}_x_mirror") is None else 2)
               for split in ("val", "test"))


def _log_run_estimate(run: _Wrapped, *, clock: RunClock, data: ImageData, settings: LoopSettings,
                      device: torch.device) -> None:
    """Log the whole run's estimated time, with evaluation timed on one small batch of
    the held-out images (post-processing: no privacy cost), and on a machine without
    CUDA a hint when it is over an hour."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the timed steps' queued work
    per_step = clock.seconds_per_step()  # before the probe below adds its own time
    probe = min(settings.eval_batch_size, 256)
    started = time.perf_counter()
    _evaluate_splits(run, data=data, settings=settings, limit=probe)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    probe_seconds = time.perf_counter() - started
    clock.exclude(probe_seconds)  # not a training step's time
    probed_images = sum(min(len(getattr(data, f"{split}_y")), probe)
                        * (1 if getattr(data, f"{split}_x_mirror") is None else 2) for split in ("val", "test"))
    eval_per_image = probe_seconds / probed_images if probed_images else 0.0
    estimate = clock.estimate(eval_seconds_per_image=eval_per_image, seconds_per_step=per_step)
    if not distributed.is_main_process():
        return
    log.info("%s", estimate_message(estimate))
    hint = faster_ways_hint(estimate, cuda_available=torch.cuda.is_available())
    if hint is not None:
        log.warning("%s", hint)


def _save(run: _Wrapped, *, run_dir, epoch: int, identity: Mapping[str, Any], outcome: TrainingOutcome) -> None:
    """Write the checkpoint (rank 0), with every rank's generator states (a collective).
    It holds the mechanism's generator states: a checkpoint is a secret, like the data."""
    rng_by_rank = distributed.gather_objects(ckpt.generator_states(run.generators))
    if distributed.rank() != 0:
        return
    ckpt.save_checkpoint(ckpt.checkpoint_path(run_dir), {
        "identity": dict(identity), "epoch": epoch, "steps": outcome.steps, "samples_seen": outcome.samples_seen,
        "train_seconds": outcome.train_seconds, "epsilon": outcome.epsilon, "history": outcome.history,
        "model": _unwrapped(run.model).state_dict(), "optimizer": run.base_optimizer.state_dict(),
        "accountant": run.engine.accountant.state_dict() if run.engine is not None else {},
        **({"ema": run.ema.state_dict()} if run.ema is not None else {}),
        "rng_by_rank": rng_by_rank})


def fit(*, model: nn.Module, optimizer: torch.optim.Optimizer, data: ImageData, plan: PrivacyPlan,
        settings: LoopSettings, device: torch.device, criterion: Optional[nn.Module] = None,
        metrics: Optional[MetricsLog] = None, run_dir: Optional[str | os.PathLike] = None,
        run_identity: Optional[Mapping[str, Any]] = None,
        epoch_callbacks: Sequence[Callable[[dict], None]] = ()) -> TrainingOutcome:
    """Train ``model`` for ``settings.epochs`` and evaluate after each epoch.

    ``epoch_callbacks``: each is called with the epoch's metrics row once it is written;
    one that raises :class:`StopTraining` ends the run there with that status.

    With ``plan.private`` the run is DP-SGD as :mod:`dp_sweeps.privacy` states; ε after
    each epoch is the accountant's, for the steps actually taken. A non-finite output
    stops the run with status ``diverged``. Evaluation uses the EMA weights when
    ``ema_decay`` is set (post-processing of the private iterates: no privacy cost).
    """
    if settings.augmult > 1 and plan.private and settings.grad_sample_mode == "ghost":
        raise ConfigError("trainer.augmult>1 needs per-example gradients: use privacy.grad_sample_mode "
                          "hooks, functorch or ew, not 'ghost'")
    # Opacus's hooks fire on the first layer although its input needs no gradient: harmless.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    # PRV evaluates log(1 - q) for a release over the whole set (q = 1, data normalisation): -inf is right there.
    warnings.filterwarnings("ignore", message="divide by zero encountered in log", category=RuntimeWarning,
                            module=r"opacus\.accountants\.analysis\.prv")
    model.to(device=device, memory_format=settings.memory_format).train()
    run = _wrap(model=model, optimizer=optimizer, criterion=criterion or nn.CrossEntropyLoss(), data=data,
                plan=plan, settings=settings, device=device)
    outcome = TrainingOutcome(status="completed")
    identity = dict(run_identity or {})
    start = _restore(run, run_dir=run_dir, settings=settings, identity=identity, metrics=metrics, outcome=outcome)
    clock = RunClock(steps_per_epoch=plan.steps_per_epoch, epochs_left=settings.epochs - start + 1,
                     eval_images_per_epoch=_eval_images_per_epoch(data))
    for epoch in range(start, settings.epochs + 1):
        epoch_start = time.perf_counter()
        excluded_before = clock.excluded_seconds
        stats, diverged = _train_epoch(run, epoch=epoch, data=data, plan=plan, settings=settings, device=device,
                                       outcome=outcome, clock=clock)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # count the last step's queued GPU work
        # Training time only: the estimate's evaluation probe is left out.
        epoch_train_seconds = time.perf_counter() - epoch_start - (clock.excluded_seconds - excluded_before)
        outcome.train_seconds += epoch_train_seconds
        eval_start = time.perf_counter()  # the epoch's work after training: accounting and evaluation
        if run.engine is not None:
            # DP-SGD's steps: the ledger less the releases made before training (its first entries).
            outcome.steps = (sum(n for _, _, n in run.engine.accountant.history)
                             - sum(n for _, _, n in plan.prior_releases))
            outcome.epsilon = float(run.engine.get_epsilon(plan.delta))
        row = {"epoch": epoch, "step": outcome.steps, "epsilon": outcome.epsilon, **stats}
        row.update(_evaluate_splits(run, data=data, settings=settings))
        row["seconds"] = time.perf_counter() - epoch_start
        clock.epoch_done(train_seconds=epoch_train_seconds, eval_seconds=time.perf_counter() - eval_start)
        outcome.history.append(row)
        if metrics is not None and distributed.rank() == 0:
            metrics.write(row)
        log.info("epoch %d/%d: val_accuracy=%.4f test_accuracy=%.4f epsilon=%s; rest of the run: about %s",
                 epoch, settings.epochs, row["val_accuracy"], row["test_accuracy"],
                 "n/a" if outcome.epsilon is None else f"{outcome.epsilon:.3f}",
                 format_duration(clock.remaining_seconds()))
        if diverged:
            outcome.status = "diverged"
            log.warning("non-finite loss in epoch %d: the run diverged", epoch)
            break
        try:
            for callback in epoch_callbacks:
                callback(dict(row))
        except StopTraining as stop:
            outcome.status = stop.status
            log.info("training stopped after epoch %d: %s", epoch, stop)
            break
        if run_dir is not None and settings.checkpoint_every and (
                epoch % settings.checkpoint_every == 0 or epoch == settings.epochs):
            _save(run, run_dir=run_dir, epoch=epoch, identity=identity, outcome=outcome)
    return outcome
