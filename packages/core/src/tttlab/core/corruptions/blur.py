"""Blur corruptions: defocus, glass, motion, zoom and gaussian blur.

Constants: ``imagenet`` = Hendrycks' ``make_imagenet_c.py`` (the values imagecorruptions-imaug uses),
``cifar`` = ``make_cifar_c.py`` (github.com/hendrycks/robustness, ``ImageNet-C/create_c/``), including its
held-out ``gaussian_blur`` sigmas.

===============  ==============================================  ==========================================
corruption       imagenet                                        cifar
===============  ==============================================  ==========================================
defocus (r, a)   (3,.1) (4,.5) (6,.5) (8,.5) (10,.5)             (.3,.4) (.4,.5) (.5,.6) (1,.2) (1.5,.1)
glass (s, d, n)  (.7,1,2) (.9,2,1) (1,2,3) (1.1,3,2) (1.5,4,2)   (.05,1,1) (.25,1,1) (.4,1,1) (.25,1,2) (.4,1,2)
motion (r, s)    (10,3) (15,5) (15,8) (15,12) (20,15)            (6,1) (6,1.5) (6,2) (8,2) (9,2.5)
zoom (factors)   1..1.11/.01, 1..1.16/.01, 1..1.21/.02,          1..1.06/.01, 1..1.11/.01, 1..1.16/.01,
                 1..1.26/.02, 1..1.31/.03                        1..1.21/.01, 1..1.26/.01
gaussian sigma   1 2 3 4 6                                       .4 .6 .7 .8 1
===============  ==============================================  ==========================================

``mnist`` family (28 px, one channel): the CIFAR constants, with the lengths in pixels scaled by 28/32:

* gaussian sigma, glass sigma and motion sigma are multiplied by 0.875 (gaussian .35 .525 .6125 .7 .875);
* motion radius (in taps) 6 6 6 8 9 becomes round(0.875 r) = 5 5 5 7 8;
* kept as they are: the defocus radii (the disk is drawn on the integer grid: a radius below 1 is one
  pixel, 1 the 5-pixel cross, 1.5 the 3x3 square; scaling 1 -> .875 and 1.5 -> 1.31 would collapse
  severities 4 and 5 onto smaller footprints), the glass displacement (an integer, already the minimum 1)
  and iterations, and the zoom factors (relative to the image size).

Deviations from the original scripts (the constants are unchanged):

* motion blur: ImageMagick's ``-motion-blur`` (Wand) is reimplemented in numpy: ``2r+1`` taps with
  one-sided Gaussian weights ``exp(-i^2 / 2 sigma^2)`` (normalised), tap ``i`` sampling the pixel at
  ``(ceil(i cos(a) - 1/2), ceil(i sin(a) - 1/2))``, pixels beyond the border repeating the edge (ImageMagick's
  default virtual pixels), angle uniform in [-45, 45] degrees per image.  All taps are kept even when
  the line is longer than the image (imagecorruptions drops them, and the weights then sum to less than
  1; this never happens at the families' own sizes).  The output is not re-quantised to
  8 bits before the caller's conversion (ImageMagick writes a PNG in between).
* glass blur: the original's "swap" ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` acts on numpy views, so it
  copies: in reverse raster order every pixel of the inner region takes the *current* value of a random
  neighbour at offset ``[-d, d)^2`` (a neighbour already visited in this pass has its new value).  We
  reproduce exactly this process, vectorised: the chains of "already visited" neighbours are resolved by
  pointer jumping, and the passes compose into one gather.  Only the random numbers differ (our ``rng``,
  in a different order); the quantisation to 8 bits after the first Gaussian is kept.
* zoom blur: the central crop is zoomed with Pillow's bilinear resize on float32 planes (mode ``F``), with
  the crop box chosen so that the sample positions are those of ``scipy.ndimage.zoom(order=1)``
  (corner-aligned) in ``clipped_zoom``: equal up to float rounding.
* defocus blur: as in the original, the 21x21 disk of radius 10 (imagenet severity 5) touches its grid's
  border, where the reflect-101 anti-aliasing adds mass: that kernel sums to 1.011 (kept).  The disk (disk, normalised, then a 3x3 or 5x5 Gaussian with reflect-101
  borders as OpenCV's ``GaussianBlur``) is cropped to its non-zero support and applied by FFT convolution
  (or direct correlation for small kernels) with reflect-101 image borders (OpenCV ``filter2D``'s default).
* gaussian blur: scikit-image's ``gaussian`` (edge mode ``nearest``, kernel truncated at 4 sigma) in
  float32; for sigma >= 2.5 the same truncated, separable kernel is applied by FFT on an edge-padded image
  (identical up to float rounding, faster for wide kernels).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import scipy.fft as sfft
from PIL import Image
from scipy import ndimage as ndi

from ._common import pick

DEFOCUS = {
    "imagenet": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    "cifar": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
}
GLASS = {
    "imagenet": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
    "cifar": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
}
MOTION = {
    "imagenet": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    "cifar": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
}
ZOOM = {  # (stop, step) of np.arange(1, stop, step)
    "imagenet": ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)),
    "cifar": ((1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.01)),
}
GAUSSIAN = {"imagenet": (1, 2, 3, 4, 6), "cifar": (0.4, 0.6, 0.7, 0.8, 1)}

#: 28 px / 32 px: the factor applied to the CIFAR lengths for the ``mnist`` family.
MNIST_SCALE = 28 / 32
DEFOCUS["mnist"] = DEFOCUS["cifar"]
GLASS["mnist"] = tuple((s * MNIST_SCALE, d, n) for s, d, n in GLASS["cifar"])
MOTION["mnist"] = tuple((int(round(r * MNIST_SCALE)), s * MNIST_SCALE) for r, s in MOTION["cifar"])
ZOOM["mnist"] = ZOOM["cifar"]
GAUSSIAN["mnist"] = tuple(s * MNIST_SCALE for s in GAUSSIAN["cifar"])

#: Above this sigma the Gaussian is applied by FFT (measured crossover on 224 px batches).
FFT_SIGMA = 2.5


# ----------------------------------------------------------------------------------------- gaussian


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The normalised 1-D Gaussian of ``scipy.ndimage.gaussian_filter`` (radius ``int(truncate*sigma+.5)``)."""
    radius = int(truncate * float(sigma) + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


@lru_cache(maxsize=64)
def _gauss_spectrum(sigma: float, fh: int, fw: int) -> np.ndarray:
    """rfft2 of the separable Gaussian, centred at (0, 0) on an (fh, fw) torus, shape (fh, fw//2+1, 1)."""
    k = gaussian_kernel1d(sigma)
    r = k.size // 2
    kh = np.zeros(fh)
    kh[: r + 1], kh[fh - r :] = k[r:], k[:r]
    kw = np.zeros(fw)
    kw[: r + 1], kw[fw - r :] = k[r:], k[:r]
    spec = np.fft.fft(kh)[:, None] * np.fft.rfft(kw)[None, :]
    return spec.astype(np.complex64)[..., None]


def gauss2d(x: np.ndarray, sigma: float) -> np.ndarray:
    """scikit-image ``gaussian`` (mode nearest, truncate 4) over H and W of an NHWC float32 batch."""
    if sigma <= 0:
        return x.astype(np.float32, copy=True)
    n, h, w, c = x.shape
    r = int(4.0 * sigma + 0.5)
    if sigma < FFT_SIGMA or r >= min(h, w):
        return ndi.gaussian_filter(x, (0, sigma, sigma, 0), mode="nearest", truncate=4.0).astype(
            np.float32, copy=False
        )
    fh, fw = sfft.next_fast_len(h + 2 * r, real=True), sfft.next_fast_len(w + 2 * r, real=True)
    padded = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    spec = sfft.rfft2(padded, s=(fh, fw), axes=(1, 2))
    spec *= _gauss_spectrum(float(sigma), fh, fw)
    out = sfft.irfft2(spec, s=(fh, fw), axes=(1, 2))
    return np.ascontiguousarray(out[:, r : r + h, r : r + w], dtype=np.float32)


def gaussian_blur(x, severity, rng, family):
    """Held-out corruption: an isotropic Gaussian blur of standard deviation sigma pixels."""
    return gauss2d(x, pick(GAUSSIAN, family, severity))


# ------------------------------------------------------------------------------------------ defocus


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The anti-aliased disk: the pixels within ``radius`` (a 17x17 grid, or (2r+1)^2 for r > 8),
    normalised, then blurred by a 3x3 (5x5 for r > 8) Gaussian of sigma ``alias_blur`` (reflect-101)."""
    if radius <= 8:
        grid, ksize = np.arange(-8, 9), 3
    else:
        grid, ksize = np.arange(-radius, radius + 1), 5
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    half = ksize // 2
    g = np.exp(-(np.arange(-half, half + 1) ** 2) / (2 * alias_blur**2))
    g /= g.sum()
    disk = ndi.convolve1d(disk, g, axis=0, mode="mirror")
    disk = ndi.convolve1d(disk, g, axis=1, mode="mirror")
    return disk.astype(np.float32)


@lru_cache(maxsize=16)
def _defocus_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """``disk_kernel`` cropped symmetrically to its non-zero support (same result, smaller borders)."""
    k = disk_kernel(radius, alias_blur)
    c = k.shape[0] // 2
    nz = np.nonzero(k)
    p = int(max(np.abs(nz[0] - c).max(), np.abs(nz[1] - c).max()))
    return k[c - p : c + p + 1, c - p : c + p + 1]


@lru_cache(maxsize=32)
def _defocus_spectrum(radius: float, alias_blur: float, fh: int, fw: int) -> np.ndarray:
    k = _defocus_kernel(radius, alias_blur)
    p = k.shape[0] // 2
    torus = np.zeros((fh, fw))
    torus[: k.shape[0], : k.shape[1]] = k
    torus = np.roll(torus, (-p, -p), axis=(0, 1))
    return np.fft.rfft2(torus).astype(np.complex64)[..., None]


def defocus_blur(x, severity, rng, family):
    """Convolution with an anti-aliased disk (a defocused lens), reflect-101 borders."""
    radius, alias = pick(DEFOCUS, family, severity)
    k = _defocus_kernel(radius, alias)
    p = k.shape[0] // 2
    n, h, w, c = x.shape
    if k.shape[0] <= 5 or p >= min(h, w):
        return ndi.correlate(x, k[None, :, :, None], mode="mirror").astype(np.float32, copy=False)
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")  # numpy reflect = reflect-101
    fh, fw = sfft.next_fast_len(h + 2 * p, real=True), sfft.next_fast_len(w + 2 * p, real=True)
    spec = sfft.rfft2(padded, s=(fh, fw), axes=(1, 2))
    spec *= _defocus_spectrum(radius, alias, fh, fw)
    out = sfft.irfft2(spec, s=(fh, fw), axes=(1, 2))
    return np.ascontiguousarray(out[:, p : p + h, p : p + w], dtype=np.float32)


# -------------------------------------------------------------------------------------------- glass


def glass_sources(n: int, h: int, w: int, delta: int, iterations: int, rng: np.random.Generator):
    """Flat source index (into the n*h*w pixels) of every output pixel of the glass-blur shuffle.

    One pass visits the inner pixels (rows and columns ``delta+1 .. size-delta``) in reverse raster order;
    each takes the current value at a uniform offset in ``[-delta, delta)^2``.  A source that comes later
    in raster order (inside the region) was already overwritten in this pass, so the value is that
    pixel's *new* value: these chains only move forward, and pointer jumping resolves them in
    O(log length) vectorised rounds.  Passes compose: ``src <- src[pass]``.
    """
    size = n * h * w
    itype = np.int32 if size < 2**31 - 1 else np.int64
    src = np.arange(size, dtype=itype)
    rows = np.arange(delta + 1, h - delta + 1)
    cols = np.arange(delta + 1, w - delta + 1)
    if rows.size == 0 or cols.size == 0 or delta < 1:
        return src
    base = np.arange(n, dtype=itype)[:, None, None] * (h * w)
    pos = (base + rows[:, None].astype(itype) * w + cols[None, :].astype(itype)).ravel()
    prow = np.broadcast_to(rows[None, :, None], (n, rows.size, cols.size)).ravel()
    pcol = np.broadcast_to(cols[None, None, :], (n, rows.size, cols.size)).ravel()
    for _ in range(iterations):
        dy, dx = rng.integers(-delta, delta, size=(2, pos.size), dtype=itype)
        target = np.arange(size, dtype=itype)
        target[pos] = pos + dy * w + dx
        qr, qc = prow + dy, pcol + dx
        later = ((dy > 0) | ((dy == 0) & (dx > 0))) & (qr <= h - delta) & (qc > delta) & (qc <= w - delta)
        pending = np.zeros(size, dtype=bool)
        pending[pos] = later
        active = pos[later]
        while active.size:
            t = target[active]
            target[active] = target[t]
            still = pending[t]
            pending[active] = still
            active = active[still]
        src = src[target]
    return src


def glass_blur(x, severity, rng, family):
    """Gaussian blur, 8-bit quantisation, local pixel shuffle (see :func:`glass_sources`), Gaussian blur."""
    sigma, delta, iterations = pick(GLASS, family, severity)
    n, h, w, c = x.shape
    y = gauss2d(x, sigma)
    np.clip(y, 0, 1, out=y)
    y = np.floor(y * np.float32(255)) * np.float32(1 / 255)  # the original re-quantises to uint8 here
    src = glass_sources(n, h, w, int(delta), int(iterations), rng)
    y = y.reshape(n * h * w, c)[src].reshape(n, h, w, c)
    return gauss2d(y, sigma)


# ------------------------------------------------------------------------------------------- motion


def motion_kernel(radius: int, sigma: float) -> np.ndarray:
    """One-sided Gaussian weights of the ``2r+1`` taps (tap 0 = the pixel itself), summing to 1."""
    width = 2 * int(radius) + 1
    k = np.exp(-(np.arange(width, dtype=np.float64) ** 2) / (2 * sigma**2))
    return (k / k.sum()).astype(np.float32)


def motion_offsets(radius: int, angle: float, shape: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """(row, col) sample offset of each tap along the line at ``angle`` degrees (ImageMagick's rounding).

    With ``shape``, the taps stop at the first one that leaves an image of that size (as
    imagecorruptions does; only matters for images smaller than the kernel)."""
    width = 2 * int(radius) + 1
    a = math.radians(angle)
    sin, cos = math.sin(a), math.cos(a)
    out = []
    for i in range(width):
        oy, ox = math.ceil(i * sin - 0.5), math.ceil(i * cos - 0.5)
        if shape is not None and (abs(oy) >= shape[0] or abs(ox) >= shape[1]):
            break
        out.append((oy, ox))
    return out


def line_blur(x: np.ndarray, radius: int, sigma: float, angles) -> np.ndarray:
    """Motion-blur every (H, W, C) image of ``x`` along its own angle; edge pixels repeat."""
    n, h, w, c = x.shape
    k = motion_kernel(radius, sigma)
    out = np.empty(x.shape, np.float32)
    for i in range(n):
        offsets = motion_offsets(radius, float(angles[i]))
        oys = [o[0] for o in offsets]
        oxs = [o[1] for o in offsets]
        top, bottom = max(0, -min(oys)), max(0, max(oys))
        left, right = max(0, -min(oxs)), max(0, max(oxs))
        padded = np.pad(x[i], ((top, bottom), (left, right), (0, 0)), mode="edge")
        acc = out[i]
        np.multiply(padded[top : top + h, left : left + w], k[0], out=acc)
        tmp = np.empty_like(acc)
        for weight, (oy, ox) in zip(k[1 : len(offsets)], offsets[1:]):
            np.multiply(padded[top + oy : top + oy + h, left + ox : left + ox + w], weight, out=tmp)
            acc += tmp
    return out


def motion_blur(x, severity, rng, family):
    """ImageMagick-style motion blur along a random angle in [-45, 45] degrees per image."""
    radius, sigma = pick(MOTION, family, severity)
    angles = rng.uniform(-45, 45, size=x.shape[0])
    return line_blur(x, radius, sigma, angles)


# --------------------------------------------------------------------------------------------- zoom


def _zoom_box(n_out: int, zoom: float) -> tuple[float, float]:
    """Source interval (Pillow box coordinates) reproducing ``clipped_zoom``'s sample positions on one axis.

    ``clipped_zoom`` crops ``ceil(n/zoom)`` central pixels, zooms them with ``scipy.ndimage.zoom``
    (order 1, corner-aligned: output ``j`` samples input ``j (crop-1)/(zoomed-1)``) and trims to ``n``.
    Pillow samples output pixel ``j`` at ``box0 + (j + 1/2) (box1 - box0) / n - 1/2``."""
    crop = int(math.ceil(n_out / zoom))
    top = (n_out - crop) // 2
    zoomed = int(round(crop * zoom))
    trim = (zoomed - n_out) // 2
    a = (crop - 1) / (zoomed - 1) if zoomed > 1 else 0.0
    b = trim * a + top + 0.5
    return b - 0.5 * a, b - 0.5 * a + a * n_out


def clipped_zoom(x: np.ndarray, zoom: float) -> np.ndarray:
    """Zoom the centre of every (N, H, W, C) image by ``zoom`` >= 1, keeping the size (bilinear)."""
    return _zoom_sum(x, [zoom], include_identity=False)


def _zoom_sum(x: np.ndarray, factors, include_identity: bool) -> np.ndarray:
    """Sum over ``factors`` of the clipped zooms of ``x`` (plus ``x`` itself if ``include_identity``)."""
    n, h, w, c = x.shape
    planes = np.ascontiguousarray(np.moveaxis(x, -1, 1), dtype=np.float32)  # (N, C, H, W)
    out = planes.copy() if include_identity else np.zeros_like(planes)
    boxes = []
    for z in factors:
        y0, y1 = _zoom_box(h, float(z))
        x0, x1 = _zoom_box(w, float(z))
        boxes.append((x0, y0, x1, y1))
    for i in range(n):
        for ch in range(c):
            im = Image.fromarray(planes[i, ch])
            acc = out[i, ch]
            for box in boxes:
                acc += np.asarray(im.resize((w, h), Image.Resampling.BILINEAR, box=box))
    return np.moveaxis(out, 1, -1)


def zoom_factors(family: str, severity: int) -> np.ndarray:
    stop, step = pick(ZOOM, family, severity)
    return np.arange(1, stop, step)


def zoom_blur(x, severity, rng, family):
    """Average of the image and its central zooms by the family's factors (a radial blur)."""
    factors = zoom_factors(family, severity)
    out = _zoom_sum(x, factors, include_identity=True)
    out *= np.float32(1 / (len(factors) + 1))
    return np.ascontiguousarray(out)
