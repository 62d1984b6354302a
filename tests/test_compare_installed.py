"""The main job over the real subpackages: ``make demo``'s comparison in the ``smoke`` profile.

Runs :func:`tttlab.core.demo.main` in the smoke profile on one method of the demo set per installed
subpackage (jobs=2) and checks that every one ran, that the table, ``results.csv``,
``summary.csv`` and ``report.md`` agree with the run directories' records, and that a second run
recomputes nothing.  Skipped where no subpackage is installed (the core-only environment).
"""

from __future__ import annotations

import os
import time

import pandas as pd
import pytest

from tttlab.core import compare as cmp
from tttlab.core.records import load_records

CONFIG = cmp.load_config([])
DEMO_SPECS, UNAVAILABLE = cmp.resolve_methods(CONFIG["methods"])
# one method of the demo set per installed subpackage (an adapting one, not the baseline): the whole demo
# set in the smoke profile would take minutes on 2 cores.  The JAX method first: compare starts the tasks in
# this order, jobs=2, and MTTT's cold XLA compiles (20-35 s on 2 cores) take about as long as the four torch
# tasks together; started last, it ran alone after them (the demo fixture on the shared 2-core machine:
# 52 s -> 43 s at load ~4, 31 s -> 29.5 s at load ~2).
SPECS = sorted(
    list(
        {
            s.package: s
            for s in reversed(DEMO_SPECS)
            if s.name != CONFIG["baselines"].get(s.package)
            or len([d for d in DEMO_SPECS if d.package == s.package]) == 1
        }.values()
    )[::-1],
    key=lambda s: s.framework != "jax",
)
METHODS = "methods=[" + ",".join(s.name for s in SPECS) + "]"

pytestmark = pytest.mark.skipif(not SPECS, reason="no subpackage with a method of the demo set is installed")

# The JAX evaluate subprocesses of this module run under the XLA settings of MTTT's tests (core's
# testing.fast_xla_compiles_for_tests, environment variables only): their persistent compilation cache (the
# second comparison, the label-correlated stream, loads the ``predict`` program the first one compiled; JAX
# keys each entry by the program, the JAX/XLA version, the flags and the device, so a hit is the same
# executable) and XLA:CPU's backend optimisation level 0 (the smoke model's cold compiles, most of MTTT's
# time here; no check of this module depends on the last bits of its accuracies: every comparison of two
# runs is of runs under the same flags).  Set for this module only, and put back after it (a top-level
# tests/conftest.py clashed with mttt_jax's tests/conftest.py in one pytest session).
XLA_ENV_KEYS = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "XLA_FLAGS")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def fast_xla_compiles():
    from tttlab.core.testing import fast_xla_compiles_for_tests

    before = {key: os.environ.get(key) for key in XLA_ENV_KEYS}
    fast_xla_compiles_for_tests()
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from tttlab.core import demo

    out = tmp_path_factory.mktemp("demo") / "demo_out"
    t0 = time.perf_counter()
    status = demo.main(["--out", str(out), "profile=smoke", "jobs=2", "progress=false", METHODS])
    seconds = time.perf_counter() - t0
    config = cmp.load_config([f"out_dir={out}", "profile=smoke", "jobs=2"])
    return out, status, seconds, config


def test_every_installed_demo_method_runs(demo):
    out, status, seconds, config = demo
    report = (out / "report.md").read_text()
    failed = report.split("## Failed")[1].split("\n## ")[0] if "## Failed" in report else ""
    assert failed == "", f"failed methods (smoke profile):\n{failed}"
    assert status == 0
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["method"].unique()) == sorted(s.name for s in SPECS)
    runs = report.split("## Runs")[1].split("## Command")[0]
    print(f"smoke comparison of {len(SPECS)} methods in {seconds:.0f} s:\n{runs}")
    assert seconds < 240, f"the smoke comparison took {seconds:.0f} s:\n{runs}"


def test_files_agree_with_the_records(demo):
    out, _, _, config = demo
    results = pd.read_csv(out / "results.csv")
    for spec in SPECS:
        mine = results[results["method"] == spec.name]
        root = next((out / "runs").glob(f"*/{spec.name}/reset_each_shift/seed0"))
        recs = load_records(root, metric="accuracy")
        recs = recs[recs["corruption"].isin(config["corruptions"])]
        want = {(r.corruption, int(r.severity)): r.value for r in recs.itertuples()}
        got = {(r.corruption, int(r.severity)): r.accuracy for r in mine.itertuples()}
        assert got == want
    summary = pd.read_csv(out / "summary.csv")
    text = (out / "report.md").read_text()
    for row in summary.itertuples():
        mine = results[results["method"] == row.method]
        assert row.mean == pytest.approx(mine.groupby("corruption")["accuracy"].mean().mean())
        assert f"| {row.method} |" in text
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {row.method} |"))
        assert f"{100 * row.mean:.1f}" in line
    for name in ("heatmap", "bars"):
        assert (out / f"{name}.png").exists() and (out / f"{name}.svg").exists()


