"""Poisson subsampling with exactly the steps the accountant counts.

Guarantee: each of the ``steps`` batches of an epoch includes every training example
independently with probability ``sample_rate`` (q), empty batches included, in one
process or across ``world_size`` ranks (each rank draws the coins of its own shard:
the union over ranks is one Poisson sample of the whole set). The accountant's
``(σ, q, steps)`` is therefore the mechanism's.

Why not Opacus's samplers (written here by hand, with this docstring as the reason):
- ``UniformWithReplacementSampler`` sizes an epoch as ``int(1 / (1 / k))`` batches,
  which is ``k - 1`` for many k (k = 93, or 782 = ceil(50,000 / 64)): the loader's
  length, Opacus's ``q = 1 / len(loader)`` and the plan then disagree.
- ``DistributedUniformWithReplacementSampler`` skips empty local batches, so ranks take
  different numbers of steps, and each released step is conditioned on non-empty local
  batches (an inclusion probability above q).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class PoissonBatchSampler(Sampler[list[int]]):
    """``steps`` Poisson batches per pass over this rank's shard ``range(rank, N, world_size)``.

    The coins come from ``generator`` (the mechanism's secret stream: see
    :mod:`dp_sweeps.privacy.randomness`); an empty batch is yielded as ``[]``, never skipped.
    """

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int, generator: torch.Generator,
                 rank: int = 0, world_size: int = 1):
        if num_samples < 1 or steps < 1 or not 0 < sample_rate <= 1:
            raise ValueError(f"Poisson sampling needs N ≥ 1, steps ≥ 1 and 0 < q ≤ 1 (got N={num_samples}, "
                             f"steps={steps}, q={sample_rate})")
        self.num_samples, self.sample_rate, self.steps = num_samples, sample_rate, steps
        self.generator = generator
        self.shard = torch.arange(rank, num_samples, world_size)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            coins = torch.rand(len(self.shard), generator=self.generator)
            yield self.shard[coins < self.sample_rate].tolist()


class _Indices(Dataset):
    """The example indices 0..N-1: the loop gathers the tensors itself (they stay on the device)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def collate_indices(indices: list[int]) -> tuple[torch.Tensor]:
    """A batch of indices as ``(LongTensor,)``; an empty batch gives an empty tensor."""
    return (torch.as_tensor(indices, dtype=torch.long),)


def poisson_index_loader(*, num_samples: int, sample_rate: float, steps: int, generator: torch.Generator,
                         rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader of index batches driven by :class:`PoissonBatchSampler` (``len`` = ``steps``)."""
    sampler = PoissonBatchSampler(num_samples=num_samples, sample_rate=sample_rate, steps=steps,
                                  generator=generator, rank=rank, world_size=world_size)
    return DataLoader(_Indices(num_samples), batch_sampler=sampler, collate_fn=collate_indices)


def shuffled_index_loader(*, num_samples: int, batch_size: int, generator: torch.Generator) -> DataLoader:
    """Shuffled fixed-size index batches, ``ceil(N / B)`` per epoch (non-private runs, and
    ``privacy.poisson_sampling=false``, whose ε is then not a guarantee)."""
    return DataLoader(_Indices(num_samples), batch_size=batch_size, shuffle=True, generator=generator,
                      collate_fn=collate_indices)
