"""Contract of every corruption, parametrized over the registry (timm-style), plus reference checks."""

from __future__ import annotations

import numpy as np
import pytest

from tttlab.core import corruptions as C
from tttlab.core.errors import InvalidInputError, SeverityError, TTTLabError, UnknownNameError

ALL = list(C.ALL)


def reference_corrupt(ref, image, name, severity, seed):
    """imagecorruptions-imaug on one uint8 HWC image; only two of its functions take a seed, the rest
    draw from numpy's global generator, which we seed."""
    np.random.seed(seed)  # noqa: NPY002 - the reference draws from the global generator
    kwargs = {"seed": seed} if name in ("impulse_noise", "glass_blur") else {}
    return ref.corrupt(image, corruption_name=name, severity=severity, **kwargs)


def test_registry_complete():
    assert len(C.COMMON) == 15 and len(C.HELDOUT) == 4
    assert set(C.FUNCTIONS) == set(C.ALL)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(3, 28, 28, 1), (2, 32, 32, 3), (1, 64, 48, 3)])
def test_shape_dtype_and_determinism(name, shape):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=shape, dtype=np.uint8)
    a = C.corrupt(x, name, 3, seed=7)
    b = C.corrupt(x, name, 3, seed=7)
    assert a.dtype == np.uint8 and a.shape == x.shape
    assert np.array_equal(a, b), "same seed must give identical bytes"
    assert not np.array_equal(a, x), "a corruption must change the image"


@pytest.mark.parametrize("name", ALL)
def test_batch_equals_images_with_same_rng_stream_shape(name, digits28):
    # A single image (H, W, C) and a batch of one give the same result under the same seed.
    one = C.corrupt(digits28[0], name, 2, seed=3)
    batch = C.corrupt(digits28[:1], name, 2, seed=3)
    assert np.array_equal(one, batch[0])


@pytest.mark.parametrize("name", ALL)
def test_severity_increases_change(name, photos224):
    """Mean absolute change from the clean image grows (weakly) from severity 1 to severity 5."""
    if name == "elastic_transform":
        pytest.skip("make_imagenet_c.py's elastic severities 1-2 are large affine warps: not monotone "
                    "(AlexNet's errors 52.6, 70.1, 55.7, 64.1, 80.6%); see test_elastic_follows_hendrycks_two_steps")  # fmt: skip
    x = photos224[:2]
    change = [np.abs(C.corrupt(x, name, s, seed=0).astype(np.float64) - x).mean() for s in C.SEVERITIES]
    assert change[4] > change[0], change


#: Spatter severity 1 changes few pixels and is normalised by its single brightest value: over 8 draws
#: the mean change still varies by about +-10% (over 40 draws ours is -3% +- 3.6% from the reference), so
#: this cell gets a wider tolerance.  (The draws are seeded on both sides: each cell's outcome is fixed.)
TOLERANCE = {("spatter", 1): 0.15}
#: Spatter's low severities change few pixels, so one draw's mean change varies by +-30%: average more.
DRAWS = {"spatter": 8}
#: Corruptions that draw nothing, on both sides (the reference's functions call no random generator; ours
#: take no bytes from ``rng``): every draw is the same image, so one draw gives the mean of three exactly.
#: The test checks that this holds on the first image (ours: every image) at a second seed.  The
#: reference is ~80 % of the test's time (zoom blur alone 7 of its 22 s on an idle machine, 3-6x that under
#: load); three identical draws cost 8 s for nothing.
SEEDLESS = frozenset(
    {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression", "gaussian_blur",
     "saturate"}
)  # fmt: skip


def mean_abs_change(images, corrupted) -> float:
    return float(np.abs(corrupted.astype(np.float64) - images).mean())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_imagenet_constants_match_reference(name, severity, photos224):
    """Mean |corrupted - clean| agrees with imagecorruptions-imaug (ImageNet constants) within 10%.

    Both sides are averaged over 3 independent draws (8 for spatter), so that the comparison is between the
    corruptions' distributions rather than between two single random draws (fog's plasma alone moves
    one draw's change by +-10%).  A corruption that draws nothing (``SEEDLESS``) gives the same image at
    every draw: one draw is its mean, and the test checks that another seed changes no byte on either side."""
    ref = pytest.importorskip("imagecorruptions")
    if name == "elastic_transform":
        pytest.skip("imagecorruptions replaced Hendrycks' elastic transform (no affine step, other constants); "
                    "ours follows make_imagenet_c.py: test_elastic_follows_hendrycks_two_steps")  # fmt: skip
    x = photos224
    draws = range(1 if name in SEEDLESS else DRAWS.get(name, 3))
    ours = [C.corrupt(x, name, severity, seed=d, family="imagenet") for d in draws]
    theirs = [
        np.stack([reference_corrupt(ref, img, name, severity, seed=100 * d + i) for i, img in enumerate(x)])
        for d in draws
    ]
    if name in SEEDLESS:
        assert np.array_equal(C.corrupt(x, name, severity, seed=1, family="imagenet"), ours[0])
        assert np.array_equal(reference_corrupt(ref, x[0], name, severity, seed=101), theirs[0][0])
    d_ours = np.mean([mean_abs_change(x, y) for y in ours])
    d_ref = np.mean([mean_abs_change(x, y) for y in theirs])
    tol = TOLERANCE.get((name, severity), 0.10)
    assert abs(d_ours - d_ref) <= tol * d_ref, (d_ours, d_ref, tol)


