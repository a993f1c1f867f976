"""Multi-process DP-SGD (gloo, 2 CPU processes, slow: each process starts its own
interpreter): noise is added once for the global batch, sampling and accounting are
global, and every rank ends with the same weights. Fast: the single-process case that
every run goes through."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from dp_sweeps.data import load_cifar10
from dp_sweeps.models import create_model
from dp_sweeps.privacy import PrivacyPlan, make_private, plan_privacy
from dp_sweeps.training.loop import fit
from dp_sweeps.training.network import loop_settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _noise_worker(rank: int, world: int, port: int, out: str) -> None:
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    _join(rank, world, port)
    torch.manual_seed(0)
    n, batch, sigma, clip = 64, 16, 1.0, 1.0
    plan = PrivacyPlan(private=True, accountant="prv", delta=1e-5, max_grad_norm=clip, noise_multiplier=sigma,
                       sample_rate=1 / 4, steps_per_epoch=4, steps=4, target_epsilon=None, planned_epsilon=None,
                       poisson_sampling=True)
    model = DPDDP(nn.Sequential(nn.Flatten(), nn.Linear(12, 300), nn.Linear(300, 40)))
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch, generator=torch.Generator().manual_seed(rank))
    _, model, optimizer, criterion, loader = make_private(
        plan=plan, module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        num_samples=len(loader.dataset), sampler_generator=torch.Generator(),
        criterion=nn.CrossEntropyLoss(), grad_sample_mode="hooks",
        noise_generator=torch.Generator().manual_seed(100 + rank))
    x = torch.randn(batch // world, 3, 2, 2)
    (criterion(model(x), torch.zeros(len(x), dtype=torch.long)) * 0.0).backward()  # zero gradients: noise only
    optimizer.step()  # clip, rank 0 adds noise, all-reduce, scale by the expected global batch
    update = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.save({"std": update.std().item(), "update": update,
                "sample_rate": loader.sample_rate if hasattr(loader, "sample_rate") else None},
               f"{out}/noise{rank}.pt")
    dist.destroy_process_group()


def _train_worker(rank: int, world: int, port: int, root: str, out: str, batch_size: int = 64) -> None:
    _join(rank, world, port)
    from pathlib import Path

    from tests.helpers.runs import compose_config, tiny_overrides

    # A fixed draw of the mechanism (each rank its own streams): the bounds on the sampled
    # counts below are checked on one known draw, not on fresh randomness.
    cfg = compose_config(tiny_overrides(Path(root)) + [f"trainer.batch_size={batch_size}", "privacy.epsilon=8",
                                                      "privacy.noise_seed=13"])
    data = load_cifar10(root=root, download=False, verify_checksums=False)
    plan = plan_privacy(cfg.privacy, num_train=data.num_train, batch_size=batch_size, epochs=1)
    torch.manual_seed(0)
    model = create_model("convnet", num_classes=10, width=4, hidden=16)
    outcome = fit(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), data=data, plan=plan,
                  settings=loop_settings(cfg, grad_sample_mode="hooks"), device=torch.device("cpu"))
    torch.save({"state": model.state_dict(), "steps": outcome.steps, "epsilon": outcome.epsilon,
                "seen": outcome.samples_seen}, f"{out}/train{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_noise_is_added_once_for_the_global_batch(tmp_path):
    mp.spawn(_noise_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"noise{r}.pt", weights_only=True) for r in range(2)]
    expected, every_rank = 1.0 / 16, math.sqrt(2) / 16  # σC / B, and what noise on each rank would give
    for r in results:
        assert r["std"] == pytest.approx(expected, rel=0.04)
        assert r["std"] < 0.5 * (expected + every_rank)
    assert torch.equal(results[0]["update"], results[1]["update"])  # one all-reduced update


@pytest.mark.slow
def test_every_rank_ends_with_the_same_weights(tiny_cifar, tmp_path):
    mp.spawn(_train_worker, args=(2, _free_port(), str(tiny_cifar), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"train{r}.pt", weights_only=True) for r in range(2))
    assert a["steps"] == b["steps"] == 8  # global sampling rate: ceil(500/64) steps
    assert a["epsilon"] == pytest.approx(b["epsilon"]) and a["epsilon"] <= 8.0
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert 0 < a["seen"] < 500 and 0 < b["seen"] < 500  # each rank samples its own shard
    assert a["seen"] + b["seen"] == pytest.approx(500, rel=0.25)


@pytest.mark.slow
def test_every_rank_takes_every_step_with_empty_local_batches(tiny_cifar, tmp_path):
    """Expected global batch 2 over 2 ranks: a rank's local batch is empty in about 37% of
    the 250 steps. Every rank still takes every planned step (an empty local batch adds a
    zero gradient; rank 0 adds the noise once), so the ranks stay in lockstep and the
    accountant's q and step count are the mechanism's. Opacus's distributed sampler skips
    empty local batches: ranks then took different numbers of steps."""
    mp.spawn(_train_worker, args=(2, _free_port(), str(tiny_cifar), str(tmp_path), 2), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"train{r}.pt", weights_only=True) for r in range(2))
    assert a["steps"] == b["steps"] == 250
    assert a["epsilon"] == pytest.approx(b["epsilon"])
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    # Each rank's shard of 250 at q = 1/250 over 250 steps: Binomial(62,500, 1/250), mean 250, sd ≈ 15.8.
    assert abs(a["seen"] - 250) < 80 and abs(b["seen"] - 250) < 80


def test_one_process_is_rank_0_of_1_without_a_process_group(monkeypatch):
    """Without torchrun's environment (every test run and every plain job): no process
    group is created, the device name is kept, and a gather is the object alone."""
    from dp_sweeps.training import distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.world_size_from_env() == 1
    assert distributed.init_from_env("cpu") == (0, 1, "cpu")
    assert distributed.init_from_env("auto") == (0, 1, "auto")  # resolved later by resolve_device
    assert not dist.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    state = {"generator": torch.Generator().manual_seed(3).get_state()}
    (gathered,) = distributed.gather_objects(state)
    assert gathered is state
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: still no group
    assert distributed.init_from_env("cpu") == (0, 1, "cpu") and not dist.is_initialized()
