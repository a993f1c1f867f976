"""The splits of a data set as tensors: what the loop, the evaluation and the feature
maps read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dp_sweeps.data.facts import DataFacts


@dataclass
class ImageData:
    """Normalised images (float32, N x C x H x W) and labels (int64), per split.

    ``val_*`` is held out of the training set (``data.val_size``) for tuning; it is
    empty when ``val_size`` is 0. The test set is never used for tuning.
    ``val_x_mirror`` / ``test_x_mirror``: the same inputs from horizontally mirrored
    images, for evaluation with ``trainer.eval_flip`` (None otherwise).
    ``facts``: the data set's public facts (:class:`DataFacts`); they describe the
    images, and stay the same when a feature map replaces the inputs. Left out (tensors
    built by hand), they are read off the tensors' shape, with a flip that keeps labels.
    ``prior_releases``: Gaussian releases already made from the training set while
    preparing it (``data.normalization=dp``), as accountant entries ``(σ, q, count)``:
    the run's ε covers them.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    val_x_mirror: Optional[torch.Tensor] = None
    test_x_mirror: Optional[torch.Tensor] = None
    facts: Optional[DataFacts] = None
    prior_releases: tuple[tuple[float, float, int], ...] = ()

    def __post_init__(self) -> None:
        if self.facts is None:
            shape = tuple(self.train_x.shape[1:])
            self.facts = DataFacts(name="tensors", channels=int(shape[0]) if shape else 1,
                                   image_size=int(shape[-1]) if shape else 1, num_classes=self.num_classes,
                                   hflip_preserves_label=True)

    @property
    def num_train(self) -> int:
        return len(self.train_y)

    def with_mirrors(self) -> "ImageData":
        """A copy carrying the horizontal mirrors of the val and test images (the last
        axis is the width), read by evaluation with ``trainer.eval_flip``. Refused where a
        mirror is another class (``facts.hflip_preserves_label`` false)."""
        if not self.facts.hflip_preserves_label:
            raise ValueError(f"data={self.facts.name}: a mirrored image is another class (hflip_preserves_label=false)")
        return ImageData(**{**vars(self), "val_x_mirror": self.val_x.flip(-1), "test_x_mirror": self.test_x.flip(-1)})

    def to(self, device: torch.device) -> "ImageData":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return ImageData(**moved)
