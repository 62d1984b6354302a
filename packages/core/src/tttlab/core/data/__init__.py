"""Datasets as uint8 NHWC numpy arrays with int64 labels, lazily read.

Embedded (offline): :func:`mnist`, :func:`digits`.  On disk: :func:`cifar10`, :func:`cifar10_c`,
:func:`imagenet`, :func:`imagenet_c`, :func:`imagenet_a`, :func:`imagenet_r`, :func:`imagenet_v2`,
:func:`tfds`.  :func:`load` dispatches by name.  Fixtures in each on-disk format: ``tttlab.core.testing``.
"""

from __future__ import annotations

from ..errors import UnknownNameError
from ._base import ArrayDataset, FileDataset, ImageDataset, resize_center_crop
from .cifar import CIFAR10_CLASSES, cifar10, cifar10_c
from .embedded import digits, mnist
from .imagenet import (
    imagenet,
    imagenet_a,
    imagenet_a_wnids,
    imagenet_c,
    imagenet_class_names,
    imagenet_r,
    imagenet_r_wnids,
    imagenet_v2,
    imagenet_wnids,
)
from .tfds import tfds

READERS = {
    "mnist": mnist, "digits": digits, "cifar10": cifar10, "cifar10_c": cifar10_c, "imagenet": imagenet,
    "imagenet_c": imagenet_c, "imagenet_a": imagenet_a, "imagenet_r": imagenet_r,
    "imagenet_v2": imagenet_v2, "tfds": tfds,
}  # fmt: skip


def load(name: str, *args, **kwargs) -> ImageDataset:
    """``load("cifar10", root, split="test")`` == ``cifar10(root, split="test")``."""
    if name not in READERS:
        raise UnknownNameError(f"unknown dataset {name!r}; expected one of {sorted(READERS)}")
    return READERS[name](*args, **kwargs)


__all__ = [
    "ArrayDataset", "CIFAR10_CLASSES", "FileDataset", "ImageDataset", "READERS", "cifar10", "cifar10_c",
    "digits", "imagenet", "imagenet_a", "imagenet_a_wnids", "imagenet_c", "imagenet_class_names",
    "imagenet_r", "imagenet_r_wnids", "imagenet_v2", "imagenet_wnids", "load", "mnist",
    "resize_center_crop", "tfds",
]  # fmt: skip
