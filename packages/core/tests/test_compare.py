"""tttlab.core.compare with fake methods (compare_fake_methods.run, in evaluate subprocesses).

Checks that every method yields records, that the printed table, results.csv, summary.csv and report.md
agree with the records, that a resumed run recomputes nothing (evaluate calls are counted), that a
crashing method is reported with its stderr while the others' results stay, that several seeds give a
mean and a sample std, that the continual and mixed settings work (a stream is resumed as a whole), and
that a method of a subpackage that is not installed gives its install command.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tttlab.core import compare as cmp
from tttlab.core import registry
from tttlab.core.errors import ConfigError, DatasetLayoutError, DatasetNotFoundError, UnknownNameError
from tttlab.core.records import load_records

HERE = Path(__file__).resolve().parent
FAKE = ["fake.alpha", "fake.beta", "fake.crash", "fake.empty"]
CORR = ["gaussian_noise", "fog"]

sys.path.insert(0, str(HERE))  # the subprocesses get it through PYTHONPATH (fixture env)
import compare_fake_methods as fm  # noqa: E402

sys.path.remove(str(HERE))


def _spec(name: str):
    return registry.register(dict(name=name, package="fake", framework="numpy",
                                  evaluate="compare_fake_methods:run", paper="a fake"))  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Fake methods registered, the fake module importable by subprocesses, a call counter."""
    tmp = tmp_path_factory.mktemp("compare")
    calls = tmp / "calls.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("TTTLAB_FAKE_CALLS", str(calls))
        mp.setitem(registry.KNOWN_PACKAGES, "notapkg", "tttlab-notapkg")
        for name in FAKE:
            _spec(name)
        yield {"tmp": tmp, "calls": calls}
        for name in FAKE:
            registry.unregister(name)


def base_config(out: Path, **kw):
    c = {
        "methods": ["fake.*", "notapkg.method"], "benchmark": "digits_c", "profile": "smoke",
        "corruptions": CORR, "num_examples": 40, "batch_size": 20, "out_dir": str(out), "jobs": 2,
        "progress": False,
        "overrides": {"fake.crash": {"fake": {"crash": True}}, "fake.empty": {"fake": {"no_records": True}}},
    }  # fmt: skip
    c.update(kw)
    return c


@pytest.fixture
def no_plots(monkeypatch):
    """compare without its figures, for the tests that read none: the heatmap and the bars (PNG + SVG)
    took about a quarter of this file's time, and a plotting error is only echoed (compare keeps the
    table), which these tests discard.  The figures are checked on ``first``
    (test_files_agree_with_the_records) and on the several-settings table in
    test_continual_and_mixed_settings; the real function is returned."""
    real = cmp.write_plots
    monkeypatch.setattr(cmp, "write_plots", lambda *args, **kwargs: [])
    return real


def calls(env) -> list[dict]:
    f = env["calls"]
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


@pytest.fixture(scope="module")
def first(env):
    out = env["tmp"] / "cmp"
    n0 = len(calls(env))
    result = cmp.compare(base_config(out), echo=lambda *a: None)
    return result, calls(env)[n0:]


def test_every_method_yields_records_and_failures_are_reported(first):
    result, made = first
    assert sorted(c["method"] for c in made) == sorted(FAKE)
    status = {t.spec.name: t.status for t in result.tasks}
    assert status == {"fake.alpha": "ok", "fake.beta": "ok", "fake.crash": "failed", "fake.empty": "failed"}
    assert set(result.results["method"]) == {"fake.alpha", "fake.beta"}
    for m in ("fake.alpha", "fake.beta"):
        rows = result.results[result.results["method"] == m]
        assert sorted(rows["corruption"]) == sorted(CORR) and (rows["n"] == 40).all()
    crash = next(t for t in result.tasks if t.spec.name == "fake.crash")
    assert "boom in fake.crash" in crash.stderr_tail and "about to fail" in crash.stderr_tail
    empty = next(t for t in result.tasks if t.spec.name == "fake.empty")
    assert "no accuracy records" in empty.error
    report = result.report.read_text()
    assert "## Failed" in report and "RuntimeError: boom in fake.crash" in report
    assert "fake.empty" in report.split("## Failed")[1]
    # the package that is not installed: its install command, not a crash
    (u,) = result.unavailable
    assert u.name == "notapkg.method" and u.reason == "not installed"
    assert "pip install -c constraints.txt -e packages/notapkg" in u.message
    assert "pip install -c constraints.txt -e packages/notapkg" in report


def test_files_agree_with_the_records(first):
    result, _ = first
    out = result.out_dir
    csv = pd.read_csv(out / "results.csv")
    # results.csv holds exactly the accuracy records of the run directories
    recs = []
    for t in result.tasks:
        if t.status == "ok":
            df = load_records(t.root, metric="accuracy")
            recs += [(r.method, r.corruption, int(r.severity), r.value, int(r.n)) for r in df.itertuples()
                     if r.corruption != "mean"]  # fmt: skip
    got = [(r.method, r.corruption, int(r.severity), r.accuracy, int(r.n)) for r in csv.itertuples()]
    assert sorted(got) == sorted(recs)
    for r in csv.itertuples():  # and they are what the fake evaluate computed
        assert r.accuracy == fm.accuracy(r.method, r.setting, r.seed, r.corruption, r.severity)
        assert r.s_per_image == pytest.approx(0.001)
    summary = pd.read_csv(out / "summary.csv")
    report = result.report.read_text()
    for row in summary.itertuples():
        mine = csv[csv["method"] == row.method]
        assert row.mean == pytest.approx(mine["accuracy"].mean())
        assert row.gaussian_noise == pytest.approx(
            mine.loc[mine["corruption"] == "gaussian_noise", "accuracy"].item()
        )
        assert row.s_per_image == pytest.approx(mine["s_per_image"].mean())
        cells = [f"{100 * mine.loc[mine['corruption'] == c, 'accuracy'].item():.1f}" for c in CORR]
        mean = f"{100 * mine['accuracy'].mean():.1f}"
        line = next(ln for ln in report.splitlines() if ln.startswith(f"| {row.method} |"))
        assert [c.strip().strip("*") for c in line.strip("|").split("|")] == [
            row.method, *cells, mean, "—", "1.00", "40",
        ]  # fmt: skip
        printed = next(ln for ln in result.text.splitlines() if ln.strip().startswith(row.method))
        assert printed.split() == [row.method, *cells, mean, "—", "1.00"]
    for name in ("heatmap", "bars"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.svg").stat().st_size > 0
    assert "tttlab-compare" in report.split("## Command")[1]


def test_resumed_run_recomputes_nothing(env, first, no_plots):
    result, _ = first
    n0 = len(calls(env))
    cfg = base_config(result.out_dir, methods=["fake.alpha", "fake.beta"])
    again = cmp.compare(cfg, echo=lambda *a: None)
    assert calls(env)[n0:] == []
    assert {t.status for t in again.tasks} == {"resumed"}
    pd.testing.assert_frame_equal(again.results, result.results[result.results["method"] != "x"])
    # one more corruption: only that domain is computed, the others are reused
    cfg["corruptions"] = [*CORR, "contrast"]
    more = cmp.compare(cfg, echo=lambda *a: None)
    made = calls(env)[n0:]
    assert sorted(c["method"] for c in made) == ["fake.alpha", "fake.beta"]
    assert all(c["corruptions"] == ["contrast"] for c in made)
    assert len(more.results) == 2 * 3
    old = more.results[more.results["corruption"] != "contrast"].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, result.results.reset_index(drop=True))