def test_seed_changes_output(photos224):
    a = C.corrupt(photos224[:1], "gaussian_noise", 3, seed=0)
    b = C.corrupt(photos224[:1], "gaussian_noise", 3, seed=1)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, err",
    [
        ({"corruption": "gaussian_nose", "severity": 1}, UnknownNameError),
        ({"corruption": "fog", "severity": 0}, SeverityError),
        ({"corruption": "fog", "severity": 6}, SeverityError),
        ({"corruption": "fog", "severity": 2.5}, SeverityError),
        ({"corruption": "fog", "severity": 1, "family": "svhn"}, UnknownNameError),
        ({"corruption": "fog", "severity": 1, "seed": "1"}, InvalidInputError),
    ],
)
def test_bad_arguments(kwargs, err):
    x = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(err) as info:
        C.corrupt(x, **kwargs)
    assert isinstance(info.value, TTTLabError)
    bad = (
        kwargs.get("family") or kwargs["corruption"]
        if "family" in kwargs or err is UnknownNameError
        else kwargs["severity"]
    )
    assert str(bad) in str(info.value)


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((1, 32, 32, 3), np.float32),
        np.zeros((1, 32, 32, 4), np.uint8),
        np.zeros((2, 3, 32, 32, 3), np.uint8),
    ],
)
def test_bad_images(x):
    with pytest.raises(InvalidInputError) as info:
        C.corrupt(x, "fog", 1)
    assert str(x.dtype) in str(info.value) or str(x.shape) in str(info.value)


def test_empty_batch_gives_an_empty_batch():
    x = np.zeros((0, 32, 32, 3), np.uint8)
    assert C.corrupt(x, "fog", 1, seed=0).shape == x.shape


def test_aliases():
    assert C.canonical_name("JPEG") == "jpeg_compression"
    assert C.resolve("heldout") == C.HELDOUT
    assert C.resolve(["gauss", "fog"]) == ("gaussian_noise", "fog")


def test_a_misspelt_corruption_gets_a_guess_before_the_list():
    """``corruptions=[gausian_noise]`` (compare, every evaluate): the error listed all 19 names and 11 aliases
    and left the user to find the one meant; it now names the closest first.  Subset names are guessed too."""
    with pytest.raises(UnknownNameError) as e:
        C.resolve(["fog", "gausian_noise"])
    assert str(e.value).startswith(
        "unknown corruption 'gausian_noise' (did you mean 'gaussian_noise'?); expected one of gaussian_noise, "
    )
    with pytest.raises(UnknownNameError, match=r"^unknown corruption 'comon' \(did you mean 'common'\?\)"):
        C.resolve("comon")
    with pytest.raises(UnknownNameError, match=r"^unknown corruption 'xyz'; expected one of "):
        C.canonical_name("xyz")  # nothing close: no guess


@pytest.mark.parametrize("name", ["gaussian_noise", "spatter", "motion_blur", "jpeg_compression"])
def test_threads_do_not_change_bytes(name, photos224):
    """Chunks get their own child generators: 1 thread and 3 threads give identical bytes."""
    x = np.concatenate([photos224] * 4)  # 16 images of 224 px: 3 chunks
    assert C.chunk_size(x.shape) < len(x)
    one = C.corrupt(x, name, 3, seed=5, threads=1)
    many = C.corrupt(x, name, 3, seed=5, threads=3)
    assert np.array_equal(one, many)
    if name != "jpeg_compression":  # deterministic: the 4 copies of the photos give the same bytes
        assert not np.array_equal(one[:4], one[4:8]), "chunks must not repeat the same noise"
