"""Dataset containers: uint8 NHWC images + int64 labels, read lazily.

Two kinds share one interface (:class:`ImageDataset`): :class:`ArrayDataset` over an in-memory or
memory-mapped array, and :class:`FileDataset` over image files decoded on demand (ImageNet-style
folders) with a fixed-size transform so that batches stack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DatasetLayoutError, InvalidInputError


class ImageDataset:
    """Interface: ``len(ds)``, ``ds.labels``, ``ds.take(indices) -> (uint8 NHWC, int64 labels)``."""

    name: str
    labels: np.ndarray
    classes: tuple[str, ...]
    #: For 200-class subsets (ImageNet-A/R): index of each of this dataset's classes among the 1000
    #: ImageNet classes, so that ``logits_1000[:, class_indices]`` are the logits to evaluate.
    class_indices: np.ndarray | None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def take_list(self, indices: Sequence[int] | np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Like :meth:`take`, but the images as a list of uint8 (H, W, C) arrays, each at its own size: what
        a reader without a fixed-size transform gives (e.g. ``imagenet(root, transform=None)``: the decoded
        files), for augmentations that must see the whole image (RandomResizedCrop of the full photo)."""
        images, labels = self.take(indices)
        return list(images), labels

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        images, labels = self.take([index])
        return images[0], int(labels[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Iterate ``(images, labels)`` batches, optionally shuffled by ``seed``."""
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        order = np.arange(len(self))
        if shuffle:
            order = np.random.default_rng(seed).permutation(order)
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            yield self.take(order[start : start + batch_size])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        return _Subset(self, np.asarray(indices, dtype=np.int64))


@dataclass
class ArrayDataset(ImageDataset):
    """Images held as one uint8 (N, H, W, C) array (possibly a ``np.memmap``)."""

    images: np.ndarray
    labels: np.ndarray
    name: str = "array"
    classes: tuple[str, ...] = ()
    class_indices: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] not in (1, 3):
            raise InvalidInputError(
                f"{self.name}: images must be uint8 (N, H, W, C) with C in {{1, 3}}, "
                f"got {self.images.dtype} {self.images.shape}"
            )
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (self.images.shape[0],):
            raise InvalidInputError(
                f"{self.name}: {self.images.shape[0]} images but labels of shape {self.labels.shape}"
            )
        if not self.classes:
            n = int(self.labels.max()) + 1 if self.labels.size else 0
            self.classes = tuple(str(i) for i in range(n))

    def take(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        return np.ascontiguousarray(self.images[idx]), self.labels[idx]


@dataclass
class FileDataset(ImageDataset):
    """Image files decoded on demand; ``transform`` maps a PIL RGB image to a fixed-size PIL image."""

    paths: list[Path]
    labels: np.ndarray
    name: str = "files"
    classes: tuple[str, ...] = ()
    class_indices: np.ndarray | None = None
    transform: Callable | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.paths) != self.labels.shape[0]:
            raise InvalidInputError(f"{self.name}: {len(self.paths)} files but {self.labels.shape[0]} labels")

    def load(self, index: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        path = self.paths[int(index)]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if self.transform is not None:
                    img = self.transform(img)
                return np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetLayoutError(f"{self.name}: cannot decode image file {path}: {exc}") from exc

    def take_list(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        return [self.load(i) for i in idx], self.labels[idx]

    def take(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        arrays = [self.load(i) for i in idx]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise InvalidInputError(
                f"{self.name}: images of different sizes {sorted(shapes)} cannot be stacked; "
                "give the reader a transform (e.g. resize_center_crop(256, 224))"
            )
        images = np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8)
        return images, self.labels[idx]


class _Subset(ImageDataset):
    def __init__(self, parent: ImageDataset, indices: np.ndarray):
        self.parent, self.indices = parent, indices
        self.name = parent.name
        self.labels = parent.labels[indices]
        self.classes = parent.classes
        self.class_indices = parent.class_indices

    def take(self, indices):
        return self.parent.take(self.indices[np.asarray(indices, dtype=np.int64)])

    def take_list(self, indices):
        return self.parent.take_list(self.indices[np.asarray(indices, dtype=np.int64)])


#: Pillow resampling filters by name for :func:`resize_center_crop`.
INTERPOLATIONS = ("bilinear", "bicubic")


def resize_center_crop(resize: int = 256, crop: int = 224, interpolation: str = "bilinear") -> Callable:
    """Shorter side to ``resize``, then a centre ``crop`` x ``crop`` (the upstream eval transform).

    The sizes are torchvision's ``Resize(resize)`` + ``CenterCrop(crop)`` on PIL images (the transform of
    Hendrycks' ImageNet-C/A/R scripts): the longer side becomes ``int(resize * long / short)`` (truncated),
    and the crop starts at ``int(round((size - crop) / 2))`` (Python's round: halves to even).  Rounding
    the long side or flooring the offset instead shifts the crop by a pixel on about half the photos.
    ``interpolation``: Pillow's ``bilinear`` (torchvision's default, Hendrycks' scripts) or ``bicubic``
    (``Resize(256, interpolation=BICUBIC)``, the eval transform of MAE-based code).
    """
    if interpolation not in INTERPOLATIONS:
        raise InvalidInputError(f"interpolation={interpolation!r}; expected one of {list(INTERPOLATIONS)}")

    def transform(img):
        from PIL import Image

        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_long = int(resize * long / short)
        nw, nh = (resize, new_long) if w <= h else (new_long, resize)
        nw, nh = max(crop, nw), max(crop, nh)
        img = img.resize((nw, nh), Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR)
        left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
        return img.crop((left, top, left + crop, top + crop))

    suffix = "" if interpolation == "bilinear" else f"_{interpolation}"
    transform.__name__ = f"resize_center_crop_{resize}_{crop}{suffix}"
    return transform
