"""ImageNet and its test sets, read from ImageNet-style folders.

Layouts::

    imagenet     <root>/<split>/<wnid>/*.JPEG              (or root = the split folder)
    imagenet_c   <root>/<corruption>/<severity>/<wnid>/*.JPEG  (or <root>/ImageNet-C/..., RobustBench's data_dir)
    imagenet_a   <root>/<wnid>/*.jpg                        200 of the 1000 classes
    imagenet_r   <root>/<wnid>/*.jpg                        200 of the 1000 classes
    imagenet_v2  <root>/<0..999>/*.jpeg                     folder name = class index (numeric order)

Labels of ``imagenet``/``imagenet_c``/``imagenet_v2`` index the 1000 classes in sorted-wnid order.
ImageNet-A/R are labelled 0..199 in the sorted order of their own 200 wnids, and carry ``class_indices``:
the position of each of those wnids among the 1000, so ``logits_1000[:, ds.class_indices]`` are the
logits to evaluate.  ImageNet-V2's folders must be read in numeric order ("10" after "9"): reading them
as ImageFolder does (lexicographic) mislabels 990 of the 1000 classes, a known pitfall.
The class list (wnids, names, A/R membership) ships as ``imagenet_classes.tsv``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ..errors import DatasetLayoutError, DatasetNotFoundError, InvalidInputError
from ._base import FileDataset, resize_center_crop

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
#: The upstream evaluation transform: shorter side to 256 (bilinear), centre crop 224.
EVAL_TRANSFORM = resize_center_crop(256, 224)


@functools.lru_cache(maxsize=1)
def _classes() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    import importlib.resources

    text = importlib.resources.files(__package__).joinpath("imagenet_classes.tsv").read_text()
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    wnids = tuple(r[1] for r in rows)
    names = tuple(r[2] for r in rows)
    a = tuple(r[1] for r in rows if r[3] == "1")
    r_ = tuple(r[1] for r in rows if r[4] == "1")
    return wnids, names, a, r_


def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in sorted (label) order."""
    return _classes()[0]


def imagenet_class_names() -> tuple[str, ...]:
    return _classes()[1]


def imagenet_a_wnids() -> tuple[str, ...]:
    return _classes()[2]


def imagenet_r_wnids() -> tuple[str, ...]:
    return _classes()[3]


