"""Flattened image datasets for pi-net MLPs, read through ``tttlab.core.data`` where the core has a reader.

* ``mnist`` (embedded, 784 features, normalised with the MNIST mean/std), ``digits`` (embedded);
* ``cifar10`` from a local path (core reader; 3072 features in CHW order, normalised with the upstream
  per-channel mean/std, no augmentation, as the paper);
* ``imagenet32`` from a local path: the downsampled-ImageNet 32x32 batch files (``train_data_batch_1``
  .. ``train_data_batch_10`` and ``val_data``, each a pickle or ``.npz`` with ``data`` (N x 3072, CHW
  uint8) and ``labels`` (1..1000)); the core has no reader for this format, so it is read here;
  normalised with the ImageNet mean/std, as upstream's ``transfer_imagenet.py`` (its CIFAR-10 transfer
  set keeps the CIFAR-10 constants);
* ``classes`` (:func:`load_flat`): keep only the examples of these labels, relabelled ``0..k-1`` in the
  given order (upstream's transfer run trains on a fixed random subset of 250 ImageNet classes);
* Omniglot from a local path (see :func:`omniglot_classes`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tttlab.core._io import load_data_pickle
from tttlab.core.errors import DatasetLayoutError, DatasetNotFoundError, InvalidInputError

#: per-channel mean / std of CIFAR-10 used by upstream's transform
CIFAR_MEAN = (0.49137255, 0.48235294, 0.44666667)
CIFAR_STD = (0.24705882, 0.24352941, 0.26156863)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
#: ImageNet mean / std, used by upstream's ``transfer_imagenet.py`` for ImageNet32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS = ("mnist", "digits", "cifar10", "imagenet32")
NUM_CLASSES = {"mnist": 10, "digits": 10, "cifar10": 10, "imagenet32": 1000}


def flatten_images(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C*H*W) in CHW order, ``(x/255 - mean) / std``."""
    x = torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((x - m) / s).flatten(1)


def _subset(images, labels, num_examples):
    if num_examples is not None:
        if int(num_examples) < 1:
            raise InvalidInputError(f"num_examples={num_examples!r}: expected a positive integer or null")
        images, labels = images[: int(num_examples)], labels[: int(num_examples)]
    return images, labels


def check_classes(classes, name: str, key: str = "train.classes") -> list[int] | None:
    """``classes`` as a list of distinct label indices of dataset ``name`` (``None``: all classes)."""
    if classes is None:
        return None
    n = NUM_CLASSES.get(name)
    ok = isinstance(classes, (list, tuple)) and len(classes) > 0
    ok = ok and all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < (n or 0) for k in classes)
    if not ok or len(set(classes)) != len(classes):
        raise InvalidInputError(
            f"{key}={classes!r}: expected null or a non-empty list of distinct label indices of {name} "
            f"(integers in [0, {n}))"
        )
    return [int(k) for k in classes]


def _keep_classes(images, labels, classes):
    """Examples of ``classes`` only, labels relabelled to their position in ``classes``."""
    if classes is None:
        return images, labels
    labels = np.asarray(labels)
    index = np.full(int(max(labels.max(initial=0), max(classes))) + 1, -1, dtype=np.int64)
    index[np.asarray(classes)] = np.arange(len(classes))
    keep = np.nonzero(index[labels] >= 0)[0]
    return np.asarray(images)[keep], index[labels[keep]]


def data_root(root, what: str, key: str, layout: str) -> Path:
    """``root`` as an existing directory.

    Not set (None: the schema's default, which is what a paper experiment's ``root: ???`` becomes once
    validated; ``???`` itself; or an empty string, e.g. ``data.root=$DATA`` with ``DATA`` unset, which read
    the current directory) or a path that does not exist: :class:`DatasetNotFoundError`; a path that exists
    but is not a directory: :class:`DatasetLayoutError` (a present path with the wrong contents).  Each
    names ``key``, the path and ``layout``, the expected contents; an unset one says how to set it.
    """
    if root is None or not str(root).strip() or str(root).strip() == "???":
        given = "is not set" if root is None or str(root).strip() == "???" else f"is empty ({key}={root!r})"
        raise DatasetNotFoundError(
            f"{what} is read from disk, but {key} {given}; expected the path of the folder holding the {what} "
            f"data: {layout}. Set it on the command line: {key}=/path/to/{what}"
        )
    path = Path(root)
    if not path.exists():
        raise DatasetNotFoundError(f"{key}={str(path)!r}: {path} does not exist; expected {layout}")
    if not path.is_dir():
        raise DatasetLayoutError(f"{key}={str(path)!r}: {path} is a file, not a directory; expected {layout}")
    return path


CIFAR10_LAYOUT = "<root>/cifar-10-batches-py/{data_batch_1..5, test_batch} (or root = that folder)"


