"""Digital corruptions: brightness, contrast, elastic transform, pixelate, JPEG, saturate, spatter.

Constants from Hendrycks & Dietterich (github.com/hendrycks/robustness, ``ImageNet-C/create_c/``):
``imagenet`` = ``make_imagenet_c.py`` as packaged by imagecorruptions-imaug 1.1.5, ``cifar`` =
``make_cifar_c.py``.

==================  ===================================  ========================================
corruption          imagenet                             cifar
==================  ===================================  ========================================
brightness (+V)     .1 .2 .3 .4 .5                       .05 .1 .15 .2 .3
contrast (factor)   .4 .3 .2 .1 .05                      .75 .5 .4 .3 .15
saturate (S*a + b)  (.3,0) (.1,0) (2,0) (5,.1) (20,.2)   (.3,0) (.1,0) (1.5,0) (2,.1) (2.5,.2)
jpeg quality        25 18 15 10 7                        80 65 58 50 40
pixelate factor     .6 .5 .4 .3 .25 (up: nearest)        .95 .9 .85 .75 .65 (up: box)
elastic             244 * (alpha, sigma, affine) =       IMSIZE * (alpha, sigma, affine) =
                    (2,.7,.1) (2,.08,.2) (.05,.01,.02)   (0,0,.08) (.05,.2,.07) (.08,.06,.06)
                    (.07,.01,.02) (.12,.01,.02)          (.1,.04,.05) (.1,.03,.03)
spatter             (loc, scale, sigma, threshold, intensity, mud) per severity: ``SPATTER``
==================  ===================================  ========================================

``mnist`` family (28 px, one channel): the CIFAR constants.  The only constants given in pixels are the
elastic ones (IMSIZE = 32 in ``make_cifar_c.py``); for MNIST they are taken with IMSIZE = 28, i.e. the same
fractions of the image side.  Pixelate and JPEG constants are relative and carry over unchanged.

Elastic: every family runs the procedure of Hendrycks' scripts, a random affine warp (three points
around the centre moved by U(+-affine) pixels) then a displacement field (U(-1, 1) noise, Gaussian
smoothed with sigma pixels, truncate 3, times alpha).  The ImageNet constants are those of
``make_imagenet_c.py`` (and of its ``imagenet_c`` package), which generated ImageNet-C: written as
multiples of 244 (the script's own note says 224 was meant; the pixel values are kept as run).  The
imagecorruptions package replaced this by a displacement-only transform with other constants
(alpha 250 * (.05 .. .12), sigma 1% of the side); we do not follow it, since the AlexNet errors that
normalise the mCE (non-monotone in severity: 52.6, 70.1, 55.7, 64.1, 80.6%) were measured on the
original.  ``make_imagenet_c.py`` also upsamples pixelate with a box filter where imagecorruptions uses nearest neighbour; for upsampling,
Pillow's box filter copies one source pixel per output pixel, the same one as nearest for the 224 px
sizes (checked), so the two agree.  The held-out corruptions' CIFAR constants (saturate, spatter; speckle
in ``noise.py``) are those of ``make_cifar_c.py`` too.

Deviations from the original scripts:

* randomness: everything is drawn from the ``numpy.random.Generator`` passed in (the elastic noise fields,
  the affine jitter, the spatter liquid layer), batched; the distributions are the originals'.
* brightness/saturate are computed in closed form on RGB instead of a round trip through HSV: with hue
  fixed, every channel of a pixel is ``V - (V - c) * k`` (brightness: ``c * V'/V``), exactly what
  scikit-image's ``hsv2rgb(rgb2hsv(.))`` gives, including hue 0 for grey pixels (a grey pixel under
  saturate ``b > 0`` becomes ``(V, V (1-b), V (1-b))``).
* saturate on one-channel images: the HSV round trip leaves grey unchanged (imagecorruptions returns the
  image as is), so a grey domain would be clean; here ``a`` scales the deviations from the image mean and
  ``b`` is added (a documented proxy, so that MNIST-C-style benchmarks have a real saturate domain).
* brightness on one-channel images adds ``c`` to the value, as imagecorruptions does.
* spatter and water/mud on one channel: the RGB colour is reduced to ITU-R 601 luma (imagecorruptions
  does the same through its ``rgb2gray``); the maths is linear, so no RGB round trip is needed.
* elastic: the random affine warp (OpenCV ``warpAffine``, reflect-101 border) and the
  elastic displacement (``map_coordinates``, reflect border) are composed into one bilinear resampling
  with a reflect-101 border, instead of two successive resamplings.
* spatter (water): OpenCV's Canny (3x3 Sobel with replicated border, L1 magnitude, its fixed-point
  non-maximum suppression, hysteresis 50/150), 5x5 chamfer distance transform (weights 1, 1.4, 2.1969
  in 16-bit fixed point), box blurs, ``equalizeHist`` and ``filter2D`` are re-implemented on the batch
  with numpy, in OpenCV's integer arithmetic: the texture equals OpenCV's C code bit for bit (tested).
  OpenCV builds with IPP compute the distance transform in float32 instead (differences up to 1e-4 px,
  which move a few truncated 3x3 means by one level).  The liquid layer is float32 (float64 upstream)
  and its Gaussian smoothing uses an FFT of the edge-padded images for wide kernels (same result up to
  float rounding).
* JPEG on one-channel images encodes a greyscale JPEG directly (imagecorruptions converts L -> RGB -> JPEG
  -> L).
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from ._common import pick, to_gray_like

BRIGHTNESS = {"imagenet": (0.1, 0.2, 0.3, 0.4, 0.5), "cifar": (0.05, 0.1, 0.15, 0.2, 0.3)}
CONTRAST = {"imagenet": (0.4, 0.3, 0.2, 0.1, 0.05), "cifar": (0.75, 0.5, 0.4, 0.3, 0.15)}
SATURATE = {
    "imagenet": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
    "cifar": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
}
JPEG = {"imagenet": (25, 18, 15, 10, 7), "cifar": (80, 65, 58, 50, 40)}
PIXELATE = {"imagenet": (0.6, 0.5, 0.4, 0.3, 0.25), "cifar": (0.95, 0.9, 0.85, 0.75, 0.65)}
#: (alpha, sigma, affine amplitude) as fractions of ELASTIC_IMSIZE[family], per severity
ELASTIC = {
    "imagenet": ((2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02)),
    "cifar": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
}
ELASTIC["mnist"] = ELASTIC["cifar"]
#: make_imagenet_c.py writes its constants as multiples of 244 (sic), make_cifar_c.py of IMSIZE = 32;
#: the mnist family takes the CIFAR fractions of its own side, 28.
ELASTIC_IMSIZE = {"imagenet": 244, "cifar": 32, "mnist": 28}
#: (loc, scale, sigma, threshold, intensity, mud)
SPATTER = {
    "imagenet": (
        (0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
        (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1),
    ),
    "cifar": (
        (0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1),
    ),
}  # fmt: skip
for _table in (BRIGHTNESS, CONTRAST, SATURATE, JPEG, PIXELATE, SPATTER):
    _table["mnist"] = _table["cifar"]

#: pale turquoise water and brown mud, RGB in [0, 1]
WATER = np.asarray([175, 238, 238], np.float32) / np.float32(255)
MUD = np.asarray([63, 42, 20], np.float32) / np.float32(255)


# ----------------------------------------------------------------------------------------------------
# brightness, contrast, saturate


def _value(x: np.ndarray) -> np.ndarray:
    """HSV value (max over the 3 channels) of (N,H,W,3), as (N,H,W)."""
    return np.maximum(np.maximum(x[..., 0], x[..., 1]), x[..., 2])


def _channel_means(x: np.ndarray) -> np.ndarray:
    """Per-image, per-channel means (N, C) in float64; summing over rows first keeps the inner loop
    contiguous (a reduction over the pixels of an (N, H*W, C) view is ten times slower)."""
    n, h, w, ch = x.shape
    rows = x.reshape(n, h, w * ch).sum(axis=1, dtype=np.float64)
    return rows.reshape(n, w, ch).sum(axis=1) / (h * w)


def brightness(x, severity, rng, family):
    """HSV value ``V -> min(V + c, 1)`` (one channel: ``x + c``)."""
    c = np.float32(pick(BRIGHTNESS, family, severity))
    if x.shape[-1] == 1:
        return x + c
    v = _value(x)
    ratio = np.minimum(v + c, np.float32(1))
    black = v == 0
    np.maximum(v, np.float32(1e-30), out=v)
    ratio /= v
    out = np.empty_like(x)
    for i in range(3):  # per channel: a broadcast over a last axis of 3 is several times slower
        np.multiply(x[..., i], ratio, out=out[..., i])
    if black.any():  # hue 0, saturation 0: (V', V', V')
        out[black] = c
    return out


def contrast(x, severity, rng, family):
    """Deviation from the per-image, per-channel mean scaled by ``c``."""
    c = np.float32(pick(CONTRAST, family, severity))
    n, h, w, ch = x.shape
    shift = (_channel_means(x) * (1 - float(c))).astype(np.float32)
    out = x * c
    for i in range(n):
        for j in range(ch):
            out[i, :, :, j] += shift[i, j]
    return out


def saturate(x, severity, rng, family):
    """HSV saturation ``S -> clip(S * a + b, 0, 1)`` (one channel: see the module docstring)."""
    a, b = pick(SATURATE, family, severity)
    a, b = np.float32(a), np.float32(b)
    if x.shape[-1] == 1:
        means = _channel_means(x)[:, 0].astype(np.float32)
        return (x - means[:, None, None, None]) * a + (means[:, None, None, None] + b)
    v = _value(x)
    chroma = v - np.minimum(np.minimum(x[..., 0], x[..., 1]), x[..., 2])
    grey = chroma == 0
    # S = chroma / V, S' = clip(S a + b, 0, 1); every channel: V - (V - c) * S' / S
    k = np.divide(chroma, v, out=np.zeros_like(v), where=v > 0)
    k *= a
    k += b
    np.clip(k, 0, 1, out=k)
    k *= v
    np.divide(k, chroma, out=k, where=~grey)
    out = np.empty_like(x)
    for i in range(3):
        o = out[..., i]
        np.subtract(v, x[..., i], out=o)
        o *= k
        np.subtract(v, o, out=o)
    if b > 0 and grey.any():  # hue 0: (V, V (1 - S'), V (1 - S'))
        low = v[grey] * (1 - min(float(b), 1.0))
        out[..., 1][grey] = low
        out[..., 2][grey] = low
    return out


# ----------------------------------------------------------------------------------------------------
# JPEG and pixelate: uint8 in, uint8 out


def jpeg_compression(x, severity, rng, family):
    """Pillow JPEG round trip at the family's quality (4:2:0 chroma, Pillow's defaults)."""
    quality = pick(JPEG, family, severity)
    u8 = x if x.dtype == np.uint8 else _to_uint8(x)
    out = np.empty_like(u8)
    grey = u8.shape[-1] == 1
    for i in range(len(u8)):
        buf = io.BytesIO()
        Image.fromarray(u8[i, :, :, 0] if grey else u8[i]).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf, formats=("JPEG",)) as im:
            dec = np.asarray(im)
        out[i] = dec[..., None] if grey else dec
    return out if x.dtype == np.uint8 else out.astype(np.float32) / np.float32(255)


def pixelate(x, severity, rng, family):
    """Box-filter downsampling by the family's factor, then back up (imagenet: nearest; else box)."""
    c = pick(PIXELATE, family, severity)
    u8 = x if x.dtype == np.uint8 else _to_uint8(x)
    n, h, w, ch = u8.shape
    small = (max(1, int(w * c)), max(1, int(h * c)))
    up = Image.NEAREST if family == "imagenet" else Image.BOX
    out = np.empty_like(u8)
    for i in range(n):
        im = Image.fromarray(u8[i, :, :, 0] if ch == 1 else u8[i])
        dec = np.asarray(im.resize(small, Image.BOX).resize((w, h), up))
        out[i] = dec[..., None] if ch == 1 else dec
    return out if x.dtype == np.uint8 else out.astype(np.float32) / np.float32(255)


