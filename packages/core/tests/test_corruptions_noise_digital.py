"""The maths of the noise and digital corruptions: each checked against its definition (or against the
library whose arithmetic it reproduces), on small synthetic arrays."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from scipy import stats

from tttlab.core import corruptions as C
from tttlab.core.corruptions import digital as D
from tttlab.core.corruptions import noise as N
from tttlab.core.corruptions._common import to_gray_like, to_rgb

FAMILIES = ("mnist", "cifar", "imagenet")
SEVERITIES = (1, 2, 3, 4, 5)
MINE = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression", "saturate", "spatter",
)  # fmt: skip


def grey(value: float, shape=(4, 64, 64, 3)) -> np.ndarray:
    return np.full(shape, value, np.float32)


def random_rgb(seed=0, shape=(3, 40, 48, 3)) -> np.ndarray:
    x = np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.float32) / np.float32(255)
    x[0, :4, :4] = 0.0  # black pixels
    x[0, 4:8, :4] = 0.5  # grey pixels
    x[0, 8:12, :4] = 1.0  # white pixels
    return x


# ------------------------------------------------------------------------------------------ noise


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_gaussian_noise_std(family, severity):
    x = grey(0.5)
    residual = N.gaussian_noise(x, severity, np.random.default_rng(severity), family) - x
    sigma = N.GAUSSIAN[family][severity - 1]
    assert abs(residual.std() / sigma - 1) < 0.02
    assert abs(residual.mean()) < 4 * sigma / np.sqrt(x.size)


@pytest.mark.parametrize("family", ("cifar", "imagenet"))
def test_speckle_noise_is_multiplicative(family):
    x = grey(0.5)
    x[:2] = 0.25
    y = N.speckle_noise(x, 5, np.random.default_rng(0), family)
    sigma = N.SPECKLE[family][4]
    for value in (0.25, 0.5):
        r = (y - x)[x == value]
        assert abs(r.std() / (value * sigma) - 1) < 0.03
    assert np.array_equal(N.speckle_noise(grey(0.0), 5, np.random.default_rng(0), family), grey(0.0))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("severity", (1, 3, 5))
def test_shot_noise_mean_and_variance(family, severity):
    """Poisson(x c) / c: the mean of every level is preserved and its variance is x / c."""
    photons = N.SHOT[family][severity - 1]
    levels = np.array([0, 1, 40, 128, 200, 255], np.float32)
    x = np.repeat(levels / 255, 40_000).reshape(len(levels), 200, 200, 1).astype(np.float32)
    y = N.shot_noise(x, severity, np.random.default_rng(1), family)
    for i, level in enumerate(levels / 255):
        mean, var = y[i].mean(), y[i].var()
        assert abs(mean - level) <= 5 * np.sqrt(level / photons / y[i].size) + 1e-7, (level, mean)
        if level > 0:  # relative error of a variance estimate ~ 1/sqrt(number of photons counted)
            tol = 0.02 + 5 / np.sqrt(level * photons * y[i].size)
            assert abs(var / (level / photons) - 1) < tol, (level, var)
    assert np.all(y[0] == 0)
    counts = y * photons
    assert np.allclose(counts, np.rint(counts), atol=1e-3)  # integer photon counts


@pytest.mark.parametrize("photons", (3, 60, 500))
def test_shot_noise_table_matches_poisson_pmf(photons):
    """The table sampler of one level against the exact Poisson pmf (total variation < 0.01)."""
    sampler = N._PoissonLevels(photons)
    level = 77
    draws = sampler.sample(np.full(200_000, level, np.uint8), np.random.default_rng(2)) * photons
    draws = np.rint(draws).astype(int)
    lam = level / 255 * photons
    support = np.arange(draws.max() + 1)
    empirical = np.bincount(draws, minlength=support.size) / draws.size
    assert 0.5 * np.abs(empirical - stats.poisson.pmf(support, lam)).sum() < 0.01


def test_shot_noise_off_grid_input_falls_back():
    x = np.full((2, 50, 50, 3), 0.3001, np.float32)  # not a multiple of 1/255
    assert N._levels_255(x) is None
    y = N.shot_noise(x, 2, np.random.default_rng(0), "imagenet")
    assert abs(y.mean() - 0.3001) < 0.01
    assert N._levels_255(np.full((1, 8, 8, 1), 0.5, np.float32)) is None
    assert N._levels_255(np.full((1, 8, 8, 1), np.float32(128) / np.float32(255), np.float32)) is not None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("severity", (1, 5))
def test_impulse_noise_fraction(family, severity):
    amount = N.IMPULSE[family][severity - 1]
    x = grey(0.5, (4, 100, 100, 3))
    y = N.impulse_noise(x, severity, np.random.default_rng(0), family)
    n = x.size
    tol = 5 * np.sqrt(amount / 2 / n)
    assert abs((y == 0).mean() - amount / 2) < tol
    assert abs((y == 1).mean() - amount / 2) < tol
    assert np.all((y == x) | (y == 0) | (y == 1))


# ---------------------------------------------------------------------------------- colour/contrast


def skimage_hsv_round_trip(x, channel, fn):
    color = pytest.importorskip("skimage.color")
    out = []
    for img in x.astype(np.float64):
        hsv = color.rgb2hsv(img)
        hsv[..., channel] = fn(hsv[..., channel])
        out.append(color.hsv2rgb(hsv))
    return np.stack(out)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_brightness_is_hsv_value_shift(family, severity):
    x = random_rgb()
    c = D.BRIGHTNESS[family][severity - 1]
    ours = D.brightness(x, severity, None, family)
    ref = skimage_hsv_round_trip(x, 2, lambda v: np.clip(v + c, 0, 1))
    assert np.abs(ours - ref).max() < 1e-5
    g = grey(0.5, (1, 8, 8, 1))
    assert np.allclose(D.brightness(g, severity, None, family), 0.5 + c)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_saturate_is_hsv_saturation_change(family, severity):
    x = random_rgb()
    a, b = D.SATURATE[family][severity - 1]
    ours = D.saturate(x, severity, None, family)
    ref = skimage_hsv_round_trip(x, 1, lambda s: np.clip(s * a + b, 0, 1))
    assert np.abs(ours - ref).max() < 1e-5


def test_saturate_one_channel_proxy():
    x = random_rgb()[..., :1]
    y = D.saturate(x, 4, None, "mnist")
    a, b = D.SATURATE["mnist"][3]
    m = x.mean(axis=(1, 2, 3), keepdims=True)
    assert np.allclose(y, (x - m) * a + m + b, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_contrast_scales_deviation_from_mean(family, severity):
    x = random_rgb()
    c = D.CONTRAST[family][severity - 1]
    y = D.contrast(x, severity, None, family)
    mean = x.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    assert np.allclose(y - mean, c * (x - mean), atol=1e-6)
    assert np.allclose(y.mean(axis=(1, 2), dtype=np.float64), mean[:, 0, 0], atol=1e-6)


# ---------------------------------------------------------------------------------- JPEG, pixelate


def pillow_round_trip(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(buf, "JPEG", quality=quality)
    dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    return dec[..., None] if dec.ndim == 2 else dec


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("channels", (1, 3))
def test_jpeg_equals_pillow_round_trip(family, channels):
    x = (random_rgb(shape=(2, 40, 48, 3))[..., :channels] * 255).astype(np.uint8)
    for severity in (1, 5):
        quality = D.JPEG[family][severity - 1]
        ours = C.corrupt(x, "jpeg", severity, seed=0, family=family)
        assert np.array_equal(ours, np.stack([pillow_round_trip(img, quality) for img in x]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_pixelate_equals_pillow_and_is_blocky(family, severity):
    x = (random_rgb(shape=(2, 64, 64, 3)) * 255).astype(np.uint8)
    c = D.PIXELATE[family][severity - 1]
    up = Image.NEAREST if family == "imagenet" else Image.BOX
    ref = np.stack(
        [np.asarray(Image.fromarray(i).resize((int(64 * c),) * 2, Image.BOX).resize((64, 64), up)) for i in x]
    )
    ours = C.corrupt(x, "pixelate", severity, seed=0, family=family)
    assert np.array_equal(ours, ref)
    # every output pixel copies one of int(64 c) x int(64 c) block values: few distinct rows/columns
    rows = {tuple(r.ravel()) for r in ours[0]}
    assert len(rows) == int(64 * c)


def test_pixelate_half_gives_constant_2x2_blocks():
    x = (random_rgb(shape=(1, 224, 224, 3)) * 255).astype(np.uint8)
    y = C.corrupt(x, "pixelate", 2, seed=0, family="imagenet")  # factor 0.5: 112 px, nearest back up
    for dy in (0, 1):
        for dx in (0, 1):
            assert np.array_equal(y[:, dy::2, dx::2], y[:, ::2, ::2])


# ---------------------------------------------------------------------------------- elastic


@pytest.mark.parametrize("mode", ("reflect", "mirror"))
@pytest.mark.parametrize("channels", (1, 3))
def test_bilinear_matches_map_coordinates(mode, channels):
    rng = np.random.default_rng(0)
    x = rng.random((2, 20, 24, channels), dtype=np.float32)
    sy = rng.uniform(-6, 25, (2, 20, 24)).astype(np.float32)
    sx = rng.uniform(-6, 29, (2, 20, 24)).astype(np.float32)
    ours = D._bilinear(x, sy, sx, mode)
    for i in range(2):
        for c in range(channels):
            ref = ndi.map_coordinates(x[i, :, :, c], np.stack([sy[i], sx[i]]), order=1, mode=mode)
            assert np.abs(ours[i, :, :, c] - ref).max() < 1e-5


def test_elastic_constants_are_make_imagenet_c_and_make_cifar_c():
    """(alpha, sigma, affine) in pixels: make_imagenet_c.py writes them as multiples of 244 (not the
    displacement-only variant of imagecorruptions), make_cifar_c.py as multiples of IMSIZE = 32."""
    imagenet = [(244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2),
                (244 * 0.05, 244 * 0.01, 244 * 0.02), (244 * 0.07, 244 * 0.01, 244 * 0.02),
                (244 * 0.12, 244 * 0.01, 244 * 0.02)]  # fmt: skip
    cifar = [(0, 0, 32 * 0.08), (32 * 0.05, 32 * 0.2, 32 * 0.07), (32 * 0.08, 32 * 0.06, 32 * 0.06),
             (32 * 0.1, 32 * 0.04, 32 * 0.05), (32 * 0.1, 32 * 0.03, 32 * 0.03)]  # fmt: skip
    for family, expected in (("imagenet", imagenet), ("cifar", cifar)):
        size = D.ELASTIC_IMSIZE[family]
        got = [tuple(size * v for v in row) for row in D.ELASTIC[family]]
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def reference_elastic(x, alpha, sigma, jitter, rng):
    """Hendrycks' two steps on one square (H, W, C) image with our generator's draws: the affine warp of
    three points around the centre (bilinear, reflect-101 border as OpenCV's warpAffine), then
    map_coordinates (bilinear, reflect border) at the grid displaced by the smoothed U(-1, 1) fields."""
    h, w, c = x.shape
    centre = np.float32([h // 2, w // 2])
    half = min(h, w) // 3
    pts1 = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    pts2 = pts1 + rng.uniform(-jitter, jitter, size=(1, 3, 2))[0]
    # the affine map pts1 -> pts2 in (x, y); warpAffine samples the source at its inverse
    a = np.linalg.solve(np.c_[pts1, np.ones(3)], pts2).T  # (2, 3): [x', y'] = a @ [x, y, 1]
    inv = np.linalg.inv(np.r_[a, [[0, 0, 1]]])
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    sx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    sy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    warped = np.stack(
        [ndi.map_coordinates(x[..., k], np.stack([sy, sx]), order=1, mode="mirror") for k in range(c)], -1
    )
    noise = rng.random(size=(2, 1, h, w), dtype=np.float32) * np.float32(2) - np.float32(1)
    dy, dx = (ndi.gaussian_filter(f[0].astype(np.float64), sigma, mode="reflect", truncate=3) * alpha
              for f in noise)  # fmt: skip
    return np.stack(
        [ndi.map_coordinates(warped[..., k], np.stack([yy + dy, xx + dx]), order=1, mode="reflect")
         for k in range(c)], -1,
    )  # fmt: skip


@pytest.mark.parametrize("family, size, severity", [("imagenet", 96, 1), ("imagenet", 96, 3),
                                                    ("imagenet", 96, 5), ("cifar", 32, 2)])  # fmt: skip
def test_elastic_follows_hendrycks_two_steps(family, size, severity):
    """Same draws as the original's affine-then-displacement (a smooth image: our single composed
    resampling differs from two successive bilinear ones by float noise and a little interpolation blur)."""
    x = ndi.gaussian_filter(random_rgb(shape=(1, size, size, 3)), (0, 3, 3, 0))
    x = (x - x.min()) / (x.max() - x.min())
    alpha, sigma, jitter = (D.ELASTIC_IMSIZE[family] * v for v in D.ELASTIC[family][severity - 1])
    ours = D.elastic_transform(x, severity, np.random.default_rng(4), family)[0]
    ref = reference_elastic(x[0], alpha, sigma, jitter, np.random.default_rng(4))
    inner = (slice(4, -4), slice(4, -4))  # the two border conventions differ only at the border
    assert np.abs(ours - ref)[inner].mean() < 2e-3
    assert np.abs(ours - ref)[inner].max() < 0.03
    assert np.abs(ours - x[0]).mean() > 10 * np.abs(ours - ref)[inner].mean()  # the warp is not trivial


def test_wide_reflect_gaussian_equals_gaussian_filter():
    """The FFT form of the wide (ImageNet severity 1: sigma 171 px > the image) smoothing is scipy's."""
    v = np.random.default_rng(0).random((2, 1, 50, 40)).astype(np.float32)
    for sigma in (13.0, 170.8):
        ours = D._reflect_gauss_fft(D._reflect_gauss_fft(v, sigma, 2), sigma, 3)
        ref = ndi.gaussian_filter(v.astype(np.float64), (0, 0, sigma, sigma), mode="reflect", truncate=3.0)
        assert np.abs(ours - ref).max() < 1e-6


