"""Linear SVM trained by DP-SGD: the multi-class hinge loss through the one training loop.

The model is one linear layer on the (flattened) features; the loss is the Weston-Watkins
multi-class hinge, ``nn.MultiMarginLoss(margin)``: (1/C) Σ_{j≠y} max(0, margin - s_y + s_j).
L2 regularisation is ``optimizer.weight_decay`` (applied to the already-noised update,
so it costs nothing).

Guarantee: exactly the deep models' (:mod:`dp_sweeps.privacy`): the released weights are
(ε, δ)-DP with respect to adding or removing one training example, with ε computed by
the configured Opacus accountant (``privacy.accountant``, PRV by default) for the noise
multiplier σ calibrated to ``privacy.epsilon`` (or given), the Poisson sampling rate
q = 1/ceil(N / ``trainer.batch_size``) and the steps actually taken; per-example
gradients are clipped to ``privacy.max_grad_norm``. :func:`dp_sweeps.training.fit`
does the training, with the hinge loss as its criterion.

Why DP-SGD rather than objective perturbation (Chaudhuri et al. 2011): objective
perturbation needs a smooth, strongly convex loss (a Huber hinge plus a regulariser), an
exact minimiser, and one-vs-rest training that splits ε over the 10 classes; DP-SGD
handles the multi-class hinge directly, and shares the accountant, the sweeps and the
loop of the deep models, so the comparison with them is like for like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from dp_sweeps.classical import register_classifier
from dp_sweeps.training.network import train_network
from dp_sweeps.validation import require_number


@dataclass(frozen=True)
class SVMSettings:
    # The hinge's margin (scores are unnormalised: with weight decay it sets the scale).
    margin: float = 1.0

    def __post_init__(self) -> None:
        require_number("model.margin", self.margin, low=0)


def linear_svm(*, in_features: int, num_classes: int) -> nn.Module:
    """Class scores ``W x + b`` of the flattened input (per-example gradients: Opacus's Linear)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


@register_classifier("svm", settings=SVMSettings)
def run_svm(cfg, settings: SVMSettings, *, data, device, output_dir) -> dict[str, Any]:
    model = linear_svm(in_features=math.prod(data.train_x.shape[1:]), num_classes=data.num_classes)
    result = train_network(cfg, model=model, data=data, device=device, output_dir=output_dir,
                           criterion=nn.MultiMarginLoss(margin=settings.margin), model_name="svm")
    result.update(mechanism="DP-SGD (Opacus) on the multi-class hinge loss" if result["private"]
                  else "SGD on the hinge loss", weight_decay=cfg.optimizer.get("weight_decay"))
    if result["private"]:
        result["guarantee"] = "(ε, δ)-DP (DP-SGD, Opacus accountant), add/remove one training example"
    return result
