"""TFDS prepared datasets through ``tfds.data_source`` (array_record files, no TensorFlow needed).

``tfds(name, data_dir, split)`` opens ``<data_dir>/<name>/<version>/`` (the newest version unless
``name`` is ``"name:1.2.3"``) with ``tfds.builder_from_directory(...).as_data_source(split)``.  How TFDS
4.9 reads this without TensorFlow: the data source is an ``ArrayRecordDataSource`` (random access into
``<name>-<split>.array_record-0000i-of-0000n``); each record is a serialized ``tf.train.Example`` that
TFDS parses with its own vendored protobuf classes (``tensorflow_datasets.proto.tf_example_pb2``,
``example_parser.ExampleParserNp``) and decodes per feature with ``decode_example_np`` (``Image``: OpenCV
if installed, else Pillow; ``ClassLabel``: int64).  So neither reading nor (see
``tttlab.core.testing.make_tfds``) writing imports TensorFlow.  Needs the ``[tfds]`` extra; datasets
prepared in the default ``tfrecord`` format must be re-prepared with ``file_format="array_record"``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DatasetLayoutError, DatasetNotFoundError, InvalidInputError, require
from ._base import ImageDataset


def _version_key(v: str):
    return tuple(int(p) if p.isdigit() else p for p in v.split("."))


def prepared_dir(name: str, data_dir) -> Path:
    """``<data_dir>/<name>/<version>`` holding ``dataset_info.json``."""
    base, _, version = name.partition(":")
    root = Path(data_dir)
    if not root.exists():
        raise DatasetNotFoundError(
            f"TFDS data_dir {root} does not exist; expected the folder holding prepared TFDS datasets "
            f"(<name>/<version>/ with dataset_info.json and array_record files)"
        )
    ds_dir = root / base
    if not ds_dir.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DatasetNotFoundError(
            f"{ds_dir} does not exist; expected TFDS dataset {base!r} prepared under data_dir {root} "
            f"({base}/<version>/ with dataset_info.json and array_record files); {root} holds {have}"
        )
    if version:
        path = ds_dir / version
    else:
        versions = sorted(
            (p.name for p in ds_dir.iterdir() if (p / "dataset_info.json").exists()), key=_version_key
        )
        if not versions:
            raise DatasetLayoutError(f"{ds_dir} has no prepared version (<version>/dataset_info.json)")
        path = ds_dir / versions[-1]
    if not (path / "dataset_info.json").exists():
        raise DatasetLayoutError(f"{path} has no dataset_info.json; expected a prepared TFDS dataset")
    return path


class TFDSDataset(ImageDataset):
    """Random-access view of one split; ``image`` -> uint8 NHWC, ``label`` -> int64."""

    def __init__(self, source, name: str, image_key: str, label_key: str, classes: tuple[str, ...]):
        self.source, self.name, self.image_key, self.label_key = source, name, image_key, label_key
        self.classes = classes
        self.class_indices = None
        self._labels = None

    def __len__(self) -> int:
        return len(self.source)

    @property
    def labels(self) -> np.ndarray:
        """All labels (read once; TFDS decodes whole records, so this touches every example)."""
        if self._labels is None:
            labels = []
            for start in range(0, len(self), 256):
                records = self._records(range(start, min(start + 256, len(self))))
                labels += [int(r[self.label_key]) for r in records]
            self._labels = np.asarray(labels, np.int64)
        return self._labels

    def _records(self, indices) -> list:
        idx = [int(i) for i in indices]
        if hasattr(self.source, "__getitems__"):
            return list(self.source.__getitems__(idx))
        return [self.source[i] for i in idx]

    def take(self, indices):
        records = self._records(np.asarray(indices, dtype=np.int64))
        images = [np.asarray(r[self.image_key], np.uint8) for r in records]
        images = [im[..., None] if im.ndim == 2 else im for im in images]
        if len({im.shape for im in images}) > 1:
            raise InvalidInputError(
                f"{self.name}: images of different sizes cannot be stacked; resize them first"
            )
        labels = np.asarray([int(r[self.label_key]) for r in records], np.int64)
        return (np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)), labels


def _check_split(split, available, path: Path) -> None:
    """``split`` is a split name or TFDS's split syntax over them (``"test[:1000]"``, ``"test[:10%]"``,
    ``"train+validation"``), as ``as_data_source`` reads it; every named split must exist."""
    if not isinstance(split, str) or not split.strip():
        raise InvalidInputError(f"{path}: split must be a non-empty string, got {split!r}")
    names = [part.split("[", 1)[0].strip() for part in split.split("+")]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise InvalidInputError(
            f"{path}: no split {unknown[0]!r} (in {split!r}); available: {sorted(available)} "
            "(with TFDS's slicing: 'test[:1000]', 'test[:10%]', 'train+test')"
        )


def tfds(
    name: str, data_dir, split: str = "train", image_key: str = "image", label_key: str = "label"
) -> TFDSDataset:
    """A prepared TFDS split read without TensorFlow (array_record file format).

    ``split`` is a split name or TFDS's split syntax (``"test[:1000]"``, ``"train[:10%]"``,
    ``"train+test"``), which ``as_data_source`` reads as ``tfds.load`` does."""
    tfds_mod = require("tensorflow_datasets", "tfds")
    path = prepared_dir(name, data_dir)
    if not any(path.glob("*.array_record*")):
        raise DatasetLayoutError(
            f"{path} holds no .array_record files; prepare the dataset with file_format='array_record'"
        )
    builder = tfds_mod.builder_from_directory(str(path))
    _check_split(split, builder.info.splits, path)
    features = builder.info.features
    missing = [k for k in (image_key, label_key) if k not in features]
    if missing:
        raise DatasetLayoutError(
            f"{path}: features {missing} not found; the dataset has {sorted(features.keys())} "
            "(pass image_key=/label_key= to name them)"
        )
    try:
        source = builder.as_data_source(split=split)
    except ValueError as exc:  # a malformed or out-of-range slice: TFDS names what it could not read
        raise InvalidInputError(f"{path}: split {split!r} cannot be read: {exc}") from exc
    feature = features[label_key]
    classes = tuple(feature.names) if hasattr(feature, "names") else ()
    return TFDSDataset(source, f"tfds/{name}/{split}", image_key, label_key, classes)