@pytest.mark.parametrize("family", ("cifar", "mnist"))
def test_elastic_small_keeps_content(family):
    x = random_rgb(shape=(4, 32, 32, 3))
    x = ndi.gaussian_filter(x, (0, 2, 2, 0))  # smooth: a small warp changes it a little
    for severity in SEVERITIES:
        y = D.elastic_transform(x, severity, np.random.default_rng(severity), family)
        assert 0 < np.abs(y - x).mean() < 0.1
        assert abs(y.mean() - x.mean()) < 0.01


# ---------------------------------------------------------------------------------- spatter


def test_gaussian_nearest_fft_matches_ndimage():
    a = np.random.default_rng(0).standard_normal((3, 50, 70)).astype(np.float32)
    for sigma in (0.7, 2, 4):
        ref = ndi.gaussian_filter(a, (0, sigma, sigma), mode="nearest", truncate=4.0)
        assert np.abs(D._gaussian_nearest(a, sigma) - ref).max() < 1e-5


def liquid_levels(n=3, h=60, w=50, sigma=2.0):
    rng = np.random.default_rng(5)
    liquid = ndi.gaussian_filter(rng.normal(0.65, 0.3, (n, h, w)), (0, sigma, sigma), mode="nearest")
    liquid[liquid < 0.68] = 0
    return (liquid * 255).astype(np.uint8)


