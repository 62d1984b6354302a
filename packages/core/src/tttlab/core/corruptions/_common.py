"""Shared plumbing of the corruption functions.

Contract of every corruption function (``noise.py``, ``blur.py``, ``weather.py``, ``digital.py``)::

    fn(x: np.ndarray, severity: int, rng: np.random.Generator, family: str) -> np.ndarray

* ``x``: float32, shape (N, H, W, C) with C in {1, 3}, values in [0, 1]. Never modified in place.
* ``severity``: int in 1..5 (already validated).
* ``rng``: the only source of randomness (no ``np.random`` global state, no ``random``).
* ``family``: one of :data:`FAMILIES`; selects the per-resolution constants.
* functions marked ``fn.native_uint8 = True`` (JPEG, pixelate) instead take and return the uint8 batch.
* returns float32 (or float64) array of the same shape, *not necessarily clipped*; the caller clips to
  [0, 1] and converts to uint8 by truncation, as Hendrycks' scripts do (``np.uint8(np.clip(x, 0, 1) * 255)``).
"""

from __future__ import annotations

import numpy as np

#: Constant families: ``imagenet`` = make_imagenet_c.py (224 px), ``cifar`` = make_cifar_c.py (32 px),
#: ``mnist`` = our documented adaptation of the CIFAR constants to 28 px single-channel digits.
FAMILIES = ("mnist", "cifar", "imagenet")


def family_for_size(height: int, width: int) -> str:
    """Default constant family for an image size: <=28 px mnist, <=64 px cifar, larger imagenet."""
    side = min(height, width)
    if side <= 28:
        return "mnist"
    if side <= 64:
        return "cifar"
    return "imagenet"


def pick(table: dict[str, tuple], family: str, severity: int):
    """``table[family][severity - 1]``: the constant of one family at one severity."""
    return table[family][severity - 1]


def to_rgb(x: np.ndarray) -> np.ndarray:
    """(N,H,W,1) -> (N,H,W,3) by repetition; (N,H,W,3) unchanged."""
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def to_gray_like(y: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Convert an RGB result back to the channel count of ``like`` (ITU-R 601 luma for 1 channel)."""
    if like.shape[-1] == 1 and y.shape[-1] == 3:
        w = np.asarray([0.299, 0.587, 0.114], dtype=y.dtype)
        return (y @ w)[..., None]
    return y
