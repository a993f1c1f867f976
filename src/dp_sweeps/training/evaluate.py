"""Loss and accuracy of a trained model on a held-out split: post-processing of the
released weights, so it costs no privacy."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024,
             memory_format: torch.memory_format = torch.contiguous_format,
             criterion: Optional[nn.Module] = None, x_mirror: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """Mean loss (the training criterion, cross-entropy by default) and accuracy of
    ``model`` on (x, y); (nan, nan) if empty. With ``x_mirror`` (the inputs of the
    mirrored images) the prediction is the mean of the two logits (test-time flip
    averaging: post-processing of the trained model, no privacy cost)."""
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    if len(y) == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size].contiguous(memory_format=memory_format))
        if x_mirror is not None:
            logits = (logits + model(x_mirror[start:start + batch_size].contiguous(memory_format=memory_format))) / 2
        target = y[start:start + batch_size]
        loss_sum += criterion(logits, target).item() * len(target)
        correct += (logits.argmax(1) == target).sum().item()
    model.train(was_training)
    return loss_sum / len(y), correct / len(y)