def test_changed_method_code_is_recomputed(env, monkeypatch, no_plots):
    out = env["tmp"] / "code"
    cfg = base_config(out, methods=["fake.alpha"], overrides={})
    n0 = len(calls(env))
    cmp.compare(cfg, echo=lambda *a: None)
    assert len(calls(env)) == n0 + 1
    assert cmp.code_fingerprint(_spec("fake.alpha"))  # the fake module's file is found and hashed
    cmp.compare(cfg, echo=lambda *a: None)  # same code: resumed
    assert len(calls(env)) == n0 + 1
    monkeypatch.setattr(cmp, "code_fingerprint", lambda spec: "edited")  # e.g. a retuned profile YAML
    again = cmp.compare(cfg, echo=lambda *a: None)
    assert len(calls(env)) == n0 + 2 and [t.status for t in again.tasks] == ["ok"]
    assert len(again.results) == len(CORR)  # the stale part's records are not mixed in


def test_code_fingerprint_follows_code_and_config_files(tmp_path, monkeypatch):
    pkg = tmp_path / "tttlab_fp_pkg"
    (pkg / "conf").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "evaluate.py").write_text("def run(cfg=None):\n    pass\n")
    (pkg / "conf" / "profile.yaml").write_text("lr: 0.1\n")
    (pkg / "README.md").write_text("notes\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from tttlab.core.registry import MethodSpec

    spec = MethodSpec(name="fp.m", package="fp", framework="numpy", evaluate="tttlab_fp_pkg.evaluate:run")

    def fp():
        return cmp.code_fingerprint(spec)

    first = fp()
    assert len(first) == 16
    (pkg / "README.md").write_text("other notes\n")  # documentation does not change the numbers
    assert fp() == first
    (pkg / "conf" / "profile.yaml").write_text("lr: 0.2\n")
    second = fp()
    assert second != first
    (pkg / "evaluate.py").write_text("def run(cfg=None):\n    return 1\n")
    assert fp() not in (first, second)
    assert "tttlab_fp_pkg" not in sys.modules  # located, never imported
    missing = MethodSpec(name="fp.x", package="fp", framework="numpy", evaluate="no_such_module_xyz:run")
    assert cmp.code_fingerprint(missing) == ""
    # the core's code computes the streams, subsets and metrics too: an edited core is other code as well
    now = fp()
    real = cmp.source_fingerprint
    monkeypatch.setattr(
        cmp, "source_fingerprint", lambda top: "edited" if top == "tttlab.core" else real(top)
    )
    assert fp() != now and len(fp()) == 16


def test_several_seeds_give_mean_and_spread(env, no_plots):
    out = env["tmp"] / "seeds"
    cfg = base_config(out, methods=["fake.alpha"], seeds=[0, 1, 2], overrides={})
    result = cmp.compare(cfg, echo=lambda *a: None)
    per_seed = [
        np.mean([fm.accuracy("fake.alpha", "reset_each_shift", s, c, 5) for c in CORR]) for s in (0, 1, 2)
    ]
    (row,) = result.table.to_dict("records")
    assert row["seeds"] == 3
    assert row["mean"] == pytest.approx(np.mean(per_seed))
    assert row["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert (
        f"{100 * np.mean(per_seed):.1f} ± {100 * np.std(per_seed, ddof=1):.1f}" in result.report.read_text()
    )
    assert sorted(result.results["seed"].unique()) == [0, 1, 2]


def test_continual_and_mixed_settings(env, no_plots):
    out = env["tmp"] / "settings"
    cfg = base_config(
        out, methods=["fake.alpha"], setting=["continual", "mixed"], overrides={}, severities=[3, 5]
    )
    n0 = len(calls(env))
    result = cmp.compare(cfg, echo=lambda *a: None)
    assert [(c["setting"], c["corruptions"]) for c in calls(env)[n0:]] == [
        ("continual", CORR),
        ("mixed", CORR),
    ]
    assert list(result.table["setting"]) == ["continual", "mixed"]
    for r in result.results.itertuples():
        assert r.accuracy == fm.accuracy("fake.alpha", r.setting, 0, r.corruption, r.severity)
    assert len(result.results) == 2 * 2 * 2
    assert "fake.alpha · continual" in result.text and "fake.alpha · mixed" in result.text
    # the figures of a several-settings table (rows labelled method · setting); compare ran without them
    figures = no_plots(result.results, result.table, result.config, out)
    assert [p.name for p in figures] == ["heatmap.png", "bars.png"]
    assert all((out / f"{p.stem}.{ext}").stat().st_size > 0 for p in figures for ext in ("png", "svg"))
    # several severities: the corruption columns average them; the report has a per-severity table
    row = result.table.iloc[0]
    want = np.mean([fm.accuracy("fake.alpha", "continual", 0, "fog", s) for s in (3, 5)])
    assert row["fog"] == pytest.approx(want)
    at3 = np.mean([fm.accuracy("fake.alpha", "continual", 0, c, 3) for c in CORR])
    assert f"| fake.alpha · continual | {100 * at3:.1f} |" in result.report.read_text()
    # resumed: nothing; a longer stream: the whole stream again (its domains are not independent)
    n1 = len(calls(env))
    cmp.compare(cfg, echo=lambda *a: None)
    assert calls(env)[n1:] == []
    cfg["corruptions"] = [*CORR, "contrast"]
    longer = cmp.compare(cfg, echo=lambda *a: None)
    assert [c["corruptions"] for c in calls(env)[n1:]] == [[*CORR, "contrast"]] * 2
    assert len(longer.results) == 2 * 3 * 2


def test_the_next_task_starts_when_one_ends_not_at_a_polling_tick(monkeypatch):
    """run_tasks started the next task only at its loop's next 0.2 s sleep: 20 evaluates that end at once,
    one job at a time, took at least 4 s (with the many short evaluates of these tests, a good part of this
    file's time).  Now a worker that ends wakes the loop; every task still runs exactly once, in order, never
    two at a time with jobs=1."""
    import threading
    import time
    from types import SimpleNamespace

    order, active, overlap = [], [], []
    lock = threading.Lock()

    def instant(task, c, stop=None):
        with lock:
            active.append(task)
            overlap.append(len(active))
        order.append(task.seed)
        task.status, task.seconds = "ok", 0.0
        with lock:
            active.remove(task)

    monkeypatch.setattr(cmp, "run_task", instant)
    spec = SimpleNamespace(name="fake.alpha", package="fake")
    tasks = [cmp.Task(spec=spec, setting="episodic", seed=k, root=Path("."), corruptions=["fog"], severities=[5],
                      todo=[("fog", 5)]) for k in range(20)]  # fmt: skip
    t0 = time.perf_counter()
    cmp.run_tasks(tasks, {"jobs": 1, "progress": False}, echo=lambda *a: None)
    seconds = time.perf_counter() - t0
    assert order == list(range(20)) and max(overlap) == 1
    assert {t.status for t in tasks} == {"ok"}
    assert seconds < 2.0, f"20 instant tasks took {seconds:.1f} s (0.2 s ticks: >= 4 s)"


def test_timeout_is_a_failure(env):
    cfg = base_config(env["tmp"] / "timeout", methods=["fake.alpha"], timeout_s=0.5,
                      overrides={"fake.alpha": {"fake": {"sleep": 30}}})  # fmt: skip
    result = cmp.compare(cfg, echo=lambda *a: None)
    (t,) = result.tasks
    assert t.status == "failed" and "timed out" in t.error and t.seconds < 20
    assert result.text == "no results"


def test_a_key_under_a_node_the_config_lacks_lists_the_top_level_keys():
    """compare hands validate() a key it cannot place as one dotted key ('optimization.lr', an evaluate's
    key given to compare): the line listed the keys of the node 'optimization', which has none ("known keys
    in 'optimization': ", nothing after it).  Now the deepest node the schema has: the top, or the node on
    the way."""
    from tttlab.core.config import RunConfig, validate

    top = ", ".join(f.name for f in dataclasses.fields(cmp.CompareConfig))
    with pytest.raises(ConfigError) as info:
        cmp.load_config(["optimization.lr=1"])
    assert str(info.value) == f"unknown config key 'optimization.lr' (known keys: {top})"
    with pytest.raises(ConfigError) as info:
        validate({"logging.foo.bar": 1}, RunConfig)  # below logging, which the schema has: its keys
    line = "unknown config key 'logging.foo.bar' (known keys in 'logging': progress, level)"
    assert str(info.value) == line


@pytest.mark.parametrize(
    "argv, line",
    [
        # a mapping key given a list: it said "bad override ++overrides=[1]: Error merging override
        # ++overrides=[1]" (the '++' compare adds, and no reason)
        (["overrides=[1]"], "bad override overrides=[1]: Error merging override overrides=[1] (Cannot merge "
         "DictConfig with ListConfig)"),
        # words the shell split: it said "bad override seeds=[0,: no viable alternative at input '[0,'"
        (["seeds=[0,", "1]"], "'seeds=[0, 1]': a space inside a value; quote the override (\"seeds=[0, 1]\") or "
         "drop the space"),
        (["seeds=", "1"], "'seeds= 1': a space after '='; give seeds=1 (one word, or quoted)"),
    ],
)  # fmt: skip
def test_a_refused_override_is_named_as_the_command_line_gave_it(argv, line):
    """tttlab-compare's own refusals say what the Hydra commands say (core README, ``errors, cli``)."""
    with pytest.raises(ConfigError) as info:
        cmp.load_config(argv)
    assert str(info.value) == line


def test_config_errors_and_method_names(env, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'seeds'"):
        cmp.load_config(["seds=[1]"])
    with pytest.raises(ConfigError, match="setting"):
        cmp.load_config(["setting=sideways"])
    with pytest.raises(ConfigError, match="profile"):
        cmp.load_config(["profile=huge"])
    with pytest.raises(ConfigError, match="severities"):
        cmp.load_config(["severities=[6]"])
    with pytest.raises(ConfigError, match=r"'timeout_s'=-1.*positive"):
        cmp.load_config(["timeout_s=-1"])
    with pytest.raises(ConfigError, match=r"'device'='cdua'.*cuda:N"):
        cmp.load_config(["device=cdua"])
    assert cmp.load_config(["device=cuda:1"])["device"] == "cuda:1"
    c = cmp.load_config(["--jobs", "3", "methods=fake.*", "profile=quick", "seeds=[2,1,2]"])
    assert c["jobs"] == 3 and c["methods"] == ["fake.*"] and c["seeds"] == [2, 1]
    # a bare --key is true only for a true/false key; another key without its value is named (was "invalid
    # value True" from the schema)
    assert cmp.load_config(["--progress", "methods=fake.*"])["progress"] is True
    for argv in (["--jobs"], ["--jobs", "--progress"], ["--out-dir", "profile=quick"]):
        with pytest.raises(ConfigError, match=rf"^{argv[0]} needs a value: {argv[0]} VALUE or \w+=VALUE"):
            cmp.load_config(argv)
    # a mistyped --list / --help / key is an unknown option with a did-you-mean (was "--lst needs a value")
    for argv, close in (
        (["--lst"], "--list"),
        (["--hlep"], "--help"),
        (["--seds"], "--seeds"),
        (["--jbos"], "--jobs"),
    ):
        with pytest.raises(
            ConfigError, match=rf"^unknown option {argv[0]} \(did you mean {close}\?\): .* out_dir,"
        ):
            cmp.load_config(argv)
    # a Hydra command's -m (a sweep): was "bad override in ['-m', 'seeds=1,2']: LexerNoViableAltException: -m"
    with pytest.raises(
        ConfigError, match=r"^-m: tttlab-compare takes key=value .* no Hydra option; .*'seeds=\[0,1,2\]'"
    ):
        cmp.load_config(["-m", "seeds=1,2"])
    # an override Hydra refuses is named alone (was "bad override in [<every override>]: invalid literal for
    # int() with base 10: 'x'"), a list key indexed by a name with how a list is given
    with pytest.raises(ConfigError, match=r"^bad override seeds\.x=1: seeds is a list \(now \[0\]\), not a "):
        cmp.load_config(["profile=quick", "seeds.x=1"])
    assert cmp.load_config(["seeds.0=4"])["seeds"] == [4]
    # ... after the overrides before it: seeds.2=3 indexes the list seeds=[0,1,2] gave (it was named the bad one)
    with pytest.raises(ConfigError, match=r"^bad override methods\.x=a: methods is a list \(now \["):
        cmp.load_config(["seeds=[0,1,2]", "seeds.2=3", "methods.x=a"])
    assert cmp.load_config(["seeds=[0,1,2]", "seeds.2=3"])["seeds"] == [0, 1, 3]
    assert c["num_examples"] == c["profiles"]["quick"]["num_examples"] and len(c["corruptions"]) == 15
    specs, missing = cmp.resolve_methods(["fake.alpha", "fake.b*", "alpha"])
    assert [s.name for s in specs] == ["fake.alpha", "fake.beta"] and missing == []
    with pytest.raises(UnknownNameError, match="did you mean 'fake.alpha'"):
        cmp.resolve_methods(["fake.alpah"], strict=True)
    assert cmp.resolve_methods(["fake.alpah"])[1][0].reason == "unknown"
    # the CLI: a configuration error is exit status 2 with the message, no traceback
    assert cmp.main(["seds=[1]", f"out_dir={tmp_path}"]) == 2
    # bad-input audit: TypeErrors from the severities check, an empty run, values silently ignored, and
    # NotADirectoryError / FileExistsError from a file where a directory belongs
    (tmp_path / "a_file").write_text("x")
    for override, needle in (
        ('severities=["5"]', r"'severities'=\['5'\]"),
        ("corruptions=[]", "'corruptions'=.* is empty"),
        ("root=/data/mnist", "'root'='/data/mnist': benchmark 'mnist_c' is embedded"),
        ("baselines={fake:other.alpha}", "'baselines.fake'='other.alpha'"),
        ("dirichlet_delta=-1", r"config key dirichlet_delta=-1\.0; expected null .*0 \(sorted by class\)"),
        (f"out_dir={tmp_path / 'a_file' / 'out'}", "'out_dir'=.*a_file is a file"),
        (f"cache_dir={tmp_path / 'a_file'}", "'cache_dir'=.*a_file is a file"),
    ):
        with pytest.raises(ConfigError, match=needle):
            cmp.load_config([override])
    assert cmp.load_config(["severities=5"])["severities"] == [5]
    # a benchmark read from disk without its files: refused before any method runs (each method's
    # subprocess used to fail on it in turn, and the report listed them all as failed)
    with pytest.raises(DatasetNotFoundError, match="needs root"):
        cmp.load_config(["benchmark=cifar10_c"])
    with pytest.raises(DatasetNotFoundError, match=r"nowhere does not exist; expected .*CIFAR-10-C"):
        cmp.load_config(["benchmark=cifar10_c", f"root={tmp_path / 'nowhere'}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="ImageNet-C/<corruption>"):
        cmp.load_config(["benchmark=imagenet_c", f"root={tmp_path / 'empty'}"])
    cfg = base_config(
        tmp_path / "typo", methods=["fake.alpha"], overrides={"fake.alpah": {"fake": {"sleep": 1}}}
    )
    with pytest.raises(
        ConfigError, match=r"'overrides.fake.alpah' matches no method; did you mean 'fake.alpha'"
    ):
        cmp.compare(cfg, echo=lambda *a: None)
    # a misspelt baseline of an installed subpackage: every gain of it was silently blank
    cfg = base_config(tmp_path / "typo_base", methods=["fake.alpha"], baselines={"fake": "fake.alpah"})
    with pytest.raises(
        ConfigError, match=r"'baselines.fake'='fake.alpah' is no installed method; did you mean 'fake.alpha'"
    ):
        cmp.compare(cfg, echo=lambda *a: None)
    assert not (tmp_path / "typo_base").exists()


def test_an_out_dir_that_cannot_be_made_is_a_config_error(env, tmp_path, monkeypatch, capsys):
    """An empty ``out_dir`` / ``cache_dir`` (an unset ``$VAR``) wrote everything into the working directory,
    and one that cannot be created (no permission) ended in a PermissionError traceback.  ``env``: fake.alpha
    is registered (without it, run alone or first in a shuffled order, the method was unknown)."""
    for key in ("out_dir", "cache_dir"):
        with pytest.raises(ConfigError, match=f"'{key}' is empty"):
            cmp.load_config([f"out_dir={tmp_path / 'out'}", f"{key}="])
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    for args in (
        [f"out_dir={tmp_path / 'locked'}"],
        [f"out_dir={tmp_path / 'o'}", f"cache_dir={tmp_path / 'locked'}"],
    ):
        assert cmp.main(["methods=[fake.alpha]", *args]) == 2
        err = capsys.readouterr().err
        assert "locked'" in err and "cannot create this directory" in err and "Permission denied" in err, err
    from tttlab.core import demo

    assert demo.main(["--no-compare", "--out", str(tmp_path / "locked")]) == 2
    assert "'out_dir'=" in capsys.readouterr().err


def test_plain_table_without_rich(first, monkeypatch):
    result, _ = first
    monkeypatch.setitem(__import__("sys").modules, "rich", None)
    text = cmp.format_table(result.table, result.config)
    assert "─" not in text
    header, rows = cmp.table_rows(result.table, result.config, short=True)
    for r in rows:
        assert re.search(r"\s+".join(map(re.escape, r)), text)
    assert not math.isnan(result.table["mean"].iloc[0])


def test_compare_imports_no_framework():
    import subprocess

    code = (
        "import sys\nfrom tttlab.core import compare\ncompare.load_config([])\n"
        "compare.resolve_methods(compare.load_config([])['methods'])\n"
        "print(','.join(m for m in ('torch', 'jax', 'tensorflow') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""


def test_highlights_read_the_table():
    c = {"setting": ["reset_each_shift"], "corruptions": ["fog", "snow"], "baselines": {"p": "p.base"}}
    table = pd.DataFrame([
        {"method": "p.base", "package": "p", "setting": "reset_each_shift", "fog": 0.2, "snow": 0.6, "mean": 0.4,
         "delta": np.nan, "s_per_image": 0.001},
        {"method": "p.up", "package": "p", "setting": "reset_each_shift", "fog": 0.9, "snow": 0.5, "mean": 0.7,
         "delta": 0.3, "s_per_image": 0.01},
        {"method": "p.down", "package": "p", "setting": "reset_each_shift", "fog": 0.1, "snow": 0.5, "mean": 0.3,
         "delta": -0.1, "s_per_image": 0.002},
    ])  # fmt: skip
    lines = cmp.highlights(table, c)
    assert lines[0] == "Best mean accuracy: p.up (70.0%)."
    assert "p.up +30.0 (10.0 ms/image)" in lines[1] and "p.down -10.0 (2.00 ms/image)" in lines[2]
    assert lines[3] == "Largest gain on one corruption: p.up on fog, 20.0% -> 90.0% (+70.0)."
    # a per-image method that saw fewer images than its baseline says so next to its gain
    table["images"] = [40, 40, 8]
    lines = cmp.highlights(table, c)
    assert "p.up +30.0 (10.0 ms/image)" in lines[1]
    assert "p.down -10.0 (2.00 ms/image; 8 images per corruption against the baseline's 40)" in lines[2]
    # ... and so does the largest gain on one corruption when that method's is the largest
    table["images"] = [40, 8, 40]
    lines = cmp.highlights(table, c)
    assert lines[3] == (
        "Largest gain on one corruption: p.up on fog, 20.0% -> 90.0% "
        "(+70.0; 8 images per corruption against the baseline's 40)."
    )


DRIVER = """
import sys
from tttlab.core import compare, registry
registry.register(dict(name="fake.sleepy", package="fake", framework="numpy", evaluate="compare_fake_methods:run"))
sys.exit(compare.main(sys.argv[1:]))
"""


def test_terminated_comparison_stops_its_evaluates(env):
    import signal
    import subprocess
    import time

    out = env["tmp"] / "terminated"
    pid_file = out / "child.pid"
    args = [sys.executable, "-c", DRIVER, "methods=[fake.sleepy]", "benchmark=digits_c", "profile=smoke",
            f"out_dir={out}", "++overrides={fake.sleepy:{fake:{sleep:60}}}"]  # fmt: skip
    proc = subprocess.Popen(args, env={**os.environ, "TTTLAB_FAKE_PIDFILE": str(pid_file)})
    deadline = time.time() + 60
    while not pid_file.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the evaluate subprocess is gone too


def test_an_evaluate_whose_comparison_is_killed_ends_itself(tmp_path):
    """Kill audit: the evaluates run in sessions of their own, so after ``kill -9`` of the comparison they
    ran on as orphans, writing the parts that the comparison, started again, evaluated at the same time.
    Here the "evaluate" is ``time.sleep(60)`` under compare's RUNNER, its parent a stand-in comparison."""
    import subprocess
    import time

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"evaluate": "time:sleep", "config": 60}))
    parent = (
        "import os, subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', *sys.argv[1:4], str(os.getpid())], start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "p.wait()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent, cmp.RUNNER, str(job), str(tmp_path / "result.json")],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip

    def alive(pid: int) -> bool:  # a dead orphan may stay a zombie until init reaps it
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
        except OSError:  # no /proc (macOS)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            return True

    child = int(proc.stdout.readline())
    assert alive(child)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.time() + 10
    while alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the orphaned evaluate ended itself"
    assert not (tmp_path / "result.json").exists()


def test_list_cuts_a_long_description_at_a_word(monkeypatch):
    """``tttlab-compare --list`` cut a description longer than 100 characters mid-word ("(small MNIST CNN
    offl..."); it is cut at a space, marked " ...", within 100 characters; a short one stays whole."""
    from types import SimpleNamespace

    long = "MEMO: marginal entropy over AugMix views, BN prior N=16, one step per image (small MNIST CNN offline)"
    specs = [
        SimpleNamespace(name="x.long", framework="torch", description=long, paper="", package="x"),
        SimpleNamespace(
            name="x.short", framework="jax", description="", paper="a short paper title", package="x"
        ),
    ]
    monkeypatch.setattr(cmp, "installed_methods", lambda: (specs, {}))
    lines = cmp.list_text().splitlines()
    about = lines[0][len(f"{'x.long':40s} {'torch':6s} ") :]
    assert about.endswith(" ...") and len(about) <= 100, about
    assert long.startswith(about[: -len(" ...")] + " "), about  # whole words only
    assert (
        about
        == "MEMO: marginal entropy over AugMix views, BN prior N=16, one step per image (small MNIST CNN ..."
    )
    assert lines[1] == f"{'x.short':40s} {'jax':6s} a short paper title"


def test_help_into_a_closed_pipe_is_quiet():
    """`tttlab-compare --help | head` ended in a BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    try:
        res = subprocess.run(
            [sys.executable, "-c", "import sys; from tttlab.core.compare import main; sys.exit(main(['--help']))"],
            stdout=w, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(w)
    assert (res.returncode, res.stderr) == (141, ""), res.stderr  # 128 + SIGPIPE, as every tttlab command


@pytest.mark.parametrize(("s", "text"), [
    (0.0012, "1.20"), (0.012, "12.0"), (0.12, "120"), (1.2346, "1235"), (0.00001234, "0.0123"),
    (0.0099996, "10.00"), (None, "—"), (float("nan"), "—"),
])  # fmt: skip
def test_cost_column_keeps_three_significant_digits(s, text):
    assert cmp._fmt_cost(s) == text


def test_nothing_installed_says_so_once(env, tmp_path):
    lines = []
    result = cmp.compare(base_config(tmp_path, methods=["notapkg.method"]), echo=lines.append)
    assert result.tasks == [] and len(result.unavailable) == 1
    assert any(line.startswith("no method to run") for line in lines)
    assert not any("method(s) x" in line for line in lines), lines


def test_trained_models_are_cached_per_package_and_code_version(env, tmp_path):
    c = cmp.load_config([f"out_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}", "methods=fake.*"])
    spec = registry.get_method("fake.alpha")
    a, b = (cmp.Task(spec, "episodic", 0, tmp_path / "r", ["fog"], [5], [], fingerprint=f) for f in "ab")
    a2 = cmp.Task(spec, "continual", 1, tmp_path / "s", ["fog"], [5], [], fingerprint="a")
    for t in (a, b, a2):
        t.part = t.root / "part"
    dirs = [Path(cmp.evaluate_config(t, c)["cache_dir"]) for t in (a, b, a2)]
    assert dirs[0] != dirs[1] and dirs[0] == dirs[2]  # edited code retrains; same code is shared
    assert dirs[0].parent == (tmp_path / "cache" / "models").resolve() and dirs[0].name.startswith("fake-")
    # the benchmark's domains stay shared by every method and version
    assert (
        cmp.evaluate_config(a, c)["benchmark"]["cache_dir"]
        == cmp.evaluate_config(b, c)["benchmark"]["cache_dir"]
    )


# ----------------------------------------------------------------------------------------------------------
# the numbers of the table, from hand-made records (added by a mutation audit: the fake methods have no
# baseline, write s_per_image records and never leave a stale or an unwanted domain behind, so these
# paths were not checked)


def _results(rows):
    cols = ["method", "package", "framework", "setting", "seed", "corruption", "severity", "accuracy", "n",
            "wall_time_s", "s_per_image", "model"]  # fmt: skip
    return pd.DataFrame([dict(zip(cols, r)) for r in rows], columns=cols)


def test_summary_delta_is_gain_over_the_baseline_of_the_same_setting():
    c = {"corruptions": ["fog", "snow"], "baselines": {"p": "p.base"}}
    rows = []
    accs = {("p.base", "episodic"): (0.5, 0.7), ("p.up", "episodic"): (0.8, 0.6),
            ("p.base", "continual"): (0.2, 0.4), ("p.up", "continual"): (0.35, 0.45)}  # fmt: skip
    for (m, s), (fog, snow) in accs.items():
        rows += [(m, "p", "torch", s, 0, "fog", 5, fog, 10, 0.1, 0.01),
                 (m, "p", "torch", s, 0, "snow", 5, snow, 10, 0.3, 0.03)]  # fmt: skip
    table = cmp.summarize(_results([(*r, None) for r in rows]), c)
    got = {(r["method"], r["setting"]): r for r in table.to_dict("records")}
    assert got[("p.up", "episodic")]["delta"] == pytest.approx(0.7 - 0.6)
    assert got[("p.up", "continual")]["delta"] == pytest.approx(0.4 - 0.3)
    assert math.isnan(got[("p.base", "episodic")]["delta"])
    assert got[("p.up", "episodic")]["s_per_image"] == pytest.approx(0.02)  # mean of the rows'


def test_summary_mean_counts_only_seeds_with_every_corruption():
    c = {"corruptions": ["fog", "snow"], "baselines": {}}
    rows = [("m", "p", "torch", "episodic", 0, "fog", 5, 0.4, 10, 1.0, 0.1, None),
            ("m", "p", "torch", "episodic", 0, "snow", 5, 0.6, 10, 1.0, 0.2, None),
            ("m", "p", "torch", "episodic", 1, "fog", 5, 0.9, 10, 1.0, 0.6, None)]  # fmt: skip
    (row,) = cmp.summarize(_results(rows), c).to_dict("records")
    assert row["mean"] == pytest.approx(0.5) and row["seeds"] == 1  # seed 1 lacks snow
    assert row["fog"] == pytest.approx(0.65)
    assert row["s_per_image"] == pytest.approx(0.3)  # the mean cost of the rows (not their median)


def _write_part(part: Path, recs, mtime: float) -> None:
    from tttlab.core.records import RunDir

    with RunDir(part, {"p": str(part)}).writer(method="fake.alpha", package="fake", framework="numpy",
                                                model="m", dataset="digits_c", setting="episodic", seed=0) as w:  # fmt: skip
        for r in recs:
            w.write(**r)
    os.utime(part / "records.jsonl", (mtime, mtime))


def test_collect_newest_part_wins_only_wanted_domains_and_derived_cost(env, tmp_path):
    spec = registry.get_method("fake.alpha")
    root = tmp_path / "task"
    acc = dict(metric="accuracy", severity=5, n=20)
    _write_part(root / "part-old", [dict(acc, corruption="fog", value=0.1, wall_time_s=2.0),
                                    dict(acc, corruption="snow", value=0.3, wall_time_s=4.0)], 1_000_000)  # fmt: skip
    _write_part(root / "part-new", [dict(acc, corruption="fog", value=0.9, wall_time_s=1.0),
                                    dict(acc, corruption="contrast", value=0.5, wall_time_s=1.0)], 2_000_000)  # fmt: skip
    c = {"corruptions": ["fog", "snow"], "severities": [5]}
    task = cmp.Task(spec, "episodic", 0, root, ["fog", "snow"], [5], [], fingerprint="")
    res = cmp.collect([task], c)
    got = {r.corruption: r for r in res.itertuples()}
    assert sorted(got) == ["fog", "snow"]  # contrast was not asked for
    assert got["fog"].accuracy == 0.9  # the newer part's record
    assert got["snow"].accuracy == 0.3
    # no s_per_image record: wall_time_s / n
    assert got["fog"].s_per_image == pytest.approx(1.0 / 20) and got["snow"].s_per_image == pytest.approx(
        4.0 / 20
    )


def test_run_key_changes_with_everything_that_changes_the_numbers(tmp_path):
    """A comparison with another benchmark, data root, number of images, batch size, profile or device
    must not resume from the records of this one (they live under another ``runs/<key>`` folder)."""
    c = cmp.load_config([f"out_dir={tmp_path}", "benchmark=digits_c", "profile=smoke", "num_examples=40"])
    key = cmp.run_key(c)
    for k, v in [("benchmark", "mnist_c"), ("root", str(tmp_path)), ("num_examples", 80), ("batch_size", 7),
                 ("profile", "quick"), ("device", "cuda"), ("dirichlet_delta", 0.0), ("dirichlet_delta", 0.1)]:  # fmt: skip
        assert cmp.run_key({**c, k: v}) != key, k
    assert cmp.run_key({**c, "dirichlet_delta": 0.0}) != cmp.run_key({**c, "dirichlet_delta": 0.1})
    # i.i.d. (dirichlet_delta null) keeps the key comparisons had before the option existed
    assert key == cmp.run_key({k: v for k, v in c.items() if k != "dirichlet_delta"})
    # what does not change the numbers keeps the key (jobs, output folder, methods)
    assert cmp.run_key({**c, "jobs": 7, "out_dir": str(tmp_path / "x"), "methods": ["a.b"]}) == key


def test_method_overrides_match_globs_and_merge_deeply():
    """``overrides`` (and a profile's) apply to every method whose name matches the glob, in order, merged
    key by key: a later pattern adds to a nested mapping instead of replacing it."""
    c = {"profile": "smoke", "profiles": {"smoke": {"overrides": {"p.*": {"train": {"lr": 0.1, "steps": 2}}}}},
         "overrides": {"p.a*": {"train": {"steps": 5}, "x": 1}, "q.*": {"y": 2}}}  # fmt: skip
    assert cmp._method_overrides(c, "p.alpha") == {"train": {"lr": 0.1, "steps": 5}, "x": 1}
    assert cmp._method_overrides(c, "p.beta") == {"train": {"lr": 0.1, "steps": 2}}
    assert cmp._method_overrides(c, "r.alpha") == {}


# ----------------------------------------------------------------------------------------------------------
# dirichlet_delta (added by a mutation audit: compare could drop the key on its way to the evaluates, pass
# null for it or key i.i.d. runs differently, and every test above still passed)


def test_dirichlet_delta_reaches_the_evaluate_and_iid_configs_are_unchanged(env, tmp_path):
    """Set: the evaluate's ``benchmark`` mapping carries it (and the run folder key differs); null: the
    mapping and the run key are exactly those of comparisons from before the option (no null entry: old
    run directories keep their config hashes and resume)."""
    c = cmp.load_config([f"out_dir={tmp_path}", "benchmark=digits_c", "profile=smoke", "num_examples=40"])
    assert c["dirichlet_delta"] is None
    assert cmp.run_key(c) == "digits_c-smoke-13566ccd", "the i.i.d. key of comparisons before the option"
    spec = registry.get_method("fake.alpha")
    task = cmp.Task(spec, "continual", 0, tmp_path / "r", ["fog"], [5], [], fingerprint="a")
    task.part = task.root / "part"
    iid = cmp.evaluate_config(task, c)["benchmark"]
    assert set(iid) == {"name", "corruptions", "severities", "setting", "num_examples", "batch_size", "seed",
                        "cache_dir"}  # fmt: skip
    corr = cmp.load_config([f"out_dir={tmp_path}", "benchmark=digits_c", "profile=smoke", "num_examples=40",
                            "dirichlet_delta=0.1"])  # fmt: skip
    assert cmp.evaluate_config(task, corr)["benchmark"] == {**iid, "dirichlet_delta": 0.1}
    assert cmp.run_key(corr) not in (cmp.run_key(c), cmp.run_key({**corr, "dirichlet_delta": 0.0}))
    # a full config given as is (compare's fast path) is checked too: 0 and 0.0 are one comparison
    full = cmp.check_config({**c, "dirichlet_delta": 0})
    assert type(full["dirichlet_delta"]) is float and cmp.run_key(full) == cmp.run_key(
        {**c, "dirichlet_delta": 0.0}
    )
    # the table's title says so (the i.i.d. title as before)
    assert "setting reset_each_shift, label-correlated (dirichlet_delta=0.1), profile" in cmp._bench_title(
        corr
    )
    assert "setting reset_each_shift, profile" in cmp._bench_title(c)


def test_stream_order_reaches_the_evaluate_and_default_configs_are_unchanged(env, tmp_path):
    """``stream_order=mariodoebler``: the evaluate's ``benchmark`` mapping carries it, the run folder key
    differs, the severities keep their given order (the stream's); the default leaves the mapping, the key
    and the sorted severities as comparisons had them before the option."""
    import shlex

    args = [f"out_dir={tmp_path}", "benchmark=digits_c", "profile=smoke", "num_examples=40"]
    c = cmp.load_config([*args, "severities=[4,2]"])
    assert c["stream_order"] == "tttlab" and c["severities"] == [2, 4]
    assert cmp.run_key(cmp.load_config(args)) == "digits_c-smoke-13566ccd", "the key from before the option"
    md = cmp.load_config([*args, "severities=[4,2]", "stream_order=mariodoebler"])
    assert md["severities"] == [4, 2]
    spec = registry.get_method("fake.alpha")
    task = cmp.Task(spec, "gradual", 0, tmp_path / "r", ["fog"], [4, 2], [], fingerprint="a")
    task.part = task.root / "part"
    default = cmp.evaluate_config(task, c)["benchmark"]
    assert "stream_order" not in default
    assert cmp.evaluate_config(task, md)["benchmark"] == {**default, "stream_order": "mariodoebler"}
    assert (
        cmp.run_key(md) != cmp.run_key(c) == cmp.run_key({k: v for k, v in c.items() if k != "stream_order"})
    )
    again = cmp.load_config(shlex.split(cmp.equivalent_command(md))[1:])
    assert again["stream_order"] == "mariodoebler" and again["severities"] == [4, 2]
    assert cmp.run_key(again) == cmp.run_key(md) and "stream_order=" not in cmp.equivalent_command(c)
    assert "stream_order mariodoebler" in cmp._bench_title(md) and "stream_order" not in cmp._bench_title(c)
    grad = {**md, "setting": ["gradual"]}
    assert "visits severities 4, 2 of each corruption" in cmp._gradual_note(grad)
    assert "visits severities 2, 4, 2 of each corruption" in cmp._gradual_note({**c, "setting": ["gradual"]})
    with pytest.raises(ConfigError, match="'stream_order'='upstream': expected one of tttlab, mariodoebler"):
        cmp.load_config([*args, "stream_order=upstream"])


def test_mariodoebler_reset_each_shift_resumes_whole_corruptions(env, tmp_path, monkeypatch):
    """Its severities of one corruption share one adaptation (no reset between them): a missing domain is
    computed again with the rest of its corruption, in the given severity order; the default order resumes
    per domain."""
    done = pd.DataFrame(
        {"corruption": ["fog", "fog", "snow"], "severity": [4, 2, 4], "metric": ["accuracy"] * 3}
    )
    monkeypatch.setattr(cmp, "task_records", lambda task, c: done)
    args = [f"out_dir={tmp_path}", "benchmark=digits_c", "profile=smoke", "corruptions=[fog,snow]",
            "severities=[4,2]", "setting=reset_each_shift"]  # fmt: skip
    spec = registry.get_method("fake.alpha")
    (md,) = cmp.plan(cmp.load_config([*args, "stream_order=mariodoebler"]), [spec])
    assert md.todo == [("snow", 4), ("snow", 2)] and (md.corruptions, md.severities) == (["snow"], [4, 2])
    (default,) = cmp.plan(cmp.load_config(args), [spec])
    assert default.todo == [("snow", 2)] and (default.corruptions, default.severities) == (["snow"], [2])


@pytest.mark.parametrize("delta", ["0", "0.1", "0.001", "2", "1e-05", "0.3333333333333333", "123456789"])
def test_equivalent_command_reproduces_the_label_correlated_comparison(tmp_path, delta):
    """The report's command line, read back, is the same comparison (the same delta, the same run key; the
    command wrote 6 significant digits before this audit: 1/3 came back as 0.333333, another stream)."""
    import shlex

    c = cmp.load_config([f"out_dir={tmp_path}", "profile=smoke", f"dirichlet_delta={delta}"])
    again = cmp.load_config(shlex.split(cmp.equivalent_command(c))[1:])
    assert again["dirichlet_delta"] == float(delta)
    assert cmp.run_key(again) == cmp.run_key(c)
    iid = cmp.load_config([f"out_dir={tmp_path}", "profile=smoke"])
    assert "dirichlet_delta" not in cmp.equivalent_command(iid)


def test_label_correlated_comparison_end_to_end(env, no_plots):
    """``dirichlet_delta=0`` through a whole comparison: the evaluate gets it, the report says so (0 too:
    sorted by class is label-correlated); the i.i.d. comparison is another run whose evaluate gets no key."""
    out = env["tmp"] / "correlated"
    n0 = len(calls(env))
    corr = cmp.compare(base_config(out, methods=["fake.alpha"], dirichlet_delta=0), echo=lambda *a: None)
    assert [c["dirichlet_delta"] for c in calls(env)[n0:]] == [0.0]
    report = corr.report.read_text()
    assert "setting reset_each_shift, label-correlated (dirichlet_delta=0), profile `smoke`" in report
    assert "dirichlet_delta=0" in report.split("## Command")[1]
    n1 = len(calls(env))
    iid = cmp.compare(base_config(out, methods=["fake.alpha"]), echo=lambda *a: None)
    assert [c["dirichlet_delta"] for c in calls(env)[n1:]] == ["absent"], "a new run, without the key"
    assert "label-correlated" not in iid.report.read_text()


def test_a_bad_method_name_or_seed_leaves_no_out_dir(env, tmp_path, capsys):
    """A mistyped method name (or a negative seed) is exit status 2 with one line naming it, before
    anything is made: no out_dir with an empty cache/ behind (the walkthrough found one), and a negative
    seed is refused by the config check rather than after the plan is printed."""
    out = tmp_path / "out"
    assert cmp.main(["methods=[fake.alpah]", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        re.search(r"'fake.alpah' \(did you mean 'fake.alpha'.*\?\); installed methods: ", err)
        and "\n" not in err
    )
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"'seeds'=\[0, -1\]: expected a list of integers >= 0"):
        cmp.load_config(["seeds=[0,-1]"])
    assert cmp.main(["seeds=-1", f"out_dir={out}"]) == 2 and not out.exists()
    assert capsys.readouterr().out == ""


def test_a_configuration_error_is_the_one_line_every_command_prints(env, tmp_path, capsys):
    """tttlab-compare reports bad input as every other tttlab command does (tttlab.core.cli.user_errors,
    the core README): ``<prog>: error: <TTTLabError type>: <message>``, exit status 2.  It printed
    ``tttlab-compare: <message>``, without the "error:" and the type the other commands show."""
    out = tmp_path / "out"
    assert cmp.main(["profile=quik", f"out_dir={out}"]) == 2
    assert capsys.readouterr().err == (
        "tttlab-compare: error: ConfigError: config key 'profile'='quik' (did you mean 'quick'?): expected one of "
        "['full', 'quick', 'smoke']\n"
    )
    assert cmp.main(["methods=[fake.alpah]", f"out_dir={out}"], prog="tools/compare.py") == 2
    assert capsys.readouterr().err.startswith("tools/compare.py: error: UnknownNameError: unknown method ")
    assert not out.exists()


def test_a_long_error_of_a_failed_run_is_cut_at_a_word_and_marked(env, tmp_path, no_plots):
    """The failed-run line (printed, and in report.md's summary) holds the last stderr line of the evaluate; a
    long one was cut at 200 characters mid-word (a list of known keys ended in "dirichlet_del"), which read as
    the message.  It is cut at a space within 300 characters and ends in " ..."; the whole line stays in
    the stderr tail and the log."""
    words = " ".join(f"key_{i:03d}" for i in range(60))  # 479 characters
    c = base_config(
        tmp_path / "out", methods=["fake.crash"], overrides={"fake.crash": {"fake": {"crash": words}}}
    )
    result = cmp.compare(c, echo=lambda *a: None)
    (task,) = result.failed
    prefix = "exit status 1: RuntimeError: "
    assert task.error.startswith(prefix) and task.error.endswith(" ..."), task.error
    kept = task.error[len(prefix) : -len(" ...")]
    assert words.startswith(kept + " ") and len(task.error) <= len("exit status 1: ") + 300 + 4, task.error
    assert f"RuntimeError: {words}" in task.stderr_tail


def test_a_device_of_the_other_framework_is_refused_before_any_run(env, tmp_path, capsys):
    """device=tpu (JAX's) with a torch method, or device=mps (torch's) with a JAX method: exit status 2 with
    one line naming the methods, before out_dir is made (each run would have failed on its own); numpy
    methods take no device, and cpu/cuda/auto suit every framework."""
    from types import SimpleNamespace as M

    torch_m, jax_m, np_m = (
        M(name="a.t", framework="torch"),
        M(name="b.j", framework="jax"),
        M(name="c.n", framework="numpy"),
    )
    with pytest.raises(
        ConfigError, match=r"^config key 'device'='tpu' is a jax device, but a\.t runs on another"
    ):
        cmp.check_device_for("tpu", [torch_m, jax_m, np_m])
    with pytest.raises(ConfigError, match=r"'device'='mps' is a torch device, but b\.j runs on another"):
        cmp.check_device_for("mps", [torch_m, jax_m])
    for device, specs in (("tpu", [jax_m, np_m]), ("mps", [torch_m, np_m]), ("cuda:0", [torch_m, jax_m]),
                          ("gpu", [torch_m, jax_m]), ("auto", [torch_m, jax_m]), ("cpu", [torch_m, jax_m])):  # fmt: skip
        cmp.check_device_for(device, specs)
    registry.register(dict(name="fake.torchy", package="fake", framework="torch",
                           evaluate="compare_fake_methods:run", paper="a fake"))  # fmt: skip
    try:
        out = tmp_path / "out"
        assert cmp.main(["methods=[fake.torchy,fake.alpha]", "device=tpu", f"out_dir={out}"]) == 2
        err = capsys.readouterr().err.strip()
        assert (
            "'device'='tpu' is a jax device, but fake.torchy runs on another framework" in err
            and "\n" not in err
        )
        assert not out.exists()
    finally:
        registry.unregister("fake.torchy")


def test_prepare_benchmark_corrupts_the_severities_a_gradual_stream_visits(tmp_path):
    """'gradual' with one severity streams 1..5..1, but compare corrupted only the given severity ahead of
    the evaluates, so each gradual evaluate generated severities 1-4 itself (all jobs at once).  Every
    domain the stream visits is now in the cache before they start; other settings corrupt what they read."""
    c = dict(benchmark="mnist_c", corruptions=["gaussian_noise"], severities=[5], batch_size=8, num_examples=8,
             seeds=[0], cache_dir=str(tmp_path), setting=["gradual"])  # fmt: skip
    cmp.prepare_benchmark(c, echo=lambda *a: None)
    assert sorted(p.name for p in tmp_path.glob("benchmark/*/*.npy")) == [
        f"gaussian_noise-{s}.npy" for s in range(1, 6)
    ]
    other = tmp_path / "other"
    cmp.prepare_benchmark({**c, "cache_dir": str(other), "setting": ["continual"]}, echo=lambda *a: None)
    assert [p.name for p in other.glob("benchmark/*/*.npy")] == ["gaussian_noise-5.npy"]


def test_report_says_what_a_gradual_stream_visited(env, no_plots):
    """The report of a 'gradual' comparison said 'Accuracy per corruption at severity 5, ... setting gradual'
    and nothing else, though the stream ran each corruption through severities 1..5..1; it now says so."""
    out = env["tmp"] / "gradual"
    cfg = base_config(out, methods=["fake.alpha"], setting=["gradual"], overrides={}, severities=[5])
    text = cmp.compare(cfg, echo=lambda *a: None).report.read_text()
    assert "The `gradual` stream visits severities 1, 2, 3, 4, 5, 4, 3, 2, 1 of each corruption" in text
    assert "the table shows the records at severity 5." in text
    assert "visits severities 3, 5, 3 of" in cmp._gradual_note(
        {"setting": ["continual", "gradual"], "severities": [5, 3]}
    )
    assert cmp._gradual_note({"setting": ["continual"], "severities": [5]}) == ""


def test_a_device_the_machine_lacks_is_one_error_before_any_run(env, tmp_path, capsys, monkeypatch):
    """``device=cuda`` on a machine without CUDA failed once per method, each evaluate raising its own
    ConfigError after compare had started them all.  It is now exit status 2 with one line naming the device,
    what each framework finds and which methods need it, before out_dir is made and before any evaluate
    runs; the frameworks are asked in subprocesses (this process imports neither), numpy methods take no
    device and are not asked about."""
    import importlib.util

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("jax") is None:
        pytest.skip("needs torch and jax installed")
    from types import SimpleNamespace as M

    torch_m, jax_m, np_m = (
        M(name="a.t", framework="torch"),
        M(name="b.j", framework="jax"),
        M(name="c.n", framework="numpy"),
    )
    found = {"torch": {"found": {"cuda": 2, "mps": 0}, "about": "torch 9.9"},
             "jax": {"found": {"gpu": 0, "tpu": 0}, "about": "jax 9.9, devices: cpu"}}  # fmt: skip
    assert cmp.device_problems("cuda:1", [torch_m, np_m], found) == []
    assert cmp.device_problems("cuda:2", [torch_m, jax_m, np_m], found) == [
        "jax finds no GPU device here (jax 9.9, devices: cpu), which b.j would run on",
        "torch finds only 2 CUDA devices here (torch 9.9), which a.t would run on",
    ]
    assert cmp.device_problems("gpu", [torch_m], found) == []  # torch's gpu falls back to the CPU
    assert cmp.device_problems("cuda", [torch_m, jax_m], found) == [
        "jax finds no GPU device here (jax 9.9, devices: cpu), which b.j would run on"
    ]
    assert cmp.device_problems("tpu", [jax_m], found) == [
        "jax finds no TPU device here (jax 9.9, devices: cpu), which b.j would run on"
    ]
    for device in ("cpu", "auto"):
        assert (
            cmp.device_problems(device, [torch_m, jax_m], {"torch": {"found": {}}, "jax": {"found": {}}})
            == []
        )
    # the real frameworks, in subprocesses (one probe of each, at once: a torch or JAX start-up each): nobody
    # has 100 GPUs; CUDA hidden, torch finds none, and the line names the setting that hid it
    for name, framework in (("fake.torchy", "torch"), ("fake.jaxy", "jax")):
        registry.register(dict(name=name, package="fake", framework=framework,
                               evaluate="compare_fake_methods:run", paper="a fake"))  # fmt: skip
    calls = env["calls"].read_text().count("\n") if env["calls"].exists() else 0
    try:
        out = tmp_path / "out"
        args = ["methods=[fake.torchy,fake.jaxy,fake.alpha]", "benchmark=digits_c", "profile=smoke",
                "corruptions=[fog]", f"out_dir={out}", "progress=false"]  # fmt: skip
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        assert cmp.main([*args, "device=cuda:99"]) == 2
        err = capsys.readouterr().err.strip()
        assert re.fullmatch(
            r"tttlab-compare: error: ConfigError: config key 'device'='cuda:99', but jax finds no GPU device here "
            r"\(jax [^)]*\), which fake\.jaxy would run on; torch finds no CUDA device here \(torch [^)]*\), which "
            r"fake\.torchy would run on \(CUDA_VISIBLE_DEVICES=''\); use device=cpu or device=auto, or run on a "
            r"machine that has the device",
            err,
        ), err
        assert "fake.alpha" not in err
        assert not out.exists()
        assert (env["calls"].read_text().count("\n") if env["calls"].exists() else 0) == calls, (
            "no evaluate ran"
        )
        # a device every machine serves is not probed, and the runs go ahead
        assert cmp.main(["methods=[fake.torchy]", *args[1:], "device=auto"]) == 0
    finally:
        registry.unregister("fake.torchy")
        registry.unregister("fake.jaxy")


def test_compare_keys_work_after_register_configs_stored_its_config_groups():
    """Core's public ``register_configs`` stores Hydra config groups named ``benchmark``, ``data`` and
    ``logging``.  Afterwards, in the same process, compare's scalar override
    ``benchmark=digits_c`` was read as a choice in that group and refused ("No match in the defaults
    list"); now the groups are hidden while compare composes and are back afterwards."""
    from hydra.core.config_store import ConfigStore

    from tttlab.core.config import register_configs

    register_configs()
    repo = ConfigStore.instance().repo
    before = {k: dict(repo[k]) for k in ("benchmark", "data", "logging")}
    c = cmp.load_config(["benchmark=digits_c", "profile=smoke"])
    assert c["benchmark"] == "digits_c"
    assert {k: dict(repo[k]) for k in ("benchmark", "data", "logging")} == before
