"""``stream_order``: the default (``tttlab``) streams are the ones runs always had, byte for byte, and
``mariodoebler`` builds the streams and reset points of mariodoebler/test-time-adaptation's
``test_time.py`` / ``get_test_loader``, written out here by hand from its rules:

- the outer loop runs over the corruptions, the inner one over the severities, one loader per
  (corruption, severity); the model is reset before the first corruption, and in ``reset_each_shift``
  before every corruption (not between the severities of one corruption);
- ``gradual`` with one given severity plays 1,2,3,4,5,4,3,2,1 per corruption; with several, the given ones
  once each in the given order; the loader re-seeds before every visit, so a revisit replays its order;
- ``mixed_domains`` loops over the severities only: one loader per severity that pools every corruption
  at that severity and shuffles the pool with the same seed, no reset after the first.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from tttlab.core.benchmark import STREAM_ORDERS, Benchmark, from_config
from tttlab.core.config import BenchmarkConfig
from tttlab.core.data import ArrayDataset
from tttlab.core.errors import UnknownNameError
from tttlab.core.records import config_hash

N = 5
CORR = ("fog", "contrast", "gaussian_noise")


def _files(c: str, s: int) -> ArrayDataset:
    """A domain whose every image spells ``(corruption index, severity, image index)`` in its pixel."""
    images = np.zeros((N, 1, 1, 3), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1], images[:, 0, 0, 2] = CORR.index(c), s, np.arange(N)
    return ArrayDataset(images, np.arange(N) % 3)


def _clean() -> ArrayDataset:
    images = np.zeros((N, 1, 1, 3), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 2] = 255, np.arange(N)
    return ArrayDataset(images, np.arange(N) % 3)


def _bench(setting, severities, corruptions=CORR[:2], batch_size=2, **kw) -> Benchmark:
    kw.setdefault("shuffle", False)
    return Benchmark("t", _clean(), corruptions=corruptions, severities=severities, setting=setting,
                     batch_size=batch_size, domain_files=_files, seed=3, **kw)  # fmt: skip


def _read(batch) -> list[tuple]:
    """``(corruption, severity, image index)`` of every image of a batch (``("clean", 0, i)`` for clean)."""
    px = np.asarray(batch.images)[:, 0, 0, :]
    return [("clean", 0, int(k)) if c == 255 else (CORR[c], int(s), int(k)) for c, s, k in px]


def _images(bench, **kw) -> list[tuple]:
    return [t for b in bench.batches(**kw) for t in _read(b)]


def _visit(corruption: str, severity: int, order=range(N)) -> list[tuple]:
    return [(corruption, severity, i) for i in order]


# ---------------------------------------------------------------------------------------------- default


def _digest(setting, severities, **kw) -> str:
    """The whole stream (domains, reset flags, indices, pixels, labels, domain ids, sizes), hashed."""
    b = Benchmark("t", ArrayDataset(*_pinned_source()), corruptions=CORR, severities=severities,
                  setting=setting, batch_size=4, domain_files=_pinned_files, seed=3, **kw)  # fmt: skip
    h = hashlib.sha256()
    for bt in b:
        h.update(repr((str(bt.domain), bt.reset, bt.index)).encode())
        h.update(np.ascontiguousarray(bt.images))
        h.update(np.asarray(bt.labels, np.int64))
        h.update(np.asarray(bt.domain_ids, np.int64))
    h.update(repr((len(b), b.visit_sizes(), [str(d) for d in b.schedule()])).encode())
    return h.hexdigest()[:16]


def _pinned_source():
    images = np.zeros((10, 1, 1, 3), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 2] = 255, np.arange(10)
    return images, np.arange(10) % 3


def _pinned_files(c: str, s: int) -> ArrayDataset:
    images = np.zeros((10, 1, 1, 3), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1], images[:, 0, 0, 2] = CORR.index(c), s, np.arange(10)
    return ArrayDataset(images, np.arange(10) % 3)


#: The 60 streams below hashed one after another by the code before ``stream_order`` existed.
DEFAULT_STREAMS_DIGEST = "1115dcfe41557664"


@pytest.mark.parametrize("explicit", [False, True])
def test_default_streams_are_byte_identical_to_those_before_the_stream_order_option(explicit):
    order = {"stream_order": "tttlab"} if explicit else {}
    h = hashlib.sha256()
    for setting in ("episodic", "reset_each_shift", "continual", "mixed", "gradual"):
        for severities in ([5], [4, 2], [2, 5, 3]):
            for kw in ({}, {"dirichlet_delta": 0.0}, {"shuffle": False}, {"include_clean": True}):
                h.update(_digest(setting, severities, **kw, **order).encode())
    assert h.hexdigest()[:16] == DEFAULT_STREAMS_DIGEST


# ---------------------------------------------------------------------------------------------- by hand


def test_mariodoebler_continual_and_reset_each_shift_visit_corruption_by_corruption_in_the_given_order():
    want = _visit("fog", 4) + _visit("fog", 2) + _visit("contrast", 4) + _visit("contrast", 2)
    for setting in ("continual", "reset_each_shift", "episodic"):
        assert _images(_bench(setting, [4, 2], stream_order="mariodoebler")) == want
        assert _images(_bench(setting, [4, 2])) == want  # the same visits as the default


def test_mariodoebler_reset_each_shift_resets_per_corruption_not_per_severity():
    # 5 images in batches of 2: 3 batches per visit; clean, fog-4, fog-2, contrast-4, contrast-2
    bench = _bench("reset_each_shift", [4, 2], include_clean=True, stream_order="mariodoebler")
    first = [True, False, False]
    rest = [False, False, False]
    assert [b.reset for b in bench] == first + first + rest + first + rest
    default = _bench("reset_each_shift", [4, 2], include_clean=True)
    assert [b.reset for b in default] == first * 5  # every (corruption, severity)
    # one severity: a shift is a corruption either way
    one = [[b.reset for b in _bench("reset_each_shift", [5], stream_order=o)] for o in STREAM_ORDERS]
    assert one[0] == one[1] == first * 2


@pytest.mark.parametrize("setting", ["continual", "gradual", "mixed"])
def test_mariodoebler_resets_only_before_the_first_batch_in_the_stream_settings(setting):
    flags = [b.reset for b in _bench(setting, [4, 2], stream_order="mariodoebler")]
    assert flags[0] and not any(flags[1:]) and len(flags) > 3
    assert all(b.reset for b in _bench("episodic", [4, 2], stream_order="mariodoebler"))


def test_mariodoebler_gradual_with_several_severities_visits_each_once_in_the_given_order():
    bench = _bench("gradual", [4, 2], stream_order="mariodoebler")
    assert _images(bench) == _visit("fog", 4) + _visit("fog", 2) + _visit("contrast", 4) + _visit(
        "contrast", 2
    )
    # the default goes up through the given severities and back down: 2, 4, 2 per corruption
    default = _images(_bench("gradual", [4, 2]))
    assert [t[:2] for t in default[::N]] == [("fog", 2), ("fog", 4), ("fog", 2)] + [
        ("contrast", 2), ("contrast", 4), ("contrast", 2)
    ]  # fmt: skip
    three = _bench("gradual", [2, 5, 3], corruptions=["fog"], stream_order="mariodoebler")
    assert [str(d) for d in three.schedule()] == ["fog-2", "fog-5", "fog-3"]


def test_mariodoebler_gradual_with_one_severity_replays_the_first_visits_order_on_the_way_down():
    path = [1, 2, 3, 4, 5, 4, 3, 2, 1]
    bench = _bench("gradual", [5], shuffle=True, stream_order="mariodoebler")
    seen = _images(bench)
    assert [t[:2] for t in seen[::N]] == [("fog", s) for s in path] + [("contrast", s) for s in path]
    first = {}
    for k in range(0, len(seen), N):  # each visit: the first visit's order of that domain, every time
        visit = seen[k : k + N]
        order = [i for _, _, i in visit]
        assert sorted(order) == list(range(N))
        assert first.setdefault(visit[0][:2], order) == order
    orders = {tuple(v) for v in first.values()}
    assert len(orders) == 1 and orders != {tuple(range(N))}  # shuffled, and the same images in every domain
    # the default shows a revisit in another order
    default = _images(_bench("gradual", [5], shuffle=True))
    assert [i for *_, i in default[5 * N : 6 * N]] != [i for *_, i in default[3 * N : 4 * N]]
    # with a label-correlated order too (dirichlet_delta), a revisit replays the first visit
    corr = _images(_bench("gradual", [5], shuffle=True, dirichlet_delta=0.5, stream_order="mariodoebler"))
    assert corr[5 * N : 6 * N] == [("fog", 4, i) for *_, i in corr[3 * N : 4 * N]]


def test_mariodoebler_mixed_plays_one_pool_of_all_corruptions_per_severity_each_shuffled_alike():
    bench = _bench("mixed", [4, 2], batch_size=4, stream_order="mariodoebler")
    batches = list(bench)
    # a pool of 2 corruptions x 5 images per severity, its own loader: batches of 4, 4, 2
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert all(b.domain is None for b in batches)
    seen = [t for b in batches for t in _read(b)]
    pooled = [(c, i) for c in ("fog", "contrast") for i in range(N)]  # a pool's images, concatenated
    perm = np.random.default_rng([3, 0xD1CE]).permutation(2 * N)  # the one seeded shuffle of a pool
    for k, s in enumerate((4, 2)):
        assert seen[10 * k : 10 * (k + 1)] == [(pooled[p][0], s, pooled[p][1]) for p in perm]
    # domain ids index bench.domains (fog-4, fog-2, contrast-4, contrast-2)
    ids = np.concatenate([b.domain_ids for b in batches])
    assert [str(bench.domains[i]) for i in ids] == [f"{c}-{s}" for c, s, _ in seen]
    # the default pools all four domains into one stream of 20 images
    assert [len(b) for b in _bench("mixed", [4, 2], batch_size=4)] == [4, 4, 4, 4, 4]


def test_mariodoebler_mixed_plays_the_clean_domain_first_on_its_own():
    bench = _bench("mixed", [4, 2], batch_size=4, include_clean=True, stream_order="mariodoebler")
    batches = list(bench)
    assert [len(b) for b in batches] == [4, 1, 4, 4, 2, 4, 4, 2]  # clean, severity 4, severity 2
    seen = [t for b in batches for t in _read(b)]
    assert sorted(seen[:N]) == [("clean", 0, i) for i in range(N)]
    assert {t[:2] for t in seen[N : 3 * N]} == {("fog", 4), ("contrast", 4)}
    assert bench.visit_sizes() == [(None, N), (None, 2 * N), (None, 2 * N)]
    assert [b.reset for b in batches] == [True] + [False] * 7


def test_mariodoebler_mixed_sizes_and_sharding_agree_with_the_stream():
    bench = _bench("mixed", [4, 2, 5], corruptions=CORR, batch_size=4, stream_order="mariodoebler")
    batches = list(bench)
    assert bench.visit_sizes() == [(None, 15)] * 3
    assert len(bench) == len(batches) == 12
    assert bench.num_images == 45
    assert "(mariodoebler order)" in bench.describe()
    for setting in ("mixed", "reset_each_shift", "gradual"):
        b = _bench(setting, [4, 2], include_clean=True, stream_order="mariodoebler")
        whole = [(x.index, x.reset, _read(x)) for x in b]
        shards = sorted(
            (x.index, x.reset, _read(x)) for r in range(3) for x in b.batches(rank=r, world_size=3)
        )
        assert shards == whole


def test_with_one_severity_mariodoebler_gives_the_default_stream_except_gradual_revisits():
    for setting in ("episodic", "reset_each_shift", "continual", "mixed"):
        a, b = (_bench(setting, [5], shuffle=True, stream_order=o) for o in STREAM_ORDERS)
        assert [(x.reset, _read(x), list(x.domain_ids)) for x in a] == [
            (x.reset, _read(x), list(x.domain_ids)) for x in b
        ]


# ---------------------------------------------------------------------------------------------- options


def test_stream_order_is_checked_and_passed_through_from_config():
    with pytest.raises(UnknownNameError, match="stream_order 'upstream'.*tttlab, mariodoebler"):
        _bench("continual", [5], stream_order="upstream")
    cfg = {"name": "digits_c", "corruptions": ["fog"], "setting": "gradual", "severities": [4, 2]}
    assert from_config({**cfg, "stream_order": "mariodoebler"}).schedule() != from_config(cfg).schedule()
    assert [str(d) for d in from_config({**cfg, "stream_order": "mariodoebler"}).schedule()] == [
        "fog-4",
        "fog-2",
    ]
    assert BenchmarkConfig().stream_order == "tttlab"


def test_the_default_stream_order_keeps_a_configs_hash():
    bench = {"name": "mnist_c", "setting": "gradual", "severities": [5]}
    assert config_hash({"benchmark": {**bench, "stream_order": "tttlab"}}) == config_hash(
        {"benchmark": bench}
    )
    assert config_hash({"benchmark": {**bench, "stream_order": "mariodoebler"}}) != config_hash(
        {"benchmark": bench}
    )


def test_shift_names_what_reset_each_shift_follows():
    bench = _bench("reset_each_shift", [4, 2], include_clean=True, stream_order="mariodoebler")
    assert [bench.shift(d) for d in bench.schedule()] == [None, "fog", "fog", "contrast", "contrast"]
    default = _bench("reset_each_shift", [4, 2])
    assert [default.shift(d) for d in default.schedule()] == default.schedule()
