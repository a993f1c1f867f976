"""``trainer.precision=bf16``: the forward and backward under CPU autocast, the DP step's
per-example gradients, norms, clipping, noise and optimizer state in fp32. The bf16 step is
compared with the fp32 step on the same weights, batches and noise (``privacy.noise_seed``
replays the mechanism, for this comparison only)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from opacus import GradSampleModule

from dp_sweeps.bench import random_cifar
from dp_sweeps.errors import ConfigError
from dp_sweeps.models import create_model
from dp_sweeps.privacy import plan_privacy
from dp_sweeps.run import build_model, seed_everything
from dp_sweeps.training.loop import fit
from dp_sweeps.training.network import build_optimizer, loop_settings
from dp_sweeps.training.precision import autocast, per_example_math_in_fp32
from dp_sweeps.validation import validate_config
from tests.helpers.runs import TINY_CONVNET, compose_config

CPU = torch.device("cpu")


def _train(precision: str, *, mode: str, noise_seed: int = 5) -> tuple[dict, dict, torch.optim.Optimizer]:
    """Two DP-SGD steps of a tiny ConvNet on fixed random images; (start, end) weights."""
    cfg = compose_config([*TINY_CONVNET, "trainer.device=cpu", "trainer.progress=false", "trainer.batch_size=64",
                          "privacy.noise_multiplier=0.5", "privacy.accountant=rdp", f"privacy.noise_seed={noise_seed}",
                          f"privacy.grad_sample_mode={mode}", "optimizer=sgd", "optimizer.lr=0.5",
                          f"trainer.precision={precision}"])
    validate_config(cfg)
    data = random_cifar(128, seed=0, device=CPU)
    seed_everything(0)
    model = build_model(cfg.model, num_classes=10)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    plan = plan_privacy(cfg.privacy, num_train=data.num_train, batch_size=64, epochs=1)
    settings = replace(loop_settings(cfg, grad_sample_mode=mode), epochs=1)
    assert settings.precision == precision
    outcome = fit(model=model, optimizer=optimizer, data=data, plan=plan, settings=settings, device=CPU)
    assert outcome.status == "completed" and outcome.steps == 2
    return start, {k: v.detach().clone() for k, v in model.state_dict().items()}, optimizer


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_bf16_dp_step_matches_fp32_within_bf16_tolerance(mode):
    start, fp32, _ = _train("fp32", mode=mode)
    start_bf16, bf16, optimizer = _train("bf16", mode=mode)
    assert all(torch.equal(start[k], start_bf16[k]) for k in start)  # same initial weights
    assert all(v.dtype == torch.float32 for v in bf16.values() if v.is_floating_point())
    update = torch.cat([(fp32[k] - start[k]).flatten() for k in start if start[k].is_floating_point()])
    gap = torch.cat([(bf16[k] - fp32[k]).flatten() for k in start if start[k].is_floating_point()])
    relative = (gap.norm() / update.norm()).item()
    # Same noise, same batches: what differs is the clipped gradient sum, computed from
    # bf16 activations (8-bit mantissa, 2^-8 = 0.4% relative rounding per value).
    assert 0 < relative < 0.03, relative  # > 0: autocast did run in bf16
    # A different noise draw moves the weights far more than bf16 rounding does.
    _, other_noise, _ = _train("fp32", mode=mode, noise_seed=6)
    noise_gap = torch.cat([(other_noise[k] - fp32[k]).flatten() for k in start if start[k].is_floating_point()])
    assert gap.norm() < 0.2 * noise_gap.norm()


def test_bf16_per_example_gradients_and_norms_are_fp32():
    torch.manual_seed(0)
    model = GradSampleModule(create_model("convnet", num_classes=10, width=4, hidden=16))
    assert per_example_math_in_fp32(model)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with autocast("bf16", CPU):
        logits = model(x)
        assert logits.dtype == torch.bfloat16
        loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    for p in model.parameters():
        assert p.grad_sample.dtype == torch.float32 and p.grad_sample.shape == (8, *p.shape)
        assert p.grad.dtype == torch.float32
    # The fp32 per-example gradients of the bf16 pass sum to the bf16 batch gradient.
    for p in model.parameters():
        torch.testing.assert_close(p.grad_sample.sum(0) / 8, p.grad, rtol=2e-2, atol=1e-3)


def test_bf16_with_the_expanded_weights_engine_is_refused():
    cfg = compose_config([*TINY_CONVNET, "trainer.precision=bf16", "privacy.grad_sample_mode=ew"])
    with pytest.raises(ConfigError, match="trainer.precision=bf16"):
        validate_config(cfg)
    with pytest.raises(ConfigError, match="trainer.precision"):
        validate_config(compose_config([*TINY_CONVNET, "trainer.precision=fp16"]))
