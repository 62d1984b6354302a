"""Real colour photos that ship inside scikit-image and scikit-learn, as a small unlabelled image set.

:data:`PHOTO_NAMES`: scikit-image's ``astronaut``, ``chelsea``, ``coffee``, ``rocket`` and the two views
of ``stereo_motorcycle``, and scikit-learn's two sample images (``china``, ``flower``): eight natural
photos of ImageNet-like content, available offline (``pip install 'tttlab-core[datasets]'``).  They have
no ImageNet labels.

:func:`photos` cuts them into fixed-size crops.  Crop 0 of every photo is the ImageNet evaluation view
(shorter side to ``resize``, centre ``size`` x ``size``: :func:`~tttlab.core.data.resize_center_crop`).
Further crops (``crops_per_photo > 1``) exist only to give batch-adaptation methods more than eight images:
each one resizes the photo so that its shorter side is a whole number drawn uniformly from
``[size, 2 * size]``, takes a ``size`` x ``size`` window at a uniform random position, and mirrors it with
probability 1/2, all drawn from ``numpy.random.default_rng([seed, photo, crop])``.  Crops of one photo
overlap and show the same object: they are *not* independent samples, and a result over ``k`` crops of 8
photos carries far less information than one over ``8 k`` photos.

Labels: each image is labelled by its own index (``labels[i] == i``), since there are no class labels; a
caller attaches whatever per-image reference it uses (e.g. a model's prediction on the clean image, the
agreement protocol of ``tttlab-torch-ttt-evaluate`` on the ``photos_c`` benchmark).  ``meta["photo"]``
and ``meta["crop"]`` give each image's photo index and crop number.
"""

from __future__ import annotations

import functools

import numpy as np

from ..errors import InvalidInputError, require
from ._base import ArrayDataset, resize_center_crop

__all__ = ["PHOTO_NAMES", "photo_arrays", "photos"]

PHOTO_NAMES: tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right", "china", "flower",
)  # fmt: skip


@functools.cache
def _raw() -> tuple[np.ndarray, ...]:
    skdata = require("skimage.data", "datasets")
    load_sample_images = require("sklearn.datasets", "datasets").load_sample_images
    left, right, _ = skdata.stereo_motorcycle()
    china, flower = load_sample_images().images
    images = (
        skdata.astronaut(),
        skdata.chelsea(),
        skdata.coffee(),
        skdata.rocket(),
        left,
        right,
        china,
        flower,
    )
    return tuple(np.ascontiguousarray(a[..., :3], dtype=np.uint8) for a in images)


def photo_arrays() -> dict[str, np.ndarray]:
    """``{name: uint8 (H, W, 3) photo}`` at the size they ship, in :data:`PHOTO_NAMES` order."""
    return {n: a.copy() for n, a in zip(PHOTO_NAMES, _raw())}


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _random_crop(img, size: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    w, h = img.size
    short = int(rng.integers(size, 2 * size + 1))
    nw, nh = (short, max(size, int(short * h / w))) if w <= h else (max(size, int(short * w / h)), short)
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = int(rng.integers(0, nw - size + 1)), int(rng.integers(0, nh - size + 1))
    out = np.asarray(img.crop((left, top, left + size, top + size)))
    return np.ascontiguousarray(out[:, ::-1]) if rng.random() < 0.5 else out


@functools.lru_cache(maxsize=4)
def _crops(size: int, k: int, seed: int, resize: int) -> np.ndarray:
    """The crops of :func:`photos`, computed once per argument set (read-only: shared by every caller)."""
    from PIL import Image

    centre = resize_center_crop(resize, size)
    out = np.empty((len(PHOTO_NAMES) * k, size, size, 3), np.uint8)
    for p, raw in enumerate(_raw()):
        img = Image.fromarray(raw)
        out[p * k] = np.asarray(centre(img))
        for j in range(1, k):
            out[p * k + j] = _random_crop(img, size, np.random.default_rng([seed, p, j]))
    out.flags.writeable = False
    return out


def photos(size: int = 224, crops_per_photo: int = 1, seed: int = 0, resize: int = 256) -> ArrayDataset:
    """The eight photos as ``crops_per_photo`` crops each (module docstring): uint8 ``(8 k, size, size, 3)``,
    photo by photo (photo ``p``'s crop ``j`` at index ``p * k + j``), labelled by their own index.

    ``seed`` draws the extra crops only (crop 0, the centre view, is the same for every seed).  The images
    array is read-only (computed once per argument set and shared)."""
    size = _check_int("size", size, 1)
    k = _check_int("crops_per_photo", crops_per_photo, 1)
    seed = _check_int("seed", seed, 0)
    resize = _check_int("resize", resize, size)
    out = _crops(size, k, seed, resize)
    n = len(out)
    photo = np.repeat(np.arange(len(PHOTO_NAMES)), k)
    crop = np.tile(np.arange(k), len(PHOTO_NAMES))
    return ArrayDataset(
        out, np.arange(n), name=f"photos/{k}x{size}", classes=tuple(f"{PHOTO_NAMES[p]}/{j}" for p, j in zip(photo, crop)),
        meta={"photo": photo, "crop": crop, "photo_names": PHOTO_NAMES, "seed": seed},
    )  # fmt: skip
