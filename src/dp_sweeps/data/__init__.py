"""Data: one door (:func:`load_data`, a registry of readers: :mod:`.cifar10`,
:mod:`.cifar100`, :mod:`.mnist`, :mod:`.svhn`, :mod:`.image_folder`), the public facts of
each data set (:mod:`.facts`), the splits as tensors (:mod:`.image_data`), augmentation
(:mod:`.augment`) and data-independent feature maps (:mod:`.features`). Nothing here
reads statistics from the private training set: normalisation constants are public,
or (``data.normalization=dp``) a release charged to ε (:mod:`.dp_normalization`)."""

from dp_sweeps.data.augment import random_crop_flip
from dp_sweeps.data.cifar10 import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, load_cifar10
from dp_sweeps.data.facts import DataFacts
from dp_sweeps.data.image_data import ImageData
from dp_sweeps.data.registry import declared_facts, list_datasets, load_data, register_dataset

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "DataFacts", "ImageData", "declared_facts",
           "list_datasets", "load_cifar10", "load_data", "random_crop_flip", "register_dataset"]