def _subdirs(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _wnid_folders(root: Path, allowed: tuple[str, ...], layout: str) -> tuple[list[Path], np.ndarray]:
    if not root.exists():
        raise DatasetNotFoundError(f"{root} does not exist; expected {layout}")
    if not root.is_dir():
        raise DatasetLayoutError(f"{root} is not a directory; expected {layout}")
    index = {w: i for i, w in enumerate(allowed)}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetLayoutError(f"{root} has no class folders; expected {layout}")
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        raise DatasetLayoutError(
            f"{root}: folders {unknown[:5]} are not wnids of this dataset ({len(allowed)} classes); expected {layout}"
        )
    paths, labels = [], []
    for folder in folders:
        files = _images_in(folder)
        paths += files
        labels += [index[folder.name]] * len(files)
    if not paths:
        raise DatasetLayoutError(f"{root}: class folders hold no images; expected {layout}")
    return paths, np.asarray(labels, np.int64)


IMAGENET_SPLITS = ("train", "val")


def imagenet(root, split: str = "val", transform=EVAL_TRANSFORM) -> FileDataset:
    """ImageNet ``<root>/<split>/<wnid>/*.JPEG`` (or ``root`` = the split folder itself).

    Default transform: the upstream evaluation resize (shorter side 256, bilinear) + centre crop 224;
    ``transform=None`` keeps the files' own sizes (then every file must have the same size to batch).
    """
    if split not in IMAGENET_SPLITS:
        raise InvalidInputError(f"ImageNet split {split!r}; expected one of {IMAGENET_SPLITS}")
    _check_transform(transform)
    layout = (
        f"<root>/{split}/<wnid>/*.JPEG (or root = the {split} folder) with ImageNet-1k wnids (n01440764 ...)"
    )
    root = Path(root)
    folder = root / split if (root / split).is_dir() else root
    paths, labels = _wnid_folders(folder, imagenet_wnids(), layout)
    return FileDataset(
        paths, labels, name=f"imagenet/{split}", classes=imagenet_wnids(), transform=transform,
    )  # fmt: skip


#: The folder name RobustBench (and the extracted tarballs' usual home) gives ImageNet-C under its data_dir.
IMAGENET_C_FOLDER = "ImageNet-C"


IMAGENET_C_LAYOUT = "<root>/<corruption>/<severity 1-5>/<wnid>/*.JPEG (or <root>/ImageNet-C/<corruption>/...)"


def imagenet_c_folder(root, corruption: str, severity: int) -> Path:
    """The ``<corruption>/<severity>`` folder of an ImageNet-C ``root`` (or its ``ImageNet-C`` folder),
    checked to exist without listing it: a DatasetNotFoundError / DatasetLayoutError otherwise."""
    from ..corruptions import canonical_name, check_severity

    corruption, severity = canonical_name(corruption), check_severity(severity)
    root = Path(root)
    if not root.exists():
        raise DatasetNotFoundError(f"{root} does not exist; expected {IMAGENET_C_LAYOUT}")
    if not (root / corruption).is_dir() and (root / IMAGENET_C_FOLDER).is_dir():
        root = root / IMAGENET_C_FOLDER  # RobustBench's <data_dir>/ImageNet-C/<corruption>/<severity>/
    folder = root / corruption / str(severity)
    if not folder.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise DatasetLayoutError(
            f"{folder} does not exist; expected {IMAGENET_C_LAYOUT} ({root} holds {have[:20]})"
        )
    return folder


def imagenet_c(root, corruption: str, severity: int, transform=None) -> FileDataset:
    """One ImageNet-C domain ``<root>/<corruption>/<severity>/<wnid>/*.JPEG`` (already 224 px)."""
    from ..corruptions import canonical_name, check_severity

    corruption, severity = canonical_name(corruption), check_severity(severity)
    _check_transform(transform)
    folder = imagenet_c_folder(root, corruption, severity)
    paths, labels = _wnid_folders(folder, imagenet_wnids(), IMAGENET_C_LAYOUT)
    return FileDataset(
        paths,
        labels,
        name=f"imagenet_c/{corruption}/{severity}",
        classes=imagenet_wnids(),
        transform=transform,
    )


def _subset(root, wnids: tuple[str, ...], name: str, transform) -> FileDataset:
    _check_transform(transform)
    layout = f"<root>/<wnid>/*.jpg with the 200 {name} wnids"
    paths, labels = _wnid_folders(Path(root), wnids, layout)
    full = {w: i for i, w in enumerate(imagenet_wnids())}
    return FileDataset(
        paths, labels, name=name, classes=wnids,
        class_indices=np.asarray([full[w] for w in wnids], np.int64),
        transform=transform,
    )  # fmt: skip


def imagenet_a(root, transform=EVAL_TRANSFORM) -> FileDataset:
    """ImageNet-A (Hendrycks et al. 2021): 200 classes, with ``class_indices`` into the 1000."""
    return _subset(root, imagenet_a_wnids(), "imagenet_a", transform)


def imagenet_r(root, transform=EVAL_TRANSFORM) -> FileDataset:
    """ImageNet-R (Hendrycks et al. 2021): 200 classes, with ``class_indices`` into the 1000."""
    return _subset(root, imagenet_r_wnids(), "imagenet_r", transform)


IMAGENET_V2_FOLDERS = (
    "imagenetv2-matched-frequency-format-val", "imagenetv2-threshold0.7-format-val",
    "imagenetv2-top-images-format-val",
)  # fmt: skip


def imagenet_v2(root, transform=EVAL_TRANSFORM) -> FileDataset:
    """ImageNetV2 (Recht et al. 2019): folders "0".."999" = class index, read in numeric order.

    ``root`` is the ``imagenetv2-matched-frequency-format-val`` folder or its parent (where the
    matched-frequency variant is preferred over the other two if several are unpacked side by side).
    """
    _check_transform(transform)
    layout = "<root>/<0..999>/*.jpeg (root = imagenetv2-matched-frequency-format-val or its parent)"
    root = Path(root)
    if not root.exists():
        raise DatasetNotFoundError(f"{root} does not exist; expected {layout}")
    if not root.is_dir():
        raise DatasetLayoutError(f"{root} is not a directory; expected {layout}")
    subdirs = _subdirs(root)
    if not any(p.name.isdigit() for p in subdirs):
        named = [root / n for n in IMAGENET_V2_FOLDERS if (root / n).is_dir()]
        if named:
            root = named[0]
        elif len(subdirs) == 1:
            root = subdirs[0]
        subdirs = _subdirs(root)
    bad = [p.name for p in subdirs if not (p.name.isdigit() and 0 <= int(p.name) < 1000)]
    if not subdirs or bad:
        raise DatasetLayoutError(
            f"{root}: class folders {sorted(bad)[:5] or '(none)'} are not 0..999; expected {layout}"
        )
    paths, labels = [], []
    # numeric, not lexicographic, order: "9" < "10" < "100"
    for folder in sorted(subdirs, key=lambda p: int(p.name)):
        files = _images_in(folder)
        paths += files
        labels += [int(folder.name)] * len(files)
    if not paths:
        raise DatasetLayoutError(f"{root}: class folders hold no images; expected {layout}")
    return FileDataset(
        paths, np.asarray(labels, np.int64), name="imagenet_v2", classes=imagenet_wnids(), transform=transform,
    )  # fmt: skip


def _check_transform(transform) -> None:
    if transform is not None and not callable(transform):
        raise InvalidInputError(
            f"transform must be a callable PIL image -> PIL image (or None), got {type(transform).__name__}"
        )
