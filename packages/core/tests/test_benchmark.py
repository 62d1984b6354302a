"""Benchmark streams: reset semantics per setting, determinism, independence from batch size, sharding."""

from __future__ import annotations

import numpy as np
import pytest

from tttlab.core import benchmark as benchmark_module
from tttlab.core.benchmark import CLEAN, SETTINGS, Benchmark, Domain, from_config, make_benchmark
from tttlab.core.data import ArrayDataset
from tttlab.core.errors import (
    ConfigError,
    DatasetLayoutError,
    DatasetNotFoundError,
    InvalidInputError,
    SeverityError,
    TTTLabError,
    UnknownNameError,
)

CORR = ("gaussian_noise", "fog", "jpeg_compression")


@pytest.fixture(scope="module")
def source() -> ArrayDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 28, 28, 1), dtype=np.uint8)
    return ArrayDataset(images, np.arange(40) % 10, name="toy")


def bench(source, **kw) -> Benchmark:
    kw.setdefault("corruptions", CORR)
    kw.setdefault("severities", (3, 5))
    kw.setdefault("batch_size", 16)
    return Benchmark("toy_c", source, family="mnist", **kw)


def per_domain(batches) -> dict:
    out: dict = {}
    for b in batches:
        out.setdefault(b.domain, []).append((b.images, b.labels))
    return {
        d: (np.concatenate([i for i, _ in v]), np.concatenate([lab for _, lab in v])) for d, v in out.items()
    }


@pytest.mark.parametrize("setting", SETTINGS)
def test_reset_flags_follow_the_setting(source, setting):
    b = bench(source, setting=setting)
    batches = list(b)
    assert len(batches) == len(b)
    assert [x.index for x in batches] == list(range(len(batches)))
    resets = [x.reset for x in batches]
    assert resets[0] is True
    if setting == "episodic":
        assert all(resets)
    elif setting == "reset_each_shift":
        starts = [i == 0 or batches[i].domain != batches[i - 1].domain for i in range(len(batches))]
        assert resets == starts and sum(resets) == len(b.domains)
    else:
        assert sum(resets) == 1
    assert sum(len(x) for x in batches) == b.num_images


@pytest.mark.parametrize("setting,num_examples", [("gradual", None), ("mixed", 10), ("episodic", 100)])
def test_len_counts_without_corrupting(source, setting, num_examples, monkeypatch):
    """``len()`` (the progress bars' total) must not generate the domains: only 4 stay in memory, so
    counting used to corrupt every domain twice."""
    from tttlab.core import benchmark as B

    b = bench(source, setting=setting, num_examples=num_examples, include_clean=True)
    monkeypatch.setattr(B.C, "corrupt", lambda *a, **k: pytest.fail("len() corrupted images"))
    n, images = len(b), b.num_images
    monkeypatch.undo()
    batches = list(b)
    assert n == len(batches) and images == sum(len(x) for x in batches)


def test_unpacks_as_domain_images_labels(source):
    domain, images, labels = next(iter(bench(source)))
    assert (
        domain == Domain("gaussian_noise", 3) and images.dtype == np.uint8 and images.shape[1:] == (28, 28, 1)
    )
    assert labels.dtype == np.int64 and len(images) == len(labels) == 16


def test_gradual_goes_up_and_down(source):
    b = bench(source, setting="gradual", severities=(1, 2, 3, 4, 5), corruptions=("fog",))
    assert [d.severity for d in b.schedule()] == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    seen = []
    for x in b:
        if not seen or seen[-1] != x.domain:
            seen.append(x.domain)
    assert [d.severity for d in seen] == [1, 2, 3, 4, 5, 4, 3, 2, 1]


def test_domain_pixels_independent_of_setting_and_batch_size(source):
    a = per_domain(bench(source, setting="reset_each_shift", batch_size=7))
    c = per_domain(bench(source, setting="continual", batch_size=13))
    assert a.keys() == c.keys()
    for d in a:
        assert np.array_equal(a[d][0], c[d][0]) and np.array_equal(a[d][1], c[d][1])


