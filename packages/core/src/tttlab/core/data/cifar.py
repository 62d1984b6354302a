"""CIFAR-10 (python-pickle batches) and CIFAR-10-C (``<corruption>.npy`` + ``labels.npy``).

Layouts read::

    <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}   (or root = that folder)
    <root>/CIFAR-10-C/{<corruption>.npy, labels.npy}                         (or root = that folder)

Each batch is a pickled dict with ``b"data"`` uint8 (N, 3072) in row-major CHW order and ``b"labels"``.
A CIFAR-10-C ``<corruption>.npy`` stacks the 5 severities in order (5 x 10,000 uint8 32x32x3 images);
it is memory-mapped and sliced, so any multiple of 5 images works (tiny fixtures too).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .._io import load_data_pickle
from ..errors import DatasetLayoutError, DatasetNotFoundError, InvalidInputError
from ._base import ArrayDataset

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR10_LAYOUT = "cifar-10-batches-py/{data_batch_1..5, test_batch} (the python version of CIFAR-10)"
CIFAR10C_LAYOUT = "CIFAR-10-C/<corruption>.npy (5 severities stacked) and CIFAR-10-C/labels.npy"


def _find(root: Path, marker: str, subdir: str, layout: str) -> Path:
    root = Path(root)
    if not root.exists():
        raise DatasetNotFoundError(f"{root} does not exist; expected {layout}")
    for cand in (root, root / subdir):
        if (cand / marker).exists():
            return cand
    raise DatasetLayoutError(
        f"{root} has no {marker} (looked in {root} and {root / subdir}); expected {layout}"
    )


def _load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = load_data_pickle(f, encoding="bytes")  # numpy arrays only: no pickled code runs
        data = np.asarray(d[b"data"])
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise DatasetLayoutError(
            f"{path}: not a CIFAR-10 python batch (a pickled dict with b'data' (N, 3072) uint8 and "
            f"b'labels'): {exc!r}"
        ) from exc
    if data.dtype != np.uint8:  # a cast would wrap 300 to 44 and floor floats in [0, 1] to 0
        raise DatasetLayoutError(f"{path}: b'data' of dtype {data.dtype}; expected uint8 (N, 3072)")
    if labels.size and not 0 <= labels.min() <= labels.max() < len(CIFAR10_CLASSES):
        raise DatasetLayoutError(
            f"{path}: labels in {labels.min()}..{labels.max()}; expected 0..{len(CIFAR10_CLASSES) - 1}"
        )
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DatasetLayoutError(
            f"{path}: data of shape {data.shape} for {labels.shape[0]} labels; expected (N, 3072)"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def cifar10(root, split: str = "test") -> ArrayDataset:
    """CIFAR-10 ``train`` (data_batch_1..5) or ``test`` (test_batch) as uint8 (N, 32, 32, 3)."""
    if split not in ("train", "test"):
        raise InvalidInputError(f"CIFAR-10 split {split!r}; expected 'train' or 'test'")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    folder = _find(Path(root), names[0], "cifar-10-batches-py", CIFAR10_LAYOUT)
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise DatasetLayoutError(f"{folder} lacks {missing}; expected {CIFAR10_LAYOUT}")
    parts = [_load_batch(folder / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ArrayDataset(
        np.ascontiguousarray(images), labels, name=f"cifar10/{split}", classes=CIFAR10_CLASSES
    )


def cifar10_c_path(root, corruption: str) -> Path:
    """The ``<corruption>.npy`` of a CIFAR-10-C ``root`` (or its ``CIFAR-10-C`` folder), checked to exist
    without reading it: a DatasetNotFoundError / DatasetLayoutError naming the path and what the folder
    holds otherwise."""
    from ..corruptions import canonical_name

    folder = _find(Path(root), "labels.npy", "CIFAR-10-C", CIFAR10C_LAYOUT)
    path = folder / f"{canonical_name(corruption)}.npy"
    if not path.exists():
        have = sorted(p.stem for p in folder.glob("*.npy") if p.stem != "labels")
        raise DatasetLayoutError(f"{path} does not exist; {folder} holds {have}")
    return path


def cifar10_c(root, corruption: str, severity: int) -> ArrayDataset:
    """One CIFAR-10-C domain: rows ``[(severity-1) n, severity n)`` of ``<corruption>.npy``, n = len / 5."""
    from ..corruptions import canonical_name, check_severity

    corruption, severity = canonical_name(corruption), check_severity(severity)
    path = cifar10_c_path(root, corruption)
    folder = path.parent
    try:
        images = np.load(path, mmap_mode="r")
        labels = np.load(folder / "labels.npy")
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetLayoutError(f"{path} or its labels.npy: not a readable .npy array: {exc}") from exc
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3) or len(images) % 5:
        raise DatasetLayoutError(
            f"{path}: array {images.dtype} {images.shape}; expected uint8 (5 x n, 32, 32, 3)"
        )
    n = len(images) // 5
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.shape[0] not in (n, 5 * n):
        raise DatasetLayoutError(
            f"{folder / 'labels.npy'}: {labels.dtype} {labels.shape}; expected {5 * n} (or {n}) integer labels"
        )
    lab = labels[(severity - 1) * n : severity * n] if labels.shape[0] == 5 * n else labels
    return ArrayDataset(
        images[(severity - 1) * n : severity * n], np.asarray(lab, np.int64),
        name=f"cifar10_c/{corruption}/{severity}", classes=CIFAR10_CLASSES,
    )  # fmt: skip
