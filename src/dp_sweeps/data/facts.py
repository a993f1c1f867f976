"""The public facts of a data set: what every model, feature map, augmentation and
evaluation builds itself from, so that none of them assumes CIFAR-10.

Facts are declared in ``conf/data/<name>.yaml`` (published constants, each with its
source named there) and checked against what the loader reads; nothing here is
computed from the private training set, except under ``normalization="dp"``, where
``mean``/``std`` are a Gaussian release charged to ε (:mod:`dp_sweeps.data.dp_normalization`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

# How the pixels were standardised: a data set's published constants, the fixed
# 0.5/0.5 of image_folder, or a DP release of the training set's channel statistics.
NORMALIZATIONS = ("published", "fixed", "dp")


@dataclass(frozen=True)
class DataFacts:
    """Public facts of one data set (after ``data.classes`` relabelling).

    ``mean``/``std``: per-channel constants that turned pixels in [0, 1] into the model's
    input, ``(x - mean) / std``; None only before a ``dp`` release has been made.
    ``hflip_preserves_label``: false where a mirrored image is another class (digits),
    so augmentation never flips and ``trainer.eval_flip`` is refused.
    """

    name: str
    channels: int
    image_size: int
    num_classes: int
    hflip_preserves_label: bool
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    normalization: str = "published"
    # Where the constants come from (a paper, a reference implementation), or the mechanism.
    normalization_source: str = ""
    class_names: Optional[tuple[str, ...]] = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def replace(self, **changes: Any) -> "DataFacts":
        return dataclasses.replace(self, **changes)

    def record(self) -> dict[str, Any]:
        """The facts a run's ``result.json`` carries (prefixed ``data_`` where ambiguous)."""
        return {"data_name": self.name, "channels": self.channels, "image_size": self.image_size,
                "num_classes": self.num_classes, "hflip_preserves_label": self.hflip_preserves_label,
                "normalization": self.normalization}
