"""Data: loading (:mod:`.cifar10`), the splits as tensors (:mod:`.image_data`),
augmentation (:mod:`.augment`) and data-independent feature maps (:mod:`.features`).
Nothing here reads statistics from the private training set: normalisation constants
are public."""

from dp_sweeps.data.augment import random_crop_flip
from dp_sweeps.data.cifar10 import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, load_cifar10
from dp_sweeps.data.image_data import ImageData

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "ImageData", "load_cifar10", "random_crop_flip"]
