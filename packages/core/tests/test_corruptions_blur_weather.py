"""Maths of the blur and weather corruptions (kernels, shuffles, fields), independent of any reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from tttlab.core.corruptions import blur as B
from tttlab.core.corruptions import weather as W

FAMILIES = ("mnist", "cifar", "imagenet")
BLURS = ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur")


def rng(seed=0):
    return np.random.default_rng(seed)


def image(shape=(2, 40, 36, 3), seed=0):
    return rng(seed).random(shape, dtype=np.float32)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_kernels_sum_to_one(family, severity):
    radius, alias = B.pick(B.DEFOCUS, family, severity)
    # the radius-10 disk touches its 21x21 grid, where the reflect-101 anti-aliasing adds mass (as upstream)
    assert B.disk_kernel(radius, alias).sum() == pytest.approx(1 if radius <= 8 else 1.0108, abs=1e-4)
    radius, sigma = B.pick(B.MOTION, family, severity)
    k = B.motion_kernel(radius, sigma)
    assert k.size == 2 * radius + 1 and k.sum() == pytest.approx(1, abs=1e-6)
    assert np.all(np.diff(k) <= 0), "one-sided Gaussian: weights decrease along the line"


@pytest.mark.parametrize("name", BLURS)
@pytest.mark.parametrize("family", FAMILIES)
def test_blurs_preserve_a_constant_image(name, family):
    x = np.full((2, 32, 30, 3), 0.4, np.float32)
    y = getattr(B, name)(x, 5, rng(), family)
    assert y.shape == x.shape
    gain = B.disk_kernel(*B.pick(B.DEFOCUS, family, 5)).sum() if name == "defocus_blur" else 1
    np.testing.assert_allclose(y, 0.4 * gain, atol=2.5e-3)  # glass re-quantises to 1/255 once


def test_defocus_of_a_delta_is_the_disk_kernel():
    for severity in (3, 5):  # FFT path (kernel wider than 5)
        radius, alias = B.pick(B.DEFOCUS, "imagenet", severity)
        k = B._defocus_kernel(radius, alias)
        p = k.shape[0] // 2
        x = np.zeros((1, 64, 64, 1), np.float32)
        x[0, 32, 32, 0] = 1
        y = B.defocus_blur(x, severity, rng(), "imagenet")[0, :, :, 0]
        np.testing.assert_allclose(y[32 - p : 32 + p + 1, 32 - p : 32 + p + 1], k, atol=1e-6)
        assert abs(y.sum() - k.sum()) < 1e-4
        full = B.disk_kernel(radius, alias)
        assert full.sum() == pytest.approx(k.sum(), abs=1e-6), "cropping drops only zeros"


def test_defocus_fft_equals_direct_reflect101_correlation():
    x = image((1, 48, 40, 3))
    radius, alias = B.pick(B.DEFOCUS, "imagenet", 4)
    k = B._defocus_kernel(radius, alias)
    direct = ndi.correlate(x, k[None, :, :, None], mode="mirror")
    np.testing.assert_allclose(B.defocus_blur(x, 4, rng(), "imagenet"), direct, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 6.0])
def test_gaussian_matches_scipy_nearest_truncate4(sigma):
    x = image((1, 64, 56, 3))
    ref = ndi.gaussian_filter(x.astype(np.float64), (0, sigma, sigma, 0), mode="nearest", truncate=4.0)
    np.testing.assert_allclose(B.gauss2d(x, sigma), ref, atol=2e-6)


@pytest.mark.parametrize("angle", [0.0, 30.0, 45.0, -45.0, -90.0])
def test_motion_offsets_follow_a_line_at_the_angle(angle):
    radius = 15
    offs = np.asarray(B.motion_offsets(radius, angle))
    assert len(offs) == 2 * radius + 1 and tuple(offs[0]) == (0, 0)
    a = math.radians(angle)
    i = np.arange(len(offs))
    # each tap lies within half a pixel of the point i * (sin a, cos a)
    assert np.all(np.abs(offs[:, 0] - i * math.sin(a)) <= 0.5 + 1e-9)
    assert np.all(np.abs(offs[:, 1] - i * math.cos(a)) <= 0.5 + 1e-9)


def test_motion_blur_of_a_delta_is_the_line_kernel():
    x = np.zeros((1, 41, 41, 1), np.float32)
    x[0, 20, 20, 0] = 1
    radius, sigma = 6, 2.0
    y = B.line_blur(x, radius, sigma, [0.0])[0, :, :, 0]
    k = B.motion_kernel(radius, sigma)
    # out[y, x] = sum_i k_i img[y, x + i]: the delta spreads to the left, one-sided
    np.testing.assert_allclose(y[20, 20 - 2 * radius : 21][::-1], k, atol=1e-7)
    assert abs(y.sum() - 1) < 1e-5 and y[20, 21:].sum() == 0 and y[:20].sum() == 0


def test_glass_shuffle_is_a_copy_of_local_pixels():
    n, h, w = 2, 30, 26
    for delta, iterations in [(1, 1), (2, 3), (4, 2)]:
        src = B.glass_sources(n, h, w, delta, iterations, rng(delta))
        assert src.shape == (n * h * w,) and src.min() >= 0 and src.max() < n * h * w
        pos = np.arange(n * h * w)
        assert np.array_equal(src // (h * w), pos // (h * w)), "pixels never move between images"
        prow, pcol = np.divmod(pos % (h * w), w)
        inner = (prow > delta) & (prow <= h - delta) & (pcol > delta) & (pcol <= w - delta)
        assert np.array_equal(src[~inner], pos[~inner]), "the outer frame is never written"
        assert len(np.unique(src)) < src.size, "a copy, not a permutation (as the original's view swap)"
    # one pass with delta 1 samples up/left neighbours only: offsets in {-1, 0}^2, a pure gather
    src = B.glass_sources(1, h, w, 1, 1, rng(9))
    row, col = np.divmod(src, w)
    prow, pcol = np.divmod(np.arange(h * w), w)
    assert set(np.unique(row - prow)) <= {-1, 0} and set(np.unique(col - pcol)) <= {-1, 0}


def test_glass_shuffle_serial_semantics_on_a_small_image():
    """The vectorised chains equal a serial reverse-raster scan that copies the current neighbour value."""
    h, w, delta = 9, 8, 2
    gen = rng(3)
    src = B.glass_sources(1, h, w, delta, 1, gen)
    # replay the same offsets serially
    gen = rng(3)
    rows = np.arange(delta + 1, h - delta + 1)
    cols = np.arange(delta + 1, w - delta + 1)
    dy, dx = gen.integers(-delta, delta, size=(2, rows.size * cols.size), dtype=np.int32)
    dy, dx = dy.reshape(rows.size, cols.size), dx.reshape(rows.size, cols.size)
    cur = np.arange(h * w).reshape(h, w)
    for i in range(rows.size - 1, -1, -1):
        for j in range(cols.size - 1, -1, -1):
            r, c = rows[i], cols[j]
            cur[r, c] = cur[r + dy[i, j], c + dx[i, j]]
    assert np.array_equal(src, cur.ravel())


def test_zoom_blur_of_a_constant_is_constant_and_zoom_matches_scipy():
    x = np.full((1, 33, 29, 3), 0.7, np.float32)
    np.testing.assert_allclose(B.zoom_blur(x, 5, rng(), "imagenet"), 0.7, atol=1e-6)
    # the clipped zoom samples where scipy.ndimage.zoom(order=1) on the central crop does
    y = image((1, 40, 40, 1))
    for z in (1.0, 1.07, 1.3, 2.5):
        crop = int(math.ceil(40 / z))
        top = (40 - crop) // 2
        ref = ndi.zoom(y[0, top : top + crop, top : top + crop, 0].astype(np.float64), z, order=1)
        trim = (ref.shape[0] - 40) // 2
        ref = ref[trim : trim + 40, trim : trim + 40]
        np.testing.assert_allclose(B.clipped_zoom(y, z)[0, :, :, 0], ref, atol=1e-5)


def test_fog_adds_a_field_scaled_by_the_strength():
    x = np.zeros((3, 32, 32, 3), np.float32)
    x[:, 0, 0] = 1  # max 1: fog = (x + s * plasma) / (1 + s)
    for severity in (1, 5):
        s, _ = B.pick(W.FOG, "cifar", severity)
        y = W.fog(x, severity, rng(severity), "cifar")
        field = y * (1 + s) - x
        assert field.max() == pytest.approx(s, rel=1e-5) and field.min() == pytest.approx(0, abs=1e-5)
        assert np.allclose(field[..., 0], field[..., 2]), "one field for all channels"
    maps = W.plasma_fractal(4, 64, 2.0, rng())
    assert maps.shape == (4, 64, 64) and maps.dtype == np.float32
    assert np.allclose(maps.min(axis=(1, 2)), 0) and np.allclose(maps.max(axis=(1, 2)), 1)
    assert not np.allclose(maps[0], maps[1]), "one plasma per image"


def test_frost_texture_deterministic_per_rng_and_calibrated():
    a = W.frost_texture(1, 96, 96, rng(5))
    b = W.frost_texture(1, 96, 96, rng(5))
    c = W.frost_texture(1, 96, 96, rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_allclose(a.mean(axis=(0, 1, 2)), np.clip(W.FROST_MEAN, 0, 1), atol=0.03)
    assert np.all(a[..., 2].mean() > a[..., 0].mean()), "blue tint"


def test_snow_layer_statistics():
    layer = W.snow_layer(2, 64, 64, 0.3, 0.2, 1.0, rng())
    assert layer.shape == (2, 64, 64, 1)
    assert layer.mean() == pytest.approx(0.3, abs=0.01) and layer.std() == pytest.approx(0.2, abs=0.01)
    zoomed = W.snow_layer(1, 64, 64, 0.3, 0.2, 4.0, rng())
    # zoom 4: neighbouring pixels are strongly correlated
    z = zoomed[0, :, :, 0]
    corr = np.corrcoef(z[:, :-1].ravel(), z[:, 1:].ravel())[0, 1]
    assert corr > 0.8


def test_snow_blurs_an_8_bit_layer(monkeypatch):
    """make_cifar_c.py / make_imagenet_c.py convert the thresholded snow layer to uint8 by truncation
    (``(np.clip(layer, 0, 1) * 255).astype(np.uint8)``) before ImageMagick blurs it."""
    seen = []

    def spy(layer, radius, sigma, angles):
        seen.append(layer.copy())
        return B.line_blur(layer, radius, sigma, angles)

    monkeypatch.setattr(W, "line_blur", spy)
    for family in ("cifar", "imagenet"):
        W.snow(image((2, 32, 32, 3)), 3, rng(), family)
        loc, scale, zoom, threshold = W.SNOW[family][2][:4]
        layer = W.snow_layer(2, 32, 32, loc, scale, float(zoom), rng())  # the same first draws
        layer[layer < threshold] = 0
        truncated = np.floor(np.clip(layer, 0, 1) * 255)
        np.testing.assert_allclose(seen[-1] * 255, truncated, atol=1e-3)
        assert truncated.max() > 0


@pytest.mark.parametrize("name", ["snow", "frost", "fog"])
@pytest.mark.parametrize("family", FAMILIES)
def test_weather_shapes_and_grayscale(name, family):
    fn = getattr(W, name)
    for c in (1, 3):
        x = image((2, 28, 28, c))
        y = fn(x, 3, rng(), family)
        assert y.shape == x.shape and y.dtype == np.float32
        assert np.abs(y - x).mean() > 1e-3


@pytest.mark.parametrize("name", BLURS)
def test_grayscale_blurs_stay_single_channel_and_inputs_untouched(name):
    x = image((2, 28, 28, 1))
    keep = x.copy()
    y = getattr(B, name)(x, 4, rng(), "mnist")
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.array_equal(x, keep)


def test_mnist_constants_are_scaled_cifar_lengths():
    assert B.GAUSSIAN["mnist"] == pytest.approx(tuple(s * 0.875 for s in B.GAUSSIAN["cifar"]))
    assert [r for r, _ in B.MOTION["mnist"]] == [5, 5, 5, 7, 8]
    assert [d for _, d, _ in B.GLASS["mnist"]] == [1] * 5
    assert [s[4] for s in W.SNOW["mnist"]] == [7, 9, 9, 10, 12]
    assert B.DEFOCUS["mnist"] == B.DEFOCUS["cifar"] and W.FOG["mnist"] == W.FOG["cifar"]
