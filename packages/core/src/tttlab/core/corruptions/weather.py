"""Weather corruptions: snow, frost, fog.

Constants: ``imagenet`` = Hendrycks' ``make_imagenet_c.py`` (the values imagecorruptions-imaug uses),
``cifar`` = ``make_cifar_c.py`` (github.com/hendrycks/robustness, ``ImageNet-C/create_c/``):

* fog (strength, wibble decay): imagenet (1.5,2) (2,2) (2.5,1.7) (2.5,1.5) (3,1.4);
  cifar (.2,3) (.5,3) (.75,2.5) (1,2) (1.5,1.75).
* frost (image weight, frost weight): imagenet (1,.4) (.8,.6) (.7,.7) (.65,.7) (.6,.75);
  cifar (1,.2) (1,.3) (.9,.4) (.85,.4) (.75,.45).  The photos are used at full size for ImageNet and
  shrunk by 0.2 for CIFAR.
* snow (loc, scale, zoom, threshold, blur radius, blur sigma, image weight), imagenet
  (.1,.3,3,.5,10,4,.8) (.2,.3,2,.5,12,4,.7) (.55,.3,4,.9,12,8,.7) (.55,.3,4.5,.85,12,8,.65)
  (.55,.3,2.5,.85,12,12,.55); cifar (.1,.2,1,.6,8,3,.95) (.1,.2,1,.5,10,4,.9) (.15,.3,1.75,.55,10,4,.9)
  (.25,.3,2.25,.6,12,6,.85) (.3,.3,1.25,.65,14,12,.8).

``mnist`` family (28 px, one channel): the CIFAR constants, lengths in pixels scaled by 28/32 = 0.875:
the snow layer's motion-blur radius (round(0.875 r): 7 9 9 10 12) and sigma (x 0.875), and the frost
texture scale (0.2 x 0.875 = 0.175).  Fog keeps its constants: the plasma map is the next power of two
(32 px, as for CIFAR) cropped to 28 px, and the wibble decay is a ratio between octaves, not a length.
The snow zoom (a relative factor) and all weights are unchanged.

Deviations from the original scripts (documented):

* fog: the diamond-square plasma fractal is computed for the whole batch at once (one map per image,
  float32), with its uniform perturbations drawn from ``rng``.
* frost: the original blends a random crop of one of six bundled frost photographs.  We bundle and read
  no photos: the texture is generated from ``rng`` (a smooth density field times ridged multi-scale
  noise that looks like ice crystals, slightly blue), with its mean colour set to the six photos' average
  (RGB about (133, 155, 167) of 255) raised 6% and its contrast to 0.14, calibrated so that the mean
  absolute change on 224 px photos agrees with imagecorruptions-imaug over many draws.  As the original
  crops one of a few photos, one texture sheet 1.5x the image size is generated per call and every image
  takes a random crop of it, randomly flipped.  Grayscale images get the texture's luma.  Note: both of
  Hendrycks' scripts draw ``np.random.randint(5)``, so ImageNet-C and CIFAR-10-C use only the first five
  photos, whose average is brighter, about (146, 167, 179); imagecorruptions draws all six.  The raised
  six-photo mean above, about (141, 165, 177), is within 3% of the five-photo one.
* snow: ImageMagick's motion blur of the snow layer is the numpy line blur of ``blur.line_blur`` (same
  kernel and sampling as ImageMagick), angle uniform in [-135, -45] degrees; as in the original, the layer
  is truncated to 8 bits before the blur (its ``astype(np.uint8)``) and the blurred layer is rounded to 8
  bits (the PNG round trip).  The normal noise is drawn only for the central crop
  that the zoom enlarges (the rest of the original's draw is cropped away), and the zoom is Pillow's
  bilinear resize with ``scipy.ndimage.zoom``'s sample positions.  Grayscale images use themselves as
  the gray image.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from ._common import pick
from .blur import MNIST_SCALE, _zoom_box, line_blur

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
FOG["mnist"] = FOG["cifar"]
FROST["mnist"] = FROST["cifar"]
SNOW["mnist"] = tuple(
    (loc, scale, zoom, thr, int(round(r * MNIST_SCALE)), s * MNIST_SCALE, wt)
    for loc, scale, zoom, thr, r, s, wt in SNOW["cifar"]
)
#: Size of the frost texture's features relative to the 224 px photos (the original shrinks the photos
#: by 0.2 for CIFAR; MNIST is 28/32 of that).
FROST_SCALE = {"imagenet": 1.0, "cifar": 0.2, "mnist": 0.2 * MNIST_SCALE}

#: Average RGB of the six frost photographs of the original benchmark (0-1 scale), x1.06 (calibrated).
FROST_MEAN = np.asarray([133.4, 155.3, 167.2], np.float32) / 255.0 * 1.06
FROST_STD = 0.14
LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# ---------------------------------------------------------------------------------------------- fog


def plasma_fractal(n: int, mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` diamond-square height maps, (n, mapsize, mapsize) float32 in [0, 1]; mapsize a power of two.

    Every new point is the mean of its 4 neighbours (square step: the corners; diamond step: the
    neighbours on the torus) plus ``wibble * U(-wibble, wibble)``; wibble starts at 100 and is divided by
    ``wibbledecay`` after each octave."""
    maps = np.zeros((n, mapsize, mapsize), np.float32)
    step, wibble = mapsize, 100.0

    def wibbled_mean(total):
        noise = rng.random(total.shape, dtype=np.float32)
        noise *= np.float32(2 * wibble * wibble)
        noise -= np.float32(wibble * wibble)
        total *= np.float32(0.25)
        total += noise
        return total

    while step >= 2:
        half = step // 2
        corners = maps[:, ::step, ::step]
        acc = corners + np.roll(corners, -1, axis=1)
        acc += np.roll(acc, -1, axis=2)
        maps[:, half::step, half::step] = wibbled_mean(acc)
        centres = maps[:, half::step, half::step]
        left = centres + np.roll(centres, 1, axis=1)
        left += corners
        left += np.roll(corners, -1, axis=2)
        maps[:, ::step, half::step] = wibbled_mean(left)
        top = centres + np.roll(centres, 1, axis=2)
        top += corners
        top += np.roll(corners, -1, axis=1)
        maps[:, half::step, ::step] = wibbled_mean(top)
        step //= 2
        wibble /= wibbledecay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    maps /= maps.max(axis=(1, 2), keepdims=True)
    return maps


