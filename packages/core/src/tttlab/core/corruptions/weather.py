"""Weather corruptions: snow, frost, fog.

Constants (``imagenet`` = make_imagenet_c.py, ``cifar`` = make_cifar_c.py; ``mnist`` uses ``cifar``):

* fog (strength, wibble decay): imagenet (1.5,2) (2,2) (2.5,1.7) (2.5,1.5) (3,1.4);
  cifar (.2,3) (.5,3) (.75,2.5) (1,2) (1.5,1.75).  Diamond-square plasma on a power-of-two map covering
  the image, vectorised over the batch.
* frost (image weight, frost weight): imagenet (1,.4) (.8,.6) (.7,.7) (.65,.7) (.6,.75);
  cifar (1,.2) (1,.3) (.9,.4) (.85,.4) (.75,.45).
* snow (loc, scale, zoom, threshold, blur radius, blur sigma, image weight), imagenet
  (.1,.3,3,.5,10,4,.8) (.2,.3,2,.5,12,4,.7) (.55,.3,4,.9,12,8,.7) (.55,.3,4.5,.85,12,8,.65)
  (.55,.3,2.5,.85,12,12,.55); cifar (.1,.2,1,.6,8,3,.95) (.1,.2,1,.5,10,4,.9) (.15,.3,1.75,.55,10,4,.9)
  (.25,.3,2.25,.6,12,6,.85) (.3,.3,1.25,.65,14,12,.8).

Deviations (documented):

* frost: the original blends one of six bundled frost photographs.  We bundle no photos: the texture is
  generated procedurally from ``rng`` (a low-frequency density field plus ridged multi-scale noise that
  looks like ice crystals, with a slight blue tint), calibrated so that its mean and contrast match the
  six photos' average (RGB mean about (133, 155, 167) of 255, raised 6% so that the mean absolute change
  over 10 draws matches the reference's).  As the original crops one of six photos,
  each image gets a random (flipped) crop of one sheet generated per call.  The ``cifar``/``mnist`` texture is
  5x finer, as the original shrinks the photos by 0.2 for 32 px images.
* snow: ImageMagick's motion blur of the snow layer is the numpy line blur of ``blur.py``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ._common import pick, to_gray_like, to_rgb
from .blur import clipped_zoom, motion_blur_image

FOG = {
    "imagenet": ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),
    "cifar": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
}
FROST = {
    "imagenet": ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
    "cifar": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
}
SNOW = {
    "imagenet": (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ),
    "cifar": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
}  # fmt: skip
for _table in (FOG, FROST, SNOW):
    _table["mnist"] = _table["cifar"]

#: Average RGB of the six frost photographs of the original benchmark (0-1 scale).
FROST_MEAN = np.asarray([133.4, 155.3, 167.2], np.float32) / 255.0 * 1.06  # x1.06: calibrated, see docstring
FROST_STD = 0.14


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def plasma_fractal(n: int, mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` diamond-square height maps (n, mapsize, mapsize) in [0, 1] (mapsize a power of two)."""
    maps = np.zeros((n, mapsize, mapsize), np.float64)
    step, wibble = mapsize, 100.0

    def wibbled_mean(a):
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corners = maps[:, 0:mapsize:step, 0:mapsize:step]
        acc = corners + np.roll(corners, -1, axis=1)
        acc = acc + np.roll(acc, -1, axis=2)
        maps[:, half:mapsize:step, half:mapsize:step] = wibbled_mean(acc)
        dr = maps[:, half:mapsize:step, half:mapsize:step]
        ul = maps[:, 0:mapsize:step, 0:mapsize:step]
        lt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=2)
        maps[:, 0:mapsize:step, half:mapsize:step] = wibbled_mean(lt)
        tt = dr + np.roll(dr, 1, axis=2) + ul + np.roll(ul, -1, axis=1)
        maps[:, half:mapsize:step, 0:mapsize:step] = wibbled_mean(tt)
        step //= 2
        wibble /= wibbledecay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return (maps / maps.max(axis=(1, 2), keepdims=True)).astype(np.float32)


