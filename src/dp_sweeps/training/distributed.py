"""Multi-process DP training (``torchrun --nproc_per_node=N -m dp_sweeps ...``).

Opacus's distributed support keeps the mechanism of one process: every rank Poisson-
samples its shard of the data at the global rate q (so each example is still included
independently with probability q), clips its per-example gradients, and only rank 0
adds noise N(0, σ²C²) before the gradients are summed across ranks: the noise is added
once for the global batch, and the accountant sees q and σ of the global batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device_name: str) -> tuple[int, int, str]:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU).
    Returns (rank, world size, device name for this rank)."""
    world = world_size_from_env()
    if world <= 1:
        return 0, 1, device_name
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), world, f"cuda:{local_rank}"
    return dist.get_rank(), world, "cpu"


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def gather_objects(obj):
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (just ``[obj]`` in one process)."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
