"""Common corruptions of Hendrycks & Dietterich (ICLR 2019), batched, seeded and dependency-free.

The 15 benchmark corruptions and the 4 held-out ("validation") ones, at severities 1-5, with the
per-resolution constants of Hendrycks' ``make_imagenet_c.py`` (224 px), ``make_cifar_c.py`` (32 px) and
a documented ``mnist`` family (28 px, one channel).  Everything is numpy/scipy/Pillow: no ImageMagick, no
bundled photos, no downloads.  Deviations from the original scripts are listed in each module docstring.

>>> import numpy as np
>>> from tttlab.core.corruptions import corrupt
>>> x = np.zeros((4, 28, 28, 1), np.uint8)
>>> corrupt(x, "gaussian_noise", 5, seed=0).shape
(4, 28, 28, 1)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import InvalidInputError, SeverityError, UnknownNameError
from ._common import FAMILIES, family_for_size
from .blur import defocus_blur, gaussian_blur, glass_blur, motion_blur, zoom_blur
from .digital import (
    brightness,
    contrast,
    elastic_transform,
    jpeg_compression,
    pixelate,
    saturate,
    spatter,
)
from .noise import gaussian_noise, impulse_noise, shot_noise, speckle_noise
from .weather import fog, frost, snow

#: The 15 corruptions of the ImageNet-C / CIFAR-10-C benchmarks, in the canonical order.
COMMON: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
#: The 4 held-out corruptions (Hendrycks' "extra"/validation set).
HELDOUT: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL: tuple[str, ...] = COMMON + HELDOUT
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

CorruptionFn = Callable[[np.ndarray, int, np.random.Generator, str], np.ndarray]

FUNCTIONS: dict[str, CorruptionFn] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "spatter": spatter,
    "saturate": saturate,
}

#: Short names users type (and the names some repos use) -> canonical names.
ALIASES: dict[str, str] = {
    "gaussian": "gaussian_noise", "gauss": "gaussian_noise", "shot": "shot_noise",
    "impulse": "impulse_noise", "defocus": "defocus_blur", "glass": "glass_blur",
    "motion": "motion_blur", "zoom": "zoom_blur", "elastic": "elastic_transform",
    "jpeg": "jpeg_compression", "speckle": "speckle_noise",
}  # fmt: skip

SUBSETS: dict[str, tuple[str, ...]] = {"common": COMMON, "heldout": HELDOUT, "all": ALL}


def canonical_name(corruption: str) -> str:
    """Canonical corruption name, accepting :data:`ALIASES`; unknown names raise ``UnknownNameError``."""
    if isinstance(corruption, str):
        key = corruption.strip().lower().replace("-", "_").replace(" ", "_")
        key = ALIASES.get(key, key)
        if key in FUNCTIONS:
            return key
    import difflib

    close = difflib.get_close_matches(str(corruption).strip().lower(), [*ALL, *SUBSETS], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""  # a typo of a long name: the guess first
    raise UnknownNameError(
        f"unknown corruption {corruption!r}{hint}; expected one of {', '.join(ALL)} "
        f"(or an alias: {', '.join(sorted(ALIASES))})"
    )


def resolve(corruptions: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A subset name (``common``, ``heldout``, ``all``), one corruption, or a list -> canonical names."""
    if isinstance(corruptions, str):
        if corruptions in SUBSETS:
            return SUBSETS[corruptions]
        return (canonical_name(corruptions),)
    if not isinstance(corruptions, (list, tuple)) and not hasattr(corruptions, "__iter__"):
        raise UnknownNameError(
            f"corruptions must be a subset name ({', '.join(SUBSETS)}), a corruption name or a list of them, "
            f"got {corruptions!r}"
        )
    return tuple(canonical_name(c) for c in corruptions)


def check_severity(severity) -> int:
    if isinstance(severity, (bool, np.bool_)) or not isinstance(severity, (int, np.integer)):
        raise SeverityError(f"severity must be an integer in 1..5, got {severity!r}")
    if not 1 <= int(severity) <= 5:
        raise SeverityError(f"severity must be in 1..5, got {severity}")
    return int(severity)


def _as_batch(images) -> tuple[np.ndarray, tuple[int, ...]]:
    """Validate uint8 images and return them as (N, H, W, C) plus the original shape."""
    if not isinstance(images, np.ndarray):
        raise InvalidInputError(f"images must be a numpy uint8 array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise InvalidInputError(
            f"images must have dtype uint8 with values 0..255, got dtype {images.dtype}"
            " (convert with (x * 255).round().astype(np.uint8) if they are floats in [0, 1])"
        )
    shape = images.shape
    if images.ndim == 2:
        batch = images[None, :, :, None]
    elif images.ndim == 3 and images.shape[-1] in (1, 3):
        batch = images[None]
    elif images.ndim == 3:
        batch = images[..., None]  # (N, H, W) grayscale batch
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        batch = images
    else:
        raise InvalidInputError(
            f"images must be (H, W), (H, W, C), (N, H, W) or (N, H, W, C) with C in {{1, 3}}, got shape {shape}"
        )
    if batch.shape[1] < 8 or batch.shape[2] < 8:
        raise InvalidInputError(f"images must be at least 8x8 pixels, got shape {shape}")
    return batch, shape


