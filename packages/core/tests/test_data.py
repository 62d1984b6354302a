"""Readers of tttlab.core.data on fixtures that tttlab.core.testing writes in each exact format."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tttlab.core import data, testing
from tttlab.core.errors import (
    DatasetLayoutError,
    DatasetNotFoundError,
    InvalidInputError,
    SeverityError,
    TTTLabError,
    UnknownNameError,
)


def test_mnist_splits_exact():
    pytest.importorskip("mnist")
    train, val, test = data.mnist("train"), data.mnist("val"), data.mnist("test")
    assert (len(train), len(val), len(test)) == (50000, 10000, 10000)
    x, y = test.take(np.arange(64))
    assert x.dtype == np.uint8 and x.shape == (64, 28, 28, 1) and y.dtype == np.int64
    assert set(np.unique(test.labels)) == set(range(10))
    # the digits are white strokes on black: the border is (almost) always 0
    assert x[:, 0, :, 0].mean() < 1 and x.max() == 255
    # train and val are different images (the 50k/10k split of the original 60k)
    a = {bytes(im) for im in train.take(np.arange(2000))[0]}
    b = {bytes(im) for im in val.take(np.arange(2000))[0]}
    assert len(a & b) < 5
    with pytest.raises(InvalidInputError, match="split"):
        data.mnist("training")


def test_digits():
    pytest.importorskip("sklearn")
    parts = [data.digits(s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [1197, 300, 300]
    x, y = parts[2].take([0, 1])
    assert x.shape == (2, 28, 28, 1) and x.dtype == np.uint8 and 0 <= y.min() and y.max() <= 9


def test_cifar10_roundtrip(tmp_path):
    root = testing.make_cifar10(tmp_path, n_train=10, n_test=6)
    ds = data.cifar10(root, "test")
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    x, y = ds.take(np.arange(6))
    assert x.shape == (6, 32, 32, 3)
    # row-major CHW bytes -> HWC: pixel (r, c) channel k = data[k*1024 + r*32 + c]
    assert x[2, 5, 7, 1] == raw[b"data"][2, 1024 + 5 * 32 + 7]
    assert np.array_equal(y, raw[b"labels"])
    assert len(data.cifar10(root / "cifar-10-batches-py", "train")) == 10


def test_cifar10_c_severity_slices(tmp_path):
    folder = testing.make_cifar10_c(tmp_path, corruptions=("fog",), n_per_severity=4)
    raw = np.load(folder / "fog.npy")
    for s in (1, 3, 5):
        ds = data.cifar10_c(tmp_path, "fog", s)
        assert np.array_equal(ds.take(np.arange(4))[0], raw[(s - 1) * 4 : s * 4])
    assert np.array_equal(data.cifar10_c(folder, "fog", 2).labels, np.load(folder / "labels.npy")[4:8])
    with pytest.raises(SeverityError):
        data.cifar10_c(folder, "fog", 6)
    with pytest.raises(DatasetLayoutError, match="snow.npy"):
        data.cifar10_c(folder, "snow", 1)
    np.save(folder / "frost.npy", np.zeros((10, 32, 32), np.uint8))
    with pytest.raises(DatasetLayoutError, match="expected uint8"):
        data.cifar10_c(folder, "frost", 1)


def test_imagenet_labels_index_the_1000(tmp_path):
    wn = data.imagenet_wnids()
    assert len(wn) == 1000 and list(wn) == sorted(wn) and wn[0] == "n01440764"
    root = testing.make_imagenet(tmp_path, wnids=[wn[3], wn[700]], n_per_class=2)
    ds = data.imagenet(root, "val")
    assert sorted(set(ds.labels)) == [3, 700]
    x, y = ds.take([0, 3])
    assert x.shape == (2, 224, 224, 3) and list(y) == [3, 700]


def test_imagenet_c(tmp_path):
    wn = data.imagenet_wnids()
    root = testing.make_imagenet_c(tmp_path, corruptions=("fog",), severities=(2,), wnids=[wn[10]], size=32)
    ds = data.imagenet_c(root, "fog", 2)
    assert list(ds.labels) == [10] and ds.take([0])[0].shape == (1, 32, 32, 3)
    with pytest.raises(DatasetLayoutError, match="fog/3"):
        data.imagenet_c(root, "fog", 3)


@pytest.mark.parametrize("which", ["a", "r"])
def test_imagenet_a_r_class_indices(tmp_path, which):
    reader = data.imagenet_a if which == "a" else data.imagenet_r
    root = getattr(testing, f"make_imagenet_{which}")(tmp_path)
    ds = reader(root)
    assert len(ds.classes) == 200 and ds.class_indices.shape == (200,)
    wn = data.imagenet_wnids()
    # logits_1000[:, class_indices] puts each subset class's own logit at its subset label
    for label in np.unique(ds.labels):
        assert wn[ds.class_indices[label]] == ds.classes[label]
    logits = np.arange(1000)[None, :].repeat(len(ds), 0)
    picked = logits[:, ds.class_indices]
    assert np.array_equal(picked[np.arange(len(ds)), ds.labels], ds.class_indices[ds.labels])


def test_imagenet_v2_numeric_order(tmp_path):
    folder = testing.make_imagenet_v2(tmp_path, classes=(0, 2, 9, 10, 100))
    ds = data.imagenet_v2(tmp_path)  # the parent folder works too
    assert list(ds.labels) == [0, 2, 9, 10, 100]
    assert list(data.imagenet_v2(folder).labels) == [0, 2, 9, 10, 100]


def test_tfds_roundtrip_without_tensorflow(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    import sys

    splits = {"train": 5, "validation": 3}
    root = testing.make_tfds(tmp_path, splits=splits)
    expected = testing.expected_tfds_arrays(splits)
    for split, (images, labels) in expected.items():
        ds = data.tfds("tttlab_fixture", root, split)
        x, y = ds.take(np.arange(len(ds)))
        # TFDS shuffles records by key hash when it writes them: compare as (image, label) multisets
        got = sorted((bytes(a), int(b)) for a, b in zip(x, y))
        assert got == sorted((bytes(a), int(b)) for a, b in zip(images, labels))
        assert x.shape == images.shape and x.dtype == np.uint8
    assert "tensorflow" not in sys.modules
    with pytest.raises(InvalidInputError, match="test"):
        data.tfds("tttlab_fixture", root, "test")


def test_bad_paths_and_layouts(tmp_path):
    missing = tmp_path / "nope"
    for call in (lambda: data.cifar10(missing), lambda: data.imagenet(missing), lambda: data.imagenet_v2(missing),
                 lambda: data.imagenet_a(missing), lambda: data.cifar10_c(missing, "fog", 1)):  # fmt: skip
        with pytest.raises(DatasetNotFoundError, match="nope"):
            call()
    (tmp_path / "val" / "not_a_wnid").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="not_a_wnid"):
        data.imagenet(tmp_path, "val")
    bad = tmp_path / "cifar" / "cifar-10-batches-py"
    bad.mkdir(parents=True)
    (bad / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetLayoutError, match="test_batch"):
        data.cifar10(tmp_path / "cifar", "test")
    (tmp_path / "v2" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="0..999"):
        data.imagenet_v2(tmp_path / "v2")
    with pytest.raises(UnknownNameError, match="cifar10"):
        data.load("cifar100")
    assert issubclass(DatasetLayoutError, TTTLabError)