def fog(x, severity, rng, family):
    """``(x + s * plasma) * max(x) / (max(x) + s)`` per image: a bright, contrast-reducing haze."""
    strength, decay = pick(FOG, family, severity)
    n, h, w, _ = x.shape
    plasma = plasma_fractal(n, _next_power_of_2(max(h, w)), decay, rng)[:, :h, :w, None]
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    out = plasma * np.float32(strength)
    out = out + x
    out *= max_val / (max_val + np.float32(strength))
    return out


# -------------------------------------------------------------------------------------------- frost


def _upsample_linear(planes: np.ndarray, step: int) -> np.ndarray:
    """``scipy.ndimage.zoom(planes, (1, step, step), order=1)`` (corner-aligned) with Pillow's resize."""
    n, h, w = planes.shape
    oh, ow = h * step, w * step
    ay, ax = (h - 1) / (oh - 1), (w - 1) / (ow - 1)
    box = (0.5 - 0.5 * ax, 0.5 - 0.5 * ay, 0.5 - 0.5 * ax + ax * ow, 0.5 - 0.5 * ay + ay * oh)
    out = np.empty((n, oh, ow), np.float32)
    for i in range(n):
        out[i] = np.asarray(Image.fromarray(planes[i]).resize((ow, oh), Image.Resampling.BILINEAR, box=box))
    return out