@pytest.fixture(scope="module")
def second_run(demo):
    """The demo's methods compared again in its folder: ``(results.csv before, after, the tasks)``.  Both
    test_second_run_recomputes_nothing and ``reordered`` (its i.i.d. default: another test may write
    another comparison's results.csv later) read it; it was a comparison each (their task start-ups and
    figures, ~3-6 s on 2 cores)."""
    out, _, _, _ = demo
    before = pd.read_csv(out / "results.csv")
    ran = list(before["method"].unique())  # (the ones that failed would run again)
    result = cmp.compare({"methods": ran, "out_dir": str(out), "profile": "smoke", "progress": False, "jobs": 2},
                         echo=lambda *a: None)  # fmt: skip
    return before, pd.read_csv(out / "results.csv"), result.tasks


def test_second_run_recomputes_nothing(second_run):
    before, after, tasks = second_run
    assert {t.status for t in tasks} == {"resumed"}
    pd.testing.assert_frame_equal(before, after)


#: Methods whose prediction for an image depends on that image only (torch_ttt's unadapted source model,
#: TTT-MAE, TPT, MTTT, the pi-nets): the order of the stream and which images share a batch change nothing.
PER_IMAGE = ("torch_ttt.source", "ttt_mae.ttt", "memo_tpt.tpt", "mttt_jax.mttt_mlp", "pilimit.inf_pinet")
#: Test-batch normalisation: a batch of one class has other statistics than an i.i.d. batch.
BATCH_STATISTICS = ("torch_ttt.bn",)


@pytest.fixture(scope="module")
def reordered(demo, second_run):
    """One comparison that sends both stream keys through every installed subpackage's evaluate (one method per
    subpackage, those the demo ran): ``dirichlet_delta=0`` (each domain sorted by class) and
    ``stream_order=mariodoebler``.  Both tests below read it (a comparison per key ran 4-5 more evaluate
    subprocesses, 8-20 s each on 2 cores: imports, the embedded MNIST, the evaluate): at one severity in
    ``reset_each_shift`` the mariodoebler order is the default stream batch for batch (core's
    test_with_one_severity_mariodoebler_gives_the_default_stream_except_gradual_revisits), and a per-image
    method's accuracies do not depend on the order at all.  Returns the i.i.d. default's results (resumed from
    the demo's records: another test may have written another comparison's results.csv since), the reordered
    comparison's results, its report and its tasks."""
    out, _, _, _ = demo
    before = second_run[1]
    ran = [m for m in (*BATCH_STATISTICS, *PER_IMAGE) if m in set(before["method"])]
    assert ran, "the demo ran none of the chosen methods"
    base = {"methods": ran, "out_dir": str(out), "profile": "smoke", "progress": False, "jobs": 2}
    result = cmp.compare({**base, "dirichlet_delta": 0, "stream_order": "mariodoebler"}, echo=lambda *a: None)
    return before, pd.read_csv(out / "results.csv"), (out / "report.md").read_text(), result.tasks


def accuracies(results, name):
    return results[results["method"] == name].set_index(["corruption", "severity"])["accuracy"].sort_index()


def test_label_correlated_stream_changes_batch_statistics_only(reordered):
    """``dirichlet_delta=0`` (each domain sorted by class) through every installed subpackage's evaluate:
    methods that treat each image on its own (torch_ttt's unadapted source model, TTT-MAE, TPT, MTTT, the
    pi-nets; one per subpackage) give exactly the accuracies of the i.i.d. stream on the same images;
    test-batch normalisation (torch_ttt.bn, where the demo set has it) does not."""
    before, after, report, tasks = reordered
    assert {t.status for t in tasks} == {"ok"}, [
        (t.spec.name, t.status, t.error, t.stderr_tail) for t in tasks
    ]
    assert "label-correlated (dirichlet_delta=0)" in report
    for t in tasks:
        name = t.spec.name
        if name in BATCH_STATISTICS:
            assert not accuracies(before, name).equals(accuracies(after, name)), (
                "test-batch statistics of one-class batches change the predictions"
            )
        else:  # PER_IMAGE
            pd.testing.assert_series_equal(accuracies(before, name), accuracies(after, name), obj=name)


def test_mariodoebler_stream_order_reaches_every_evaluate(reordered):
    """``stream_order=mariodoebler`` through every installed subpackage's evaluate (each config takes the
    key; one method per subpackage): at one severity in ``reset_each_shift`` that order's stream is the
    default one, batch for batch and reset for reset, so each per-image method gives exactly the default
    run's accuracies (in its own run folder), also on the label-sorted stream it shares with the test above
    (torch_ttt.bn takes the key too; its accuracies move with the label-sorted batches, checked there)."""
    before, after, report, tasks = reordered
    assert {t.status for t in tasks} == {"ok"}, [
        (t.spec.name, t.status, t.error, t.stderr_tail) for t in tasks
    ]
    assert {t.spec.package for t in tasks} == {s.package for s in SPECS}, "every subpackage's evaluate"
    assert "stream_order mariodoebler" in report
    for t in tasks:
        if t.spec.name in PER_IMAGE:
            pd.testing.assert_series_equal(accuracies(before, t.spec.name), accuracies(after, t.spec.name),
                                           obj=t.spec.name)  # fmt: skip
