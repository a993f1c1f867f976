"""Poisson sampling with exactly the accountant's steps, at every batch size."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from dp_sweeps.privacy import PrivacyPlan, make_private, steps_per_epoch
from dp_sweeps.privacy.sampling import PoissonBatchSampler, poisson_index_loader
from dp_sweeps.run import run


def _plan(num_train: int, batch_size: int) -> PrivacyPlan:
    k = steps_per_epoch(num_train, batch_size)
    return PrivacyPlan(private=True, accountant="prv", delta=1e-5, max_grad_norm=1.0, noise_multiplier=1.0,
                       sample_rate=1 / k, steps_per_epoch=k, steps=k, target_epsilon=None, planned_epsilon=None,
                       poisson_sampling=True)


@pytest.mark.parametrize("num_train", [1, 7, 93, 744, 1000, 50_000])
def test_loader_length_and_rate_match_the_plan_for_every_batch_size(num_train):
    """For k = ceil(N / B), Opacus's loader had int(1 / (1 / k)) batches: k - 1 for k = 93,
    782, ... Ours has k for every B from 1 to N."""
    for batch_size in range(1, num_train + 1) if num_train <= 1000 else (64, 256, 1, 50_000, 49_999):
        plan = _plan(num_train, batch_size)
        loader = poisson_index_loader(num_samples=num_train, sample_rate=plan.sample_rate,
                                      steps=plan.steps_per_epoch, generator=torch.Generator())
        assert len(loader) == plan.steps_per_epoch == math.ceil(num_train / batch_size), batch_size
        assert 1 / len(loader) == plan.sample_rate


@pytest.mark.parametrize("num_train,batch_size", [(50_000, 64), (744, 8), (93, 1), (100, 1)])
def test_make_private_agrees_with_the_plan_at_affected_sizes(num_train, batch_size):
    """The accountant records the plan's q for the steps taken (782 = ceil(50,000/64) and
    93 crashed at the first step on 89ac991)."""
    plan = _plan(num_train, batch_size)
    model = nn.Linear(2, 2)
    engine, module, optimizer, criterion, loader = make_private(
        plan=plan, module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(), num_samples=num_train, grad_sample_mode="hooks",
        noise_generator=torch.Generator().manual_seed(1), sampler_generator=torch.Generator().manual_seed(2))
    assert len(loader) == plan.steps_per_epoch
    for step, (idx,) in enumerate(loader):
        if step == 3:
            break
        criterion(module(torch.randn(len(idx), 2)), torch.zeros(len(idx), dtype=torch.long)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert engine.accountant.history == [(1.0, plan.sample_rate, 3)]


def test_poisson_batches_include_each_example_independently_with_rate_q():
    n, q, steps = 400, 0.05, 400
    sampler = PoissonBatchSampler(num_samples=n, sample_rate=q, steps=steps, generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == steps
    counts = torch.zeros(n)
    for b in batches:
        counts[b] += 1
    assert counts.mean().item() == pytest.approx(q * steps, rel=0.03)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float)
    assert sizes.var().item() == pytest.approx(n * q * (1 - q), rel=0.2)


def test_ranks_sample_disjoint_shards_and_keep_empty_batches():
    n, q, steps = 10, 0.1, 200
    shards = [PoissonBatchSampler(num_samples=n, sample_rate=q, steps=steps, generator=torch.Generator().manual_seed(r),
                                  rank=r, world_size=2) for r in range(2)]
    batches = [list(s) for s in shards]
    assert [len(b) for b in batches] == [steps, steps]  # every step, on every rank
    assert sum(len(b) == 0 for b in batches[0]) > 0.4 * steps  # (0.9^5 ≈ 0.59 of them empty)
    seen = [set().union(*map(set, b)) for b in batches]
    assert seen[0] <= set(range(0, n, 2)) and seen[1] <= set(range(1, n, 2))


def test_an_affected_batch_size_trains_end_to_end(tiny_cfg, tmp_path):
    """data.train_subset=465 trainer.batch_size=5: 93 steps per epoch (crashed on 89ac991)."""
    result = run(tiny_cfg("data.train_subset=465", "trainer.batch_size=5", "privacy.accountant=rdp",
                            "privacy.noise_multiplier=2.0"), tmp_path)
    assert result["status"] == "completed"
    assert result["steps"] == result["planned_steps"] == 93
    assert result["sample_rate"] == 1 / 93
