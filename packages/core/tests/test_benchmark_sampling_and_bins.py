"""Numbers the benchmark and the metrics produce at their edges (added by a mutation audit: each test
failed on a plausible bug that the other tests let through).

* ``num_examples`` picks a seeded random subset of the source (the same images in every domain), not the
  first images of the split, and the seed changes which images; in file order (``shuffle=False``) it
  takes the first images, as RobustBench's loaders;
* a generated domain longer than one corruption chunk draws fresh noise for every chunk (the chunk
  index is part of the noise seed), so images 0 and 512 of a constant source differ;
* file-backed domains are subsampled the same way; ``gradual`` revisits a severity with the same images in
  another (seeded) order;
* the default corruption constants follow the image size (<= 28 px mnist, <= 64 px cifar, else imagenet);
* a confidence on a bin edge falls in the bin ``(lo, hi]`` that the reliability table documents.
"""

from __future__ import annotations

import numpy as np
import pytest

from tttlab.core import metrics as M
from tttlab.core.benchmark import CHUNK, CLEAN, Benchmark, Domain
from tttlab.core.data import ArrayDataset


def _ids_source(n: int = 40) -> ArrayDataset:
    """Images whose label is their index in the source, so labels tell which images were picked."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8)
    return ArrayDataset(images, np.arange(n), name="ids")


def _picked(seed: int, shuffle: bool = True) -> dict:
    b = Benchmark("ids_c", _ids_source(), corruptions=("fog", "gaussian_noise"), severities=(5,),
                  num_examples=10, seed=seed, family="mnist", include_clean=True, shuffle=shuffle,
                  batch_size=4)  # fmt: skip
    out: dict = {}
    for batch in b:
        out.setdefault(batch.domain, []).append(batch.labels)
    return {d: np.concatenate(v) for d, v in out.items()}


def test_num_examples_is_a_seeded_random_subset_shared_by_every_domain():
    a, b = _picked(0), _picked(1)
    for picked in (a, b):
        assert len(picked) == 3 and all(len(v) == 10 for v in picked.values())
        ref = picked[CLEAN]
        assert len(set(ref.tolist())) == 10, "no image twice"
        for d in (Domain("fog", 5), Domain("gaussian_noise", 5)):
            assert np.array_equal(picked[d], ref), f"{d} sees other images than the clean domain"
    assert set(a[CLEAN].tolist()) != set(range(10)), "num_examples took the first images, not a sample"
    assert set(a[CLEAN].tolist()) != set(b[CLEAN].tolist()), "the seed does not change the subset"


def test_every_corruption_chunk_of_a_domain_draws_its_own_noise():
    n = CHUNK + 8
    constant = np.full((n, 8, 8, 1), 128, np.uint8)  # identical images: only the noise tells them apart
    src = ArrayDataset(constant, np.zeros(n, np.int64), name="constant")
    b = Benchmark("const_c", src, corruptions=("gaussian_noise",), severities=(5,), family="mnist",
                  batch_size=256, shuffle=False)  # fmt: skip
    images = np.concatenate([batch.images for batch in b])
    assert len(images) == n
    first, second = images[:8], images[CHUNK : CHUNK + 8]
    assert not np.array_equal(first[0], first[1]), "images of one chunk share their noise"
    assert not np.array_equal(first, second), "chunk 1 repeats chunk 0's noise (chunk index not seeded)"
    again = np.concatenate([batch.images for batch in b])
    assert np.array_equal(images, again)


def test_confidence_on_a_bin_edge_falls_in_the_lower_bin():
    """Bins are (lo, hi]: confidences 0.25, 0.5, 0.75, 1.0 with 4 bins fill one bin each."""
    probs = np.array(
        [[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0], [0.75, 0.25, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    )
    labels = np.array([0, 1, 0, 0])  # argmax picks class 0 on ties: rows 0, 2, 3 correct, row 1 wrong
    r = M.reliability(probs, labels, n_bins=4)
    assert r["edges"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert r["count"].tolist() == [1, 1, 1, 1]
    assert r["confidence"].tolist() == [0.25, 0.5, 0.75, 1.0]
    assert r["accuracy"].tolist() == [1.0, 0.0, 1.0, 1.0]
    # ECE = mean over the four one-sample bins of |acc - conf|
    want = (0.75 + 0.5 + 0.25 + 0.0) / 4
    assert M.ece(probs, labels, n_bins=4) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(
    "shape, family",
    [
        ((28, 28), "mnist"),
        ((28, 40), "mnist"),
        ((29, 29), "cifar"),
        ((64, 64), "cifar"),
        ((65, 70), "imagenet"),
    ],
)
def test_default_constant_family_follows_the_image_size(shape, family):
    """``corrupt`` without ``family``: <= 28 px (the smaller side) mnist, <= 64 px cifar, larger imagenet
    (gaussian_blur has different constants in all three families, so the dispatch shows in the bytes)."""
    from tttlab.core.corruptions import corrupt
    from tttlab.core.corruptions._common import family_for_size

    assert family_for_size(*shape) == family
    img = np.random.default_rng(0).integers(0, 256, size=(2, *shape, 1), dtype=np.uint8)
    default = corrupt(img, "gaussian_blur", 3, seed=0)
    by_family = {
        f: corrupt(img, "gaussian_blur", 3, seed=0, family=f) for f in ("mnist", "cifar", "imagenet")
    }
    assert np.array_equal(default, by_family[family])
    assert all(not np.array_equal(default, v) for f, v in by_family.items() if f != family)


def test_num_examples_of_file_domains_is_a_seeded_random_subset():
    """Domains read from files (CIFAR-10-C/ImageNet-C style) are subsampled like generated ones: a seeded
    random subset, not the first ``num_examples`` images of the file."""
    files = _ids_source()

    def picked(seed: int) -> np.ndarray:
        b = Benchmark("files_c", None, corruptions=("fog",), severities=(5,), num_examples=10, seed=seed,
                      domain_files=lambda c, s: files, batch_size=4)  # fmt: skip
        return np.concatenate([batch.labels for batch in b])

    a, b = picked(0), picked(1)
    assert len(a) == len(set(a.tolist())) == 10
    assert set(a.tolist()) != set(range(10))
    assert set(a.tolist()) != set(b.tolist())
    assert np.array_equal(a, picked(0))


def test_gradual_revisits_a_severity_with_the_same_images_in_another_order():
    src = _ids_source()
    b = Benchmark("ids_c", src, corruptions=("fog",), severities=(4, 5), setting="gradual", seed=3,
                  family="mnist", batch_size=8)  # fmt: skip
    visits = _visits(b)
    assert [d.severity for d, _ in visits] == [4, 5, 4]
    up, down = (np.concatenate(v) for _, v in (visits[0], visits[2]))
    assert sorted(up.tolist()) == sorted(down.tolist()), "the way down shows the same images"
    assert not np.array_equal(up, down), "... in another order"
    again = [np.concatenate(v) for _, v in _visits(b)]
    assert np.array_equal(again[2], down)


def _visits(b) -> list:
    out: list = []
    for batch in b:
        if not out or out[-1][0] != batch.domain:
            out.append((batch.domain, []))
        out[-1][1].append(batch.labels)
    return out


def test_mixed_order_follows_the_seed():
    """The ``mixed`` shuffle of all domains' images is drawn from the benchmark's seed."""

    def order(seed: int) -> list:
        b = Benchmark("ids_c", _ids_source(), corruptions=("fog", "snow"), severities=(5,), setting="mixed",
                      seed=seed, family="mnist", batch_size=16, num_examples=20)  # fmt: skip
        return [(batch.domain_ids.tolist(), batch.labels.tolist()) for batch in b]

    first, other = order(0), order(1)
    assert first == order(0)
    ids = [i for batch_ids, _ in first for i in batch_ids]
    assert ids != [i for batch_ids, _ in other for i in batch_ids], "the domains interleave alike"
    assert sorted(ids) == [0] * 20 + [1] * 20 and ids != sorted(ids)


def test_corruption_subsets_are_hendrycks_15_common_and_4_held_out():
    """The ``common`` benchmark is ImageNet-C's 15 corruptions in the paper's order (noise, blur,
    weather, digital), ``heldout`` its 4 validation corruptions; a benchmark on ``common`` visits all 15."""
    from tttlab.core import corruptions as C

    common = (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
        "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
        "jpeg_compression",
    )  # fmt: skip
    heldout = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert C.resolve("common") == common
    assert C.resolve("heldout") == heldout
    assert C.resolve("all") == common + heldout
    b = Benchmark("ids_c", _ids_source(), corruptions="common", severities=(5,), family="mnist")
    assert [d.corruption for d in b.domains] == list(common)


@pytest.mark.parametrize("num_examples", [None, 10])
@pytest.mark.parametrize("files", [False, True], ids=["generated", "files"])
def test_shuffle_false_visits_the_images_in_file_order(num_examples, files):
    """``shuffle=False`` (Tent's CIFAR-10-C protocol: the released files in their order): every domain in
    the source's / file's order, and a ``num_examples`` subset is the first images, as RobustBench's
    ``load_cifar10c`` takes ``images[:n]`` of each severity; ``shuffle=True`` visits a seeded random
    subset (all images: the same ones) in a seeded random order."""
    src = _ids_source()
    kw = dict(corruptions=("fog",), severities=(5,), num_examples=num_examples, seed=2, batch_size=4)
    if files:
        kw["domain_files"] = lambda c, s: src

    def labels(shuffle: bool) -> np.ndarray:
        b = Benchmark("ids_c", None if files else src, shuffle=shuffle, family="mnist", **kw)
        return np.concatenate([batch.labels for batch in b])

    in_order, shuffled = labels(False), labels(True)
    assert not np.array_equal(in_order, shuffled)
    if num_examples is None:
        assert np.array_equal(in_order, np.sort(shuffled)), "the same images either way"
        assert np.array_equal(in_order, np.arange(40))
    else:  # file order takes the file's first images (RobustBench), shuffled a seeded random subset
        assert np.array_equal(in_order, np.arange(10))
        assert len(shuffled) == 10 and set(shuffled.tolist()) != set(range(10))


def test_a_cached_domain_is_not_read_back_in_the_other_order(tmp_path):
    """The cache of generated domains is keyed by the order: a domain cached by a shuffled benchmark is
    not read by an unshuffled one (its images would no longer match its labels)."""
    n = 40
    images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None] * 5, 28, axis=1).repeat(28, axis=2)
    src = ArrayDataset(images, np.arange(n), name="ids")

    def first_batch(shuffle: bool, cache_dir) -> tuple[np.ndarray, np.ndarray]:
        b = Benchmark("ids_c", src, corruptions=("contrast",), severities=(1,), family="mnist",
                      shuffle=shuffle, cache_dir=cache_dir, batch_size=n)  # fmt: skip
        batch = next(iter(b))
        return np.asarray(batch.images), batch.labels

    first_batch(True, tmp_path)  # fills the cache in shuffled order
    cached_images, cached_labels = first_batch(False, tmp_path)
    fresh_images, fresh_labels = first_batch(False, None)
    assert np.array_equal(cached_labels, fresh_labels)
    assert np.array_equal(cached_images, fresh_images)
    assert len(list(tmp_path.glob("ids_c-*"))) == 2, "one cache folder per order"


@pytest.mark.parametrize("bad", ["no", 1, None])
def test_shuffle_must_be_a_bool(bad):
    from tttlab.core.benchmark import from_config
    from tttlab.core.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="shuffle must be true or false"):
        from_config({"name": "mnist_c", "shuffle": bad})


def test_from_config_passes_shuffle_on():
    from tttlab.core.benchmark import from_config

    assert from_config({"name": "mnist_c", "shuffle": False}).shuffle is False
    assert from_config({"name": "mnist_c"}).shuffle is True


# ---------------------------------------------------------------------------------------------------------
# label-correlated (non-i.i.d.) streams: dirichlet_delta


def _class_source(per_class: int = 30, classes: int = 10) -> ArrayDataset:
    """300 distinct images (two pixels hold the index), labels cycling through 10 classes."""
    n = per_class * classes
    images = np.zeros((n, 28, 28, 1), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 1, 0] = np.arange(n) // 256
    return ArrayDataset(images, np.arange(n) % classes, name="classes")


def _stream(delta, setting="continual", seed=0, corruptions=("fog", "contrast"), **kw):
    b = Benchmark("cls_c", _class_source(), corruptions=corruptions, severities=(5,), setting=setting,
                  seed=seed, family="mnist", batch_size=16, dirichlet_delta=delta, **kw)  # fmt: skip
    return b, list(b)


def _runs(labels: np.ndarray) -> int:
    return int(1 + np.count_nonzero(np.diff(labels)))


def test_dirichlet_zero_sorts_each_domain_by_class_and_keeps_the_images():
    b, batches = _stream(0)
    iid_b, iid = _stream(None)
    assert len(b) == len(iid_b) == len(batches)
    for domain in b.domains:
        labels = np.concatenate([x.labels for x in batches if x.domain == domain])
        assert np.all(np.diff(labels) >= 0), "sorted by class"
        assert sorted(labels.tolist()) == sorted(
            np.concatenate([x.labels for x in iid if x.domain == domain]).tolist()
        )


@pytest.mark.parametrize("delta", [0.01, 0.1, 1.0])
def test_dirichlet_order_is_a_seeded_permutation_with_few_class_runs(delta):
    b, batches = _stream(delta)
    _, again = _stream(delta)
    _, other_seed = _stream(delta, seed=1)
    _, iid = _stream(None)

    def pairs(bs, domain):  # (image bytes, label) of one domain, in stream order
        return [(im.tobytes(), int(y)) for x in bs if x.domain == domain for im, y in zip(x.images, x.labels)]

    for d in b.domains:
        got = pairs(batches, d)
        assert got == pairs(again, d), "deterministic under the seed"
        assert sorted(got) == sorted(pairs(iid, d)), "the domain's images, each once, with their own labels"
    labels = [np.array([y for _, y in pairs(batches, d)]) for d in b.domains]
    assert np.array_equal(labels[0], labels[1]), "every domain plays the same class order"
    assert not np.array_equal(labels[0], [y for _, y in pairs(other_seed, b.domains[0])])
    # 10 chunks, each its classes one after another: at most 100 runs (i.i.d.: about 270 of 300)
    iid_runs = _runs(np.array([y for _, y in pairs(iid, b.domains[0])]))
    assert _runs(labels[0]) <= 100 < iid_runs


def test_dirichlet_chunks_follow_the_draws():
    """``dirichlet_label_order`` directly: a permutation; tiny delta puts (almost) each class in one chunk,
    so about one run per class; the order depends on the generator only."""
    from tttlab.core.benchmark import dirichlet_label_order

    labels = np.repeat(np.arange(8), 40)
    rng = np.random.default_rng(5)
    order = dirichlet_label_order(labels, 1e-3, rng)
    assert sorted(order.tolist()) == list(range(len(labels)))
    assert _runs(labels[order]) <= 16, "about one run per class"
    spread = dirichlet_label_order(labels, 100.0, np.random.default_rng(5))
    assert 40 <= _runs(labels[spread]) <= 64, "large delta: every class in every chunk, still in runs"
    assert np.array_equal(order, dirichlet_label_order(labels, 1e-3, np.random.default_rng(5)))


def test_dirichlet_in_the_mixed_setting_orders_the_pooled_stream():
    b, batches = _stream(0.0, setting="mixed")
    labels = np.concatenate([x.labels for x in batches])
    ids = np.concatenate([x.domain_ids for x in batches])
    assert np.all(np.diff(labels) >= 0) and len(labels) == 600
    assert sorted(np.bincount(ids).tolist()) == [300, 300], "both domains' images, once each"
    assert len(set(ids[labels == 0].tolist())) == 2, "a class run mixes the domains"


def test_dirichlet_sharded_ranks_give_the_unsharded_stream():
    b, batches = _stream(0.1, setting="reset_each_shift")
    shards = [list(b.batches(rank=r, world_size=2)) for r in (0, 1)]
    merged = sorted((x for s in shards for x in s), key=lambda x: x.index)
    assert [x.index for x in merged] == [x.index for x in batches]
    assert all(np.array_equal(m.labels, x.labels) and m.reset == x.reset for m, x in zip(merged, batches))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_dirichlet_delta_must_be_null_or_a_finite_number_at_least_0(bad):
    from tttlab.core.benchmark import from_config
    from tttlab.core.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="dirichlet_delta="):
        from_config({"name": "mnist_c", "dirichlet_delta": bad})
    assert from_config({"name": "mnist_c", "dirichlet_delta": 0}).dirichlet_delta == 0.0


def test_dirichlet_order_that_cannot_fill_its_chunks_is_an_error(monkeypatch):
    from tttlab.core import benchmark as B
    from tttlab.core.errors import InvalidInputError

    monkeypatch.setattr(B, "DIRICHLET_TRIES", 0)
    with pytest.raises(
        InvalidInputError, match=r"dirichlet_delta=0\.1: no correlated order of 300 images in 10 classes"
    ):
        _stream(0.1)


@pytest.mark.parametrize("delta", [0.01, 0.1])
def test_dirichlet_order_of_a_small_domain(delta):
    """32 images of 9 classes (a per-image method's few images per corruption): NOTE's 10 images per chunk
    are out of reach, the order still comes (at least 1 per chunk), as a permutation."""
    from tttlab.core.benchmark import dirichlet_label_order

    labels = np.random.default_rng(0).integers(0, 9, 32)
    labels[:9] = np.arange(9)
    for seed in range(20):
        order = dirichlet_label_order(labels, delta, np.random.default_rng(seed))
        assert sorted(order.tolist()) == list(range(32))


# ---------------------------------------------------------------------------------------------------------
# added by a mutation audit of the label-correlated order (each test failed on a plausible bug that every
# test above let through: the balance mask dropped, no redraw, per-chunk class order not drawn, ...)


class _ScriptedRng:
    """A generator whose Dirichlet draws are given (``draws``, in order), whose permutations reverse (an
    array: reversed; an int ``k``: ``k-1 .. 0``) and whose ``integers(n)`` is ``n - 1``, so that a
    correlated order can be worked out by hand."""

    def __init__(self, draws):
        self.draws, self.alphas = [np.asarray(d, float) for d in draws], []

    def permutation(self, x):
        return (np.arange(x) if np.ndim(x) == 0 else np.asarray(x))[::-1]

    def integers(self, n):
        return n - 1

    def dirichlet(self, alpha):
        self.alphas.append(np.asarray(alpha))
        if not self.draws:
            raise AssertionError("more Dirichlet draws than the scheme needs")
        draw = self.draws.pop(0)
        assert len(draw) == len(alpha), f"a draw over {len(alpha)} open chunks, scripted {len(draw)}"
        return draw


def test_dirichlet_chunks_by_hand_redraw_balance_and_class_order():
    """NOTE's scheme with given draws (3 classes of 20 images: 3 chunks, open while under 60 / 3 = 20
    images, at least min(10, 60 / 6) = 10 each).  Each class's proportions are drawn over the open chunks
    only (NOTE's masked and renormalised draw).  Try 1: class 0 -> 15, 4, 1; class 1 -> 5, 14, 1 (chunk 0
    now full); class 2 over chunks 1, 2 -> all 20 to chunk 1: chunk 2 holds 2 < 10, redrawn.  Try 2: class 0
    all to chunk 0 (full); class 1 over chunks 1, 2 -> 10 + 10; class 2's draw has no mass: all of it to one
    open chunk (``integers``: the last, chunk 2) -> sizes 20, 10, 30, kept (10 is enough).  Each chunk plays
    its classes in a drawn order (here reversed), each class's images in theirs (here reversed)."""
    from tttlab.core.benchmark import dirichlet_label_order

    labels = np.tile(np.arange(3), 20)
    rev = [np.flatnonzero(labels == c)[::-1] for c in range(3)]  # each class's images, permuted
    rng = _ScriptedRng(
        [[0.75, 0.2, 0.05], [0.25, 0.7, 0.05], [1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5], [0.0, 0.0]]
    )
    order = dirichlet_label_order(labels, 0.3, rng)
    assert np.array_equal(order, np.concatenate([rev[0], rev[1][:10], rev[2], rev[1][10:]]))
    assert not rng.draws
    assert [len(a) for a in rng.alphas] == [3, 3, 2, 3, 2, 2], "drawn over the open chunks"
    assert all(np.all(a == 0.3) for a in rng.alphas), "Dirichlet(delta)"


def test_dirichlet_chunk_minimum_is_min_10_or_images_over_2x_classes_inclusive():
    """12 images of 3 classes: chunks open while under 4 images, each needs min(10, 12 / 6) = 2.  Try 1
    leaves chunk 0 with 1 image: redrawn; try 2's smallest chunk has exactly 2: kept."""
    from tttlab.core.benchmark import dirichlet_label_order

    labels = np.tile(np.arange(3), 4)
    rev = [np.flatnonzero(labels == c)[::-1] for c in range(3)]
    rng = _ScriptedRng([[0.25, 0.75, 0], [0, 0.25, 0.75], [0, 1], [0.5, 0.5, 0], [0, 0.5, 0.5], [0, 1]])
    order = dirichlet_label_order(labels, 1.0, rng)
    assert np.array_equal(order, np.concatenate([rev[0][:2], rev[1][:2], rev[0][2:], rev[2], rev[1][2:]]))
    assert not rng.draws


def test_dirichlet_chunks_play_their_classes_in_drawn_orders():
    """Large delta: every chunk holds every class; each chunk draws its own class order, so the labels go
    down about as often as up (classes always in 0..9 order would go down only between chunks: <= 9 times)."""
    from tttlab.core.benchmark import dirichlet_label_order

    labels = np.repeat(np.arange(10), 50)
    seq = labels[dirichlet_label_order(labels, 100.0, np.random.default_rng(3))]
    steps = np.diff(seq)
    assert np.count_nonzero(steps < 0) > 25 and np.count_nonzero(steps > 0) > 25


def test_dirichlet_zero_is_a_stable_sort():
    """``delta=0``: sorted by class, each class's images in the order they came (the i.i.d. order)."""
    from tttlab.core.benchmark import dirichlet_label_order

    labels = np.random.default_rng(1).integers(0, 5, 500)
    order = dirichlet_label_order(labels, 0, np.random.default_rng(0))
    assert np.all(np.diff(labels[order]) >= 0)
    for c in range(5):
        assert np.array_equal(order[labels[order] == c], np.flatnonzero(labels == c))


def test_dirichlet_in_the_mixed_setting_interleaves_the_domains_within_a_class():
    """The pooled stream is the mixed setting's random interleaving of the domains, then sorted (stable): a
    class run alternates between the domains, not one domain's images and then the other's."""
    _, batches = _stream(0.0, setting="mixed")
    labels = np.concatenate([x.labels for x in batches])
    ids = np.concatenate([x.domain_ids for x in batches])
    for c in range(10):
        run = ids[labels == c]
        assert np.count_nonzero(np.diff(run)) > 10, f"class {c}: domains in blocks {run.tolist()}"


def test_dirichlet_in_the_gradual_setting_redraws_the_class_order_on_revisits():
    """gradual revisits severity 1 on the way down: the same images in another correlated order (its own
    draws); the first visits of every domain share one class order."""
    b = Benchmark("cls_c", _class_source(), corruptions=("fog",), severities=(1, 2), setting="gradual",
                  family="mnist", batch_size=16, dirichlet_delta=0.1)  # fmt: skip
    visits: list[list] = []
    for x in b:
        if not visits or x.domain != visits[-1][0].domain:
            visits.append([])
        visits[-1].append(x)
    assert [v[0].domain.severity for v in visits] == [1, 2, 1]
    labels = [np.concatenate([x.labels for x in v]) for v in visits]

    def pairs(v):
        return sorted((im.tobytes(), int(y)) for x in v for im, y in zip(x.images, x.labels))

    assert pairs(visits[0]) == pairs(visits[2]), "the revisit plays the same images"
    assert np.array_equal(labels[0], labels[1]), "first visits: the same class order"
    assert not np.array_equal(labels[0], labels[2]), "the revisit draws its own order"
    assert all(_runs(seq) <= 100 for seq in labels), "every visit label-correlated"


def test_shuffled_benchmarks_keep_the_cache_keys_they_had_before_the_order_option(tmp_path, monkeypatch):
    """Generated domains cached before ``shuffle`` existed stay valid: a shuffled benchmark's cache folder is
    keyed as it always was (literal keys, with the corruption code's hash fixed: this fails when a change
    would regenerate every user's cache), and file order gets a folder of its own.  ``source_id=""`` is how
    make_benchmark builds its named benchmarks (whose keys these are); user-built ones add a fingerprint."""
    from tttlab.core import benchmark as B

    monkeypatch.setattr(B, "corruptions_code_hash", lambda: "code")
    kw = dict(
        corruptions=("fog",), severities=(5,), family="mnist", cache_dir=tmp_path, seed=3, num_examples=10
    )
    kw["source_id"] = ""

    def folder(**extra) -> str:
        return Benchmark("ids_c", _ids_source(), **kw, **extra)._cache_path(Domain("fog", 5)).parent.name

    assert folder() == folder(shuffle=True) == "ids_c-7c5cf95cc33f"
    assert folder(jpeg_quality=85) == "ids_c-feb1d2e15949"
    assert folder(shuffle=False) not in ("ids_c-7c5cf95cc33f", "ids_c-feb1d2e15949")
    assert folder(shuffle=False, jpeg_quality=85) not in (folder(shuffle=False), "ids_c-feb1d2e15949")


@pytest.mark.parametrize("bad", ["no", "false", 0, None])
def test_benchmark_refuses_a_shuffle_that_is_not_a_bool(bad):
    """The class itself checks (make_benchmark callers pass config values unconverted: "false" is truthy)."""
    from tttlab.core.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="shuffle must be true or false"):
        Benchmark("ids_c", _ids_source(), corruptions=("fog",), severities=(5,), family="mnist", shuffle=bad)