def test_mixed_is_a_permutation_of_all_domains(source):
    b = bench(source, setting="mixed", batch_size=12)
    ref = per_domain(bench(source, setting="continual"))
    batches = list(b)
    assert all(x.domain is None for x in batches)
    ids = np.concatenate([x.domain_ids for x in batches])
    assert len(set(ids[:24].tolist())) > 1, "mixed batches should mix domains"
    images = np.concatenate([x.images for x in batches])
    for k, d in enumerate(b.domains):
        got = images[ids == k]
        want = ref[d][0]
        key = lambda a: sorted(a.reshape(len(a), -1).tobytes() for a in a[:, None])  # noqa: E731
        assert key(got) == key(want)


def test_deterministic_and_seeded(source):
    x1 = [b.images for b in bench(source, seed=1)]
    x2 = [b.images for b in bench(source, seed=1)]
    x3 = [b.images for b in bench(source, seed=2)]
    assert all(np.array_equal(a, b) for a, b in zip(x1, x2))
    assert not all(np.array_equal(a, b) for a, b in zip(x1, x3))


def test_corruption_changes_source_and_clean_domain_does_not(source):
    b = bench(source, include_clean=True, shuffle=False, corruptions=("fog",), severities=5)
    doms = per_domain(b)
    assert np.array_equal(doms[CLEAN][0], source.images)
    assert not np.array_equal(doms[Domain("fog", 5)][0], source.images)
    assert np.array_equal(doms[Domain("fog", 5)][1], source.labels)


@pytest.mark.parametrize("setting", ["episodic", "continual", "mixed"])
def test_sharding_partitions_the_stream(source, setting):
    b = bench(source, setting=setting)
    full = list(b)
    shards = [list(b.batches(rank=r, world_size=2)) for r in range(2)]
    merged = sorted(shards[0] + shards[1], key=lambda x: x.index)
    assert [x.index for x in merged] == [x.index for x in full]
    assert all(np.array_equal(x.images, y.images) for x, y in zip(merged, full))
    assert {x.index % 2 for x in shards[1]} == {1}


def test_num_examples_and_cache(source, tmp_path):
    b = bench(source, num_examples=10, cache_dir=tmp_path)
    assert b.num_images == 10 * len(b.domains)
    first = per_domain(b)
    files = sorted(tmp_path.rglob("*.npy"))
    assert len(files) == len(b.domains) and not list(tmp_path.rglob("*.tmp"))
    again = per_domain(bench(source, num_examples=10, cache_dir=tmp_path))
    for d in first:
        assert np.array_equal(first[d][0], again[d][0])
    assert sorted(tmp_path.rglob("*.npy")) == files  # read back, not written again


def test_cache_is_not_read_by_other_corruption_code(source, tmp_path, monkeypatch):
    """Domains cached by an older version of the corruption code are regenerated, not reused."""
    b = bench(source, num_examples=10, cache_dir=tmp_path)
    first = per_domain(b)
    for f in tmp_path.rglob("*.npy"):  # what an older corruption code would have written
        np.save(f, np.zeros_like(np.load(f)))
    assert all(not per_domain(bench(source, num_examples=10, cache_dir=tmp_path))[d][0].any() for d in first)
    monkeypatch.setattr(benchmark_module, "corruptions_code_hash", lambda: "edited-code")
    fresh = per_domain(bench(source, num_examples=10, cache_dir=tmp_path))
    for d in first:
        assert np.array_equal(first[d][0], fresh[d][0])


