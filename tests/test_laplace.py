"""The Laplace mechanism (privacy.mechanism=laplace) against independent code: the noise
the optimizer adds follows Laplace(0, b) (Kolmogorov–Smirnov), per-example gradients are
clipped in L1 as an explicit per-example loop clips them, the accountant's ε matches
dp_accounting composed by hand and the closed form of one subsampled pure-DP step, and
calibration hits its target."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from scipy import stats

from dp_sweeps.errors import ConfigError
from dp_sweeps.privacy import PrivacyPlan, calibrate_noise_multiplier, epsilon_for, make_private
from dp_sweeps.privacy.engine import resolve_grad_sample_mode
from dp_sweeps.privacy.laplace import LaplaceDPOptimizer, LaplacePLDAccountant
from dp_sweeps.run import run
from dp_sweeps.validation import validate_config


def _laplace_plan(*, noise_multiplier: float, max_grad_norm: float, num_train: int, batch_size: int) -> PrivacyPlan:
    per_epoch = math.ceil(num_train / batch_size)
    return PrivacyPlan(private=True, accountant="pld", delta=1e-5, max_grad_norm=max_grad_norm,
                       noise_multiplier=noise_multiplier, sample_rate=1 / per_epoch, steps_per_epoch=per_epoch,
                       steps=per_epoch, target_epsilon=None, planned_epsilon=None, poisson_sampling=True,
                       mechanism="laplace")


def _private(model, *, plan, num_train, seed=0):
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return make_private(plan=plan, module=model, optimizer=optimizer, num_samples=num_train,
                        sampler_generator=torch.Generator(), criterion=nn.CrossEntropyLoss(), grad_sample_mode="hooks",
                        noise_generator=torch.Generator().manual_seed(seed + 1))


def _independent_pld(*, gaussian, laplace, delta):
    """dp_accounting's PLD accountant composed by hand, as a reader of its docs would."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, count in gaussian:
        event = dp_event.GaussianDpEvent(sigma)
        accountant.compose(dp_event.SelfComposedDpEvent(event if q == 1 else dp_event.PoissonSampledDpEvent(q, event),
                                                        count))
    for ratio, q, count in laplace:
        event = dp_event.PoissonSampledDpEvent(q, dp_event.LaplaceDpEvent(ratio))
        accountant.compose(dp_event.SelfComposedDpEvent(event, count))
    return accountant.get_epsilon(delta)


def test_added_noise_follows_the_laplace_law():
    """Zero per-example gradients: what the optimizer adds is the noise alone. It passes a
    KS test against Laplace(0, b = σC) and fails one against a Gaussian of the same
    variance (so the test can tell the two laws apart)."""
    torch.manual_seed(0)
    ratio, clip, n, batch = 0.5, 0.7, 64, 16
    scale = ratio * clip
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 300), nn.Linear(300, 40))
    plan = _laplace_plan(noise_multiplier=ratio, max_grad_norm=clip, num_train=n, batch_size=batch)
    _, model, optimizer, criterion, _ = _private(model, plan=plan, num_train=n)
    assert isinstance(optimizer, LaplaceDPOptimizer)
    x = torch.randn(batch, 3, 2, 2)
    (criterion(model(x), torch.zeros(batch, dtype=torch.long)) * 0.0).backward()
    optimizer.pre_step()
    noise = (torch.cat([p.grad.flatten() for p in model.parameters()]) * optimizer.expected_batch_size).double()
    assert noise.numel() > 15000
    assert stats.kstest(noise.numpy(), "laplace", args=(0, scale)).pvalue > 1e-3
    assert stats.kstest(noise.numpy(), "norm", args=(0, math.sqrt(2) * scale)).pvalue < 1e-6


