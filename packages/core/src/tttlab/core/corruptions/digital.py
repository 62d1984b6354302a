"""Digital corruptions: brightness, contrast, elastic transform, pixelate, JPEG, saturate, spatter.

Constants (``imagenet`` = make_imagenet_c.py, ``cifar`` = make_cifar_c.py, Hendrycks & Dietterich 2019):

==================  ===================================  ====================================
corruption          imagenet                             cifar
==================  ===================================  ====================================
brightness (+V)     .1 .2 .3 .4 .5                       .05 .1 .15 .2 .3
contrast (factor)   .4 .3 .2 .1 .05                      .75 .5 .4 .3 .15
saturate (a, b)     (.3,0) (.1,0) (2,0) (5,.1) (20,.2)   (.3,0) (.1,0) (1.5,0) (2,.1) (2.5,.2)
jpeg quality        25 18 15 10 7                        80 65 58 50 40
pixelate factor     .6 .5 .4 .3 .25                      .95 .9 .85 .75 .65
elastic             alpha 250*(.05 .065 .085 .1 .12),    (alpha, sigma, affine) = 32 * ((0,0,.08),
                    sigma = 0.01 H, noise +-0.005 H      (.05,.2,.07), (.08,.06,.06), (.1,.04,.05),
                                                         (.1,.03,.03))
spatter             (loc, scale, sigma, threshold, intensity, mud) per severity, both tables below
==================  ===================================  ====================================

``mnist`` family: the CIFAR constants, with the elastic constants scaled by 28/32 (they are in pixels).

Deviations from the original scripts (all documented, none change the constants):

* brightness/saturate are computed in closed form on RGB instead of a round trip through HSV: with hue and
  value fixed, each channel is ``V - (V - c) * S'/S``; this is exactly what the HSV round trip gives,
  including scikit-image's hue 0 for grey pixels.
* saturate on one-channel images: the original turns grey into grey (a no-op); here the saturation factor
  ``a`` scales deviations from the image mean and ``b`` is added (a documented proxy, so that MNIST-C has
  a real saturate domain).
* elastic (cifar/mnist): the random affine warp and the elastic displacement are composed into one
  bilinear resampling instead of two successive ones.
* spatter (water): OpenCV's Canny, distance transform, equalizeHist and filter2D are replaced by numpy/scipy
  equivalents (a numpy Canny with OpenCV's defaults; the exact Euclidean distance replaces OpenCV's 5x5
  mask approximation).
* JPEG on one-channel images encodes a greyscale JPEG directly (the original converts L -> RGB -> JPEG -> L).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from ._common import pick, to_gray_like, to_rgb

BRIGHTNESS = {"imagenet": (0.1, 0.2, 0.3, 0.4, 0.5), "cifar": (0.05, 0.1, 0.15, 0.2, 0.3)}
CONTRAST = {"imagenet": (0.4, 0.3, 0.2, 0.1, 0.05), "cifar": (0.75, 0.5, 0.4, 0.3, 0.15)}
SATURATE = {
    "imagenet": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
    "cifar": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
}
JPEG = {"imagenet": (25, 18, 15, 10, 7), "cifar": (80, 65, 58, 50, 40)}
PIXELATE = {"imagenet": (0.6, 0.5, 0.4, 0.3, 0.25), "cifar": (0.95, 0.9, 0.85, 0.75, 0.65)}
#: imagenet: alpha (sigma and noise amplitude are fractions of the image height)
ELASTIC_IMAGENET = (250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12)
#: cifar: (alpha, sigma, affine amplitude) as fractions of the image size (x 32 in make_cifar_c.py)
ELASTIC_SMALL = ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
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

WATER = np.asarray([175, 238, 238], np.float32) / 255.0
MUD = np.asarray([63, 42, 20], np.float32) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)


def _rgb_value_saturation(rgb: np.ndarray):
    v = rgb.max(axis=-1, keepdims=True)
    m = rgb.min(axis=-1, keepdims=True)
    s = np.where(v > 0, (v - m) / np.where(v > 0, v, 1), 0).astype(np.float32)
    return v, s


def brightness(x, severity, rng, family):
    c = np.float32(pick(BRIGHTNESS, family, severity))
    if x.shape[-1] == 1:
        return x + c
    v, _ = _rgb_value_saturation(x)
    v_new = np.minimum(v + c, 1.0)
    return np.where(v > 0, x * (v_new / np.where(v > 0, v, 1)), v_new)


def contrast(x, severity, rng, family):
    c = np.float32(pick(CONTRAST, family, severity))
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * c + means


def saturate(x, severity, rng, family):
    a, b = (np.float32(v) for v in pick(SATURATE, family, severity))
    if x.shape[-1] == 1:  # documented proxy for grey images
        means = x.mean(axis=(1, 2), keepdims=True)
        return (x - means) * a + means + b
    v, s = _rgb_value_saturation(x)
    s_new = np.clip(s * a + b, 0, 1)
    ratio = np.where(s > 0, s_new / np.where(s > 0, s, 1), 0)
    out = v - (v - x) * ratio
    grey = (s == 0)[..., 0]
    if grey.any():  # hue 0: (V, V(1-S'), V(1-S'))
        vg, sg = v[grey][:, 0], s_new[grey][:, 0]
        out[grey] = np.stack([vg, vg * (1 - sg), vg * (1 - sg)], axis=-1)
    return out


def jpeg_compression(x, severity, rng, family):
    quality = pick(JPEG, family, severity)
    u8 = x if x.dtype == np.uint8 else _to_uint8(x)
    out = np.empty_like(u8)
    for i, img in enumerate(u8):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, "JPEG", quality=quality)
        buf.seek(0)
        dec = np.asarray(Image.open(buf))
        out[i] = dec[..., None] if dec.ndim == 2 else dec
    return out if x.dtype == np.uint8 else out.astype(np.float32) / 255.0


def pixelate(x, severity, rng, family):
    c = pick(PIXELATE, family, severity)
    u8 = x if x.dtype == np.uint8 else _to_uint8(x)
    n, h, w, ch = u8.shape
    small = (max(1, int(w * c)), max(1, int(h * c)))
    out = np.empty_like(u8)
    for i, img in enumerate(u8):
        pil = Image.fromarray(img[..., 0] if ch == 1 else img)
        dec = np.asarray(pil.resize(small, Image.BOX).resize((w, h), Image.NEAREST))
        out[i] = dec[..., None] if dec.ndim == 2 else dec
    return out if x.dtype == np.uint8 else out.astype(np.float32) / 255.0


jpeg_compression.native_uint8 = True
pixelate.native_uint8 = True
jpeg_compression.chunk_pixels = pixelate.chunk_pixels = 1 << 20


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix A with A @ [p, 1] = q for three point pairs (x, y)."""
    a = np.concatenate([src, np.ones((3, 1))], axis=1)
    return np.linalg.solve(a, dst).T


