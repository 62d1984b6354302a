"""Input pipelines: datasets from ``tttlab.core.data`` -> float32 NHWC batches in [-1, 1] (numpy).

* ``mnist`` (embedded, 28x28x1): no augmentation, as the MNIST proxies of this package.
* ``tfds/<name>`` (e.g. ``tfds/imagenet2012`` prepared as array_record, read without TensorFlow):
  upstream's big_vision preprocessing re-implemented with Pillow/numpy: train = inception crop
  (area 5%-100%, aspect 3/4-4/3, bilinear resize) + horizontal flip + RandAugment(2, 10) (16 ops,
  magnitude 10 of 10, fill 128; upstream's TF ops, ported); eval = resize the short side to 256 (area
  averaging with fractional coverage and truncation to uint8, TF's ``method="area"`` of upstream's
  ``resize_small``) + central crop 224.
  ``value_range(-1, 1)`` on both.

Where the Pillow ops knowingly differ from upstream's TF ops (training augmentation only):
* inception crop: TF's ``sample_distorted_bounding_box`` draws the aspect ratio uniformly in [0.75, 1.33]
  and makes up to 100 attempts, and upstream resizes the crop bilinearly without antialiasing; here the
  area is uniform, the aspect ratio log-uniform in [3/4, 4/3], 10 attempts, and Pillow's bilinear filter
  (which antialiases when it shrinks);
* Posterize keeps ``8 - int(M/10 * 4)`` bits; TF's op keeps ``int(M/10 * 4)`` bits, which is the same 4
  bits at upstream's M = 10 but turns images black for M < 2.5 (an upstream quirk not copied);
* Contrast blends towards the image's mean grey (PIL); TF's port blends towards the pixel count / 256
  (a histogram-sum slip), a constant 196 for 224 x 224 images.

Determinism: the order of an epoch is a permutation seeded by ``(seed, epoch)`` and every image's
augmentation by ``(seed, epoch, position)``, so a resumed run sees exactly the batches an uninterrupted
one would, whatever the number of workers.  With several processes each takes its slice of every
global batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError, MTTTConfigError

# --------------------------------------------------------------------------------------------------
# Per-image ops (uint8 HWC numpy <-> PIL)
# --------------------------------------------------------------------------------------------------


def _pil(img: np.ndarray):
    from PIL import Image

    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def _np(pil, channels: int) -> np.ndarray:
    a = np.asarray(pil, np.uint8)
    return a[..., None] if a.ndim == 2 else a[..., :channels]


def inception_crop(img: np.ndarray, size: int, rng: np.random.Generator, area=(0.05, 1.0),
                   ratio=(3 / 4, 4 / 3)) -> np.ndarray:  # fmt: skip
    """Random crop of random area/aspect (10 tries, else the whole image), resized to ``size`` (bilinear)."""
    from PIL import Image

    h, w = img.shape[:2]
    box = (0, 0, w, h)
    for _ in range(10):
        a = rng.uniform(*area) * h * w
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (x0, y0, x0 + cw, y0 + ch)
            break
    out = _pil(img).resize((size, size), Image.BILINEAR, box=box)
    return _np(out, img.shape[-1])


def _area_resize_axis(a: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Area resampling of ``a`` along ``axis`` to ``n_out`` samples (float64): output ``o`` is the mean of the
    piecewise-constant input over ``[o * s, (o + 1) * s)``, ``s = n_in / n_out``, input pixels that the interval
    only partly covers weighted by the covered fraction (TF's ``ResizeArea``, also when enlarging).  Computed as
    differences of the running integral (exact int32 sums for uint8 input, so a large photo costs no float64
    copy), so the cost does not grow with ``s``."""
    a = np.moveaxis(a, axis, 0)
    n_in = a.shape[0]
    integral = np.cumsum(a, axis=0, dtype=np.int32 if a.dtype == np.uint8 else np.float64)
    integral = np.concatenate([np.zeros((1, *a.shape[1:]), integral.dtype), integral])  # [k]: first k pixels
    edges = np.arange(n_out + 1) * (n_in / n_out)
    k = np.minimum(np.floor(edges).astype(np.int64), n_in - 1)
    frac = (edges - k).reshape(-1, *([1] * (a.ndim - 1)))
    at_edges = integral[k] + frac * a[k]
    return np.moveaxis((at_edges[1:] - at_edges[:-1]) / (n_in / n_out), 0, axis)


