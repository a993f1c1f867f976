"""The one training loop, shared by every deep model, by DP-SGD and by ``privacy=none``.

Data stay as tensors on the training device; a loader over example *indices* drives
sampling (Opacus's Poisson sampler when private, shuffled batches otherwise), and
Opacus's BatchMemoryManager splits large logical batches into physical ones. The loop
also does augmentation multiplicity, parameter EMA and checkpoint/resume, each of
which leaves the DP mechanism unchanged (see the docstrings).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.nn as nn
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dp_sweeps import checkpoint as ckpt
from dp_sweeps import distributed
from dp_sweeps.bookkeeping import FactoredGradSample
from dp_sweeps.data import ImageData, random_crop_flip
from dp_sweeps.errors import ConfigError
from dp_sweeps.privacy import PrivacyPlan, make_private
from dp_sweeps.randomness import mechanism_generator
from dp_sweeps.sampling import shuffled_index_loader
from dp_sweeps.results import NON_PRIVATE, MetricsLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    """The ``trainer.*`` settings the loop reads (see conf/trainer/default.yaml)."""

    epochs: int
    batch_size: int
    physical_batch_size: Optional[int] = None
    seed: int = 0
    grad_sample_mode: str = "hooks"
    augment: bool = False
    augmult: int = 1
    ema_decay: Optional[float] = None
    noise_seed: Optional[int] = None  # debugging only: replays the mechanism (dp_sweeps.randomness)
    # Training loss/accuracy: functions of the private batches, outside the guarantee.
    non_private_stats: bool = False
    eval_batch_size: int = 1024
    progress: bool = True
    checkpoint_every: int = 0
    resume: bool = False
    channels_last: bool = False


@dataclass
class TrainingOutcome:
    status: str  # "completed" or "diverged"
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    samples_seen: int = 0
    train_seconds: float = 0.0
    epsilon: Optional[float] = None
    resumed_from_epoch: int = 0

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def configure_backend(device: torch.device, *, tf32: bool = True, reuse_cpu_memory: bool = False) -> None:
    """TF32 matmuls/convolutions on CUDA (Ampere and newer): faster, and DP noise dwarfs
    its rounding. On CPU, ``reuse_cpu_memory``: :func:`keep_freed_cpu_memory`."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True
    elif reuse_cpu_memory:
        keep_freed_cpu_memory()


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of unmapping it.

    Per-example gradients are large short-lived blocks (ResNet-18, 64 examples: 2.8 GB
    per physical batch). glibc serves each block over 32 MB with a fresh ``mmap`` and
    returns it on free, so every step page-faults and zeroes gigabytes again; with
    ``mmap`` off for malloc and no trimming, the blocks are reused. Measured (ResNet-18,
    CPU, 1 thread, batch 64): 5.09 -> 4.07 s per DP step, non-private unchanged. The cost:
    the process keeps its peak memory, and the heap fragments: a benchmark process running
    EfficientNet non-private then with Opacus's hooks peaked at 15 GB instead of 9.3 GB, and
    one running more repeats was killed for memory. Hence opt-in (``trainer.reuse_cpu_memory``).
    Process-wide and not undone. Returns False where this is not glibc (no effect)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024,
             memory_format: torch.memory_format = torch.contiguous_format,
             criterion: Optional[nn.Module] = None, x_mirror: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """Mean loss (the training criterion, cross-entropy by default) and accuracy of
    ``model`` on (x, y); (nan, nan) if empty. With ``x_mirror`` (the inputs of the
    mirrored images) the prediction is the mean of the two logits (test-time flip
    averaging: post-processing of the trained model, no privacy cost)."""
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    if len(y) == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size].contiguous(memory_format=memory_format))
        if x_mirror is not None:
            logits = (logits + model(x_mirror[start:start + batch_size].contiguous(memory_format=memory_format))) / 2
        target = y[start:start + batch_size]
        loss_sum += criterion(logits, target).item() * len(target)
        correct += (logits.argmax(1) == target).sum().item()
    model.train(was_training)
    return loss_sum / len(y), correct / len(y)


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


def _ema_with_warmup(decay: float):
    """EMA update with De et al.'s warm-up, decay_t = min(decay, (1 + t) / (10 + t))."""
    def update(ema_params, params, num_averaged):
        t = int(num_averaged)
        d = min(decay, (1 + t) / (10 + t))
        pairs = list(zip(ema_params, params))
        floating = [(e, p) for e, p in pairs if e.is_floating_point()]
        if floating:
            torch._foreach_lerp_([e for e, _ in floating], [p for _, p in floating], 1.0 - d)
        for e, p in pairs:  # integer/bool buffers (counters, flags) are copied, not averaged
            if not e.is_floating_point():
                e.copy_(p)
    return update