def elastic_transform(x, severity, rng, family):
    n, h, w, ch = x.shape
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    out = np.empty_like(x)
    for i in range(n):
        if family == "imagenet":
            alpha, sigma, amp, affine = ELASTIC_IMAGENET[severity - 1], (0.01 * h, 0.01 * w), 0.005 * h, 0.0
        else:
            size = 28 if family == "mnist" else 32
            fa, fs, fa2 = ELASTIC_SMALL[severity - 1]
            alpha, sigma, amp, affine = fa * size, fs * size, 1.0, fa2 * size
        sy, sx = (y.copy() for y in (yy, xx))
        if affine > 0:
            centre = np.float64([w // 2, h // 2])
            half = min(h, w) // 3
            src = np.stack([centre + half, [centre[0] + half, centre[1] - half], centre - half])
            dst = src + rng.uniform(-affine, affine, size=src.shape)
            # output pixel p samples the input at A^-1 p (OpenCV's warpAffine convention)
            inv = _affine_from_points(dst, src)
            sx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
            sy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
        noise = rng.uniform(-amp, amp, size=(2, h, w))
        if alpha > 0:
            dx = ndi.gaussian_filter(noise[0], sigma, mode="reflect", truncate=3) * alpha
            dy = ndi.gaussian_filter(noise[1], sigma, mode="reflect", truncate=3) * alpha
            sy, sx = sy + dy, sx + dx
        coords = np.stack([sy, sx])
        for c in range(ch):
            out[i, :, :, c] = ndi.map_coordinates(x[i, :, :, c], coords, order=1, mode="mirror")
    return out


def _equalize_hist(u8: np.ndarray) -> np.ndarray:
    hist = np.bincount(u8.ravel(), minlength=256)
    cdf = hist.cumsum()
    cdf_min = cdf[hist > 0][0]
    total = u8.size
    if total == cdf_min:
        return u8
    lut = np.clip(np.rint((cdf - cdf_min) * 255.0 / (total - cdf_min)), 0, 255).astype(np.uint8)
    return lut[u8]


def _canny(u8: np.ndarray, low: float, high: float) -> np.ndarray:
    """Canny edges as OpenCV computes them by default: 3x3 Sobel, L1 magnitude, non-maximum suppression
    along the quantised gradient direction, hysteresis between ``low`` and ``high``."""
    img = u8.astype(np.float32)
    gx = ndi.sobel(img, axis=1, mode="mirror")
    gy = ndi.sobel(img, axis=0, mode="mirror")
    mag = np.abs(gx) + np.abs(gy)
    # quantised direction: 0 horizontal gradient (compare left/right), 45, 90, 135
    ax, ay = np.abs(gx), np.abs(gy)
    tan22 = 0.4142135623730951
    horiz = ay <= ax * tan22
    vert = ay > ax / tan22
    diag = ~(horiz | vert)
    same_sign = (gx * gy) > 0
    p = np.pad(mag, 1, mode="constant")
    c = p[1:-1, 1:-1]
    left, right = p[1:-1, :-2], p[1:-1, 2:]
    up, down = p[:-2, 1:-1], p[2:, 1:-1]
    ul, dr = p[:-2, :-2], p[2:, 2:]
    ur, dl = p[:-2, 2:], p[2:, :-2]
    keep = np.zeros_like(c, dtype=bool)
    keep |= horiz & (c > left) & (c >= right)
    keep |= vert & (c > up) & (c >= down)
    keep |= diag & same_sign & (c > ul) & (c >= dr)
    keep |= diag & ~same_sign & (c > ur) & (c >= dl)
    weak = keep & (mag > low)
    strong = keep & (mag > high)
    lab, n = ndi.label(weak, structure=np.ones((3, 3)))
    if n == 0:
        return strong
    good = np.zeros(n + 1, bool)
    good[np.unique(lab[strong])] = True
    good[0] = False
    return good[lab]


_EMBOSS = np.asarray([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], np.float32)


def spatter(x, severity, rng, family):
    loc, scale, sigma, threshold, intensity, mud = pick(SPATTER, family, severity)
    rgb = to_rgb(x).astype(np.float32, copy=True)
    n, h, w, _ = rgb.shape
    liquid = rng.normal(loc, scale, size=(n, h, w)).astype(np.float32)
    liquid = ndi.gaussian_filter(liquid, (0, sigma, sigma), mode="nearest", truncate=4.0)
    liquid[liquid < threshold] = 0
    for i in range(n):
        layer = liquid[i]
        if mud == 0:
            level = np.clip(layer * 255, 0, 255).astype(np.uint8)
            edges = _canny(level, 50, 150)
            dist = ndi.distance_transform_edt(~edges) if edges.any() else np.full((h, w), 20.0)
            dist = np.minimum(dist, 20.0).astype(np.float32)
            dist = ndi.uniform_filter(dist, 3, mode="mirror").astype(np.uint8)
            dist = _equalize_hist(dist).astype(np.float32)
            dist = np.clip(np.rint(ndi.correlate(dist, _EMBOSS, mode="mirror")), 0, 255)
            dist = np.rint(ndi.uniform_filter(dist.astype(np.float32), 3, mode="mirror"))
            m = level.astype(np.float32) * dist
            peak = m.max()
            m = m / peak * intensity if peak > 0 else m
            rgb[i] += m[..., None] * WATER
        else:
            m = ndi.gaussian_filter(
                (layer > threshold).astype(np.float32), intensity, mode="nearest", truncate=4.0
            )
            m[m < 0.8] = 0
            rgb[i] = rgb[i] * (1 - m[..., None]) + MUD * m[..., None]
    return to_gray_like(rgb, x)
