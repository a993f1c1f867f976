"""How long the whole run will take: all its epochs, evaluation included.

The loop's tqdm bar shows one epoch; the default job is 100 of them. :class:`RunClock`
times the training steps and the evaluation and extrapolates to the end of the run:

- after the first few steps (the very first step is left out: it pays one-off costs
  such as cuDNN's autotuning and Opacus's first hooks), from the mean time per step
  since then and the time of one evaluation batch measured right there
  (:meth:`RunClock.wants_estimate`, :meth:`RunClock.estimate`);
- after each epoch, from that epoch's measured training and evaluation time.

Only public quantities are timed (steps, images evaluated): nothing here depends on the
private batches' contents or sizes beyond what wall time reveals anyway. The estimate
assumes later epochs cost what the measured ones did.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

# Steps timed after the first one before the first estimate (fewer in a shorter epoch).
STEPS_TO_TIME = 5
# Above this, on a machine without CUDA, the log names faster ways to try the project.
SLOW_RUN_SECONDS = 3600.0


def format_duration(seconds: float) -> str:
    """``1d 02:03:04`` / ``02:03:04`` / ``03:04``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}" if hours or days else f"{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


@dataclass
class RunClock:
    """Times one run's steps and evaluations and extrapolates to its last epoch.

    ``epochs_left`` counts the epoch about to start; ``eval_images_per_epoch`` is what
    each epoch's evaluation forwards (validation and test sets, mirrors included)."""

    steps_per_epoch: int
    epochs_left: int
    eval_images_per_epoch: int
    clock: Callable[[], float] = time.perf_counter
    started: float = field(init=False, default=0.0)
    steps_done: int = field(init=False, default=0)
    eval_seconds_per_image: Optional[float] = field(init=False, default=None)
    excluded_seconds: float = field(init=False, default=0.0)
    _after_first_step: Optional[float] = field(init=False, default=None)
    _epoch_seconds: list = field(init=False, default_factory=list)
    _estimated: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    @property
    def steps_to_time(self) -> int:
        return max(1, min(STEPS_TO_TIME, self.steps_per_epoch - 1))

    def step_done(self) -> None:
        self.steps_done += 1
        if self.steps_done == 1:
            self._after_first_step = self.clock()

    def wants_estimate(self) -> bool:
        """True once, when enough steps of the first epoch have been timed."""
        if self._estimated or self._epoch_seconds:
            return False
        return self.steps_done >= 1 + self.steps_to_time or self.steps_done >= self.steps_per_epoch

    def seconds_per_step(self) -> float:
        now = self.clock()
        if self.steps_done >= 2 and self._after_first_step is not None:
            return (now - self._after_first_step) / (self.steps_done - 1)
        return (now - self.started) / max(self.steps_done, 1)

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` just spent on something else (the evaluation probe) out of
        the step times."""
        self.excluded_seconds += seconds
        self.started += seconds
        if self._after_first_step is not None:
            self._after_first_step += seconds

    def estimate(self, *, eval_seconds_per_image: float, seconds_per_step: Optional[float] = None) -> dict:
        """The whole run's estimate from the steps timed so far (first epoch)."""
        self._estimated = True
        self.eval_seconds_per_image = eval_seconds_per_image
        per_step = self.seconds_per_step() if seconds_per_step is None else seconds_per_step
        train = per_step * self.steps_per_epoch * self.epochs_left
        evaluation = eval_seconds_per_image * self.eval_images_per_epoch * self.epochs_left
        return {"total_seconds": train + evaluation, "train_seconds": train, "eval_seconds": evaluation,
                "seconds_per_step": per_step, "epochs": self.epochs_left,
                "steps": self.steps_per_epoch * self.epochs_left}

    def epoch_done(self, *, train_seconds: float, eval_seconds: float) -> None:
        self._epoch_seconds.append((train_seconds, eval_seconds))

    def remaining_seconds(self, *, steps_into_epoch: int = 0) -> float:
        """Seconds to the end of the run, ``steps_into_epoch`` steps into the current epoch."""
        epochs_done = len(self._epoch_seconds)
        epochs_left = self.epochs_left - epochs_done
        if self._epoch_seconds:
            train, evaluation = (sum(s) / epochs_done for s in zip(*self._epoch_seconds))
            per_step = train / max(self.steps_per_epoch, 1)
        else:
            per_step = self.seconds_per_step() if self.steps_done else math.nan
            evaluation = (self.eval_seconds_per_image or 0.0) * self.eval_images_per_epoch
        steps_left = self.steps_per_epoch * epochs_left - steps_into_epoch
        return max(steps_left, 0) * per_step + max(epochs_left, 0) * evaluation


def estimate_message(estimate: dict) -> str:
    return (f"estimated time for the whole run: {format_duration(estimate['total_seconds'])} "
            f"({estimate['epochs']} epochs, {estimate['steps']} steps at {estimate['seconds_per_step']:.3g} s/step "
            f"= {format_duration(estimate['train_seconds'])} training, "
            f"+ {format_duration(estimate['eval_seconds'])} evaluation)")


def faster_ways_hint(estimate: dict, *, cuda_available: bool) -> Optional[str]:
    """One line naming faster ways to try the project, for a run over an hour on a
    machine without CUDA (None otherwise)."""
    if cuda_available or estimate["total_seconds"] <= SLOW_RUN_SECONDS:
        return None
    per_epoch = estimate["total_seconds"] / max(estimate["epochs"], 1)
    epochs_in_an_hour = int(SLOW_RUN_SECONDS // per_epoch)
    this_model = (f"`trainer.epochs={epochs_in_an_hour}` (about an hour with this model)" if epochs_in_an_hour
                  else "a GPU for this model")
    return ("no CUDA device and over an hour: for a quick look try `debug=fast` (a tiny ConvNet, seconds), "
            f"`model=convnet trainer.epochs=2` (minutes), or {this_model}; docs/gpu.md")