def test_water_texture_matches_opencv():
    """Canny, chamfer distance, equalizeHist and the whole water texture against OpenCV's C code
    (the reference's dependency; IPP off: IPP builds compute the distances in float)."""
    cv2 = pytest.importorskip("cv2")
    use_ipp = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(False)
    try:
        for sigma in (1.0, 2.0, 3.0):
            levels = liquid_levels(sigma=sigma)
            edges = D._canny(levels, 50, 150)
            assert np.array_equal(edges, np.stack([cv2.Canny(lv, 50, 150) > 0 for lv in levels]))
            ours = np.minimum(D._chamfer5(edges), 20 << 16) / 65536.0
            ref = [cv2.distanceTransform((~e).astype(np.uint8) * 255, cv2.DIST_L2, 5) for e in edges]
            assert np.array_equal(ours, np.minimum(np.stack(ref), 20))
            eq = D._equalize_hist(levels)
            assert np.array_equal(eq, np.stack([cv2.equalizeHist(lv) for lv in levels]))
            tex = D._water_texture(levels)
            kernel = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
            for lv, t in zip(levels, tex):
                d = cv2.distanceTransform(255 - cv2.Canny(lv, 50, 150), cv2.DIST_L2, 5)
                d = cv2.equalizeHist(cv2.blur(np.minimum(d, 20), (3, 3)).astype(np.uint8))
                d = cv2.blur(cv2.filter2D(d, cv2.CV_8U, kernel), (3, 3)).astype(np.float32)
                assert np.array_equal(t, d)
    finally:
        cv2.ipp.setUseIPP(use_ipp)


