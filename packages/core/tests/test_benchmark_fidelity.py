"""Benchmark definitions checked against the references that define them (core fidelity audit).

* ``gradual``: the test-time-adaptation benchmark (mariodoebler/test-time-adaptation, ``test_time.py``)
  runs every corruption through severities 1,2,3,4,5,4,3,2,1 when one severity is configured (its
  default ``[5]``); a gradual stream over one severity would be the continual stream.
* ``num_examples`` in file order (``shuffle=False``): RobustBench's ``load_cifar10c`` slices
  ``images[(s - 1) * 10000 : s * 10000][:n]``, the first ``n`` images of every severity, so the
  reference code that reads the released files without shuffling (Tent, CoTTA) sees those.
"""

from __future__ import annotations

import numpy as np
import pytest

from tttlab.core import corruptions as C
from tttlab.core.benchmark import Benchmark, Domain
from tttlab.core.data import ArrayDataset


def _ids_source(n: int = 40) -> ArrayDataset:
    """Images whose label is their index, so labels tell which images a domain holds."""
    rng = np.random.default_rng(0)
    return ArrayDataset(rng.integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8), np.arange(n), name="ids")


def _visited(b: Benchmark) -> list[Domain]:
    seen: list[Domain] = []
    for batch in b:
        if not seen or seen[-1] != batch.domain:
            seen.append(batch.domain)
    return seen


# ---------------------------------------------------------------------------------------------- gradual
@pytest.mark.parametrize("severities", [(5,), 5, (3,)])
def test_gradual_with_one_severity_runs_1_to_5_and_back_per_corruption(severities):
    b = Benchmark("ids_c", _ids_source(), corruptions=("fog", "snow"), severities=severities,
                  setting="gradual", family="mnist", batch_size=16)  # fmt: skip
    path = [1, 2, 3, 4, 5, 4, 3, 2, 1]
    expected = [Domain(c, s) for c in ("fog", "snow") for s in path]
    assert b.schedule() == expected
    assert _visited(b) == expected, "the stream itself visits the way up and down"
    assert b.severities == (1, 2, 3, 4, 5) and len(b.domains) == 10
    resets = [x.reset for x in b]
    assert resets[0] and sum(resets) == 1, "gradual never resets after the first batch"


def test_other_settings_keep_the_single_severity():
    for setting in ("continual", "reset_each_shift", "mixed", "episodic"):
        b = Benchmark("ids_c", _ids_source(), corruptions=("fog",), severities=(5,), setting=setting,
                      family="mnist")  # fmt: skip
        assert b.severities == (5,) and b.domains == [Domain("fog", 5)]


def test_gradual_with_several_severities_goes_through_those_given():
    b = Benchmark("ids_c", _ids_source(), corruptions=("fog",), severities=(2, 4), setting="gradual",
                  family="mnist")  # fmt: skip
    assert [d.severity for d in b.schedule()] == [2, 4, 2]


# ------------------------------------------------------------------------------ num_examples, file order
def _labels(b: Benchmark) -> dict:
    out: dict = {}
    for batch in b:
        out.setdefault(batch.domain, []).append(batch.labels)
    return {d: np.concatenate(v) for d, v in out.items()}


@pytest.mark.parametrize("files", [False, True], ids=["generated", "files"])
@pytest.mark.parametrize("seed", [0, 5])
def test_file_order_subset_is_the_first_images_of_every_domain(files, seed):
    src = _ids_source()
    kw: dict = dict(corruptions=("fog", "gaussian_noise"), severities=(1, 5), num_examples=12, seed=seed,
                    shuffle=False, batch_size=5)  # fmt: skip
    if files:
        kw["domain_files"] = lambda c, s: src
    b = Benchmark("ids_c", None if files else src, family="mnist", **kw)
    got = _labels(b)
    assert len(got) == 4
    for d, lab in got.items():
        assert np.array_equal(lab, np.arange(12)), f"{d}: {lab.tolist()}, expected the first 12 in order"


def test_file_order_subset_has_its_own_cache(tmp_path, monkeypatch):
    """A generated file-order subset is cached apart from the sorted random subset earlier code cached under
    the file-order key (those images would not match the first images' labels); full file-order domains
    keep their key (literal folder names of the code before, with the corruption code's hash fixed;
    ``source_id=""``: the key of make_benchmark's named benchmarks)."""
    from tttlab.core import benchmark as B

    src = _ids_source()

    def folder(num_examples, shuffle=False) -> str:
        b = Benchmark("ids_c", src, corruptions=("fog",), severities=(5,), family="mnist",
                      cache_dir=tmp_path, num_examples=num_examples, shuffle=shuffle, source_id="")  # fmt: skip
        return b._cache_path(Domain("fog", 5)).parent.name

    with monkeypatch.context() as m:
        m.setattr(B, "corruptions_code_hash", lambda: "code")
        assert folder(None) == "ids_c-0991f4afba16" and folder(40) == "ids_c-00868be86523", "full: kept"
        assert folder(10) != "ids_c-ed5c01f4161e", "a subset now holds other images: another cache folder"
        assert folder(10) != folder(10, shuffle=True)
    # and the cached images are those of the first images
    b = Benchmark("ids_c", src, corruptions=("contrast",), severities=(1,), family="mnist",
                  cache_dir=tmp_path, num_examples=10, shuffle=False, batch_size=10)  # fmt: skip
    first = next(iter(b))
    again = next(iter(Benchmark("ids_c", src, corruptions=("contrast",), severities=(1,), family="mnist",
                                cache_dir=tmp_path, num_examples=10, shuffle=False, batch_size=10)))  # fmt: skip
    assert np.array_equal(first.labels, np.arange(10)) and np.array_equal(again.images, first.images)
    fresh = C.corrupt(src.images[:10], "contrast", 1, rng=np.random.default_rng([0, C.ALL.index("contrast"), 1, 0]),
                      family="mnist")  # fmt: skip
    assert np.array_equal(first.images, fresh)


@pytest.mark.parametrize("files", [False, True], ids=["generated", "files"])
def test_file_order_subset_of_a_class_sorted_folder_warns(files):
    """RobustBench's ``load_imagenetc`` does not take the folder's first images: it takes the first ones of a
    fixed random list of 5,000 validation images (``helper_files/imagenet_test_image_ids.txt``).  The first
    images of a folder sorted by class (ImageNet-C's layout) are the first classes only; ``shuffle=False``
    with a ``num_examples`` subset there warns, naming how many classes are left.  Unsorted data (CIFAR-10-C's
    files, RobustBench's ``load_cifar10c``) and the default shuffled subset do not warn."""
    import warnings

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 28, 28, 1), dtype=np.uint8)
    sorted_src = ArrayDataset(images, np.repeat(np.arange(4), 10), name="sorted")
    mixed_src = ArrayDataset(images, np.tile(np.arange(4), 10), name="mixed")

    def labels(src, shuffle):
        kw: dict = dict(
            corruptions=("fog",), severities=(5,), num_examples=12, shuffle=shuffle, batch_size=12
        )
        if files:
            kw["domain_files"] = lambda c, s: src
        b = Benchmark("ids_c", None if files else src, family="mnist", **kw)
        return np.concatenate([batch.labels for batch in b])

    with pytest.warns(UserWarning, match="holds 2 of its 4 classes"):
        got = labels(sorted_src, False)
    assert np.array_equal(got, [0] * 10 + [1] * 2), "still the first images (RobustBench's CIFAR-10-C slice)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels(mixed_src, False)
        assert len(set(labels(sorted_src, True).tolist())) > 2
