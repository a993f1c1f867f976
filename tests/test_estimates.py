"""The whole run's time estimate (dp_sweeps.training.estimate): its arithmetic on a fake
clock, the CPU hint, and the line a real tiny run logs after its first steps."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from dp_sweeps.bench import random_cifar
from dp_sweeps.privacy import plan_privacy
from dp_sweeps.run import build_model, seed_everything
from dp_sweeps.training.estimate import RunClock, faster_ways_hint, format_duration
from dp_sweeps.training.loop import fit
from dp_sweeps.training.network import build_optimizer, loop_settings
from tests.helpers.runs import TINY_CONVNET, compose_config


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_estimate_covers_every_epoch_and_evaluation_and_leaves_out_the_first_step():
    time = FakeClock()
    clock = RunClock(steps_per_epoch=10, epochs_left=100, eval_images_per_epoch=10_000, clock=time)
    time.now += 30.0  # the first step: one-off costs
    clock.step_done()
    for _ in range(4):
        time.now += 2.0
        clock.step_done()
        assert not clock.wants_estimate()
    time.now += 2.0
    clock.step_done()
    assert clock.wants_estimate()
    estimate = clock.estimate(eval_seconds_per_image=0.001)
    assert estimate["seconds_per_step"] == pytest.approx(2.0)
    assert estimate["train_seconds"] == pytest.approx(2.0 * 10 * 100)
    assert estimate["eval_seconds"] == pytest.approx(0.001 * 10_000 * 100)
    assert estimate["total_seconds"] == pytest.approx(2000 + 1000)
    assert not clock.wants_estimate()  # once
    # After an epoch, the measured epoch (3 s per step, 12 s of evaluation) is extrapolated.
    clock.epoch_done(train_seconds=30.0, eval_seconds=12.0)
    assert clock.remaining_seconds() == pytest.approx(99 * (30 + 12))
    assert clock.remaining_seconds(steps_into_epoch=5) == pytest.approx(99 * 42 - 5 * 3)


def test_probe_time_is_left_out_of_the_steps():
    time = FakeClock()
    clock = RunClock(steps_per_epoch=4, epochs_left=1, eval_images_per_epoch=0, clock=time)
    for _ in range(2):
        time.now += 1.0
        clock.step_done()
    time.now += 50.0
    clock.exclude(50.0)
    time.now += 1.0
    clock.step_done()
    assert clock.seconds_per_step() == pytest.approx(1.0)


def test_a_short_epoch_estimates_at_its_end():
    clock = RunClock(steps_per_epoch=2, epochs_left=3, eval_images_per_epoch=0, clock=FakeClock())
    clock.step_done()
    assert not clock.wants_estimate()
    clock.step_done()
    assert clock.wants_estimate()


def test_hint_on_a_cpu_when_over_an_hour_only():
    estimate = {"total_seconds": 100 * 3000.0, "epochs": 100}
    hint = faster_ways_hint(estimate, cuda_available=False)
    assert "debug=fast" in hint and "model=convnet trainer.epochs=" in hint and "`trainer.epochs=1`" in hint
    assert faster_ways_hint(estimate, cuda_available=True) is None
    assert faster_ways_hint({"total_seconds": 3000.0, "epochs": 100}, cuda_available=False) is None
    assert format_duration(90061) == "1d 01:01:01" and format_duration(61) == "01:01"


@pytest.mark.slow
def test_a_real_run_logs_the_whole_run_estimate_after_its_first_steps(caplog):
    cfg = compose_config([*TINY_CONVNET, "trainer.device=cpu", "trainer.batch_size=16", "privacy.noise_multiplier=1",
                          "privacy.accountant=rdp", "trainer.progress=true"])
    data = random_cifar(160, seed=0, device=torch.device("cpu"))
    seed_everything(0)
    model = build_model(cfg.model, num_classes=10)
    plan = plan_privacy(cfg.privacy, num_train=160, batch_size=16, epochs=3)
    settings = replace(loop_settings(cfg, grad_sample_mode="hooks"), epochs=3)
    with caplog.at_level(logging.INFO, logger="dp_sweeps.training.loop"):
        outcome = fit(model=model, optimizer=build_optimizer(cfg.optimizer, model.parameters()), data=data,
                      plan=plan, settings=settings, device=torch.device("cpu"))
    assert outcome.status == "completed"
    lines = [r.getMessage() for r in caplog.records]
    estimates = [line for line in lines if line.startswith("estimated time for the whole run")]
    assert len(estimates) == 1 and "3 epochs, 30 steps" in estimates[0], lines
    assert lines.index(estimates[0]) < next(i for i, line in enumerate(lines) if line.startswith("epoch 1/3"))
    assert "rest of the run: about" in lines[-1]