def _fresh(src, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """What a benchmark with one chunk and shuffle=False must yield for ``src``, corrupted here."""
    rng = np.random.default_rng([seed, benchmark_module.C.ALL.index(corruption), severity, 0])
    return benchmark_module.C.corrupt(
        src.take(np.arange(len(src)))[0], corruption, severity, rng=rng, family="mnist"
    )


def _one_domain(src, cache_dir, name="toy_c", **kw) -> np.ndarray:
    b = Benchmark(name, src, corruptions=("gaussian_noise",), severities=(3,), family="mnist", shuffle=False,
                  batch_size=len(src), cache_dir=cache_dir, **kw)  # fmt: skip
    return next(iter(b)).images


def test_two_sources_of_one_length_do_not_share_cached_domains(source, tmp_path):
    """Two user-built benchmarks of one name over sources of the same length (two slices of one split) each
    get their own corrupted images from a shared cache_dir, not the first one's; the same source reads its
    cache back (one folder per source, nothing written the second time)."""
    first, second = source.subset(np.arange(0, 20)), source.subset(np.arange(20, 40))
    assert np.array_equal(_one_domain(first, tmp_path), _fresh(first, "gaussian_noise", 3))
    got = _one_domain(second, tmp_path)
    assert np.array_equal(got, _fresh(second, "gaussian_noise", 3)), "the second slice got the first's images"
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 2
    assert np.array_equal(_one_domain(first, tmp_path), _fresh(first, "gaussian_noise", 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == folders
    # a trusted source_id replaces the fingerprint: same id, same folder (the caller vouches for the data)
    a = _one_domain(first, tmp_path / "ids", source_id="slice-a")
    assert np.array_equal(_one_domain(second, tmp_path / "ids", source_id="slice-a"), a)
    with pytest.raises(InvalidInputError, match="source_id must be a string"):
        _one_domain(first, tmp_path, source_id=3)


def test_tfds_split_slices_do_not_share_cached_domains(tmp_path):
    """The case users hit: ``test[:10]`` and ``test[10:20]`` of one TFDS dataset, one cache_dir."""
    pytest.importorskip("tensorflow_datasets")
    from tttlab.core import data, testing

    root = testing.make_tfds(tmp_path / "tfds", n={"test": 20}, image_shape=(28, 28, 1), num_classes=3)
    for split in ("test[:10]", "test[10:20]"):
        src = data.tfds("tttlab_fixture", root, split=split)
        assert np.array_equal(_one_domain(src, tmp_path / "cache", name="fixture_c"),
                              _fresh(src, "gaussian_noise", 3)), split  # fmt: skip


def test_named_benchmarks_keep_their_cache_keys_and_splits_get_their_own(tmp_path, monkeypatch):
    """make_benchmark's standard data keeps the folder names of the code before source fingerprints (literal
    keys, corruption code hash fixed); MNIST's / digits' validation split, as long as test, no longer shares
    test's folder; a generated cifar10_c from a clean set that is not the full CIFAR-10 test batch is
    fingerprinted, so two such folders of one size do not share either."""
    pytest.importorskip("sklearn")
    from tttlab.core import testing

    monkeypatch.setattr(benchmark_module, "corruptions_code_hash", lambda: "code")
    kw = dict(corruptions=("fog",), severities=(5,), cache_dir=tmp_path)

    def folder(name, **extra) -> str:
        return make_benchmark(name, **kw, **extra)._cache_path(Domain("fog", 5)).parent.name

    assert folder("digits_c") == "digits_c-3072efbabc80"
    assert folder("digits_c", shuffle=False) == "digits_c-f8fe36f92d3d"
    assert folder("digits_c", num_examples=100, seed=3) == "digits_c-c686e373ab98"
    assert folder("digits_c", split="validation") not in (
        "digits_c-3072efbabc80",
        folder("digits_c", split="train"),
    )
    assert folder("digits_c", split="val") == folder("digits_c", split="validation")
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="generated"):
        roots = [
            testing.make_cifar10(tmp_path / f"c{seed}", n_train=2, n_test=6, seed=seed) for seed in (0, 1)
        ]
        got = [per_domain(make_benchmark("cifar10_c", root=r, corruptions=("contrast",), severities=(1,),
                                         shuffle=False, cache_dir=tmp_path / "cache"))  # fmt: skip
               for r in roots]  # fmt: skip
    assert not np.array_equal(got[0][Domain("contrast", 1)][0], got[1][Domain("contrast", 1)][0])
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.parametrize(
    "kw, err, needle",
    [
        ({"setting": "online"}, UnknownNameError, "online"),
        ({"severities": (6,)}, SeverityError, "6"),
        ({"batch_size": 0}, InvalidInputError, "0"),
        ({"corruptions": ("blurr",)}, UnknownNameError, "blurr"),
        ({"num_examples": -3}, InvalidInputError, "-3"),
        ({"num_examples": True}, InvalidInputError, "True"),
        ({"corruptions": None}, UnknownNameError, "None"),
        ({"corruptions": 5}, UnknownNameError, "5"),
        ({"corruptions": ()}, InvalidInputError, "empty"),
        ({"corruptions": ("fog", "fog")}, InvalidInputError, "repeat"),
        ({"severities": None}, SeverityError, "None"),
        ({"severities": (5, 5)}, InvalidInputError, "repeat"),
        ({"seed": -1}, InvalidInputError, "-1"),
        ({"seed": "a"}, InvalidInputError, "'a'"),
        ({"seed": None}, InvalidInputError, "None"),
    ],
)
def test_bad_arguments(source, kw, err, needle):
    with pytest.raises(err, match=needle):
        bench(source, **kw)


def test_named_benchmarks_bad_input(tmp_path):
    with pytest.raises(UnknownNameError, match="svhn_c"):
        make_benchmark("svhn_c")
    with pytest.raises(DatasetNotFoundError, match="root"):
        make_benchmark("cifar10_c")
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        make_benchmark("cifar10_c", root=tmp_path / "nowhere")
    # a missing root also says what the folder should hold (it named only the path)
    for name, files, clean in (("cifar10_c", "CIFAR-10-C/{<corruption>.npy, labels.npy}", "cifar-10-batches-py/"),
                               ("imagenet_c", "ImageNet-C/<corruption>/<severity>/<wnid>/*.JPEG", "val/<wnid>/")):  # fmt: skip
        with pytest.raises(DatasetNotFoundError) as e:
            make_benchmark(name, root=tmp_path / "nowhere")
        assert f"root {tmp_path / 'nowhere'} does not exist; expected {files}" in str(e.value)
        assert clean in str(e.value)
    with pytest.raises(InvalidInputError, match="root='/data'"):
        make_benchmark("digits_c", root="/data")  # an embedded benchmark: the root would be ignored
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InvalidInputError, match="a_file"):
        make_benchmark("digits_c", cache_dir=tmp_path / "a_file")
    # from_config: a misspelt key, values of the wrong type are named, not converted or ignored
    with pytest.raises(ConfigError, match="severty.*severities"):
        from_config({"name": "digits_c", "severty": 3})
    for key, value in (("batch_size", "x"), ("batch_size", 2.7), ("seed", None), ("include_clean", "false")):
        with pytest.raises(TTTLabError, match=repr(value)):
            from_config({"name": "digits_c", key: value})
    assert from_config({"name": "digits_c", "severities": 3}).severities == (3,)


def test_corrupted_benchmark_root_with_neither_files_nor_clean_data_names_both_layouts(tmp_path):
    """A root holding no CIFAR-10-C / ImageNet-C files and no clean data: the error names the corrupted
    files' layout (what a user of these benchmarks points root at), not only the clean data's."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"CIFAR-10-C/\{<corruption>.npy, labels.npy\}.*test_batch"):
        make_benchmark("cifar10_c", root=tmp_path / "empty")
    with pytest.raises(DatasetLayoutError, match=r"ImageNet-C/<corruption>/<severity>/<wnid>.*val"):
        make_benchmark("imagenet_c", root=tmp_path / "empty")
    # a root that does not exist (a typo): the same two layouts, not only "does not exist"
    with pytest.raises(
        DatasetNotFoundError, match=r"nowhere does not exist.*CIFAR-10-C/\{<corruption>.*test_batch"
    ):
        make_benchmark("cifar10_c", root=tmp_path / "nowhere")
    with pytest.raises(
        DatasetNotFoundError, match=r"nowhere does not exist.*ImageNet-C/<corruption>.*val/<wnid>"
    ):
        make_benchmark("imagenet_c", root=tmp_path / "nowhere")


def test_mnist_c_shape():
    pytest.importorskip("mnist")
    b = make_benchmark("mnist_c", corruptions=("shot_noise",), severities=5, num_examples=64, batch_size=32)
    batches = list(b)
    assert len(batches) == 2 and batches[0].images.shape == (32, 28, 28, 1)
    assert "1 corruptions" in b.describe()


def test_cifar10_c_files_and_generated(tmp_path):
    from tttlab.core import testing

    files_root = testing.make_cifar10_c(tmp_path / "c", corruptions=("fog", "snow"), n_per_severity=6)
    b = make_benchmark(
        "cifar10_c", root=files_root, corruptions=("fog",), severities=(2,), batch_size=4, setting="continual"
    )
    got = per_domain(b)[Domain("fog", 2)]
    raw = np.load(next(files_root.rglob("fog.npy")))[6:12]
    assert sorted(map(bytes, got[0].reshape(6, -1))) == sorted(map(bytes, raw.reshape(6, -1)))
    clean_root = testing.make_cifar10(tmp_path / "clean", n_train=10, n_test=12)
    g = make_benchmark("cifar10_c", root=clean_root, corruptions=("fog",), severities=(2,), batch_size=5)
    assert g.family == "cifar" and g.num_images == 12
    assert g.jpeg_quality is None  # CIFAR-10-C was saved as raw .npy arrays


def test_released_files_or_a_warning_that_the_domains_are_generated(tmp_path):
    """A cifar10_c / imagenet_c root with the release is read (``released_files``: True, no warning); a root
    with only the clean data (e.g. a misnamed CIFAR-10-C folder beside cifar-10-batches-py) is corrupted here,
    and core says so: those are not the release's pixels."""
    import warnings

    from tttlab.core import testing
    from tttlab.core.benchmark import released_files

    files = testing.make_cifar10_c(tmp_path / "c", corruptions=("fog",), n_per_severity=2)
    inet_files = testing.make_imagenet_c(tmp_path / "ic" / "ImageNet-C", severities=(5,), size=32)
    clean = testing.make_cifar10(tmp_path / "clean", n_train=2, n_test=4)
    inet_clean = testing.make_imagenet(tmp_path / "inet", n_per_class=1, size=(32, 32))
    for name, root in (("cifar10_c", files), ("imagenet_c", inet_files.parent)):
        assert released_files(name, root)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # reading the release warns about nothing
            make_benchmark(name, root=root, corruptions=("fog",), severities=(5,))
    for name, root, layout in (
        ("cifar10_c", clean, "CIFAR-10-C/"),
        ("imagenet_c", inet_clean, "ImageNet-C/"),
    ):
        assert not released_files(name, root)
        with pytest.warns(
            UserWarning, match=f"holds no released {name} files \\(expected {layout}.*generated"
        ):
            make_benchmark(name, root=root, corruptions=("fog",), severities=(5,))
    assert not released_files("mnist_c", files) and not released_files("cifar10_c", None)


def test_generated_imagenet_c_is_saved_as_quality_85_jpeg(tmp_path):
    """make_imagenet_c.py saves every corrupted image with Pillow at quality=85: generated ImageNet-C
    domains repeat that round trip (pixels equal to a file written and read back); clean images do not."""
    from PIL import Image

    from tttlab.core import corruptions as C
    from tttlab.core import testing

    root = testing.make_imagenet(tmp_path / "in", n_per_class=2, size=(40, 48))
    b = make_benchmark("imagenet_c", root=root, corruptions=("gaussian_noise",), severities=(2,),
                       batch_size=8, include_clean=True, seed=3)  # fmt: skip
    assert b.family == "imagenet" and b.jpeg_quality == 85
    doms = per_domain(b)
    clean, corrupted = doms[CLEAN][0], doms[Domain("gaussian_noise", 2)][0]
    raw = C.corrupt(clean, "gaussian_noise", 2, rng=np.random.default_rng([3, 0, 2, 0]), family="imagenet")
    for i in range(len(raw)):
        Image.fromarray(raw[i]).save(tmp_path / "x.JPEG", quality=85, optimize=True)
        assert np.array_equal(corrupted[i], np.asarray(Image.open(tmp_path / "x.JPEG")))
    assert not np.array_equal(corrupted, raw)
    assert np.array_equal(clean, np.stack([b.source[i][0] for i in b._example_indices()]))
    with pytest.raises(InvalidInputError, match="jpeg_quality"):
        Benchmark("x", b.source, jpeg_quality=100)


def test_imagenet_c_files_under_a_robustbench_data_dir(tmp_path):
    from tttlab.core import testing

    testing.make_imagenet_c(tmp_path / "ImageNet-C", corruptions=("fog",), severities=(5,), size=32)
    b = make_benchmark("imagenet_c", root=tmp_path, corruptions=("fog",), severities=(5,), batch_size=2)
    assert b.source is None and b.num_images == 3  # read from the files, not generated from val


def test_a_root_without_a_chosen_domain_is_refused_when_built(tmp_path):
    """CIFAR-10-C / ImageNet-C files that lack a chosen corruption (or severity) are a DatasetLayoutError
    naming the missing path and what the folder holds when the benchmark is made, not halfway through the
    stream (tttlab-compare found it only in every method's subprocess, after writing its out_dir)."""
    from tttlab.core import compare as cmp
    from tttlab.core.errors import DatasetLayoutError
    from tttlab.core.testing import make_cifar10_c, make_imagenet_c

    c10 = make_cifar10_c(tmp_path / "c10", corruptions=("gaussian_noise",))
    with pytest.raises(
        DatasetLayoutError, match=r"CIFAR-10-C/fog\.npy does not exist; .* holds \['gaussian_noise'\]"
    ):
        make_benchmark("cifar10_c", root=c10.parent, corruptions=["gaussian_noise", "fog"])
    assert len(make_benchmark("cifar10_c", root=c10.parent, corruptions=["gaussian_noise"]).domains) == 1
    inc = make_imagenet_c(tmp_path / "inc", corruptions=("fog",), severities=(5,))
    with pytest.raises(DatasetLayoutError, match=r"fog/3 does not exist"):
        make_benchmark("imagenet_c", root=inc, corruptions=["fog"], severities=[3, 5])
    with pytest.raises(DatasetLayoutError, match=r"snow/5 does not exist; .*holds \['fog'\]"):
        make_benchmark("imagenet_c", root=inc, corruptions=["fog", "snow"], severities=[5])
    assert len(make_benchmark("imagenet_c", root=inc, corruptions=["fog"], severities=[5]).domains) == 1
    out = tmp_path / "cmp"
    argv = [
        "methods=[x.y]",
        "benchmark=cifar10_c",
        f"root={c10.parent}",
        "corruptions=[fog]",
        f"out_dir={out}",
    ]
    assert cmp.main(argv) == 2 and not out.exists()


@pytest.mark.parametrize("setting", SETTINGS)
def test_visit_sizes_give_every_batch_size_before_the_stream_runs(source, setting):
    """``visit_sizes`` (images per visit, mixed: the pooled stream) tell a caller every batch's size without
    corrupting anything: the stream's batches are those sizes cut into batch_size pieces."""
    b = bench(source, setting=setting, num_examples=17, batch_size=8)
    visits = b.visit_sizes()
    expected = [min(8, n - start) for _, n in visits for start in range(0, n, 8)]
    assert [len(x.labels) for x in b] == expected and len(expected) == len(b)
    if setting == "mixed":
        assert visits == [(None, 17 * len(b.domains))]
    else:
        assert [d for d, _ in visits] == b.schedule() and {n for _, n in visits} == {17}