def corrupt(
    images: np.ndarray,
    corruption: str,
    severity: int,
    *,
    rng: np.random.Generator | None = None,
    seed: int | None = None,
    family: str | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Corrupt uint8 images; returns uint8 of the same shape.

    ``images`` may be one image or a batch (see :func:`_as_batch`).  Randomness comes only from ``rng``
    (or ``numpy.random.default_rng(seed)``): the same seed gives identical bytes.  ``family`` picks the
    constants (``mnist``, ``cifar``, ``imagenet``); by default it follows the image size.  Large batches
    are split into fixed-size chunks corrupted on ``threads`` threads (default :func:`default_threads`);
    the output does not depend on the number of threads.
    """
    name = canonical_name(corruption)
    severity = check_severity(severity)
    batch, shape = _as_batch(images)
    if family is None:
        family = family_for_size(batch.shape[1], batch.shape[2])
    elif family not in FAMILIES:
        raise UnknownNameError(f"unknown constant family {family!r}; expected one of {', '.join(FAMILIES)}")
    if rng is None:
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0
        ):
            raise InvalidInputError(f"seed must be a non-negative integer or None, got {seed!r}")
        rng = np.random.default_rng(seed)
    elif seed is not None:
        raise InvalidInputError("pass either rng or seed, not both")
    if batch.shape[0] == 0:
        return np.array(images, copy=True)
    fn = FUNCTIONS[name]
    size = chunk_size(batch.shape, getattr(fn, "chunk_pixels", CHUNK_PIXELS))
    starts = list(range(0, batch.shape[0], size))
    # One child generator per fixed-size chunk: the bytes depend on the seed and the image shape only,
    # never on the number of threads.
    rngs = [rng] if len(starts) == 1 else rng.spawn(len(starts))

    def run(i: int) -> np.ndarray:
        return _corrupt_chunk(fn, batch[starts[i] : starts[i] + size], severity, rngs[i], family, name)

    workers = min(len(starts), threads if threads is not None else default_threads())
    if workers <= 1:
        parts = [run(i) for i in range(len(starts))]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(run, range(len(starts))))
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return out.reshape(shape)


#: Pixels (H x W x C x N) per chunk: chunks are corrupted in parallel threads (numpy, scipy and Pillow
#: release the GIL), each with its own child generator.  Frost shares one texture sheet per call and
#: runs unchunked; JPEG/pixelate use 4x larger chunks (their per-image work is small).
CHUNK_PIXELS = 1 << 18


def chunk_size(batch_shape, chunk_pixels: int | None = None) -> int:
    """Images per chunk for a batch shape; a function may set ``fn.chunk_pixels`` (0: whole batch)."""
    n, h, w, c = batch_shape
    pixels = CHUNK_PIXELS if chunk_pixels is None else chunk_pixels
    return max(1, n) if pixels == 0 else max(1, pixels // (h * w * c))


def default_threads() -> int:
    """``TTTLAB_CORRUPTION_THREADS`` if set, else the number of CPUs (at most 8)."""
    import os

    env = os.environ.get("TTTLAB_CORRUPTION_THREADS")
    if env:
        return max(1, int(env))
    return min(8, os.cpu_count() or 1)


def _corrupt_chunk(fn, batch, severity, rng, family, name) -> np.ndarray:
    if getattr(fn, "native_uint8", False):  # JPEG, pixelate: work on bytes, no float round trip
        return fn(np.ascontiguousarray(batch), severity, rng, family)
    x = batch.astype(np.float32) * np.float32(1 / 255)
    y = fn(x, severity, rng, family)
    if y.shape != x.shape:  # pragma: no cover - guards the function contract
        raise AssertionError(f"{name} returned shape {y.shape} for input {x.shape}")
    # Truncation as in Hendrycks' scripts; the 1e-3 only undoes float error (k/255*255 = k - 1e-5).
    return (np.clip(y, 0, 1) * 255 + 1e-3).astype(np.uint8)


__all__ = [
    "ALIASES", "ALL", "COMMON", "FAMILIES", "FUNCTIONS", "HELDOUT", "SEVERITIES", "SUBSETS",
    "CHUNK_PIXELS", "canonical_name", "check_severity", "chunk_size", "corrupt", "default_threads", "resolve",
]  # fmt: skip