def test_per_example_gradients_are_clipped_in_l1_as_an_explicit_loop_does():
    """σ = 0: the summed gradient equals Σ_n min(1, C/‖g_n‖₁) g_n computed one example at a
    time with autograd; each clipped term has L1 norm ≤ C; L2 clipping would differ."""
    torch.manual_seed(0)
    clip, batch = 0.5, 6
    reference = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))
    model.load_state_dict(reference.state_dict())
    x = torch.randn(batch, 3, 2, 2) * torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 30.0]).reshape(-1, 1, 1, 1)
    y = torch.arange(batch) % 3

    loss_fn = nn.CrossEntropyLoss()
    l1_terms, l2_terms, l1_norms = [], [], []
    for i in range(batch):
        grads = torch.autograd.grad(loss_fn(reference(x[i:i + 1]), y[i:i + 1]), list(reference.parameters()))
        flat = torch.cat([g.flatten() for g in grads])
        l1, l2 = flat.abs().sum(), flat.norm(2)
        l1_terms.append(flat * min(1.0, clip / (l1.item() + 1e-6)))
        l2_terms.append(flat * min(1.0, clip / (l2.item() + 1e-6)))
        l1_norms.append(l1_terms[-1].abs().sum().item())
    expected, l2_clipped = torch.stack(l1_terms).sum(0), torch.stack(l2_terms).sum(0)

    plan = _laplace_plan(noise_multiplier=0.0, max_grad_norm=clip, num_train=batch, batch_size=batch)
    _, model, optimizer, criterion, _ = _private(model, plan=plan, num_train=batch)
    criterion(model(x), y).backward()
    optimizer.pre_step()
    got = torch.cat([p.grad.flatten() for p in model.parameters()]) * optimizer.expected_batch_size

    assert max(l1_norms) <= clip * (1 + 1e-5)
    assert sum(n > clip * 0.99 for n in l1_norms) >= 3  # the large inputs are clipped to C exactly
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got, l2_clipped, rtol=1e-2, atol=1e-4)


def test_accountant_matches_dp_accounting_composed_by_hand():
    """The engine's ledger (a Gaussian release, then Laplace steps) against dp_accounting
    composed in the test, and the steps counted as Opacus counts them."""
    prior = ((8.0, 1.0, 2),)
    accountant = LaplacePLDAccountant(prior_releases=prior)
    for _ in range(30):
        accountant.step(noise_multiplier=0.9, sample_rate=0.05)
    for _ in range(10):
        accountant.step(noise_multiplier=1.5, sample_rate=0.05)
    assert len(accountant) == 40
    assert accountant.history == [(8.0, 1.0, 2), (0.9, 0.05, 30), (1.5, 0.05, 10)]
    expected = _independent_pld(gaussian=[(8.0, 1.0, 2)], laplace=[(0.9, 0.05, 30), (1.5, 0.05, 10)], delta=1e-5)
    assert accountant.get_epsilon(1e-5) == pytest.approx(expected, rel=1e-9)
    alone = _independent_pld(gaussian=[], laplace=[(0.9, 0.05, 30), (1.5, 0.05, 10)], delta=1e-5)
    assert accountant.get_epsilon(1e-5) > alone  # the prior release is charged


def test_ledger_survives_a_checkpoint(tmp_path):
    """The accountant's state goes through the checkpoint format (weights_only load) and
    gives the same ε; a Gaussian accountant's state is refused."""
    from dp_sweeps.training.checkpoint import load_checkpoint, save_checkpoint

    accountant = LaplacePLDAccountant(prior_releases=((8.0, 1.0, 2),))
    for _ in range(12):
        accountant.step(noise_multiplier=0.7, sample_rate=0.1)
    save_checkpoint(tmp_path / "last.pt", {"accountant": accountant.state_dict()})
    restored = LaplacePLDAccountant(prior_releases=((8.0, 1.0, 2),))
    restored.load_state_dict(load_checkpoint(tmp_path / "last.pt")["accountant"])
    assert len(restored) == 12 and restored.get_epsilon(1e-5) == accountant.get_epsilon(1e-5)
    from opacus.accountants import RDPAccountant

    with pytest.raises(ValueError):
        restored.load_state_dict(RDPAccountant().state_dict())