def fog(x, severity, rng, family):
    strength, decay = pick(FOG, family, severity)
    n, h, w, _ = x.shape
    plasma = plasma_fractal(n, _next_power_of_2(max(h, w)), decay, rng)[:, :h, :w, None]
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + strength * plasma) * max_val / (max_val + strength)


def frost_texture(n: int, h: int, w: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Procedural frost, (n, h, w, 3) float32 in [0, 1]: density field x ridged crystal noise, blue tint."""
    s = max(scale, 0.05)
    sigma = 24 * s
    # the low-frequency density field is smooth: draw it on a coarse grid and upsample (bilinear)
    step = max(1, int(sigma // 3))
    coarse = rng.standard_normal((n, -(-h // step) + 1, -(-w // step) + 1), dtype=np.float32)
    coarse = ndi.gaussian_filter(coarse, (0, sigma / step, sigma / step), mode="wrap")
    density = ndi.zoom(coarse, (1, step, step), order=1)[:, :h, :w]
    density = (density - density.mean(axis=(1, 2), keepdims=True)) / (
        density.std(axis=(1, 2), keepdims=True) + 1e-8
    )
    ridges = np.zeros((n, h, w), np.float32)
    for band_sigma, weight in ((1.0, 0.5), (2.5, 0.3), (6.0, 0.2)):
        band = ndi.gaussian_filter(
            rng.standard_normal((n, h, w), dtype=np.float32), (0, band_sigma * s, band_sigma * s), mode="wrap"
        )
        band /= band.std(axis=(1, 2), keepdims=True) + 1e-8
        ridges += weight * np.clip(1 - np.abs(band), 0, 1) ** 3
    tex = 0.55 * density + 1.6 * (ridges - ridges.mean(axis=(1, 2), keepdims=True)) / (
        ridges.std(axis=(1, 2), keepdims=True) + 1e-8
    )
    tex = tex / (tex.std(axis=(1, 2), keepdims=True) + 1e-8) * FROST_STD
    rgb = tex[..., None] + FROST_MEAN
    return np.clip(rgb, 0, 1).astype(np.float32)


def frost(x, severity, rng, family):
    w_img, w_frost = pick(FROST, family, severity)
    n, h, w, _ = x.shape
    # Like the original (random crops of 6 stored photos), every image takes a random crop, possibly
    # flipped, of one texture sheet 1.5x the image size, generated per call: one texture per batch.
    sheet = frost_texture(
        1, (3 * h + 1) // 2, (3 * w + 1) // 2, rng, scale=1.0 if family == "imagenet" else 0.2
    )[0]
    top = rng.integers(0, sheet.shape[0] - h + 1, size=n)
    left = rng.integers(0, sheet.shape[1] - w + 1, size=n)
    flips = rng.integers(0, 2, size=(n, 2))
    tex = np.empty((n, h, w, 3), np.float32)
    for i in range(n):
        crop = sheet[top[i] : top[i] + h, left[i] : left[i] + w]
        tex[i] = crop[:: -1 if flips[i, 0] else 1, :: -1 if flips[i, 1] else 1]
    return to_gray_like(w_img * to_rgb(x) + w_frost * tex, x)


def snow(x, severity, rng, family):
    loc, scale, zoom, threshold, radius, sigma, weight = pick(SNOW, family, severity)
    rgb = to_rgb(x)
    n, h, w, _ = rgb.shape
    layer = rng.normal(loc, scale, size=(n, h, w, 1)).astype(np.float32)
    layer = clipped_zoom(layer, float(zoom)) if zoom > 1 else layer
    layer[layer < threshold] = 0
    layer = np.clip(layer, 0, 1)
    angles = rng.uniform(-135, -45, size=n)
    layer = np.stack([motion_blur_image(img, int(radius), sigma, a) for img, a in zip(layer, angles)])
    layer = np.round(layer * 255) / 255.0
    gray = (rgb @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None]
    rgb = weight * rgb + (1 - weight) * np.maximum(rgb, gray * 1.5 + 0.5)
    out = rgb + layer + layer[:, ::-1, ::-1]
    return to_gray_like(out, x)


frost.chunk_pixels = 0  # one texture sheet per call: do not split the batch
