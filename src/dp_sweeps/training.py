"""The one training loop, shared by every deep model, by DP-SGD and by ``privacy=none``.

Data stay as tensors on the training device; a loader over example *indices* drives
sampling (Opacus's Poisson sampler when private, shuffled batches otherwise), and
Opacus's BatchMemoryManager splits large logical batches into physical ones.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn as nn
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from dp_sweeps.data import ImageData, random_crop_flip
from dp_sweeps.privacy import PrivacyPlan, make_private
from dp_sweeps.results import MetricsLog

log = logging.getLogger(__name__)


@dataclass
class TrainingOutcome:
    status: str  # "completed" or "diverged"
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    samples_seen: int = 0
    train_seconds: float = 0.0
    epsilon: Optional[float] = None

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y); (nan, nan) if empty."""
    if len(y) == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    model.train(was_training)
    return loss_sum / len(y), correct / len(y)


def _index_loader(num_train: int, batch_size: int, generator: torch.Generator) -> DataLoader:
    """Batches of example indices; ``ceil(N / B)`` of them per epoch (Opacus's q = 1/len)."""
    return DataLoader(TensorDataset(torch.arange(num_train)), batch_size=batch_size, shuffle=True,
                      generator=generator)


def _physical_batches(loader: DataLoader, *, cap: int, private: bool,
                      optimizer: torch.optim.Optimizer) -> Iterator[tuple[torch.Tensor, float, bool]]:
    """Yield (indices, loss weight, take a step) per physical batch.

    Private: Opacus's BatchMemoryManager tells the DPOptimizer which physical batches
    end a logical one (it clips each, accumulates, and noises once per logical batch).
    Non-private: plain gradient accumulation with losses weighted by chunk size.
    """
    if private:
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=cap, optimizer=optimizer) as batches:
            for (idx,) in batches:
                yield idx, 1.0, True
        return
    for (idx,) in loader:
        chunks = idx.split(cap)
        for k, chunk in enumerate(chunks):
            yield chunk, len(chunk) / len(idx), k == len(chunks) - 1


def fit(*, model: nn.Module, optimizer: torch.optim.Optimizer, data: ImageData, plan: PrivacyPlan,
        epochs: int, batch_size: int, physical_batch_size: Optional[int], device: torch.device,
        seed: int, grad_sample_mode: str = "hooks", augment: bool = False, secure_mode: bool = False,
        eval_batch_size: int = 1024, metrics: Optional[MetricsLog] = None,
        progress: bool = True) -> TrainingOutcome:
    """Train ``model`` for ``epochs`` and evaluate after each one.

    With ``plan.private`` the run is DP-SGD as :mod:`dp_sweeps.privacy` states; ε after
    each epoch is the accountant's, for the steps actually taken. A non-finite loss
    stops the run with status ``diverged``.
    """
    model.to(device).train()
    # Opacus's hooks fire on the first layer although its input needs no gradient: harmless.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    sampler_generator = torch.Generator().manual_seed(seed + 1)
    noise_generator = torch.Generator(device=device).manual_seed(seed + 2)
    augment_generator = torch.Generator(device=device).manual_seed(seed + 3)
    loader = _index_loader(data.num_train, batch_size, sampler_generator)
    criterion: nn.Module = nn.CrossEntropyLoss()
    engine = None
    if plan.private:
        engine, model, optimizer, criterion, loader = make_private(
            plan=plan, module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
            grad_sample_mode=grad_sample_mode, noise_generator=noise_generator, secure_mode=secure_mode)
    cap = physical_batch_size or batch_size
    outcome = TrainingOutcome(status="completed")
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        loss_sum, correct, seen, steps_before = 0.0, 0, 0, outcome.steps
        bar = tqdm(total=plan.steps_per_epoch, desc=f"epoch {epoch}/{epochs}", leave=False,
                   disable=not progress, unit="step")
        diverged = False
        for idx, weight, take_step in _physical_batches(loader, cap=cap, private=plan.private,
                                                        optimizer=optimizer):
            idx = idx.to(device, non_blocking=True)
            x, y = data.train_x[idx], data.train_y[idx]
            if augment:
                x = random_crop_flip(x, generator=augment_generator)
            logits = model(x)
            loss = criterion(logits, y)
            # An empty Poisson batch still takes a (pure-noise) step: skipping it would
            # reveal that the batch was empty. Its loss is nan by definition; not divergence.
            if len(y) > 0:
                if not torch.isfinite(loss):
                    diverged = True
                    break
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
            (loss * weight).backward()
            if take_step:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if plan.private and getattr(optimizer, "_is_last_step_skipped", False):
                    continue
                outcome.steps += 1
                bar.update(1)
        bar.close()
        outcome.train_seconds += time.perf_counter() - epoch_start
        outcome.samples_seen += seen
        if engine is not None:
            outcome.steps = sum(n for _, _, n in engine.accountant.history)
            outcome.epsilon = float(engine.get_epsilon(plan.delta))
        row = {"epoch": epoch, "step": outcome.steps,
               "train_loss": loss_sum / seen if seen else math.nan,
               "train_accuracy": correct / seen if seen else math.nan,
               "epsilon": outcome.epsilon}
        row["val_loss"], row["val_accuracy"] = evaluate(model, data.val_x, data.val_y, batch_size=eval_batch_size)
        row["test_loss"], row["test_accuracy"] = evaluate(model, data.test_x, data.test_y, batch_size=eval_batch_size)
        row["seconds"] = time.perf_counter() - epoch_start
        outcome.history.append(row)
        if metrics is not None:
            metrics.write(row)
        log.info("epoch %d/%d: train_loss=%.4f test_accuracy=%.4f epsilon=%s (%d steps)", epoch, epochs,
                 row["train_loss"], row["test_accuracy"],
                 "n/a" if outcome.epsilon is None else f"{outcome.epsilon:.3f}", outcome.steps - steps_before)
        if diverged:
            outcome.status = "diverged"
            log.warning("non-finite loss in epoch %d: the run diverged", epoch)
            break
    log.debug("trained in %.1fs", time.perf_counter() - started)
    return outcome