def frost_texture(n: int, h: int, w: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Procedural frost, (n, h, w, 3) float32 in [0, 1]: density field x ridged crystal noise, blue tint.

    ``scale`` is the size of the features relative to the 224 px version (0.2 for 32 px images)."""
    s = max(scale, 0.05)
    sigma = 24 * s
    # the low-frequency density field is smooth: draw it on a coarse grid and upsample (bilinear)
    step = max(1, int(sigma // 3))
    coarse = rng.standard_normal((n, -(-h // step) + 1, -(-w // step) + 1), dtype=np.float32)
    coarse = ndi.gaussian_filter(coarse, (0, sigma / step, sigma / step), mode="wrap")
    density = _upsample_linear(coarse, step)[:, :h, :w]
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
    """``a x + b frost`` with a procedural frost texture (random flipped crops of one sheet per call)."""
    w_img, w_frost = pick(FROST, family, severity)
    n, h, w, c = x.shape
    sheet = frost_texture(1, (3 * h + 1) // 2, (3 * w + 1) // 2, rng, scale=FROST_SCALE[family])[0]
    if c == 1:
        sheet = (sheet @ LUMA)[..., None]
    top = rng.integers(0, sheet.shape[0] - h + 1, size=n)
    left = rng.integers(0, sheet.shape[1] - w + 1, size=n)
    flips = rng.integers(0, 2, size=(n, 2))
    out = x * np.float32(w_img)
    for i in range(n):
        crop = sheet[top[i] : top[i] + h, left[i] : left[i] + w]
        crop = crop[:: -1 if flips[i, 0] else 1, :: -1 if flips[i, 1] else 1]
        out[i] += np.float32(w_frost) * crop
    return out


frost.chunk_pixels = 0  # one texture sheet per call: do not split the batch


# --------------------------------------------------------------------------------------------- snow


def snow_layer(n: int, h: int, w: int, loc: float, scale: float, zoom: float, rng) -> np.ndarray:
    """(n, h, w, 1) float32: normal noise N(loc, scale^2) zoomed (bilinear) by ``zoom`` about the centre.

    Only the ``ceil(size / zoom)`` central pixels that the zoom keeps are drawn."""
    ch, cw = int(math.ceil(h / zoom)), int(math.ceil(w / zoom))
    base = rng.standard_normal((n, ch, cw), dtype=np.float32)
    base *= np.float32(scale)
    base += np.float32(loc)
    if ch == h and cw == w and zoom <= 1:
        return base[..., None]
    top, left = (h - ch) // 2, (w - cw) // 2
    y0, y1 = _zoom_box(h, zoom)
    x0, x1 = _zoom_box(w, zoom)
    box = (x0 - left, y0 - top, x1 - left, y1 - top)
    out = np.empty((n, h, w, 1), np.float32)
    for i in range(n):
        out[i, :, :, 0] = np.asarray(
            Image.fromarray(base[i]).resize((w, h), Image.Resampling.BILINEAR, box=box)
        )
    return out


def snow(x, severity, rng, family):
    """Zoomed, thresholded and motion-blurred noise added twice (and rotated 180 degrees) to a whitened image."""
    loc, scale, zoom, threshold, radius, sigma, weight = pick(SNOW, family, severity)
    n, h, w, c = x.shape
    layer = snow_layer(n, h, w, loc, scale, float(zoom), rng)
    layer[layer < threshold] = 0
    np.clip(layer, 0, 1, out=layer)
    # the original blurs an 8-bit image: (clip(layer) * 255).astype(uint8) truncates before the blur
    layer = np.floor(layer * np.float32(255)) * np.float32(1 / 255)
    angles = rng.uniform(-135, -45, size=n)
    layer = line_blur(layer, int(radius), sigma, angles)
    layer = np.round(layer * np.float32(255)) * np.float32(1 / 255)
    gray = x if c == 1 else (x @ LUMA)[..., None]
    whitened = np.maximum(x, gray * np.float32(1.5) + np.float32(0.5))
    out = x * np.float32(weight)
    out += np.float32(1 - weight) * whitened
    out += layer
    out += layer[:, ::-1, ::-1]
    return out


__all__ = ["fog", "frost", "frost_texture", "plasma_fractal", "snow", "snow_layer"]
