"""The real-photo set (:func:`tttlab.core.data.photos`) and its corruption benchmark ``photos_c``."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

from tttlab.core import corruptions as C  # noqa: E402
from tttlab.core.benchmark import (  # noqa: E402
    IMAGENET_C_JPEG_QUALITY,
    PHOTOS_C_CROPS,
    UNLABELLED_BENCHMARKS,
    jpeg_roundtrip,
    make_benchmark,
)
from tttlab.core.data import PHOTO_NAMES, load, photo_arrays, photos, resize_center_crop  # noqa: E402
from tttlab.core.errors import InvalidInputError, MissingDependencyError  # noqa: E402


def test_crop_zero_is_the_imagenet_eval_view_and_labels_are_indices():
    """Crop 0 of every photo is resize-256 / centre-224 of the shipped photo; the others are 224 px windows
    of the photo resized to a shorter side in [224, 448] (possibly mirrored); labels are image indices."""
    from PIL import Image

    ds = photos(224, crops_per_photo=3, seed=0)
    raw = photo_arrays()
    assert list(raw) == list(PHOTO_NAMES) and len(PHOTO_NAMES) == 8
    assert ds.images.shape == (24, 224, 224, 3) and ds.images.dtype == np.uint8
    assert ds.labels.tolist() == list(range(24))
    assert ds.meta["photo"].tolist() == [p for p in range(8) for _ in range(3)]
    assert ds.meta["crop"].tolist() == [0, 1, 2] * 8
    centre = resize_center_crop(256, 224)
    for p, img in enumerate(raw.values()):
        assert np.array_equal(ds.images[3 * p], np.asarray(centre(Image.fromarray(img))))
    # a random crop is no centre view and differs between crops of one photo
    assert not np.array_equal(ds.images[1], ds.images[0]) and not np.array_equal(ds.images[1], ds.images[2])
    with pytest.raises(ValueError):  # shared, read-only
        ds.images[0, 0, 0, 0] = 1


def test_crops_are_seeded():
    a, b, other = photos(64, 4, seed=0), photos(64, 4, seed=0), photos(64, 4, seed=1)
    assert np.array_equal(a.images, b.images)
    extra = a.meta["crop"] > 0
    assert np.array_equal(a.images[~extra], other.images[~extra])  # the centre view does not depend on it
    assert not np.array_equal(a.images[extra], other.images[extra])
    assert load("photos", crops_per_photo=4, size=64).images.shape == (32, 64, 64, 3)


@pytest.mark.parametrize("kwargs", [{"crops_per_photo": 0}, {"size": 0}, {"seed": -1}, {"size": 300}])
def test_bad_arguments(kwargs):
    with pytest.raises(InvalidInputError):
        photos(**kwargs)


def test_missing_scikit_image_names_the_install(monkeypatch):
    import importlib
    import sys

    # the module itself (the package exports the function under the same name)
    module = importlib.import_module("tttlab.core.data.photos")

    module._raw.cache_clear()
    module._crops.cache_clear()
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    monkeypatch.setitem(sys.modules, "skimage", None)
    try:
        with pytest.raises(MissingDependencyError, match=r"core\[datasets\]"):
            photos(32)
    finally:
        module._raw.cache_clear()
        module._crops.cache_clear()


def test_photos_c_corrupts_the_crops_with_imagenet_constants(monkeypatch):
    """Every ``photos_c`` image is the labelled crop (label = its index among the 8 x 64 crops; 8 x 3 here,
    for speed) corrupted with the ImageNet constants and the benchmark's per-chunk generator, then JPEG'd
    at quality 85."""
    import tttlab.core.benchmark as B

    assert "photos_c" in UNLABELLED_BENCHMARKS and PHOTOS_C_CROPS == 64
    monkeypatch.setattr(B, "PHOTOS_C_CROPS", 3)
    bench = make_benchmark("photos_c", corruptions=["contrast"], severities=[5], num_examples=6, batch_size=4)
    assert len(bench.source) == 24
    (dom, images, labels), (_, images2, labels2) = list(bench)
    got, idx = np.concatenate([images, images2]), np.concatenate([labels, labels2])
    assert len(set(idx.tolist())) == 6
    clean = photos(224, 3).images[idx]
    order = np.random.default_rng([0, 0x5EED]).permutation(24)[:6]
    assert idx.tolist() == order.tolist()
    rng = np.random.default_rng([0, C.ALL.index("contrast"), 5, 0])
    want = jpeg_roundtrip(
        C.corrupt(clean, "contrast", 5, rng=rng, family="imagenet"), IMAGENET_C_JPEG_QUALITY
    )
    assert np.array_equal(got, want)
    with pytest.raises(InvalidInputError, match="reads no files"):
        make_benchmark("photos_c", root="/tmp")


def test_compare_refuses_the_unlabelled_benchmark(tmp_path):
    """tools/compare.py would pass photos_c to every method's evaluate, which would score image indices as
    class labels (near 0 % for all): refused with the command that runs its agreement protocol."""
    from tttlab.core import compare as cmp
    from tttlab.core.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"'photos_c' has no class labels.*\+experiment=photos_mobilenet_v2"
    ):
        cmp.load_config([f"out_dir={tmp_path}", "benchmark=photos_c", "profile=smoke"])
    assert (
        cmp.load_config([f"out_dir={tmp_path}", "benchmark=digits_c", "profile=smoke"])["benchmark"]
        == "digits_c"
    )
