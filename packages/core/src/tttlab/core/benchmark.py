"""Corruption benchmarks as deterministic streams of batches.

A benchmark is *dataset x corruptions x severities x setting*.  Iterating it yields :class:`Batch` objects
(which also unpack as ``domain, images, labels``) with a ``reset`` flag that tells the method when to
restore its source weights:

===================  =====================================================================  ==========
setting              domain order                                                           reset
===================  =====================================================================  ==========
``episodic``         corruptions x severities in order                                      every batch
``reset_each_shift`` corruptions x severities in order                                      first batch of each domain
``continual``        corruptions x severities in order                                      first batch only
``mixed``            all domains' images shuffled together (``Batch.domain_ids`` per image) first batch only
``gradual``          per corruption, severities up then down (1,2,3,4,5,4,3,2,1)             first batch only
===================  =====================================================================  ==========

(``stream_order="mariodoebler"``: ``reset_each_shift`` resets at the first batch of each corruption, and
``mixed`` plays one pool per severity; see below.)

``gradual`` follows the test-time-adaptation benchmark (mariodoebler/test-time-adaptation, RMT): every
corruption goes 1,2,3,4,5,4,3,2,1, and a single given severity (the usual ``[5]``) stands for all five,
as there (a gradual stream of one severity would be the continual one).  Two differences from CoTTA's own
``cifar10c_gradual.py``: CoTTA starts its first corruption at 5,4,3,2,1 (no way up), and CoTTA's
``cifar10c.py`` loops severities outermost; here every setting visits corruption by corruption, each
through its severities.

``stream_order`` says how the stream is built from the domains where the references differ. The default,
``tttlab``: with several severities ``gradual`` goes up and down through those given (``[2, 4]``: 2,4,2
per corruption), a revisited severity shows the same images in another seeded order (CoTTA's and
mariodoebler's code replay the first visit's order), ``mixed`` pools every (corruption, severity) domain
into one shuffled stream, and ``reset_each_shift`` resets at every (corruption, severity) domain, as
Tent's code does. ``mariodoebler`` follows the test-time-adaptation benchmark's visits and reset points
exactly (its ``test_time.py``: corruptions outer, severities inner, one loader per visit, re-seeded
before each): ``gradual`` with several severities visits those given once each, in the given order (there
is no way back down), and a revisit (one given severity: 1..5..1) replays the first visit's order;
``mixed`` plays one pool of all corruptions per severity, severity after severity in the given order,
each pool shuffled by the same seeded permutation and batched on its own (a pool ends with its partial
batch), without a reset in between; ``reset_each_shift`` resets at every corruption, not between the
severities of one corruption (the clean domain, if included, is played once, first: a shift, and in
``mixed`` a pool, of its own; the reference has no clean domain in ``mixed_domains``). With one severity,
the usual ``[5]``, the two orders give the same streams except for ``gradual``'s revisits (and ``mixed``
with the clean domain). The images a visit shows, their subset (``num_examples`` per domain) and their
order within a first visit are this module's either way: the reference's own shuffle (Python's
``random``) and its ``mixed_domains`` subset, sampled from the pooled stream, are not reproduced.

Label-correlated (non-i.i.d.) streams: ``dirichlet_delta`` reorders each domain's images by class, in
any setting (``mixed``: the pooled stream).  ``0`` sorts them by class; ``delta > 0`` follows NOTE (Gong
et al., NeurIPS 2022), the scheme of the test-time-adaptation benchmark's ``correlated`` settings: the
images are dealt into as many chunks as there are classes (those present in the domain; NOTE counts
``max label + 1``, the same unless a subset misses a class), each class split across the chunks by a
Dirichlet(``delta``) draw (chunks that already hold their share get no more; redrawn until every chunk
holds at least ``min(10, images / (2 x classes))`` images: NOTE's 10, which small domains cannot always
meet), and each chunk plays its classes one after another in a
random order.  Small ``delta`` gives long runs of one class (test-batch statistics then see one or two
classes: where BatchNorm-based adaptation is known to fail); large ``delta`` shares every class evenly
among the chunks, which still play them in runs of about ``images / classes**2``, so no ``delta`` is
i.i.d. (on MNIST, 2,000 images, batches of 64: 1.3 classes per batch sorted, 1.5 at ``delta=0.01``, 2.1 at
0.1, 3.6 at 1, 3.9 at 100; 9.9 i.i.d.).  Combine it with any setting, e.g. ``setting=continual
dirichlet_delta=0.1`` for a continual, label-correlated stream.

The images of a domain depend only on ``(seed, corruption, severity)`` and the source data, never on
the setting or the batch size, so methods evaluated under different settings see the same pixels.
``num_examples`` counts images per domain in every setting, ``mixed`` too (the test-time-adaptation
benchmark samples its ``mixed_domains`` subset from the pooled stream instead).
Generated domains are corrupted in fixed chunks, each with its own ``numpy.random.Generator`` seeded
from ``(seed, corruption index, severity, chunk)``, and optionally cached on disk (atomic ``.npy``), keyed by
every option that changes their pixels and by the source data (``Benchmark(source_id=...)``).

Named benchmarks (:func:`make_benchmark`): ``mnist_c`` (embedded MNIST test split, generated, ``mnist``
constants: Hendrycks' 15 corruptions on MNIST, not Mu & Gilmer's MNIST-C, whose corruption set differs), ``digits_c`` (scikit-learn digits, generated; for fast tests), ``cifar10_c`` (the RobustBench
``.npy`` files, or generated from the CIFAR-10 test batches), ``imagenet_c`` (the ImageNet-C folders, or
generated from ImageNet val with the upstream resize-256 / centre-crop-224 and, as every released
ImageNet-C image, saved as a quality-85 JPEG: ``make_imagenet_c.py`` writes each corrupted image with
Pillow at ``quality=85`` (4:2:0 chroma), which smooths the noise corruptions in particular; the
generated domains repeat that round trip, see ``Benchmark(jpeg_quality=...)``).  CIFAR-10-C was saved as
raw ``.npy``: no round trip there.  ``photos_c``: the eight real photos of :func:`tttlab.core.data.photos`
(scikit-image / scikit-learn, offline) as :data:`PHOTOS_C_CROPS` 224 px crops each (crop 0 the ImageNet
resize-256 / centre-224 view, the others random crops: overlapping views of the same 8 photos, not
independent images), corrupted with the ``imagenet`` constants and the same quality-85 JPEG round trip as a
generated ``imagenet_c``; ``num_examples`` takes a seeded random subset of the 512 crops.  It has no class
labels: each image's label is its index among the 512 crops (:data:`UNLABELLED_BENCHMARKS`), for the caller
to map to a per-image reference such as a model's prediction on the clean crop.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import corruptions as C
from ._io import atomic_save_npy, remove_stale_temps, source_fingerprint
from .data import ArrayDataset, ImageDataset
from .errors import (
    DatasetLayoutError,
    DatasetNotFoundError,
    InvalidInputError,
    SeverityError,
    UnknownNameError,
)

SETTINGS: tuple[str, ...] = ("episodic", "reset_each_shift", "continual", "mixed", "gradual")
#: How the stream is built from the domains (module docstring): ``tttlab`` (default) or ``mariodoebler``
#: (the streams and reset points of mariodoebler/test-time-adaptation).
STREAM_ORDERS: tuple[str, ...] = ("tttlab", "mariodoebler")
BENCHMARKS: tuple[str, ...] = ("mnist_c", "digits_c", "cifar10_c", "imagenet_c", "photos_c")
#: Crops per photo of the ``photos_c`` source (:func:`tttlab.core.data.photos`): 8 photos x 64 = 512 images.
PHOTOS_C_CROPS = 64
#: Benchmarks whose labels are image indices, not classes (the caller supplies per-image references).
UNLABELLED_BENCHMARKS: tuple[str, ...] = ("photos_c",)
#: Images corrupted per random generator; fixed so that results never depend on the batch size.
CHUNK = 512
#: The JPEG quality of the released ImageNet-C files (``make_imagenet_c.py`` saves them with ``quality=85``).
IMAGENET_C_JPEG_QUALITY = 85


@dataclass(frozen=True, order=True)
class Domain:
    """One corruption at one severity; ``Domain(None, None)`` is the clean data."""

    corruption: str | None
    severity: int | None

    def __str__(self) -> str:
        return "clean" if self.corruption is None else f"{self.corruption}-{self.severity}"


CLEAN = Domain(None, None)


@dataclass
class Batch:
    """A batch of the stream.  Unpacks as ``domain, images, labels``.

    ``domain`` is ``None`` in the ``mixed`` setting, where ``domain_ids`` indexes ``Benchmark.domains``
    per image.  ``reset`` asks the method to restore its source state before adapting on this batch.
    """

    domain: Domain | None
    images: np.ndarray
    labels: np.ndarray
    reset: bool
    index: int
    domain_ids: np.ndarray

    def __iter__(self):
        return iter((self.domain, self.images, self.labels))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


#: Most redraws of the Dirichlet proportions before a correlated order gives up (every chunk must get its
#: minimum); NOTE's code retries for two minutes instead.
DIRICHLET_TRIES = 1000


def dirichlet_label_order(labels: np.ndarray, delta: float, rng: np.random.Generator) -> np.ndarray:
    """Positions of ``labels`` in a label-correlated order (see the module docstring): ``delta == 0``
    sorts by class (stable: each class keeps its order), ``delta > 0`` is NOTE's Dirichlet scheme with
    ``rng``'s draws.

    NOTE draws the proportions over all chunks, zeroes the full ones and renormalises; this draws them
    over the open chunks directly: the same distribution (a Dirichlet's entries restricted to a subset
    and renormalised are Dirichlet with those entries' parameters), without a division by zero when the
    draw's mass underflows outside the full chunks.  With many classes the draw is spread over many
    chunks (its total concentration is ``classes x delta``): on 1000 classes of 50 images ``delta=0.01``
    still gives about 20,000 runs in 50,000 images, where 10 classes of 1,000 give 23."""
    labels = np.asarray(labels)
    if delta == 0 or len(labels) == 0:
        return np.argsort(labels, kind="stable")
    by_class = np.argsort(labels, kind="stable")
    classes, counts = np.unique(labels, return_counts=True)
    members = np.split(by_class, np.cumsum(counts)[:-1])
    k, n = len(classes), len(labels)
    need = min(10, n // (2 * k))
    for _ in range(DIRICHLET_TRIES):
        chunks: list[list[np.ndarray]] = [[] for _ in range(k)]  # the pieces of each chunk, one per class
        sizes = np.zeros(k, np.int64)
        for idx in members:
            idx = rng.permutation(idx)
            open_chunks = np.flatnonzero(sizes < n / k)  # never empty: fewer than n images are dealt so far
            share = rng.dirichlet(np.full(len(open_chunks), float(delta)))
            if not (np.isfinite(share).all() and share.sum() > 0):  # delta -> 0: all of it in one chunk
                share = np.eye(len(open_chunks))[rng.integers(len(open_chunks))]
            ends = np.concatenate([(np.cumsum(share) * len(idx)).astype(np.int64)[:-1], [len(idx)]])
            starts = np.concatenate([[0], ends[:-1]])
            for j in np.flatnonzero(ends > starts):
                chunks[open_chunks[j]].append(idx[starts[j] : ends[j]])
                sizes[open_chunks[j]] += ends[j] - starts[j]
        if sizes.min() >= need:
            break
    else:
        raise InvalidInputError(
            f"dirichlet_delta={delta}: no correlated order of {n} images in {k} classes with at least {need} "
            f"images per chunk after {DIRICHLET_TRIES} draws; expected a larger dirichlet_delta"
        )
    return np.concatenate([chunk[i] for chunk in chunks if chunk for i in rng.permutation(len(chunk))])


def check_dirichlet_delta(delta) -> float | None:
    """``None`` (i.i.d. order) or a finite number >= 0, else an :class:`InvalidInputError`."""
    if delta is None:
        return None
    if (
        isinstance(delta, (bool, np.bool_))
        or not isinstance(delta, (int, float, np.integer, np.floating))
        or not (0 <= float(delta) < np.inf)
    ):
        raise InvalidInputError(
            f"dirichlet_delta={delta!r}; expected null (i.i.d. order), 0 (sorted by class) or a finite number > 0"
        )
    return float(delta)


def check_setting(setting: str) -> str:
    if setting not in SETTINGS:
        raise UnknownNameError(
            f"unknown benchmark setting {setting!r}; expected one of {', '.join(SETTINGS)}"
        )
    return setting


def check_stream_order(stream_order) -> str:
    if not isinstance(stream_order, str) or stream_order not in STREAM_ORDERS:
        raise UnknownNameError(
            f"unknown stream_order {stream_order!r}; expected one of {', '.join(STREAM_ORDERS)}"
        )
    return stream_order


def _check_severities(severities) -> tuple[int, ...]:
    if isinstance(severities, (int, np.integer)):
        severities = (severities,)
    if (
        severities is None
        or isinstance(severities, (str, bytes, float))
        or not hasattr(severities, "__iter__")
    ):
        raise SeverityError(f"severities must be an integer in 1..5 or a list of them, got {severities!r}")
    out = tuple(C.check_severity(s) for s in severities)
    if not out:
        raise InvalidInputError("severities must name at least one severity in 1..5, got an empty list")
    if len(set(out)) != len(out):
        raise InvalidInputError(f"severities {list(out)} repeat a severity; expected each at most once")
    return out


@functools.cache
def corruptions_code_hash() -> str:
    """Fingerprint of the corruption code: generated domains cached by another version of it (a corrected
    constant, an added 8-bit step) are regenerated instead of read back."""
    return source_fingerprint(C.__name__)


def _warn_if_first_images_miss_classes(ds: ImageDataset, n: int, what: str) -> None:
    """Warn when the first ``n`` images of a dataset sorted by class leave classes out (``shuffle=False``
    with a ``num_examples`` subset on e.g. an ImageNet folder: a subset of the first classes only)."""
    labels = np.asarray(ds.labels)
    if len(labels) < 2 or not np.all(np.diff(labels) >= 0):
        return
    have, total = len(np.unique(labels[:n])), len(np.unique(labels))
    if have < total < len(labels):  # classes of several images each, in runs: sorted by class
        warnings.warn(
            f"{what}: shuffle=False takes the first {n} images in file order, and this data is sorted by "
            f"class: the subset holds {have} of its {total} classes; use shuffle=True (a seeded random "
            "subset) unless the reference really reads these first images",
            stacklevel=3,
        )


class Benchmark:
    """A deterministic corruption benchmark over a source dataset (or over per-domain files).

    Args:
        name: a label for records (``mnist_c``...).
        source: clean images to corrupt (generated domains).  ``None`` when every domain comes from files.
        corruptions: names, aliases or a subset name (``common``, ``heldout``, ``all``).
        severities: severities in 1..5 (``gradual`` with one severity: all five, module docstring).
        setting: one of :data:`SETTINGS`.
        batch_size: images per batch.
        num_examples: images per domain, the same images in every domain; default all.  Shuffled: the
            first ``num_examples`` of a seeded permutation (a seeded random subset, as the
            test-time-adaptation benchmark's ``random.sample``); ``shuffle=False``: the first
            ``num_examples`` in file order, as RobustBench's ``load_cifar10c``.  On a folder sorted by
            class (ImageNet-C, -A, -R, a generated ImageNet source) those are the first classes only, and
            a warning says so: RobustBench's ``load_imagenetc`` takes the first images of its fixed random
            list of 5,000 validation images instead, not of the folder; use the default ``shuffle=True``.
        seed: seeds the choice of examples, the corruption noise and the order.
        family: corruption constants (``mnist``, ``cifar``, ``imagenet``); default by image size.
        domain_files: ``(corruption, severity) -> ImageDataset`` to read pre-corrupted data instead of
            generating it (e.g. the CIFAR-10-C ``.npy`` files).
        cache_dir: where generated domains are cached as ``.npy`` (atomic writes); ``None`` = memory only.
        dirichlet_delta: ``None`` (default): each domain's images in i.i.d. order; ``0``: sorted by class;
            ``> 0``: NOTE's Dirichlet label-correlated order (module docstring), seeded by ``seed``.
        shuffle: visit a domain's images in a seeded random order (default; sorted-by-class folders need
            it); ``False``: in the order of the source or the domain's file, and a ``num_examples``
            subset is the first images, as reference code that reads the released files without
            shuffling does (RobustBench's CIFAR-10-C loader, the official Tent and CoTTA code).
        jpeg_quality: if set, every generated corrupted image goes through a JPEG round trip at this
            quality (Pillow, 4:2:0), as the released ImageNet-C files did (85); clean images are left as is.
        stream_order: ``tttlab`` (default) or ``mariodoebler``: the test-time-adaptation benchmark's order of
            the visits, order of a revisit, ``mixed`` pools and ``reset_each_shift`` reset points (module
            docstring).  Only the stream changes: the domains' images are the same.
        source_id: what names the source data in the cache key of generated domains.  ``None`` (default):
            a SHA-256 fingerprint of the labels and images the benchmark takes from ``source`` (hashed once,
            after they are read), so two sources of one length (two slices of a split, two folders) never
            share cached domains.  A string is trusted as the source's identity instead (no hashing), and
            ``""`` adds nothing to the key: :func:`make_benchmark` passes it for a named benchmark's standard
            data (name + length identify it), which keeps the keys of caches written before this option.
    """

    def __init__(
        self,
        name: str,
        source: ImageDataset | None,
        *,
        corruptions: str | Sequence[str] = "common",
        severities: int | Sequence[int] = (5,),
        setting: str = "reset_each_shift",
        batch_size: int = 64,
        num_examples: int | None = None,
        seed: int = 0,
        family: str | None = None,
        domain_files: Callable[[str, int], ImageDataset] | None = None,
        cache_dir: str | os.PathLike | None = None,
        shuffle: bool = True,
        include_clean: bool = False,
        jpeg_quality: int | None = None,
        dirichlet_delta: float | None = None,
        source_id: str | None = None,
        stream_order: str = "tttlab",
    ):
        if source_id is not None and not isinstance(source_id, str):
            raise InvalidInputError(f"source_id must be a string or None, got {source_id!r}")
        if jpeg_quality is not None and (
            isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, (int, np.integer))
            or not 1 <= jpeg_quality <= 95
        ):  # fmt: skip
            raise InvalidInputError(f"jpeg_quality must be an integer in 1..95 or None, got {jpeg_quality!r}")
        if source is None and domain_files is None:
            raise InvalidInputError(f"benchmark {name!r} needs a source dataset or domain files")
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if num_examples is not None and (
            isinstance(num_examples, bool)
            or not isinstance(num_examples, (int, np.integer))
            or num_examples < 1
        ):
            raise InvalidInputError(f"num_examples must be a positive integer or None, got {num_examples!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InvalidInputError(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(shuffle, (bool, np.bool_)):
            raise InvalidInputError(f"shuffle must be true or false, got {shuffle!r}")
        if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
            raise InvalidInputError(f"cache_dir {cache_dir} is a file; expected a directory (or a new path)")
        self.name = name
        self.source = source
        self.corruptions = C.resolve(corruptions)
        if len(set(self.corruptions)) != len(self.corruptions):
            raise InvalidInputError(
                f"corruptions {list(self.corruptions)} repeat a corruption; expected each at most once"
            )
        if not self.corruptions and not include_clean:
            raise InvalidInputError(
                f"benchmark {name!r}: corruptions is empty ({corruptions!r}); expected at least one corruption "
                "(or a subset name: common, heldout, all)"
            )
        self.severities = _check_severities(severities)
        self.setting = check_setting(setting)
        self.stream_order = check_stream_order(stream_order)
        if self.setting == "gradual" and len(self.severities) == 1:  # the benchmark's 1..5..1 (docstring)
            self.severities = C.SEVERITIES
            self._gradual_path = C.SEVERITIES + C.SEVERITIES[-2::-1]
        elif self.stream_order == "mariodoebler":  # several severities: each once, in the given order
            self._gradual_path = self.severities
        else:  # up through the given severities and back down
            up = tuple(sorted(self.severities))
            self._gradual_path = up + up[-2::-1]
        self.batch_size = int(batch_size)
        self.num_examples = None if num_examples is None else int(num_examples)
        self.seed = int(seed)
        self.family = family
        self.domain_files = domain_files
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.shuffle = bool(shuffle)
        self.dirichlet_delta = check_dirichlet_delta(dirichlet_delta)
        self.include_clean = include_clean
        self.jpeg_quality = None if jpeg_quality is None else int(jpeg_quality)
        self.source_id = source_id
        self._source_fingerprint: str | None = None
        self._memo: dict[Domain, ImageDataset] = {}

    # ------------------------------------------------------------------ structure
    @property
    def domains(self) -> list[Domain]:
        """Distinct domains, in canonical order (clean first if included)."""
        doms = [CLEAN] if self.include_clean else []
        doms += [Domain(c, s) for c in self.corruptions for s in self.severities]
        return doms

    def schedule(self) -> list[Domain]:
        """Domains in the order the stream visits them (``gradual`` revisits severities on the way down)."""
        if self.setting != "gradual":
            return self.domains
        doms = [CLEAN] if self.include_clean else []
        return doms + [Domain(c, s) for c in self.corruptions for s in self._gradual_path]

    def shift(self, domain: Domain) -> Domain | str | None:
        """What ``reset_each_shift`` resets on a change of: the domain (``tttlab``), or its corruption
        (``mariodoebler``: the severities of one corruption follow each other without a reset).  For a
        method that must see the shifts on its own, e.g. a rank of a sharded stream, which may not get the
        batch flagged ``reset``."""
        return domain if self.stream_order == "tttlab" else domain.corruption

    def mixed_pools(self) -> list[list[Domain]]:
        """The domains pooled into each shuffled part of a ``mixed`` stream, part after part: one pool of
        every domain (``tttlab``), or one pool of all corruptions per severity, in the given order of the
        severities (``mariodoebler``; the clean domain, if included, first, on its own)."""
        if self.stream_order == "tttlab":
            return [self.domains]
        clean = [[CLEAN]] if self.include_clean else []
        return clean + [[d for d in self.domains if d.severity == s] for s in self.severities]

    @property
    def class_indices(self) -> np.ndarray | None:
        ref = self.source if self.source is not None else self.domain_dataset(self.domains[-1])
        return getattr(ref, "class_indices", None)

    def _domain_size(self, domain: Domain) -> int:
        """Images of one domain; a generated domain's count needs no corruption (``len()`` stays cheap)."""
        if domain not in self._memo and self.source is not None:
            if domain.corruption is None or self.domain_files is None:
                return len(self._example_indices())
        return len(self.domain_dataset(domain))

    def visit_sizes(self) -> list[tuple[Domain | None, int]]:
        """``(domain, images)`` of every visit in stream order (``mixed``: one ``(None, all images)``), read
        without corrupting a generated domain: with ``batch_size`` they give every batch's size before the
        stream runs (a visit of ``n`` images ends with a batch of ``n % batch_size`` when that is not 0)."""
        if self.setting == "mixed":  # one visit per pool
            return [(None, sum(self._domain_size(d) for d in pool)) for pool in self.mixed_pools()]
        return [(d, self._domain_size(d)) for d in self.schedule()]

    def __len__(self) -> int:
        """Number of batches in the stream."""
        return sum(-(-n // self.batch_size) for _, n in self.visit_sizes())

    @property
    def num_images(self) -> int:
        return sum(self._domain_size(d) for d in self.schedule())

    def describe(self) -> str:
        d = self.schedule()
        order = "" if self.stream_order == "tttlab" else f" ({self.stream_order} order)"
        return (
            f"{self.name}: {len(self.corruptions)} corruptions x severities {list(self.severities)} "
            f"({len(self.domains)} domains, {len(d)} visits), setting {self.setting}{order}, "
            f"{self.num_images} images in {len(self)} batches of {self.batch_size}, seed {self.seed}"
        )

    # ------------------------------------------------------------------ data
    def example_indices(self) -> np.ndarray:
        """Indices of the ``source`` images a generated domain holds, in the order it stores them (the seeded
        subset of ``num_examples``, or the first ones with ``shuffle=False``)."""
        return self._example_indices()

    def _example_indices(self) -> np.ndarray:
        n = len(self.source)
        if not self.shuffle:  # file order: the first num_examples, as the references read the files
            if self.num_examples is not None and self.num_examples < n:
                _warn_if_first_images_miss_classes(self.source, self.num_examples, self.name)
            return np.arange(n if self.num_examples is None else min(n, self.num_examples))
        order = np.random.default_rng([self.seed, 0x5EED]).permutation(n)
        if self.num_examples is not None and self.num_examples < n:
            order = order[: self.num_examples]
        return order

    def _source_key(self, taken: tuple[np.ndarray, np.ndarray] | None = None) -> str:
        """``source_id``, or the fingerprint of the taken ``(images, labels)`` (read here if not given)."""
        if self.source_id is not None:
            return self.source_id
        if self._source_fingerprint is None:
            images, labels = taken if taken is not None else self.source.take(self._example_indices())
            images = np.ascontiguousarray(images)
            h = hashlib.sha256(repr((images.shape, images.dtype.str)).encode())
            h.update(np.ascontiguousarray(labels, dtype=np.int64))
            h.update(images)
            self._source_fingerprint = h.hexdigest()[:16]
        return self._source_fingerprint

    def _cache_path(self, domain: Domain, taken: tuple[np.ndarray, np.ndarray] | None = None) -> Path | None:
        if self.cache_dir is None:
            return None
        fields = (self.name, len(self.source), self.num_examples, self.seed, self.family, CHUNK,
                  corruptions_code_hash())  # fmt: skip
        if not self.shuffle:  # file order: other images per noise chunk (keeps the shuffled caches' keys)
            fields += (("order", "file"),)
            if self.num_examples is not None and self.num_examples < len(self.source):
                # the first images, no longer the sorted seeded subset that earlier code cached here
                fields += (("subset", "first"),)
        if self.jpeg_quality is not None:  # keeps the keys of earlier caches without the round trip
            fields += (("jpeg", self.jpeg_quality),)
        source_key = self._source_key(taken)
        if source_key:  # "" (named benchmarks' standard data): the key as before source_id existed
            fields += (("source", source_key),)
        key = hashlib.sha256(repr(fields).encode()).hexdigest()[:12]
        return self.cache_dir / f"{self.name}-{key}" / f"{domain}.npy"

    def _generate(self, domain: Domain) -> ArrayDataset:
        idx = self._example_indices()
        images, labels = self.source.take(idx)
        if domain.corruption is not None:
            path = self._cache_path(domain, (images, labels))
            if path is not None and path.exists():
                images = np.load(path, mmap_mode="r")
            else:
                c_index = C.ALL.index(domain.corruption)
                out = np.empty_like(images)
                for k, start in enumerate(range(0, len(images), CHUNK)):
                    rng = np.random.default_rng([self.seed, c_index, domain.severity, k])
                    out[start : start + CHUNK] = C.corrupt(
                        images[start : start + CHUNK], domain.corruption, domain.severity,
                        rng=rng, family=self.family,
                    )  # fmt: skip
                if self.jpeg_quality is not None:
                    out = jpeg_roundtrip(out, self.jpeg_quality)
                images = out
                if path is not None:
                    remove_stale_temps(path.parent)  # domains whose generation was killed mid-write
                    atomic_save_npy(path, images)
        return ArrayDataset(
            images, labels, name=f"{self.name}/{domain}", classes=self.source.classes,
            class_indices=getattr(self.source, "class_indices", None),
        )  # fmt: skip

    def domain_dataset(self, domain: Domain) -> ImageDataset:
        """All images of one domain (lazily read where the reader is lazy), in stream order."""
        if domain not in self._memo:
            if domain.corruption is not None and self.domain_files is not None:
                ds = self.domain_files(domain.corruption, domain.severity)
                subset = self.num_examples is not None and self.num_examples < len(ds)
                if not self.shuffle:  # file order; a subset is the file's first images (RobustBench)
                    if subset:
                        _warn_if_first_images_miss_classes(ds, self.num_examples, f"{self.name}/{domain}")
                        ds = ds.subset(np.arange(self.num_examples))
                else:
                    order = np.random.default_rng([self.seed, 0x5EED]).permutation(len(ds))
                    ds = ds.subset(order[: self.num_examples] if subset else order)
            elif self.source is None:
                raise DatasetNotFoundError(f"benchmark {self.name!r} has no clean source data for {domain}")
            else:
                ds = self._generate(domain)
            # keep at most a few generated domains in memory
            if len(self._memo) >= 4:
                self._memo.pop(next(iter(self._memo)))
            self._memo[domain] = ds
        return self._memo[domain]

    # ------------------------------------------------------------------ stream
    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def _correlated(self, order: np.ndarray, labels: np.ndarray, visit: int | None = None) -> np.ndarray:
        """``order`` rearranged into the label-correlated order of ``dirichlet_delta`` (``labels``: those of
        ``order``'s images); class runs from :func:`dirichlet_label_order`, seeded by the benchmark's seed."""
        key = [self.seed, 0xC0AA] if visit is None else [self.seed, 0xC0AA, visit]
        return order[dirichlet_label_order(labels, self.dirichlet_delta, np.random.default_rng(key))]

    def batches(self, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """The stream; with ``world_size > 1`` only the batches ``index % world_size == rank``.

        Sharding by batch keeps every batch whole, so an episodic method gives the same per-batch result
        on any number of processes; records from all ranks together equal the unsharded run.
        """
        if not 0 <= rank < world_size:
            raise InvalidInputError(f"rank must be in 0..{world_size - 1}, got {rank}")
        domains = self.domains
        schedule = self.schedule()
        index = 0
        if self.setting == "mixed":
            # every pool is shuffled by the same key: mariodoebler's pools (one per severity, of one size)
            # replay one permutation, as its loader re-seeds before each
            for pool in self.mixed_pools():
                parts = [(self.domain_dataset(d), domains.index(d)) for d in pool]
                owner = np.concatenate([np.full(len(ds), i, np.int64) for i, (ds, _) in enumerate(parts)])
                within = np.concatenate([np.arange(len(ds)) for ds, _ in parts])
                order = np.random.default_rng([self.seed, 0xD1CE]).permutation(len(owner))
                if self.dirichlet_delta is not None:
                    pooled = np.concatenate([ds.labels for ds, _ in parts])
                    order = self._correlated(order, pooled[order])
                for start in range(0, len(order), self.batch_size):
                    sel = order[start : start + self.batch_size]
                    if index % world_size == rank:
                        images, labels = _gather(parts, owner[sel], within[sel])
                        ids = np.asarray([parts[o][1] for o in owner[sel]], np.int64)
                        yield Batch(None, images, labels, index == 0, index, ids)
                    index += 1
            return
        previous: Domain | None = None
        for visit, domain in enumerate(schedule):
            ds = self.domain_dataset(domain)
            order = np.arange(len(ds))
            # the way down revisits a severity: same images, another order (mariodoebler: the same order)
            revisit = (
                self.setting == "gradual"
                and self.stream_order == "tttlab"
                and schedule.index(domain) != visit
            )
            if revisit:
                order = np.random.default_rng([self.seed, visit]).permutation(len(ds))
            if (
                self.dirichlet_delta is not None
            ):  # every domain the same class order (same labels), revisits another
                order = self._correlated(order, ds.labels[order], visit if revisit else None)
            d_id = domains.index(domain)
            # a shift (see shift()): every domain, or every corruption (the clean domain is one of its own)
            shift = previous is None or self.shift(domain) != self.shift(previous)
            previous = domain
            for b, start in enumerate(range(0, len(ds), self.batch_size)):
                if index % world_size == rank:
                    images, labels = ds.take(order[start : start + self.batch_size])
                    if self.setting == "episodic":
                        reset = True
                    elif self.setting == "reset_each_shift":
                        reset = b == 0 and shift
                    else:
                        reset = index == 0
                    ids = np.full(len(labels), d_id, np.int64)
                    yield Batch(domain, images, labels, reset, index, ids)
                index += 1


def _gather(parts, owners: np.ndarray, within: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images ``within[i]`` of domain ``owners[i]``, one ``take`` per domain, in the given order."""
    images = labels = None
    for o in np.unique(owners):
        pos = np.flatnonzero(owners == o)
        im, lb = parts[o][0].take(within[pos])
        if images is None:
            images = np.empty((len(owners),) + im.shape[1:], im.dtype)
            labels = np.empty(len(owners), np.int64)
        images[pos], labels[pos] = im, lb
    return images, labels


def jpeg_roundtrip(images: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode every uint8 (N, H, W, C) image as a Pillow JPEG at ``quality`` (4:2:0 chroma, as
    ``Image.save(path, quality=85)`` in ``make_imagenet_c.py``; its ``optimize=True`` only changes the
    Huffman tables, not the pixels)."""
    import io

    from PIL import Image

    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf, formats=("JPEG",)) as im:
            dec = np.asarray(im)
        out[i] = dec[..., None] if dec.ndim == 2 else dec
    return out


def make_benchmark(
    name: str = "mnist_c",
    *,
    root: str | os.PathLike | None = None,
    corruptions: str | Sequence[str] = "common",
    severities: int | Sequence[int] = (5,),
    setting: str = "reset_each_shift",
    batch_size: int = 64,
    num_examples: int | None = None,
    seed: int = 0,
    split: str = "test",
    cache_dir: str | os.PathLike | None = None,
    include_clean: bool = False,
    shuffle: bool = True,
    dirichlet_delta: float | None = None,
    stream_order: str = "tttlab",
) -> Benchmark:
    """Build a named benchmark (see the module docstring; ``shuffle``, ``stream_order``: :class:`Benchmark`)."""
    from . import data

    common = dict(
        corruptions=corruptions, severities=severities, setting=setting, batch_size=batch_size,
        num_examples=num_examples, seed=seed, cache_dir=cache_dir, include_clean=include_clean,
        shuffle=shuffle, dirichlet_delta=dirichlet_delta, stream_order=stream_order,
    )  # fmt: skip
    if name in ("mnist_c", "digits_c", "photos_c") and root is not None:
        raise InvalidInputError(
            f"benchmark {name!r} is generated from embedded data and reads no files; got root={root!r} "
            "(root is for cifar10_c / imagenet_c)"
        )
    if name == "photos_c":
        if split != "test":
            raise InvalidInputError(f"benchmark 'photos_c' has no splits; got split={split!r}")
        source = data.photos(224, PHOTOS_C_CROPS)
        return Benchmark(
            name, source, family="imagenet", jpeg_quality=IMAGENET_C_JPEG_QUALITY, source_id="", **common
        )
    if name in ("mnist_c", "digits_c"):
        source = (data.mnist if name == "mnist_c" else data.digits)(split)
        # the test split keeps its cache key; another split (MNIST's val is as long as test) gets its own
        source_id = "" if source.name.endswith("/test") else source.name
        return Benchmark(name, source, family="mnist", source_id=source_id, **common)
    if name in ("cifar10_c", "imagenet_c"):
        if root is None:
            raise DatasetNotFoundError(
                f"benchmark {name!r} needs root=<path>: the {name} files or the clean dataset to corrupt"
            )
        root = Path(root)
        if not root.exists():
            raise DatasetNotFoundError(
                f"benchmark {name!r}: root {root} does not exist; expected {_FILES_LAYOUT[name]}, or the "
                f"clean data to corrupt: {_CLEAN_LAYOUT[name]}"
            )
        if name == "cifar10_c":
            if released_files(name, root):
                bench = Benchmark(
                    name, None, family="cifar",
                    domain_files=lambda c, s: data.cifar10_c(root, c, s), **common,
                )  # fmt: skip
                # every chosen domain's file, now: not a failure halfway through the stream
                for c in bench.corruptions:
                    data.cifar10_c_path(root, c)
                return bench
            clean = _clean_source(
                name, root, lambda: data.cifar10(root, split="test"),
                _FILES_LAYOUT[name],
            )  # fmt: skip
            _warn_generated(name, root)
            return Benchmark(
                name, clean, family="cifar", source_id=_standard_or_fingerprint(name, clean), **common
            )
        if released_files(name, root):
            bench = Benchmark(
                name, None, family="imagenet",
                domain_files=lambda c, s: data.imagenet_c(root, c, s), **common,
            )  # fmt: skip
            for d in bench.domains:  # every chosen domain's folder, now (not listed: that is per domain)
                if d.corruption is not None:
                    data.imagenet_c_folder(root, d.corruption, d.severity)
            return bench
        clean = _clean_source(
            name, root, lambda: data.imagenet(root, split="val"),
            _FILES_LAYOUT[name],
        )  # fmt: skip
        _warn_generated(name, root)
        return Benchmark(
            name, clean, family="imagenet", jpeg_quality=IMAGENET_C_JPEG_QUALITY,
            source_id=_standard_or_fingerprint(name, clean), **common,
        )  # fmt: skip
    raise UnknownNameError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")


#: What a cifar10_c / imagenet_c ``root`` holds: the released corrupted files, or the clean data to corrupt.
_FILES_LAYOUT = {
    "cifar10_c": "CIFAR-10-C/{<corruption>.npy, labels.npy} (or root = that folder)",
    "imagenet_c": "ImageNet-C/<corruption>/<severity>/<wnid>/*.JPEG (or root = the ImageNet-C folder)",
}
_CLEAN_LAYOUT = {
    "cifar10_c": "cifar-10-batches-py/{data_batch_1..5, test_batch} (the python version of CIFAR-10)",
    "imagenet_c": "val/<wnid>/*.JPEG with ImageNet-1k wnids",
}


#: Images of the clean set a generated cifar10_c / imagenet_c corrupts: the CIFAR-10 test batch, ImageNet val.
_STANDARD_CLEAN_SIZE = {"cifar10_c": 10_000, "imagenet_c": 50_000}


def _standard_or_fingerprint(name: str, clean) -> str | None:
    """The cache key's source part for a generated cifar10_c / imagenet_c: ``""`` (name + length, the key
    such caches always had) for the full standard clean set; ``None`` (a content fingerprint) for any
    other folder, e.g. a subset of ImageNet val, which another subset of the same size must not share."""
    return "" if len(clean) == _STANDARD_CLEAN_SIZE[name] else None


def released_files(name: str, root: str | os.PathLike | None) -> bool:
    """Whether ``root`` holds the released corrupted files of ``name`` (``cifar10_c``: ``labels.npy`` in root
    or ``CIFAR-10-C/``; ``imagenet_c``: corruption folders in root or ``ImageNet-C/``), which
    :func:`make_benchmark` then reads; ``False`` for every other case, where the domains are generated."""
    if root is None or name not in _FILES_LAYOUT:
        return False
    root = Path(root)
    if name == "cifar10_c":
        return any((p / "labels.npy").exists() for p in (root, root / "CIFAR-10-C"))
    return any(
        p.is_dir() and p.name in C.ALL for r in (root, root / "ImageNet-C") if r.is_dir() for p in r.iterdir()
    )


def _warn_generated(name: str, root: Path) -> None:
    """A root with the clean data but not the released files: say that the domains are generated (a misnamed
    CIFAR-10-C / ImageNet-C folder beside the clean data otherwise passes unnoticed)."""
    warnings.warn(
        f"benchmark {name!r}: {root} holds no released {name} files (expected {_FILES_LAYOUT[name]}), so every "
        "domain is generated from the clean data by tttlab's corruptions: not the release's pixels, and numbers "
        "published on the released files do not apply to this run",
        stacklevel=3,
    )


def _clean_source(name: str, root: Path, read: Callable, files_layout: str):
    """The clean test set to corrupt when ``root`` holds no corrupted files; if it holds neither, the error
    names both layouts (a user pointing at a wrong CIFAR-10-C / ImageNet-C folder is told about those)."""
    try:
        return read()
    except (DatasetNotFoundError, DatasetLayoutError) as err:
        raise DatasetLayoutError(
            f"benchmark {name!r}: {root} holds neither the {name} files, expected {files_layout}, "
            f"nor the clean data to corrupt: {err}"
        ) from err


def from_config(cfg) -> Benchmark:
    """Build from a ``tttlab.core.config.BenchmarkConfig`` (or any mapping with the same keys)."""
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    if hasattr(cfg, "keys"):  # a plain mapping has no schema that rejects a misspelt key: check here
        import dataclasses
        import difflib

        from .config import BenchmarkConfig
        from .errors import ConfigError

        known = [f.name for f in dataclasses.fields(BenchmarkConfig)]
        for key in cfg.keys():
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"unknown benchmark key {key!r}{hint} (known keys: {', '.join(known)})")
    corr = get("corruptions", "common")
    if not isinstance(corr, str) and hasattr(corr, "__iter__"):
        corr = list(corr)
        if len(corr) == 1 and corr[0] in C.SUBSETS:
            corr = corr[0]
    severities = get("severities", [5])
    if not isinstance(severities, (int, np.integer, str)) and hasattr(severities, "__iter__"):
        severities = list(severities)
    include_clean, shuffle = get("include_clean", False), get("shuffle", True)
    for key, flag in (("include_clean", include_clean), ("shuffle", shuffle)):
        if not isinstance(flag, (bool, np.bool_)):
            raise InvalidInputError(f"{key} must be true or false, got {flag!r}")
    # values are passed on unconverted: make_benchmark names a string, float or None where an int belongs
    return make_benchmark(
        get("name", "mnist_c"), root=get("root"), corruptions=corr, severities=severities,
        setting=get("setting", "reset_each_shift"), batch_size=get("batch_size", 64),
        num_examples=get("num_examples"), seed=get("seed", 0), cache_dir=get("cache_dir"),
        include_clean=bool(include_clean), shuffle=bool(shuffle), dirichlet_delta=get("dirichlet_delta"),
        stream_order=get("stream_order", "tttlab"),
    )  # fmt: skip