@pytest.mark.parametrize("ratio, q", [(2.0, 1.0), (0.5, 1.0), (1.0, 0.1), (0.25, 0.02)])
def test_one_step_matches_the_closed_form(ratio, q):
    """One Laplace step with noise ratio b/C is (1/(b/C))-DP; Poisson subsampling at q makes
    it log(1 + q(e^ε − 1))-DP, tight for add/remove neighbours. PLD (an upper bound, with
    discretization error ~1e-3) agrees at a tiny δ."""
    eps = 1 / ratio
    closed_form = math.log1p(q * math.expm1(eps))
    got = epsilon_for(noise_multiplier=ratio, sample_rate=q, steps=1, delta=1e-12, accountant="pld",
                      mechanism="laplace")
    assert closed_form - 1e-3 <= got <= closed_form + 5e-3


def test_calibration_hits_the_target():
    common = dict(delta=1e-5, sample_rate=0.01, steps=500, accountant="pld", mechanism="laplace")
    ratio = calibrate_noise_multiplier(target_epsilon=2.0, **common)
    eps = epsilon_for(noise_multiplier=ratio, sample_rate=0.01, steps=500, delta=1e-5, accountant="pld",
                      mechanism="laplace")
    assert 1.99 <= eps <= 2.0 + 1e-9
    assert calibrate_noise_multiplier(target_epsilon=1.0, **common) > ratio


@pytest.mark.parametrize("overrides, message", [
    (["privacy=laplace", "privacy.grad_sample_mode=ghost"], "privacy.grad_sample_mode='ghost'"),
    (["privacy=laplace", "privacy.accountant=prv"], "privacy.accountant='prv'"),
    (["privacy.mechanism=laplace"], "privacy.accountant='prv'"),  # the Gaussian default accountant
    (["privacy.accountant=pld"], "privacy.accountant='pld'"),  # pld with the Gaussian mechanism
    (["privacy.mechanism=cauchy"], "privacy.mechanism='cauchy'"),
])
def test_incompatible_settings_are_refused_in_one_line(tiny_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message) as refused:
        validate_config(tiny_cfg(*overrides))
    assert "\n" not in str(refused.value)


def test_auto_engine_never_picks_ghost_for_laplace():
    assert resolve_grad_sample_mode("auto", "scatter_linear") == "ghost"
    assert resolve_grad_sample_mode("auto", "scatter_linear", mechanism="laplace") == "hooks"


@pytest.mark.slow
def test_laplace_run_records_its_mechanism_and_the_accountants_epsilon(tiny_cfg, tmp_path):
    result = run(tiny_cfg("privacy=laplace", "privacy.epsilon=3", "trainer.epochs=2"), tmp_path)
    assert result["status"] == "completed"
    assert result["mechanism"] == "laplace" and result["accountant"] == "pld"
    assert result["steps"] == 16 and result["sample_rate"] == pytest.approx(1 / 8)
    expected = _independent_pld(gaussian=[], laplace=[(result["noise_multiplier"], 1 / 8, 16)], delta=1e-5)
    assert result["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert 2.97 <= result["epsilon"] <= 3.0 + 1e-9


def test_refused_laplace_run_leaves_no_result(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError):
        run(tiny_cfg("privacy=laplace", "privacy.grad_sample_mode=ghost"), tmp_path)
    assert not (tmp_path / "result.json").exists()


def test_report_plots_one_line_per_mechanism(tmp_path):
    import pandas as pd

    from dp_sweeps.analysis.report import plot_accuracy_by_mechanism, write_report

    rows = [{"run_dir": str(tmp_path / f"{m}_{e}"), "status": "completed", "model": "convnet", "private": True,
             "mechanism": m, "target_epsilon": e, "epsilon": e * 0.999, "epsilon_valid": True, "seed": 0,
             "test_accuracy": (0.3 + 0.02 * e) if m == "gaussian" else 0.1, "setting": f"{m}-{e}"}
            for m in ("gaussian", "laplace") for e in (1.0, 3.0, 8.0)]
    written = write_report(pd.DataFrame(rows), tmp_path / "report")
    assert written["accuracy_by_mechanism.png"].stat().st_size > 10_000
    assert "accuracy_by_mechanism" in written["runs.md"].read_text()
    one_mechanism = pd.DataFrame([r for r in rows if r["mechanism"] == "gaussian"])
    assert plot_accuracy_by_mechanism(one_mechanism, tmp_path / "none.png") is None
