"""The paper test sets (ImageNet-A / V2 / R / Sketch) read through core, with class names for CLIP.

Folders under ``datasets_root`` (seed 002's layout plus R and Sketch)::

    imagenet-a/<wnid>/*.jpg                                   200 classes (core imagenet_a, class_indices)
    imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg   1000 classes, numeric folder order (core)
    imagenet-r/<wnid>/*.jpg                                   200 classes (core imagenet_r, class_indices)
    sketch/<wnid>/*.JPEG  (or ImageNet-Sketch/..., TPT's name, imagenet-sketch/...)   1000 classes (core imagenet)
    ImageNet-Sketch/sketch/<wnid>/*.JPEG  (nested: the official archive unpacked into its own folder)

Images are read at their own size (``transform=None``): TPT and MEMO crop their views from the full
image, and the original view is the shorter side resized to the model's resolution + centre crop.
Class names: CLIP's curated ImageNet names (the 1000 names of the CLIP paper's zero-shot evaluation,
shipped with open_clip as ``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``; TPT's ``imagenet_classes``
is the same list, e.g. "crane bird" / "construction crane" where WordNet's first lemmas say "crane" twice:
363 of the 1000 names differ from core's ``imagenet_classes.tsv``), subset by ``class_indices`` for A/R;
or a ``classnames_file`` (one per line, in label order, for the dataset's classes or for all 1000 when the
dataset is a 200-class subset).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tttlab.core.errors import DatasetLayoutError, DatasetNotFoundError, InvalidInputError, UnknownNameError

__all__ = [
    "DATASETS",
    "class_names",
    "clip_imagenet_class_names",
    "load_test_set",
    "resolve_root",
    "subsets_for",
]

#: name -> (folders tried under datasets_root, core reader)
DATASETS = {
    "imagenet_a": (("imagenet-a", "imagenet_a"), "imagenet_a"),
    "imagenet_v2": (
        ("imagenetv2-matched-frequency-format-val", "imagenet-v2", "imagenetv2", "imagenet_v2"),
        "imagenet_v2",
    ),  # fmt: skip
    "imagenet_r": (("imagenet-r", "imagenet_r"), "imagenet_r"),
    "imagenet_sketch": (("sketch", "ImageNet-Sketch", "imagenet-sketch", "imagenet_sketch"), "imagenet"),
}
#: the two ImageNet-Sketch layouts accepted (named together when neither is found)
SKETCH_LAYOUTS = (
    "flat <datasets_root>/<sketch | ImageNet-Sketch | imagenet-sketch | imagenet_sketch>/<wnid>/*.JPEG",
    "nested <datasets_root>/ImageNet-Sketch/sketch/<wnid>/*.JPEG (the official archive unpacked in its folder)",
)
#: seed 002's ``data_to_test``
DATA_TO_TEST = {"a": ["imagenet_a"], "v2": ["imagenet_v2"], "both": ["imagenet_a", "imagenet_v2"],
                "r": ["imagenet_r"], "sketch": ["imagenet_sketch"],
                "all": ["imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch"]}  # fmt: skip


def subsets_for(data_to_test: str) -> list[str]:
    if data_to_test in DATA_TO_TEST:
        return DATA_TO_TEST[data_to_test]
    if data_to_test in DATASETS:
        return [data_to_test]
    raise UnknownNameError(
        f"data_to_test={data_to_test!r}; expected one of {', '.join(DATA_TO_TEST)} or a dataset name "
        f"({', '.join(DATASETS)})"
    )


def resolve_root(name: str, datasets_root) -> Path:
    """The dataset's folder: ``datasets_root/<one of its folder names>``, or ``datasets_root`` itself when it
    already is the dataset folder."""
    if name not in DATASETS:
        raise UnknownNameError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    root = Path(datasets_root)
    if not root.exists():
        raise DatasetNotFoundError(f"datasets_root {root} does not exist; expected a folder holding "
                                   f"{' or '.join(DATASETS[name][0])}")  # fmt: skip
    for folder in DATASETS[name][0]:
        if (root / folder).is_dir():
            return _nested_sketch(root / folder) if name == "imagenet_sketch" else root / folder
    if any(p.is_dir() for p in root.iterdir()):
        return root  # the dataset folder itself; core checks its class folders
    expected = (
        f"one of {' or '.join(SKETCH_LAYOUTS)}"
        if name == "imagenet_sketch"
        else f"{root}/{DATASETS[name][0][0]}/<class>/<images>"
    )
    raise DatasetNotFoundError(
        f"{root} holds no {name} folder ({', '.join(DATASETS[name][0])}) and no class folders; expected {expected}"
    )


def _nested_sketch(folder: Path) -> Path:
    """``ImageNet-Sketch/sketch/`` when the archive was unpacked inside the dataset folder, else ``folder``."""
    inner = folder / "sketch"
    return inner if inner.is_dir() else folder


def load_test_set(name: str, datasets_root):
    """A core ``FileDataset`` of full-size images (``class_indices`` set for ImageNet-A/R)."""
    from tttlab.core import data

    root = resolve_root(name, datasets_root)
    reader = DATASETS[name][1]
    if reader == "imagenet":
        try:
            return data.imagenet(root, split="val", transform=None)
        except DatasetLayoutError as e:
            if name != "imagenet_sketch":
                raise
            raise DatasetLayoutError(
                f"{root} is not an ImageNet-Sketch folder ({e}); expected one of {' or '.join(SKETCH_LAYOUTS)}"
            ) from e
    try:
        return getattr(data, reader)(root, transform=None)
    except DatasetLayoutError as e:
        if root != Path(datasets_root):
            raise
        # resolve_root found none of the dataset's folder names and took datasets_root for the dataset folder
        # itself; most often the folder holds other test sets, so say which subfolder was looked for as well
        folders = DATASETS[name][0]
        raise DatasetLayoutError(
            f"datasets_root {root} holds no {' or '.join(folders)} folder, and it is not the {name} folder "
            f"itself ({e}); expected {root}/{folders[0]}/<class>/<images> (or datasets_root = that folder)"
        ) from e


def clip_imagenet_class_names() -> list[str]:
    """CLIP's (and TPT's) 1000 curated ImageNet class names in the standard label order."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def class_names(dataset=None, classnames_file=None, num_classes: int | None = None) -> list[str]:
    """Names of the dataset's classes in label order.

    Default: CLIP's curated ImageNet names, as TPT prompts with them (the subset for ImageNet-A/R).
    ``classnames_file``: one name per line; it must list the dataset's classes or all 1000 ImageNet classes
    (then subset by ``class_indices``)."""
    n = num_classes if num_classes is not None else (dataset.num_classes if dataset is not None else 1000)
    indices = getattr(dataset, "class_indices", None) if dataset is not None else None
    if classnames_file is None:
        names = clip_imagenet_class_names()
        if indices is not None:
            return [names[i] for i in np.asarray(indices)]
        if len(names) != n:
            raise InvalidInputError(
                f"{n} classes but the ImageNet names are {len(names)}; pass classnames_file"
            )
        return names
    path = Path(classnames_file)
    if not path.is_file():
        raise DatasetNotFoundError(f"class-name file {path} does not exist; expected one class name per line")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) == n:
        return names
    if indices is not None and len(names) == 1000:
        return [names[i] for i in np.asarray(indices)]
    what = getattr(dataset, "name", "the dataset")
    raise DatasetLayoutError(
        f"class-name file {path} has {len(names)} names but {what} has {n} classes; expected one name per "
        f"class in label order" + (" (or all 1000 ImageNet names)" if indices is not None else "")
    )
