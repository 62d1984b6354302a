"""Datasets as uint8 NHWC numpy arrays with int64 labels, lazily read.

Embedded (offline): :func:`mnist`, :func:`digits`.  On disk: :func:`cifar10`, :func:`cifar10_c`,
:func:`imagenet`, :func:`imagenet_c`, :func:`imagenet_a`, :func:`imagenet_r`, :func:`imagenet_v2`,
:func:`tfds`.  Unlabelled real photos (offline, scikit-image / scikit-learn): :func:`photos`.  :func:`load` dispatches by name.  Fixtures in each on-disk format: ``tttlab.core.testing``.
"""

from __future__ import annotations

from ..errors import DatasetNotFoundError, InvalidInputError, UnknownNameError
from ._base import ArrayDataset, FileDataset, ImageDataset, resize_center_crop
from .cifar import CIFAR10_CLASSES, cifar10, cifar10_c, cifar10_c_path
from .embedded import digits, mnist
from .imagenet import (
    imagenet,
    imagenet_a,
    imagenet_a_wnids,
    imagenet_c,
    imagenet_c_folder,
    imagenet_class_names,
    imagenet_r,
    imagenet_r_wnids,
    imagenet_v2,
    imagenet_wnids,
)
from .photos import PHOTO_NAMES, photo_arrays, photos
from .tfds import TFDSDataset, tfds

READERS = {
    "mnist": mnist, "digits": digits, "cifar10": cifar10, "cifar10_c": cifar10_c, "imagenet": imagenet,
    "imagenet_c": imagenet_c, "imagenet_a": imagenet_a, "imagenet_r": imagenet_r,
    "imagenet_v2": imagenet_v2, "tfds": tfds, "photos": photos,
}  # fmt: skip


#: Readers that take no ``root`` (the data ships inside Python packages).
EMBEDDED = ("mnist", "digits", "photos")
#: Readers with a ``split`` argument; the others read one fixed set (or one corruption domain).
_SPLIT_READERS = ("mnist", "digits", "cifar10", "imagenet", "tfds")


def load(name: str, root=None, split: str | None = None, **kwargs) -> ImageDataset:
    """Open a dataset by name: ``load("cifar10", root, split="test")`` == ``cifar10(root, split="test")``.

    ``mnist``/``digits`` take no ``root``.  ``cifar10_c``/``imagenet_c`` need ``corruption=`` and
    ``severity=``.  TFDS datasets are ``"tfds/<name>"`` (or ``"tfds/<name>:<version>"``) with
    ``root`` = the TFDS ``data_dir``.  Unknown names raise :class:`UnknownNameError`.
    """
    if not isinstance(name, str):
        raise UnknownNameError(
            f"dataset name must be a string, got {name!r}; expected one of {sorted(READERS)}"
        )
    if name.startswith("tfds/") and len(name) > 5:
        kwargs["name"] = name[5:]
        name = "tfds"
    if name not in READERS:
        raise UnknownNameError(
            f"unknown dataset {name!r}; expected one of {sorted(READERS)} or 'tfds/<tfds name>'"
        )
    if split is not None:
        if name not in _SPLIT_READERS:
            raise InvalidInputError(f"dataset {name!r} has no splits; got split={split!r}")
        kwargs["split"] = split
    if name in EMBEDDED:
        if root is not None:
            raise InvalidInputError(f"dataset {name!r} is embedded and takes no root; got root={root!r}")
        return READERS[name](**kwargs)
    if root is None:
        raise DatasetNotFoundError(f"dataset {name!r} is read from disk: give root=<path>")
    if name == "tfds":
        if "name" not in kwargs:
            raise InvalidInputError(
                "load('tfds', ...) needs the TFDS dataset: use load('tfds/<name>', data_dir)"
            )
        return tfds(kwargs.pop("name"), root, **kwargs)
    return READERS[name](root, **kwargs)


__all__ = [
    "ArrayDataset", "CIFAR10_CLASSES", "EMBEDDED", "FileDataset", "ImageDataset", "PHOTO_NAMES", "READERS",
    "TFDSDataset", "photo_arrays", "photos",
    "cifar10", "cifar10_c", "cifar10_c_path", "digits", "imagenet", "imagenet_a", "imagenet_a_wnids", "imagenet_c",
    "imagenet_c_folder", "imagenet_class_names",
    "imagenet_r", "imagenet_r_wnids", "imagenet_v2", "imagenet_wnids", "load", "mnist",
    "resize_center_crop", "tfds",
]  # fmt: skip
