"""WRN-16-4 of De et al. 2022: architecture, weight standardisation, exact per-example
gradients of the raw weights through Opacus, the experiment config, and a real tiny
private run of the recipe (augmentation multiplicity + EMA)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator

from dp_sweeps.models import create_model
from dp_sweeps.models.wrn import WSConv2d
from dp_sweeps.privacy import steps_per_epoch
from dp_sweeps.run import run
from tests.helpers.runs import compose_config, reevaluate, tiny_overrides

TINY = {"depth": 10, "width": 1}  # one block per stage, 16/32/64 channels


def test_wrn16_4_architecture():
    model = create_model("wrn16_4")
    assert 2.74e6 < sum(p.numel() for p in model.parameters()) < 2.76e6
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 16 for m in norms)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 2 * 2 + 3 and all(isinstance(m, WSConv2d) for m in convs)  # stem, blocks, skips
    assert ModuleValidator.validate(model, strict=False) == []
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="depth=15"):
        create_model("wrn16_4", depth=15)
    with pytest.raises(ValueError, match="num_groups=7"):
        create_model("wrn16_4", num_groups=7)


def test_weight_standardisation():
    torch.manual_seed(0)
    conv = WSConv2d(8, 4, 3, padding=1)
    with torch.no_grad():
        conv.gain.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]).view(4, 1, 1, 1))
    w = conv.standardized_weight()
    fan_in = 8 * 9
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-6)
    assert torch.allclose(w.var(dim=(1, 2, 3), unbiased=False) * fan_in, conv.gain.view(4) ** 2, rtol=1e-4)
    # The layer sees only the standardised weight: a per-channel affine change of the
    # raw weight leaves its output unchanged.
    x = torch.randn(2, 8, 6, 6)
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(0.7)
    assert torch.allclose(conv(x), before, atol=1e-5)


@pytest.mark.parametrize("grad_sample_mode", ["hooks", "functorch"])
def test_per_example_gradients_are_those_of_the_raw_weights(grad_sample_mode):
    """Opacus has no hand-written rule for WSConv2d; the per-example gradients it
    computes (via torch.func) must equal an explicit per-example backward pass through
    the standardisation, for every parameter (raw weights, gains, biases, norms)."""
    torch.manual_seed(0)
    model = create_model("wrn16_4", **TINY)
    reference = copy.deepcopy(model)
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 3, 7])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, _ = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False, grad_sample_mode=grad_sample_mode)
    nn.functional.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    for i in range(3):
        loss = nn.functional.cross_entropy(reference(x[i:i + 1]), y[i:i + 1])
        expected = torch.autograd.grad(loss, list(reference.parameters()))
        for p, g in zip(params, expected):
            assert torch.allclose(p.grad_sample[i], g, atol=1e-5), p.shape


def test_experiment_carries_the_de_et_al_recipe():
    cfg = compose_config(["experiment=de_wrn16_4"])
    assert cfg.model.name == "wrn16_4" and (cfg.model.depth, cfg.model.width) == (16, 4)
    assert (cfg.optimizer.lr, cfg.optimizer.momentum) == (4.0, 0.0)
    assert (cfg.privacy.epsilon, cfg.privacy.delta, cfg.privacy.max_grad_norm) == (8, 1e-5, 1.0)
    assert (cfg.trainer.batch_size, cfg.trainer.augmult, cfg.trainer.ema_decay) == (4096, 16, 0.999)
    assert cfg.data.augment is True
    # De et al.'s step counts per ε, at Opacus's 13 steps per epoch (q = 1/13).
    assert steps_per_epoch(50_000, 4096) == 13
    for epsilon, steps in ((1, 875), (2, 1125), (4, 1593), (8, 2468)):
        epochs = compose_config(["experiment=de_wrn16_4", f"privacy.epsilon={epsilon}"]).trainer.epochs
        assert abs(13 * epochs - steps) <= 6
    cfg = compose_config(["experiment=de_wrn16_4", "privacy.epsilon=3"])
    assert "set trainer.epochs" in str(cfg.trainer.epochs)  # refused by validation, with the way out
    assert compose_config(["experiment=de_wrn16_4", "privacy.epsilon=3", "trainer.epochs=5"]).trainer.epochs == 5


def test_tiny_private_run_of_the_recipe(tiny_cifar, tmp_path):
    cfg = compose_config(tiny_overrides(tiny_cifar) + [
        "experiment=de_wrn16_4", "model.depth=10", "model.width=1", "trainer.epochs=1",
        "trainer.batch_size=50", "trainer.physical_batch_size=25", "trainer.augmult=2",
        "data.train_subset=100", "data.test_subset=50", "trainer.checkpoint_every=1",
        "privacy.noise_multiplier=2.0"])  # a fixed σ: calibrating at q = 1/2 costs more than the run
    result = run(cfg, tmp_path)
    assert result["status"] == "completed" and result["model"] == "wrn16_4"
    assert result["steps"] == 2 and result["epsilon"] == pytest.approx(result["planned_epsilon"], rel=1e-6)
    # The 50 test images were evaluated, with the EMA weights (the recipe's trainer.ema_decay) the run released.
    loss, accuracy = reevaluate(cfg, tmp_path)
    assert result["num_test"] == 50 and result["test_accuracy"] == accuracy
    assert result["test_loss"] == pytest.approx(loss, rel=1e-5)