def _unwrapped(model: nn.Module) -> nn.Module:
    """The plain model inside Opacus's GradSampleModule and (DP-)DDP wrappers."""
    while True:
        inner = getattr(model, "_module", None)
        if inner is None and isinstance(model, (DPDDP, nn.parallel.DistributedDataParallel)):
            inner = model.module
        if inner is None:
            return model
        model = inner


def fit(*, model: nn.Module, optimizer: torch.optim.Optimizer, data: ImageData, plan: PrivacyPlan,
        settings: LoopSettings, device: torch.device, criterion: Optional[nn.Module] = None,
        metrics: Optional[MetricsLog] = None, run_dir: Optional[str | os.PathLike] = None,
        run_identity: Optional[Mapping[str, Any]] = None) -> TrainingOutcome:
    """Train ``model`` for ``settings.epochs`` and evaluate after each epoch.

    With ``plan.private`` the run is DP-SGD as :mod:`dp_sweeps.privacy` states; ε after
    each epoch is the accountant's, for the steps actually taken. A non-finite loss
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
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format).train()
    rank, world = distributed.rank(), distributed.world_size()
    # The mechanism's noise and sampling coins are secret: fresh OS entropy per run, stream
    # and rank (dp_sweeps.randomness), never ``seed``. ``seed`` fixes augmentation and the
    # non-private data order (the same on every rank: each takes its slice of a batch).
    generators = {"augment": torch.Generator(device=device).manual_seed(settings.seed + 3)}
    if plan.private:
        generators["noise"] = mechanism_generator("noise", noise_seed=settings.noise_seed, rank=rank, device=device)
        generators["sampler"] = mechanism_generator("sampler", noise_seed=settings.noise_seed, rank=rank)
    else:
        generators["order"] = torch.Generator().manual_seed(settings.seed + 1)
        loader = shuffled_index_loader(num_samples=data.num_train, batch_size=settings.batch_size,
                                       generator=generators["order"])
    criterion = criterion or nn.CrossEntropyLoss()
    eval_criterion = criterion  # before Opacus may wrap it (ghost clipping)
    # The EMA copy is taken before Opacus attaches its hooks, so it carries none.
    ema = None
    if settings.ema_decay is not None:
        ema = AveragedModel(model, multi_avg_fn=_ema_with_warmup(settings.ema_decay), use_buffers=True)
    if world > 1:
        # Non-private: DDP averages gradients. Private: DPDDP only syncs the start weights;
        # the DistributedDPOptimizer sums clipped gradients and rank 0's noise.
        model = DPDDP(model) if plan.private else nn.parallel.DistributedDataParallel(model)
    engine = None
    if plan.private:
        engine, model, optimizer, criterion, loader = make_private(
            plan=plan, module=model, optimizer=optimizer, criterion=criterion, num_samples=data.num_train,
            grad_sample_mode=settings.grad_sample_mode, noise_generator=generators["noise"],
            sampler_generator=generators["sampler"])
    outcome = TrainingOutcome(status="completed")
    identity = dict(run_identity or {})
    base_optimizer = getattr(optimizer, "original_optimizer", optimizer)
    start_epoch = 1
    saved = ckpt.maybe_load(run_dir, resume=settings.resume)
    if saved is not None:
        path = ckpt.checkpoint_path(run_dir)
        ckpt.check_privacy_settings(saved["identity"], identity, path=path)
        _unwrapped(model).load_state_dict(saved["model"])
        base_optimizer.load_state_dict(saved["optimizer"])
        if engine is not None:
            engine.accountant.load_state_dict(saved["accountant"])
        if ema is not None and "ema" in saved:
            ema.load_state_dict(saved["ema"])
        rng_by_rank = saved["rng_by_rank"]
        if len(rng_by_rank) != world:
            raise ConfigError(f"checkpoint {path} was written by {len(rng_by_rank)} processes, this run has {world}: "
                              f"resume with the same number")
        ckpt.restore_generator_states(rng_by_rank[rank], generators)  # each rank its own streams
        outcome.history = list(saved["history"])
        if metrics is not None and rank == 0:  # rows after the checkpoint were never kept
            for row in outcome.history:
                metrics.write(row)
        outcome.steps, outcome.samples_seen = int(saved["steps"]), int(saved["samples_seen"])
        outcome.train_seconds, outcome.epsilon = float(saved["train_seconds"]), saved.get("epsilon")
        start_epoch = outcome.resumed_from_epoch = int(saved["epoch"]) + 1
        log.info("resumed from %s after epoch %d (%d steps)", path, saved["epoch"], outcome.steps)
    cap = settings.physical_batch_size or settings.batch_size
    copies = settings.augmult
    eval_model = ema.module if ema is not None else model
    for epoch in range(start_epoch, settings.epochs + 1):
        epoch_start = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(total=plan.steps_per_epoch, desc=f"epoch {epoch}/{settings.epochs}", leave=False,
                   disable=not settings.progress, unit="step")
        diverged = False
        for idx, weight, take_step in _physical_batches(loader, cap=cap, private=plan.private, optimizer=optimizer):
            idx = idx.to(device, non_blocking=True)
            x, y = data.train_x[idx], data.train_y[idx]
            if copies > 1:
                x, y = x.repeat_interleave(copies, 0), y.repeat_interleave(copies, 0)
            if settings.augment:
                x = random_crop_flip(x, generator=generators["augment"])
            if len(y) == 0 and plan.private and settings.grad_sample_mode != "ghost":
                # An empty Poisson batch still takes a (pure-noise) step: skipping it would
                # reveal that the batch was empty. Some engines cannot run an empty forward,
                # so hand the optimizer empty per-example gradients directly.
                for p in optimizer.params:
                    p.grad_sample = p.new_zeros((0, *p.shape))
            else:
                logits = model(x.contiguous(memory_format=memory_format))
                loss = criterion(logits, y)
                if len(y) > 0:  # an empty batch's loss is nan by definition, not divergence
                    if not torch.isfinite(loss.detach()):
                        diverged = True
                        break
                    seen += len(y)
                    if settings.non_private_stats:  # functions of the private batches (not DP)
                        loss_sum += loss.item() * len(y)
                        correct += (logits.argmax(1) == y).sum().item()
                (loss * weight).backward()
                if copies > 1 and plan.private:
                    average_augmented_copies(model, copies)
            if take_step:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if plan.private and getattr(optimizer, "_is_last_step_skipped", False):
                    continue
                outcome.steps += 1
                if ema is not None:
                    ema.update_parameters(_unwrapped(model))
                bar.update(1)
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # count the last step's queued GPU work
        outcome.train_seconds += time.perf_counter() - epoch_start
        outcome.samples_seen += seen // copies
        if engine is not None:
            # DP-SGD's steps: the ledger less the releases made before training (its first entries).
            outcome.steps = (sum(n for _, _, n in engine.accountant.history)
                             - sum(n for _, _, n in plan.prior_releases))
            outcome.epsilon = float(engine.get_epsilon(plan.delta))
        row = {"epoch": epoch, "step": outcome.steps, "epsilon": outcome.epsilon}
        if settings.non_private_stats:
            row.update({f"{NON_PRIVATE}_train_loss": loss_sum / seen if seen else math.nan,
                        f"{NON_PRIVATE}_train_accuracy": correct / seen if seen else math.nan})
        row["val_loss"], row["val_accuracy"] = evaluate(eval_model, data.val_x, data.val_y,
                                                        batch_size=settings.eval_batch_size, memory_format=memory_format,
                                                        criterion=eval_criterion, x_mirror=data.val_x_mirror)
        row["test_loss"], row["test_accuracy"] = evaluate(eval_model, data.test_x, data.test_y,
                                                          batch_size=settings.eval_batch_size, memory_format=memory_format,
                                                          criterion=eval_criterion, x_mirror=data.test_x_mirror)
        row["seconds"] = time.perf_counter() - epoch_start
        outcome.history.append(row)
        if metrics is not None and rank == 0:
            metrics.write(row)
        log.info("epoch %d/%d: val_accuracy=%.4f test_accuracy=%.4f epsilon=%s", epoch, settings.epochs,
                 row["val_accuracy"], row["test_accuracy"], "n/a" if outcome.epsilon is None else f"{outcome.epsilon:.3f}")
        if diverged:
            outcome.status = "diverged"
            log.warning("non-finite loss in epoch %d: the run diverged", epoch)
            break
        if run_dir is not None and settings.checkpoint_every and (
                epoch % settings.checkpoint_every == 0 or epoch == settings.epochs):
            # Every rank's generator states (a collective), so that each rank resumes its own.
            rng_by_rank = distributed.gather_objects(ckpt.generator_states(generators))
            if rank != 0:
                continue
            ckpt.save_checkpoint(ckpt.checkpoint_path(run_dir), {
                "identity": identity, "epoch": epoch, "steps": outcome.steps, "samples_seen": outcome.samples_seen,
                "train_seconds": outcome.train_seconds, "epsilon": outcome.epsilon, "history": outcome.history,
                "model": _unwrapped(model).state_dict(), "optimizer": base_optimizer.state_dict(),
                "accountant": engine.accountant.state_dict() if engine is not None else {},
                **({"ema": ema.state_dict()} if ema is not None else {}),
                "rng_by_rank": rng_by_rank})
    return outcome
