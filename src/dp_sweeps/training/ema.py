"""An exponential moving average of the weights (De et al. 2022): post-processing of the
private iterates, so it costs no privacy."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel


def averaged_model(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of ``model``. Take it before Opacus attaches its hooks, so that the
    copy carries none; buffers are averaged (floating) or copied (integer, bool)."""
    return AveragedModel(model, multi_avg_fn=ema_with_warmup(decay), use_buffers=True)


def ema_with_warmup(decay: float):
    """EMA update with De et al.'s warm-up, decay_t = min(decay, (1 + t) / (10 + t))."""
    def update(ema_params, params, num_averaged):
        t = int(num_averaged)
        d = min(decay, (1 + t) / (10 + t))
        pairs = list(zip(ema_params, params))
        floating = [(e, p) for e, p in pairs if e.is_floating_point()]
        if floating:
            torch._foreach_lerp_([e for e, _ in floating], [p for _, p in floating], 1.0 - d)
        for e, p in pairs:  # integer/bool buffers (counters, flags) are copied, not averaged
            if not e.is_floating_point():
                e.copy_(p)
    return update