def load_flat(
    name: str, split: str, root=None, num_examples: int | None = None, classes=None, key: str = "data.root"
):
    """``(x float32 (N, D), y int64 (N,))`` of a dataset split, flattened and normalised; with ``classes``
    (label indices) only those classes' examples, relabelled ``0..len(classes)-1`` in that order (before
    ``num_examples`` is applied).  ``key``: the config key of ``root``, named in errors."""
    from tttlab.core import data as D

    classes = check_classes(classes, name)
    if name in ("mnist", "digits"):
        ds = getattr(D, name)(split)
        images, labels = _subset(*_keep_classes(ds.images, ds.labels, classes), num_examples)
        return flatten_images(np.asarray(images), MNIST_MEAN, MNIST_STD), torch.as_tensor(
            np.array(labels), dtype=torch.long
        )
    if name == "cifar10":
        ds = D.cifar10(data_root(root, "cifar10", key, CIFAR10_LAYOUT), split=split)
        images, labels = _subset(*_keep_classes(ds.images, ds.labels, classes), num_examples)
        return flatten_images(np.asarray(images), CIFAR_MEAN, CIFAR_STD), torch.as_tensor(
            np.array(labels), dtype=torch.long
        )
    if name == "imagenet32":
        images, labels = imagenet32(root, split, key=key)
        images, labels = _subset(*_keep_classes(images, labels, classes), num_examples)
        return flatten_images(images, IMAGENET_MEAN, IMAGENET_STD), torch.as_tensor(labels, dtype=torch.long)
    raise InvalidInputError(f"dataset {name!r}; expected one of {DATASETS}")


IMAGENET32_LAYOUT = "<root>/train_data_batch_1[.npz] .. train_data_batch_10[.npz], <root>/val_data[.npz]"


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                data, labels = z["data"], z["labels"]
        else:
            with open(path, "rb") as f:
                d = load_data_pickle(f, encoding="latin1")  # numpy arrays only: no pickled code runs
            data, labels = d["data"], d["labels"]
    except Exception as exc:  # noqa: BLE001 - foreign or truncated file
        raise DatasetLayoutError(
            f"{path}: not an ImageNet32 batch file ({exc}); expected {IMAGENET32_LAYOUT}"
        ) from None
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetLayoutError(f"{path}: data of shape {data.shape}; expected (N, 3072) uint8 CHW rows")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(images):
        raise DatasetLayoutError(
            f"{path}: {len(labels)} labels for {len(images)} images; expected one per row"
        )
    if len(labels) and (labels.min() < 1 or labels.max() > 1000):
        # the downsampled-ImageNet files count classes from 1; a 0-based file would shift every class by one
        raise DatasetLayoutError(
            f"{path}: labels {labels.min()}..{labels.max()}; expected the ImageNet32 files' 1..1000 "
            f"(0-based labels? add 1 when writing the file)"
        )
    return images, labels - 1


def imagenet32(root, split: str = "train", key: str = "data.root") -> tuple[np.ndarray, np.ndarray]:
    """Downsampled ImageNet 32x32: uint8 (N, 32, 32, 3) and labels 0..999."""
    root = data_root(root, "imagenet32", key, IMAGENET32_LAYOUT)
    stems = [f"train_data_batch_{i}" for i in range(1, 11)] if split == "train" else ["val_data"]
    files = []
    for stem in stems:
        hit = [p for p in (root / stem, root / f"{stem}.npz") if p.exists()]
        if hit:
            files.append(hit[0])
    if not files:
        raise DatasetLayoutError(f"{root} has none of {stems[:2]}...; expected {IMAGENET32_LAYOUT}")
    parts = [_read_batch(p) for p in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


#: what a dataset's root holds (error messages)
TRANSFER_LAYOUTS = {"cifar10": CIFAR10_LAYOUT, "imagenet32": IMAGENET32_LAYOUT}


# ----------------------------------------------------------------------------------------------------------
# few-shot sources: {class id: uint8 images (n, 28, 28)}

OMNIGLOT_LAYOUT = (
    "<root>/images_background/<alphabet>/<character>/*.png (meta-train) and "
    "<root>/images_evaluation/<alphabet>/<character>/*.png (meta-test), as in the original Omniglot zips"
)


def omniglot_classes(
    root, split: str = "train", image_size: int = 28, key: str = "maml.root"
) -> list[np.ndarray]:
    """Omniglot characters as classes: a list of uint8 arrays (n, image_size, image_size), strokes bright.

    ``split="train"``: ``images_background`` (964 characters), ``"test"``: ``images_evaluation`` (659).
    """
    from PIL import Image

    folder = data_root(root, "omniglot", key, OMNIGLOT_LAYOUT) / (
        "images_background" if split == "train" else "images_evaluation"
    )
    if not folder.is_dir():  # the root is there, its contents are not
        raise DatasetLayoutError(
            f"{key}={str(root)!r}: {folder} is not a directory; expected {OMNIGLOT_LAYOUT}"
        )
    classes = []
    for alphabet in sorted(p for p in folder.iterdir() if p.is_dir()):
        for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
            files = sorted(char.glob("*.png"))
            if not files:
                continue
            imgs = []
            for f in files:
                with Image.open(f) as im:
                    im = im.convert("L").resize((image_size, image_size), Image.BILINEAR)
                    imgs.append(255 - np.asarray(im, dtype=np.uint8))
            classes.append(np.stack(imgs))
    if not classes:
        raise DatasetLayoutError(
            f"{folder} holds no <alphabet>/<character>/*.png; expected {OMNIGLOT_LAYOUT}"
        )
    return classes


def mnist_classes(
    split: str, digits, per_class: int | None = None, rotations=(0, 1, 2, 3)
) -> list[np.ndarray]:
    """MNIST digits as few-shot classes (the embedded proxy): one uint8 array (n, 28, 28) per (digit,
    rotation by k x 90 degrees) -- rotations make new classes, as is usual for Omniglot."""
    from tttlab.core.data import mnist

    ds = mnist(split)
    images, labels = np.asarray(ds.images)[..., 0], np.asarray(ds.labels)
    out = []
    for d in digits:
        sel = images[labels == d]
        sel = sel[:per_class] if per_class else sel
        for k in rotations:
            out.append(np.ascontiguousarray(np.rot90(sel, k, axes=(1, 2))))
    return out