def resize_small_center_crop(img: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """Short side to ``resize`` by area averaging, then the central ``crop`` x ``crop``.

    Upstream's ``resize_small(256)`` is TF's ``tf.image.resize(method="area")`` of the uint8 image, cast back
    to uint8: each output pixel is the mean of the input area it covers, partly covered pixels weighted by
    their covered fraction, and the cast truncates.  Pillow's ``BOX`` filter is not that average when the
    ratio is not an integer (it gives whole weight to the pixels whose centres fall inside, 0 to the others:
    at 375 -> 256 about 20 grey levels from TF's on noise), so the average is computed here in float64 and
    truncated as TF's cast does (TF sums in float32, so a value that is exactly an integer here can come out
    one level lower there).
    """
    h, w = img.shape[:2]
    s = resize / min(h, w)
    nh, nw = max(crop, int(round(h * s))), max(crop, int(round(w * s)))
    top, left = (nh - crop) // 2, (nw - crop) // 2
    rows = _area_resize_axis(img, nh, 0)[top : top + crop]  # each output row depends on its input rows only
    out = _area_resize_axis(rows, nw, 1)[:, left : left + crop]
    return np.floor(np.clip(out, 0, 255) + 1e-6).astype(np.uint8)


_MAX_LEVEL = 10.0
RANDAUG_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
               "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")  # fmt: skip


def _randaug_op(pil, name: str, level: float, rng: np.random.Generator):
    from PIL import Image, ImageEnhance, ImageOps

    fill = (128,) * len(pil.getbands())
    sign = 1.0 if rng.random() < 0.5 else -1.0
    enhance = (level / _MAX_LEVEL) * 1.8 + 0.1
    if name == "AutoContrast":
        return ImageOps.autocontrast(pil)
    if name == "Equalize":
        return ImageOps.equalize(pil)
    if name == "Invert":
        return ImageOps.invert(pil)
    if name == "Rotate":
        return pil.rotate(sign * level / _MAX_LEVEL * 30.0, resample=Image.NEAREST, fillcolor=fill)
    if name == "Posterize":
        return ImageOps.posterize(pil, max(1, 8 - int(level / _MAX_LEVEL * 4)))
    if name == "Solarize":
        return ImageOps.solarize(pil, int(level / _MAX_LEVEL * 256))
    if name == "SolarizeAdd":
        a = np.asarray(pil).astype(np.int32)
        added = np.clip(a + int(level / _MAX_LEVEL * 110), 0, 255)
        return Image.fromarray(np.where(a < 128, added, a).astype(np.uint8))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return getattr(ImageEnhance, name)(pil).enhance(enhance)
    if name in ("ShearX", "ShearY"):
        s = sign * level / _MAX_LEVEL * 0.3
        m = (1, s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, s, 1, 0)
        return pil.transform(pil.size, Image.AFFINE, m, resample=Image.NEAREST, fillcolor=fill)
    if name in ("TranslateX", "TranslateY"):
        t = sign * level / _MAX_LEVEL * 100.0
        m = (1, 0, -t, 0, 1, 0) if name == "TranslateX" else (1, 0, 0, 0, 1, -t)
        return pil.transform(pil.size, Image.AFFINE, m, resample=Image.NEAREST, fillcolor=fill)
    if name == "Cutout":
        pad = int(level / _MAX_LEVEL * 40)
        a = np.array(pil)
        h, w = a.shape[:2]
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        a[max(0, cy - pad) : cy + pad, max(0, cx - pad) : cx + pad] = 128
        return Image.fromarray(a)
    raise InvalidInputError(f"unknown RandAugment op {name!r}")


