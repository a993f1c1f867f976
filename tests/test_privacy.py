"""The mechanism itself: σ calibration, clipping bound, noise scale, Poisson sampling
and the accountant against known values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from dp_sweeps.privacy import PrivacyPlan, calibrate_noise_multiplier, epsilon_for, make_private
from dp_sweeps.run import run
from dp_sweeps.training.checkpoint import checkpoint_path, load_checkpoint
from tests.helpers.runs import compose_config, tiny_overrides


def _plan(*, noise_multiplier: float, max_grad_norm: float, num_train: int, batch_size: int) -> PrivacyPlan:
    per_epoch = math.ceil(num_train / batch_size)
    return PrivacyPlan(private=True, accountant="prv", delta=1e-5, max_grad_norm=max_grad_norm,
                       noise_multiplier=noise_multiplier, sample_rate=1 / per_epoch, steps_per_epoch=per_epoch,
                       steps=per_epoch, target_epsilon=None, planned_epsilon=None, poisson_sampling=True)


def _private(model, *, plan, num_train, batch_size, seed=0):
    loader = DataLoader(TensorDataset(torch.arange(num_train)), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return make_private(plan=plan, module=model, optimizer=optimizer, num_samples=len(loader.dataset),
                        sampler_generator=torch.Generator(), criterion=nn.CrossEntropyLoss(), grad_sample_mode="hooks",
                        noise_generator=torch.Generator().manual_seed(seed + 1))


@pytest.mark.slow  # writing the full-size set takes seconds, PRV's calibration at 19,600 steps more
def test_paper_setting_dry_run_calibrates_sigma_0912(full_size_cifar, tmp_path):
    cfg = compose_config(tiny_overrides(full_size_cifar) + ["trainer.epochs=100", "trainer.batch_size=256",
                                                            "dry_run=true"])
    result = run(cfg, tmp_path)
    assert result["status"] == "planned"
    assert result["noise_multiplier"] == pytest.approx(0.912, abs=0.01)
    assert result["planned_epsilon"] <= 5.0 + 0.01
    assert result["sample_rate"] == pytest.approx(1 / 196)
    assert result["planned_steps"] == 19600
    spread = result["epsilon_cross_check"]  # the dry run shows the accountants' spread
    assert spread["prv"] == pytest.approx(result["planned_epsilon"])
    assert abs(spread["pld"] - spread["prv"]) < 0.02 and spread["rdp"] > spread["prv"]
    assert not (tmp_path / "metrics.csv").exists()


def test_accountant_matches_known_values():
    # q = 256/50000, σ = 0.912, 100 epochs, δ = 1e-5 (values measured with Opacus 1.6).
    q, steps = 256 / 50000, int(100 / (256 / 50000))
    assert epsilon_for(noise_multiplier=0.912, sample_rate=q, steps=steps, delta=1e-5) == pytest.approx(5.007, abs=0.01)
    assert epsilon_for(noise_multiplier=0.912, sample_rate=q, steps=steps, delta=1e-5,
                       accountant="rdp") == pytest.approx(5.430, abs=0.01)


def test_calibration_inverts_the_accountant():
    sigma = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=0.01, steps=500)
    eps = epsilon_for(noise_multiplier=sigma, sample_rate=0.01, steps=500, delta=1e-5)
    assert 1.95 <= eps <= 2.0 + 1e-9
    assert calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=500) > sigma


def test_clipped_per_example_gradients_never_exceed_the_bound():
    """σ = 0: the summed gradient of a one-example batch is that example's clipped
    gradient, so its norm is ≤ C, and = C for large raw gradients."""
    torch.manual_seed(0)
    clip = 0.1
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))
    plan = _plan(noise_multiplier=0.0, max_grad_norm=clip, num_train=1, batch_size=1)
    _, model, optimizer, criterion, _ = _private(model, plan=plan, num_train=1, batch_size=1)
    norms = []
    for i in range(20):
        x = torch.randn(1, 3, 2, 2) * (10 * (i + 1))
        y = torch.tensor([i % 3])
        criterion(model(x), y).backward()
        optimizer.pre_step()  # clip, accumulate, (no) noise, scale by expected batch size 1
        norms.append(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())).item())
        optimizer.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.summed_grad = None
    assert max(norms) <= clip * (1 + 1e-5)
    assert sum(n > clip * 0.99 for n in norms) >= 15  # large inputs: clipped exactly to C


def test_noise_has_the_calibrated_scale():
    """Zero per-example gradients: what the optimizer adds is the noise alone, with
    standard deviation σ·C before averaging over the expected batch size."""
    torch.manual_seed(0)
    sigma, clip, n, batch = 1.3, 0.7, 64, 16
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 300), nn.Linear(300, 40))
    plan = _plan(noise_multiplier=sigma, max_grad_norm=clip, num_train=n, batch_size=batch)
    _, model, optimizer, criterion, _ = _private(model, plan=plan, num_train=n, batch_size=batch)
    x = torch.randn(batch, 3, 2, 2)
    (criterion(model(x), torch.zeros(batch, dtype=torch.long)) * 0.0).backward()
    optimizer.pre_step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()]) * optimizer.expected_batch_size
    assert noise.numel() > 15000
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.03)
    assert abs(noise.mean().item()) < 0.03 * sigma * clip


def test_poisson_sampling_has_binomial_batch_sizes():
    n, batch = 1000, 50
    plan = _plan(noise_multiplier=1.0, max_grad_norm=1.0, num_train=n, batch_size=batch)
    model = nn.Linear(1, 1)
    _, _, _, _, loader = _private(model, plan=plan, num_train=n, batch_size=batch)
    sizes, seen = [], torch.zeros(n)
    for _ in range(50):
        for (idx,) in loader:
            sizes.append(len(idx))
            seen[idx] += 1
    sizes = torch.tensor(sizes, dtype=torch.float)
    q = plan.sample_rate
    assert sizes.mean().item() == pytest.approx(n * q, abs=4 * math.sqrt(n * q * (1 - q) / len(sizes)))
    assert sizes.var().item() == pytest.approx(n * q * (1 - q), rel=0.2)  # fixed-size batches would give 0
    # Each example is included independently with probability q per step.
    assert seen.mean().item() == pytest.approx(q * len(sizes), rel=0.05)


def test_privacy_none_runs_through_the_same_loop(tiny_cfg, tmp_path):
    result = run(tiny_cfg("privacy=none"), tmp_path)
    assert result["status"] == "completed"
    assert result["private"] is False
    assert result["steps"] == 8
    # No mechanism: the record claims no privacy and carries none of a DP run's parameters.
    assert result["epsilon_valid"] is False and result["poisson_sampling"] is False
    for key in ("epsilon", "planned_epsilon", "target_epsilon", "delta", "noise_multiplier", "max_grad_norm",
                "accountant", "grad_sample_mode", "prior_releases"):
        assert result[key] is None, key


def test_given_noise_multiplier_reports_its_epsilon(tiny_cfg, tmp_path):
    result = run(tiny_cfg("privacy.noise_multiplier=2.0"), tmp_path)
    expected = epsilon_for(noise_multiplier=2.0, sample_rate=1 / 8, steps=8, delta=1e-5)
    assert result["noise_multiplier"] == 2.0
    assert result["target_epsilon"] is None
    assert result["epsilon"] == pytest.approx(expected, rel=1e-6)


def test_physical_batches_give_the_same_private_run(tiny_cfg, tmp_path):
    """BatchMemoryManager splits logical batches without changing steps, ε or the update:
    with the same draw of the mechanism (privacy.noise_seed: the same Poisson batches and
    noise), the weights after the two runs agree up to float rounding (the clipped
    gradients are summed in another order)."""
    common = ("trainer.batch_size=128", "data.train_subset=256", "data.augment=false", "privacy.noise_seed=3",
              "privacy.noise_multiplier=1.0", "trainer.checkpoint_every=1")
    whole = run(tiny_cfg(*common), tmp_path / "whole")
    split = run(tiny_cfg(*common, "trainer.physical_batch_size=16"), tmp_path / "split")
    assert whole["steps"] == split["steps"] == 2
    assert whole["epsilon"] == pytest.approx(split["epsilon"], rel=1e-9)
    a, b = (load_checkpoint(checkpoint_path(tmp_path / name))["model"] for name in ("whole", "split"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    other = run(tiny_cfg(*common, "privacy.noise_seed=4"), tmp_path / "other")  # the comparison can fail
    assert other["steps"] == 2
    c = load_checkpoint(checkpoint_path(tmp_path / "other"))["model"]
    assert any(not torch.allclose(a[key], c[key], rtol=1e-4, atol=1e-6) for key in a)


# hooks and ghost take the two branches of the loop's empty-batch step; ew and functorch
# take hooks' branch (tests/test_empty_batch_samplers.py checks every engine's empty step).
@pytest.mark.parametrize("mode", ["hooks", pytest.param("ew", marks=pytest.mark.slow),
                                  pytest.param("functorch", marks=pytest.mark.slow), "ghost"])
def test_empty_poisson_batches_still_add_noise(tiny_cfg, tmp_path, monkeypatch, mode):
    """An expected batch of 1 makes about a third of the Poisson batches empty: each must
    still be a (noise-only) step, counted by the accountant, in every engine auto picks."""
    result = run(tiny_cfg("trainer.batch_size=1", "data.train_subset=50", "privacy.noise_multiplier=1.0",
                            "optimizer.lr=0.1", f"privacy.grad_sample_mode={mode}"), tmp_path)
    assert result["status"] == "completed" and result["steps"] == 50
    assert result["epsilon"] == pytest.approx(epsilon_for(noise_multiplier=1.0, sample_rate=1 / 50, steps=50,
                                                          delta=1e-5))