def test_chamfer_without_features_is_far():
    far = D._chamfer5(np.zeros((2, 10, 12), bool))
    assert far.min() > 20 << 16
    one = np.zeros((1, 9, 9), bool)
    one[0, 4, 4] = True
    d = D._chamfer5(one)[0] / 65536.0
    assert d[4, 4] == 0 and d[4, 5] == 1 and d[4, 6] == 2
    assert abs(d[5, 5] - 1.4) < 1e-4 and abs(d[5, 6] - 2.1969) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_spatter_one_channel_is_luma_of_rgb(family, severity):
    """Water and mud colours are linear in the image: on one channel they act through their luma."""
    x1 = random_rgb(shape=(2, 32, 32, 3))[..., :1]
    y1 = D.spatter(x1, severity, np.random.default_rng(4), family)
    y3 = D.spatter(to_rgb(x1), severity, np.random.default_rng(4), family)
    assert y1.shape == x1.shape
    assert np.abs(y1 - to_gray_like(y3, x1)).max() < 1e-5


def test_spatter_water_and_mud_colours():
    x = grey(0.2, (2, 64, 64, 3))
    water = D.spatter(x, 1, np.random.default_rng(0), "imagenet") - x  # adds m * (175, 238, 238)/255
    ratio = water[..., 0] / np.maximum(water[..., 1], 1e-9)
    wet = water[..., 1] > 1e-3
    assert wet.any() and np.allclose(ratio[wet], 175 / 238, atol=1e-4)
    mud = D.spatter(x, 5, np.random.default_rng(0), "imagenet")
    covered = np.abs(mud - x).max(axis=-1) > 1e-6
    assert covered.any()
    m = (mud[..., 0] - 0.2) / (63 / 255 - 0.2)  # x (1 - m) + brown m, m >= 0.8 where covered
    assert np.all(m[covered] >= 0.8 - 1e-5)