def randaugment(img: np.ndarray, num_layers: int, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """RandAugment as upstream's ``randaug(N, M)``: N ops drawn uniformly from 16, each always applied."""
    pil = _pil(img)
    for _ in range(int(num_layers)):
        pil = _randaug_op(pil, RANDAUG_OPS[int(rng.integers(len(RANDAUG_OPS)))], float(magnitude), rng)
    return _np(pil, img.shape[-1])


def downsample(images: np.ndarray, size: int) -> np.ndarray:
    """Mean-pool NHWC uint8 images whose side is an integer multiple of ``size`` (28 px MNIST -> 14 px)."""
    h, w = images.shape[1:3]
    if (h, w) == (size, size):
        return images
    if h % size or w % size:
        raise MTTTConfigError(f"image_size={size} must divide the dataset's {h}x{w} images (mean pooling)")
    fh, fw = h // size, w // size
    pooled = (
        images.reshape(images.shape[0], size, fh, size, fw, images.shape[-1]).astype(np.float32).mean((2, 4))
    )
    return np.rint(pooled).astype(np.uint8)


def value_range(images: np.ndarray, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return images.astype(np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)


# --------------------------------------------------------------------------------------------------
# Datasets and batch iterators
# --------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """A dataset plus how to turn its images into model inputs."""

    dataset: object  # tttlab.core.data.ImageDataset
    train: bool
    image_size: int
    augment: dict
    eval_resize: int = 256
    per_image: bool = False  # images of varying size (ImageNet): processed one by one
    workers: int = 8

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def _one(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        aug = self.augment
        if self.train:
            if aug.get("inception_crop", False):
                img = inception_crop(img, self.image_size, rng)
            elif img.shape[0] != self.image_size or img.shape[1] != self.image_size:
                img = resize_small_center_crop(img, self.image_size, self.image_size)
            if aug.get("flip", False) and rng.random() < 0.5:
                img = img[:, ::-1]
            ra = aug.get("randaug")
            if ra:
                img = randaugment(img, ra[0], ra[1], rng)
        else:  # as upstream's resize_small + central_crop: also an image that already has the model's size
            img = resize_small_center_crop(img, self.eval_resize, self.image_size)
        return img

    def load(self, indices: np.ndarray, seeds: list | None, pool: ThreadPoolExecutor | None):
        """``(float32 NHWC images in the configured value range, int32 labels)`` of ``indices``.

        Labels come from the same records as the images (reading ``dataset.labels`` of a TFDS source
        would decode every example once)."""
        augmenting = self.train and any(self.augment.get(k) for k in ("inception_crop", "flip", "randaug"))
        if not (self.per_image or augmenting):
            images, labels = self.dataset.take(indices)
            images = downsample(images, self.image_size)
        else:
            if self.train and seeds is None:
                raise InvalidInputError("training batches need per-image seeds")

            def work(j):
                img, lab = self.dataset.take(indices[j : j + 1])
                rng = np.random.default_rng(seeds[j]) if seeds is not None else None
                return self._one(img[0], rng), int(lab[0])

            out = list(pool.map(work, range(len(indices))) if pool else map(work, range(len(indices))))
            images = np.stack([o[0] for o in out])
            labels = np.asarray([o[1] for o in out])
        lo, hi = self.augment.get("value_range", (-1.0, 1.0))
        return value_range(images, lo, hi), np.asarray(labels, np.int32)


def open_source(name: str, split: str, *, data_dir=None, train: bool, image_size: int, augment: dict | None = None,
                num_examples: int | None = None, eval_resize: int = 256, workers: int = 8) -> Source:  # fmt: skip
    """``mnist`` / ``digits`` (embedded) or ``tfds/<name>`` (array_record under ``data_dir``)."""
    from tttlab.core import data as core_data

    if name in ("mnist", "digits"):
        ds = core_data.load(name, split=split)
        per_image = False
    elif name.startswith("tfds/"):
        if not data_dir:
            raise MTTTConfigError(
                f"dataset {name!r} needs the TFDS data directory: set tfds_path=/YOUR/TFDS/PATH or the "
                "environment variable TFDS_DATA_DIR (prepared with file_format='array_record')"
            )
        ds = core_data.load(name, data_dir, split=split)
        per_image = True
    else:
        raise MTTTConfigError(f"input dataset {name!r}; expected 'mnist', 'digits' or 'tfds/<name>'")
    if num_examples is not None and num_examples < len(ds):
        ds = ds.subset(np.arange(int(num_examples)))
    return Source(ds, train, int(image_size), dict(augment or {}), eval_resize, per_image, workers)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def train_batches(src: Source, batch_size: int, seed: int, epoch: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """This process's part of every global training batch of ``epoch``, from ``start_step`` on."""
    order = epoch_order(len(src), seed, epoch)
    steps = len(src) // batch_size
    local = batch_size // process_count
    pool = ThreadPoolExecutor(src.workers) if src.workers > 1 and src.per_image else None
    try:
        for step in range(start_step, steps):
            pos = np.arange(
                step * batch_size + process_index * local, step * batch_size + (process_index + 1) * local
            )
            idx = order[pos]
            seeds = [[seed, epoch, int(p)] for p in pos]
            yield src.load(idx, seeds, pool)
    finally:
        if pool:
            pool.shutdown()


def eval_batches(src: Source, batch_size: int, process_index: int = 0, process_count: int = 1):
    """``(images, labels, mask)``: every example once, the last batch padded (mask 0) to full size."""
    n = len(src)
    local = batch_size // process_count
    pool = ThreadPoolExecutor(src.workers) if src.workers > 1 and src.per_image else None
    try:
        for start in range(0, n, batch_size):
            pos = np.arange(start + process_index * local, start + (process_index + 1) * local)
            mask = (pos < n).astype(np.float32)
            idx = np.where(pos < n, pos, 0)
            yield (*src.load(idx, None, pool), mask)
    finally:
        if pool:
            pool.shutdown()