jpeg_compression.native_uint8 = True
pixelate.native_uint8 = True
jpeg_compression.chunk_pixels = pixelate.chunk_pixels = 1 << 20


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255 + 1e-3).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# elastic transform


def elastic_transform(x, severity, rng, family):
    """A random affine warp, then a smoothed random displacement field (Hendrycks' two steps)."""
    n, h, w, ch = x.shape
    yy = np.arange(h, dtype=np.float32)[None, :, None]
    xx = np.arange(w, dtype=np.float32)[None, None, :]
    size = ELASTIC_IMSIZE[family]
    fa, fs, fa2 = pick(ELASTIC, family, severity)
    alpha, sigma, jitter = fa * size, fs * size, fa2 * size
    # Random affine: three points around the centre move by U(-jitter, jitter); output pixel p samples
    # the input at A^-1 p (OpenCV warpAffine), after the elastic displacement p -> p + d(p).
    centre = np.asarray([w // 2, h // 2], np.float64)
    half = min(h, w) // 3
    src = np.stack([centre + half, centre + [half, -half], centre - half])  # (x, y) points
    dst = src + rng.uniform(-jitter, jitter, size=(n, 3, 2))
    ones = np.ones((n, 3, 1))
    inv = np.linalg.solve(np.concatenate([dst, ones], axis=2), np.broadcast_to(src, (n, 3, 2)))
    inv = inv.astype(np.float32)  # (n, 3, 2): [x, y, 1] @ inv = source (x, y)
    if alpha > 0:
        dy, dx = _displacement(rng, (n, h, w), 1.0, (sigma, sigma), alpha)
        qy, qx = yy + dy, xx + dx
    else:
        qy, qx = np.broadcast_to(yy, (n, h, w)), np.broadcast_to(xx, (n, h, w))
    a = inv[:, :, None, None, :]
    sx = qx * a[:, 0, ..., 0] + qy * a[:, 1, ..., 0] + a[:, 2, ..., 0]
    sy = qx * a[:, 0, ..., 1] + qy * a[:, 1, ..., 1] + a[:, 2, ..., 1]
    return _bilinear(x, sy, sx, "mirror")


def _displacement(rng, shape, amp, sigma, alpha):
    """Two fields of U(-amp, amp) noise, Gaussian-smoothed (reflect border, truncate 3), times alpha."""
    noise = rng.random(size=(2, *shape), dtype=np.float32)
    noise *= np.float32(2 * amp)
    noise -= np.float32(amp)
    if int(3.0 * max(sigma) + 0.5) < _WIDE_RADIUS:
        smooth = ndi.gaussian_filter(noise, (0, 0, sigma[0], sigma[1]), mode="reflect", truncate=3.0)
    else:  # ImageNet severities 1-2 (sigma 171 and 20 px): the same filter by FFT on the period 2n
        smooth = _reflect_gauss_fft(_reflect_gauss_fft(noise, float(sigma[0]), 2), float(sigma[1]), 3)
    smooth *= np.float32(alpha)
    return smooth[0], smooth[1]


#: Kernel radius from which the displacement smoothing goes through the FFT (cost independent of sigma).
_WIDE_RADIUS = 32


@lru_cache(maxsize=16)
def _reflect_gauss_spectrum(n: int, sigma: float) -> np.ndarray:
    """rfft of the truncated (3 sigma) Gaussian folded onto a circle of 2n samples."""
    from .blur import gaussian_kernel1d

    k = gaussian_kernel1d(sigma, truncate=3.0)
    r = k.size // 2
    circle = np.zeros(2 * n)
    np.add.at(circle, np.mod(np.arange(-r, r + 1), 2 * n), k)
    return np.fft.rfft(circle)


def _reflect_gauss_fft(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """``ndi.gaussian_filter1d(a, sigma, axis, mode="reflect", truncate=3)``, exact also when the kernel
    is longer than the signal: 'reflect' is the half-sample symmetric extension of period 2n, so the
    filter is a circular convolution of [a, reversed a] with the kernel folded onto that period.  An
    FFT, not a matrix product: BLAS threads slow down badly on a busy machine."""
    from scipy import fft

    n = a.shape[axis]
    ext = np.concatenate([a, np.flip(a, axis)], axis=axis)
    shape = [1] * a.ndim
    shape[axis] = n + 1
    spec = fft.rfft(ext, axis=axis) * _reflect_gauss_spectrum(n, sigma).reshape(shape)
    out = fft.irfft(spec, n=2 * n, axis=axis)
    return np.take(out, np.arange(n), axis=axis).astype(np.float32)


@lru_cache(maxsize=64)
def _fold_table(n: int, mode: str) -> np.ndarray:
    """Index i in [-n, 2n) folded into [0, n): scipy's 'reflect' (half sample) or 'mirror' (whole)."""
    i = np.arange(-n, 2 * n)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * n if mode == "reflect" else 2 * n - 2
    m = np.mod(i, period)
    return np.where(m >= n, period - (mode == "reflect") - m, m)


def _bilinear(x: np.ndarray, sy: np.ndarray, sx: np.ndarray, mode: str) -> np.ndarray:
    """Bilinear sample of every image of x (N,H,W,C) at (sy, sx) (N,H,W), the border folded by ``mode``;
    one flat gather per corner and channel for the whole batch."""
    n, h, w, ch = x.shape

    def split(coord, size):
        base = np.floor(coord)
        frac = coord - base
        i0 = base.astype(np.intp)
        np.clip(i0, -size, 2 * size - 2, out=i0)
        i0 += size
        table = _fold_table(size, mode)
        return table[i0], table[i0 + 1], frac.astype(np.float32, copy=False)

    r0, r1, fy = split(sy, h)
    c0, c1, fx = split(sx, w)
    offset = (np.arange(n, dtype=np.intp) * h)[:, None, None]
    r0 += offset
    r0 *= w
    r1 += offset
    r1 *= w
    gx = 1 - fx
    corners = ((r0 + c0, gx * (1 - fy)), (r0 + c1, fx * (1 - fy)), (r1 + c0, gx * fy), (r1 + c1, fx * fy))
    planes = np.ascontiguousarray(np.moveaxis(x, -1, 0)).reshape(ch, -1) if ch > 1 else x.reshape(1, -1)
    out = np.empty(x.shape, np.float32)
    for c in range(ch):
        acc = None
        for index, weight in corners:
            value = np.take(planes[c], index)
            value *= weight
            acc = value if acc is None else np.add(acc, value, out=acc)
        out[..., c] = acc
    return out


# ----------------------------------------------------------------------------------------------------
# spatter


def spatter(x, severity, rng, family):
    """Water drops (severities 1-3 on imagenet/cifar) or mud (4-5): a thresholded smooth liquid layer."""
    loc, scale, sigma, threshold, intensity, mud = pick(SPATTER, family, severity)
    n, h, w, ch = x.shape
    liquid = rng.standard_normal(size=(n, h, w), dtype=np.float32)
    liquid *= np.float32(scale)
    liquid += np.float32(loc)
    liquid = _gaussian_nearest(liquid, sigma)
    liquid[liquid < threshold] = 0
    if mud:
        m = _gaussian_nearest((liquid > threshold).astype(np.float32), intensity)
        m[m < 0.8] = 0
        colour = to_gray_like(MUD[None, None, None, :], x).ravel()
        keep = 1 - m
        out = np.empty_like(x)
        for i in range(ch):  # x (1 - m) + colour m
            o = out[..., i]
            np.multiply(x[..., i], keep, out=o)
            o += m * colour[i]
        return out
    level = (np.clip(liquid, 0, 1) * 255).astype(np.uint8)
    m = level * _water_texture(level)
    peak = m.max(axis=(1, 2), keepdims=True)
    np.divide(m, peak, out=m, where=peak > 0)
    m *= np.float32(intensity)
    colour = to_gray_like(WATER[None, None, None, :], x).ravel()
    out = np.empty_like(x)
    for i in range(ch):
        np.add(x[..., i], m * colour[i], out=out[..., i])
    return out


#: The water texture's chamfer distance runs row by row over the batch: chunks of ~27 photos of 224 px
#: amortise its per-row cost (corrupt() uses 1-image chunks at 224 px by default).
spatter.chunk_pixels = 1 << 22


def _gaussian_nearest(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian filter of every image of a (N,H,W) float32 with scikit-image's defaults ('nearest'
    border, truncate 4).  Wide kernels by FFT of the edge-padded images (the circular wrap stays in the
    padding), narrow ones with scipy.ndimage."""
    n, h, w = a.shape
    radius = int(4.0 * sigma + 0.5)
    if radius < 6:
        return ndi.gaussian_filter(a, (0, sigma, sigma), mode="nearest", truncate=4.0)
    from scipy import fft

    padded = np.pad(a, ((0, 0), (radius, radius), (radius, radius)), mode="edge")
    shape = (fft.next_fast_len(h + 2 * radius, real=True), fft.next_fast_len(w + 2 * radius, real=True))
    spectrum = fft.rfft2(padded, s=shape)
    spectrum *= _gauss_transfer(shape, sigma, radius)
    out = fft.irfft2(spectrum, s=shape)
    return out[:, radius : radius + h, radius : radius + w]


@lru_cache(maxsize=32)
def _gauss_transfer(shape: tuple[int, int], sigma: float, radius: int) -> np.ndarray:
    """rfft2 of the (separable, symmetric) truncated Gaussian kernel centred at the origin."""
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    rows, cols = np.zeros(shape[0]), np.zeros(shape[1])
    rows[taps % shape[0]] = kernel
    cols[taps % shape[1]] = kernel
    return (np.fft.fft(rows).real[:, None] * np.fft.rfft(cols).real[None, :]).astype(np.float32)


_EMBOSS = ((-1, -1, -2), (-1, 0, -1), (0, -1, -1), (0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 2))


def _water_texture(level: np.ndarray) -> np.ndarray:
    """Hendrycks' water texture of uint8 liquid layers (N,H,W), float32: Canny edges, distance to them
    (truncated at 20), 3x3 blur, histogram equalisation, emboss, 3x3 blur; all per image, in OpenCV's
    arithmetic (reflect-101 borders)."""
    edges = _canny(level, 50, 150)
    fixed = np.minimum(_chamfer5(edges), 20 << _DIST_SHIFT)  # THRESH_TRUNC at 20
    # float blur, then truncation to uint8: the floor of the exact 3x3 mean of the fixed-point distances
    dist = (_box3(fixed) // (9 << _DIST_SHIFT)).astype(np.uint8)
    dist = _equalize_hist(dist)
    # filter2D with the emboss kernel [[-2,-1,0],[-1,1,1],[0,1,2]], saturated to uint8
    p = np.pad(dist.astype(np.int16), ((0, 0), (1, 1), (1, 1)), mode="reflect")
    h, w = dist.shape[1:]
    emb = np.zeros(dist.shape, np.int16)
    for dy, dx, weight in _EMBOSS:
        tap = p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        if weight == 1:
            emb += tap
        elif weight == -1:
            emb -= tap
        else:
            emb += tap * np.int16(weight)
    np.clip(emb, 0, 255, out=emb)
    return ((2 * _box3(emb) + 9) // 18).astype(np.float32)  # uint8 blur: the rounded 3x3 mean


def _box3(a: np.ndarray) -> np.ndarray:
    """Exact 3x3 sums (int32) over every image of an integer (N,H,W) array, reflect-101 border."""
    p = np.pad(a.astype(np.int32), ((0, 0), (1, 1), (1, 1)), mode="reflect")
    rows = p[:, :-2] + p[:, 1:-1]
    rows += p[:, 2:]
    out = rows[:, :, :-2] + rows[:, :, 1:-1]
    out += rows[:, :, 2:]
    return out


def _equalize_hist(u8: np.ndarray) -> np.ndarray:
    """OpenCV's equalizeHist of every image of u8 (N,H,W)."""
    n = u8.shape[0]
    total = u8[0].size
    codes = u8.reshape(n, -1) + (np.arange(n, dtype=np.intp) * 256)[:, None]
    hist = np.bincount(codes.ravel(), minlength=n * 256).reshape(n, 256)
    first = np.argmax(hist > 0, axis=1)
    h0 = hist[np.arange(n), first]
    cdf = np.cumsum(hist, axis=1) - h0[:, None]
    with np.errstate(divide="ignore"):
        scale = np.float32(255) / (total - h0).astype(np.float32)
    lut = np.clip(np.rint(cdf.astype(np.float32) * scale[:, None]), 0, 255)
    constant = h0 == total  # one grey level: OpenCV leaves the image unchanged
    lut[constant] = np.arange(256)
    return lut.astype(np.uint8).ravel()[codes].reshape(u8.shape)


_TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)


def _canny(u8: np.ndarray, low: int, high: int) -> np.ndarray:
    """OpenCV's Canny (aperture 3, L1 gradient) of every image of u8 (N,H,W): bool edges.

    3x3 Sobel with replicated border; a pixel with magnitude > low is kept if it is a maximum along its
    quantised gradient direction (OpenCV's fixed-point tan 22.5 test, its strict/non-strict comparisons,
    magnitude 0 outside the image); kept pixels 8-connected to one with magnitude > high are edges.
    Works on the candidates only, in a zero-bordered (N, H+2, W+2) layout."""
    n, h, w = u8.shape
    wp = w + 2
    p = np.pad(u8.astype(np.int16), ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = np.zeros((n, h + 2, wp), np.int16)
    gy = np.zeros((n, h + 2, wp), np.int16)
    col = p[:, :-2] + p[:, 2:]
    col += 2 * p[:, 1:-1]
    np.subtract(col[:, :, 2:], col[:, :, :-2], out=gx[:, 1:-1, 1:-1])
    row = p[:, :, :-2] + p[:, :, 2:]
    row += 2 * p[:, :, 1:-1]
    np.subtract(row[:, 2:], row[:, :-2], out=gy[:, 1:-1, 1:-1])
    mag = np.abs(gx)
    mag += np.abs(gy)
    flat = mag.ravel()
    idx = np.flatnonzero(flat > low)
    edges = np.zeros((n, h + 2, wp), bool)
    if idx.size:
        m = flat[idx]
        sx, sy = gx.ravel()[idx], gy.ravel()[idx]
        ax = np.abs(sx).astype(np.int32)
        ay = np.abs(sy).astype(np.int32) << 15
        tg22 = ax * _TG22
        horiz = ay < tg22
        vert = ay > tg22 + (ax << 16)
        # offset of the neighbour pair along the gradient: diagonal by the signs, then vertical, horizontal
        diagonal = np.where(np.bitwise_xor(sx, sy) < 0, wp - 1, wp + 1)  # OpenCV: (xs ^ ys) < 0
        step = np.where(horiz, 1, np.where(vert, wp, diagonal))
        # m > before and m >= after (horizontal, vertical) or m > after (diagonal)
        keep = m > flat[idx - step]
        keep &= m > flat[idx + step] - (horiz | vert)
        idx, m = idx[keep], m[keep]
        strong = m > high
        if strong.any():
            edges.ravel()[idx] = True
            structure = np.zeros((3, 3, 3), bool)
            structure[1] = True  # 8-connected within an image, never across images
            labels, count = ndi.label(edges, structure=structure)
            labels = labels.ravel()[idx]
            good = np.zeros(count + 1, bool)
            good[labels[strong]] = True
            edges.ravel()[idx[~good[labels]]] = False
    return edges[:, 1:-1, 1:-1]


_DIST_SHIFT = 16
_HV = 1 << _DIST_SHIFT
_DIAG = int(np.rint(np.float32(1.4) * np.float32(_HV)))
_LONG = int(np.rint(np.float32(2.1969) * np.float32(_HV)))
_FAR = 1 << 40


def _chamfer5(features: np.ndarray) -> np.ndarray:
    """OpenCV's 5x5 chamfer distance transform (DIST_L2, mask 5, weights 1, 1.4, 2.1969) to the True
    pixels of every image of features (N,H,W), in its 16-bit fixed point (int64; far: about 2**40).

    OpenCV's two raster passes, row by row over the whole batch; the in-row recursion
    ``t[j] = min(t[j], t[j -+ 1] + 1)`` is a running minimum of ``t[j] -+ j`` (int64: numpy's running
    minimum is several times faster on it than on int32)."""
    n, h, w = features.shape
    t = np.full((h + 4, w + 4, n), _FAR, np.int64)  # two border rows/columns each side, batch last
    ramp = (np.arange(w, dtype=np.int64) * _HV)[:, None]
    # a feature pixel is 0, minus the ramp of the forward scan
    start = np.where(features.transpose(1, 2, 0), -ramp, _FAR)

    def from_rows(r1, r2):  # the 8 mask neighbours in the adjacent row r1 and the next one r2
        best = r1[2:-2] + _HV
        np.minimum(best, np.minimum(r1[1:-3], r1[3:-1]) + _DIAG, out=best)
        far = np.minimum(r1[:-4], r1[4:])
        np.minimum(far, r2[1:-3], out=far)
        np.minimum(far, r2[3:-1], out=far)
        far += _LONG
        return np.minimum(best, far, out=best)

    for i in range(h):  # forward: the two rows above, the pixel to the left
        row = from_rows(t[i + 1], t[i])
        row -= ramp
        np.minimum(row, start[i], out=row)
        np.minimum.accumulate(row, axis=0, out=row)
        np.add(row, ramp, out=t[i + 2, 2:-2])
    for i in range(h - 1, -1, -1):  # backward: the two rows below, the pixel to the right
        row = from_rows(t[i + 3], t[i + 4])
        np.minimum(row, t[i + 2, 2:-2], out=row)
        rev = row[::-1]  # right to left: a running minimum over the reversed row
        rev -= ramp
        np.minimum.accumulate(rev, axis=0, out=rev)
        rev += ramp
        t[i + 2, 2:-2] = row
    return t[2:-2, 2:-2].transpose(2, 0, 1)
