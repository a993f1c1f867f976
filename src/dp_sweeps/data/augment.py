"""Augmentation on whole batches of tensors on the training device."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, *, padding: int = 4, generator: Optional[torch.Generator] = None,
                     flip: bool = True) -> torch.Tensor:
    """Per-example random crop (reflect-padded) and, with ``flip``, horizontal flip of a
    whole batch. ``flip=False`` for data whose mirror is another class (digits:
    ``DataFacts.hflip_preserves_label``).

    Augmentation is a function of one example and fresh randomness, so it does not
    change an example's sensitivity: DP-SGD's guarantee is unaffected.
    """
    n, c, h, w = x.shape
    if n == 0:
        return x
    dev = x.device
    padded = F.pad(x, (padding,) * 4, mode="reflect")
    top = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), device=dev, generator=generator)
    rows = (top.view(n, 1) + torch.arange(h, device=dev)).view(n, 1, h, 1)
    cols = (left.view(n, 1) + torch.arange(w, device=dev)).view(n, 1, 1, w)
    # Take h padded rows, then w columns of each, per example.
    cropped = padded.gather(2, rows.expand(n, c, h, padded.shape[3])).gather(3, cols.expand(n, c, h, w))
    if not flip:
        return cropped
    mirrored = torch.rand(n, device=dev, generator=generator) < 0.5
    return torch.where(mirrored.view(n, 1, 1, 1), cropped.flip(3), cropped)