# ---------------------------------------------------------------------------------- all of them


@pytest.mark.parametrize("name", MINE)
def test_one_channel_stays_one_channel(name):
    x = (random_rgb(shape=(2, 28, 28, 3))[..., :1] * 255).astype(np.uint8)
    y = C.corrupt(x, name, 4, seed=0)
    assert y.shape == x.shape and y.dtype == np.uint8


@pytest.mark.parametrize("name", MINE)
def test_input_not_modified(name):
    x = random_rgb(shape=(2, 32, 32, 3))
    before = x.copy()
    C.FUNCTIONS[name](x, 5, np.random.default_rng(0), "cifar")
    assert np.array_equal(x, before)


@pytest.mark.parametrize("name", ("brightness", "saturate", "contrast", "pixelate", "jpeg_compression"))
def test_grey_rgb_stays_grey_where_hue_is_undefined(name):
    """Corruptions that do not add colour keep an R=G=B image grey (saturate with b = 0 only)."""
    x = np.repeat((random_rgb(shape=(2, 32, 32, 3))[..., :1] * 255).astype(np.uint8), 3, axis=-1)
    for severity in (1, 2, 3):
        y = C.corrupt(x, name, severity, seed=0, family="cifar").astype(int)
        tol = 3 if name == "jpeg_compression" else 0  # chroma quantisation
        assert np.abs(y[..., 0] - y[..., 1]).max() <= tol and np.abs(y[..., 1] - y[..., 2]).max() <= tol


def test_impulse_noise_uint8_path_equals_float_path():
    x8 = (random_rgb(shape=(2, 32, 32, 3)) * 255).astype(np.uint8)
    native = N.impulse_noise(x8, 4, np.random.default_rng(0), "cifar")
    via_float = N.impulse_noise(x8.astype(np.float32) / np.float32(255), 4, np.random.default_rng(0), "cifar")
    assert np.array_equal(native, (np.clip(via_float, 0, 1) * 255 + 1e-3).astype(np.uint8))
