"""Atomic writes, run directories and the records schema, including a writer killed mid-run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tttlab.core import records as R
from tttlab.core._io import (
    atomic_path,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    remove_stale_temps,
)
from tttlab.core.errors import InvalidInputError, TTTLabError


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "a.json"
    atomic_write_json(p, {"v": 1, "x": np.float32(0.5), "inf": float("inf")})
    assert json.loads(p.read_text()) == {"v": 1, "x": 0.5, "inf": float("inf")}

    # the rename fails: the old content stays, no temporary file is left behind
    def boom(*a, **k):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", boom)
        with pytest.raises(OSError, match="disk full"):
            atomic_write_bytes(p, b"new")
    assert json.loads(p.read_text())["v"] == 1
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.json"]

    # the writer fails half-way through: same
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"{half")
            raise RuntimeError("killed")
    assert json.loads(p.read_text())["v"] == 1
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.json"]


def test_atomic_save_npy_and_permissions(tmp_path):
    p = atomic_save_npy(tmp_path / "x.npy", np.arange(6, dtype=np.uint8).reshape(2, 3))
    np.testing.assert_array_equal(np.load(p), np.arange(6).reshape(2, 3))
    mask = os.umask(0)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0o600


def test_temp_files_of_killed_writes_are_removed_when_the_folder_is_reopened(tmp_path):
    """A SIGKILLed atomic write leaves its temp file; the next RunDir on that folder removes it, and only
    it: not a live writer's, not another host's, not a fresh one, not other files."""
    run = tmp_path / "run"
    R.RunDir(run, {"a": 1})
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        from tttlab.core._io import atomic_path
        with atomic_path({str(run / "checkpoints" / "last.ckpt")!r}) as tmp:
            tmp.write_bytes(b"x" * 1000)
            print(tmp, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dead = run / "checkpoints" / os.path.basename(proc.stdout.strip())
    assert dead.exists() and dead.name.startswith(".last.ckpt.tttlab-")
    # the same name pattern, but a live process (this one), another host, or modified just now
    own = dead.name.split("-")
    live = dead.with_name("-".join([own[0], own[1], str(os.getpid()), "abc.tmp"]))
    other_host = dead.with_name(
        "-".join([own[0], "0" * 8 if own[1] != "0" * 8 else "1" * 8, own[2], "abc.tmp"])
    )
    for p in (live, other_host):
        p.write_bytes(b"y")
    old = os.stat(dead).st_mtime - 3600
    for p in (dead, live, other_host):
        os.utime(p, (old, old))
    fresh = dead.with_name(dead.name.replace(".tmp", "z.tmp"))
    fresh.write_bytes(b"z")  # the dead writer's pid, but touched within the last minute
    keep = run / "checkpoints" / ".notes.tmp"  # not ours
    keep.write_bytes(b"k")

    R.RunDir(run, {"a": 1})
    left = {p.name for p in (run / "checkpoints").iterdir()}
    assert dead.name not in left
    assert {live.name, other_host.name, fresh.name, keep.name} <= left
    os.utime(fresh, (old, old))
    assert remove_stale_temps(run / "checkpoints") == [fresh]
    assert remove_stale_temps(tmp_path / "missing") == []


def test_run_dir_layout_and_records_roundtrip(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    run = R.RunDir(tmp_path / "run", config={"lr": 0.1, "model": {"depth": 2}})
    names = sorted(p.name for p in run.path.iterdir())
    # no empty stats.json nor empty checkpoints/ (an evaluation's run folder had both): they come when used
    assert names == ["config.yaml", "env.json", "records.jsonl"]
    assert run.read_stats() == {} and R.read_stats(run.path) == {}
    assert run.checkpoint_path() == run.path / "checkpoints" / "last.ckpt" and run.checkpoints.is_dir()
    calls.clear()
    with run.writer(method="torch_ttt.tent", package="torch_ttt", framework="torch", seed=0) as w:
        for s in (1, 2, 3):
            w.write(corruption="fog", severity=s, metric="accuracy", value=0.5 + s / 10, n=100)
        w.write(metric="accuracy", value=np.float64(0.9), n=np.int64(100), extra={"note": "clean"})
    assert len(calls) == 4  # one fsync per record

    df = run.records()
    assert list(df.columns) == list(R.COLUMNS)
    assert df["severity"].tolist()[:3] == [1, 2, 3] and df["severity"].isna().tolist()[3]
    assert df["value"].tolist() == pytest.approx([0.6, 0.7, 0.8, 0.9])
    assert df["git_sha"].iloc[0] == run.env["git_sha"]
    assert df["config_hash"].iloc[0] == R.config_hash({"model": {"depth": 2}, "lr": 0.1})
    assert df["extra"].iloc[3] == {"note": "clean"}
    assert len(R.load_records(run.path, severity=[1, 3])) == 2
    assert len(R.load_records(run.path, corruption=None)) == 1
    assert (run.path / "config.yaml").read_text() == "lr: 0.1\nmodel:\n  depth: 2\n"

    env = json.loads((run.path / "env.json").read_text())
    for key in ("python", "platform", "hostname", "cpu_count", "packages", "git_sha"):
        assert key in env
    assert "numpy" in env["packages"] and env["cpu_count"] >= 1
    assert env["git_sha"] is None or len(env["git_sha"]) == 40

    # reopening a run keeps its records and stats
    run.append_stats({"train/loss": 2.0, "val/inner_loss": [[3.0, 2.0], [2.5, float("inf")]]})
    run2 = R.RunDir(tmp_path / "run")
    assert len(run2.records()) == 4
    run2.append_stats({"train/loss": np.float32(1.5), "val/inner_loss": np.array([[2.0, 1.0], [2.0, 1.5]])})
    stats = run2.read_stats()
    assert stats["train/loss"] == [2.0, 1.5]
    assert stats["val/inner_loss"][0][1][1] == float("inf") and stats["val/inner_loss"][1][1] == [2.0, 1.5]


def test_env_json_records_the_installed_versions_without_reading_every_distribution(monkeypatch):
    """env.json's ``packages``: every tttlab distribution and listed third-party one that is installed, with
    importlib.metadata's version, found by name: walking all installed distributions cost 0.1-0.8 s per run
    directory (and a tttlab package missing from the name list would go unrecorded)."""
    from importlib import metadata
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    names = {
        re.search(r'^name = "(.+)"', p.read_text(), re.M)[1] for p in root.glob("packages/*/pyproject.toml")
    }
    assert set(R.TTTLAB_DISTRIBUTIONS) == names
    expected = {}
    for dist in metadata.distributions():  # the walk the old code did, for the tttlab names
        # open_clip_torch is listed as open-clip-torch
        name = re.sub(r"[-_.]+", "-", dist.metadata.get("Name") or "").lower()
        if name.startswith("tttlab-") or name in R._VERSIONED:
            expected[name] = dist.version

    def no_walk():
        raise AssertionError("package_versions walked every installed distribution")

    monkeypatch.setattr(metadata, "distributions", no_walk)
    assert R.package_versions() == dict(sorted(expected.items()))
    assert "tttlab-core" in expected and "numpy" in expected
    env = R.environment()
    assert env["packages"] == R.package_versions() and list(env["packages"]) == sorted(env["packages"])


def test_git_sha_outside_a_repository(tmp_path):
    R.git_sha.cache_clear()
    assert R.git_sha(tmp_path) is None


@contextlib.contextmanager
def _config_replaced(caplog, match: str = "differs from the folder's config.yaml"):
    """The block replaces a run folder's config.yaml with another config's: one logged warning of
    ``tttlab.core.records`` matching ``match``, and no Python warning (it was a UserWarning that printed a
    stray source line)."""
    import re
    import warnings

    caplog.clear()
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="tttlab.core.records"):
        warnings.simplefilter("error")
        yield
    said = [r.getMessage() for r in caplog.records if r.name == "tttlab.core.records"]
    assert len(said) == 1 and re.search(match, said[0]), said


def test_schema_errors(tmp_path, caplog):
    w = R.RecordWriter(tmp_path / "r.jsonl")
    with pytest.raises(InvalidInputError, match="acuracy"):
        w.write(method="m", metric="accuracy", value=1.0, acuracy=1)
    with pytest.raises(InvalidInputError, match="'severity'='5'.*str"):
        w.write(method="m", metric="accuracy", value=1.0, severity="5")
    with pytest.raises(InvalidInputError, match="'severity'=7"):
        w.write(method="m", metric="accuracy", value=1.0, severity=7)
    with pytest.raises(InvalidInputError, match="'step'=True"):
        w.write(method="m", metric="accuracy", value=1.0, step=True)
    with pytest.raises(InvalidInputError, match="required field 'value'"):
        w.write(method="m", metric="accuracy")
    with pytest.raises(InvalidInputError, match="extra"):
        w.write(method="m", metric="accuracy", value=1.0, extra={"f": object()})
    with pytest.raises(InvalidInputError, match="defaults"):
        R.RecordWriter(tmp_path / "r.jsonl", {"mehtod": "m"})
    w.close()
    assert (tmp_path / "r.jsonl").read_text() == ""  # nothing half-valid was written
    # an unknown field inside a file is an error naming file and line
    (tmp_path / "bad.jsonl").write_text('{"method": "m", "metric": "a", "value": 1, "colour": "red"}\n')
    with pytest.raises(InvalidInputError, match=r"bad.jsonl:1: unknown record field\(s\) \['colour'\]"):
        R.load_records(tmp_path / "bad.jsonl")
    with pytest.raises(InvalidInputError, match="does not exist"):
        R.load_records(tmp_path / "missing")
    # a run directory below a file, or no path at all
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InvalidInputError, match="a_file/run.*Not a directory"):
        R.RunDir(tmp_path / "a_file" / "run", {})
    with pytest.raises(InvalidInputError, match="None"):
        R.RunDir(None, {})
    # a run directory whose config.yaml is not YAML: reading its hash names the file; writing a config
    # over it warns and replaces it (as a config of another run would be)
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "config.yaml").write_text("a: [1, 2\n  b: {")
    with pytest.raises(InvalidInputError, match=r"corrupt/config.yaml is not a readable YAML config"):
        R.RunDir(bad).config_hash  # noqa: B018
    with _config_replaced(caplog, "corrupt/config.yaml is not a readable YAML config.*replacing it"):
        rd = R.RunDir(bad, {"x": 1})
    assert rd.config_hash == R.config_hash({"x": 1}) == R.RunDir(bad).config_hash


def test_config_hash_stable():
    from omegaconf import OmegaConf

    from tttlab.core.config import BenchmarkConfig

    assert R.config_hash({"a": 1, "b": [1, 2]}) == R.config_hash({"b": [1, 2], "a": 1})
    assert R.config_hash({"a": 1}) != R.config_hash({"a": 2})
    assert R.config_hash(OmegaConf.create({"a": 1, "b": "${a}"})) == R.config_hash({"a": 1, "b": 1})
    assert R.config_hash(BenchmarkConfig()) == R.config_hash(OmegaConf.structured(BenchmarkConfig))
    assert len(R.config_hash({})) == 12


def test_benchmark_options_added_later_keep_old_hashes_at_their_neutral_value():
    """A run directory made before ``benchmark.shuffle`` / ``dirichlet_delta`` / ``stream_order`` existed
    keeps its hash (and so resumes); a non-default value is another config, at any depth."""
    old = {"seed": 0, "benchmark": {"name": "mnist_c", "setting": "continual"}, "train": {"lr": 0.1}}
    new = {**old, "benchmark": {**old["benchmark"], "shuffle": True, "dirichlet_delta": None,
                                "stream_order": "tttlab"}}  # fmt: skip
    assert R.config_hash(new) == R.config_hash(old) == "66f0ff11bec4"  # as hashed before the options
    assert R.config_hash({"wrap": [new]}) == R.config_hash({"wrap": [old]})
    for key, value in (("shuffle", False), ("dirichlet_delta", 0.0), ("dirichlet_delta", 0.1),
                       ("stream_order", "mariodoebler")):  # fmt: skip
        changed = {**new, "benchmark": {**new["benchmark"], key: value}}
        assert R.config_hash(changed) != R.config_hash(old), (key, value)
    assert R.config_hash({"shuffle": True}) != R.config_hash({}), "only inside a benchmark mapping"


WRITER = """
import sys, time
from tttlab.core.records import RecordWriter
w = RecordWriter(sys.argv[1], {"method": "m", "metric": "accuracy"})
i = 0
while True:
    w.write(value=float(i), step=i)
    if i == 200:
        # a record torn by the kill: part of a line reached the file, the rest never will
        w._file.write(b'{"method": "m", "metr'); w._file.flush()
        print("torn", flush=True)
        time.sleep(60)
    i += 1
"""


def test_killed_writer_leaves_complete_lines(tmp_path):
    path = tmp_path / "records.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER), str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "torn"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with pytest.warns(UserWarning, match="torn"):
        df = R.load_records(path)
    assert df["step"].tolist() == list(range(201))

    # a resumed writer cuts the torn tail before appending, so the file stays readable
    with pytest.warns(UserWarning, match="torn"):
        w = R.RecordWriter(path, {"method": "m", "metric": "accuracy"})
    w.write(value=-1.0, step=201)
    w.close()
    assert R.load_records(path)["step"].tolist() == list(range(202))

    # a malformed line in the middle is an error, not silently skipped
    lines = path.read_text().split("\n")
    lines[5] = '{"method": "m", "metr'
    path.write_text("\n".join(lines))
    with pytest.raises(InvalidInputError, match=r"records.jsonl:6: malformed"):
        R.load_records(path)


def test_load_records_without_pandas_names_the_install_command(tmp_path, monkeypatch):
    """pandas missing (a broken one-package install): reading records is a MissingDependencyError naming the
    install command, which the commands print as one line with exit status 2 (ttt_mae's resume check and
    memo_tpt's summary printed Python's or Hydra's traceback: "No module named 'pandas'")."""
    from tttlab.core.errors import MissingDependencyError

    path = tmp_path / "records.jsonl"
    with R.RecordWriter(path, {"method": "m", "package": "p", "framework": "torch"}) as w:
        w.write(metric="accuracy", value=0.5)
    monkeypatch.setitem(sys.modules, "pandas", None)  # the import system's "not installed"
    with pytest.raises(MissingDependencyError) as info:
        R.load_records(path)
    assert str(info.value) == (
        "reading run records needs pandas, a dependency of tttlab-core, which is not installed; install it with: "
        "pip install -c constraints.txt -e packages/core  (from the tttlab repository root)"
    )
    assert R.recorded_keys(path, keys=["metric"]) == {("accuracy",)}  # the resume read needs none


def test_recorded_keys_are_done_keys_of_load_records_without_pandas(tmp_path):
    """``recorded_keys`` (pilimit's resume: no pandas import before the first step) gives what
    ``done_keys(load_records(...))`` gives: rank files and nested folders, filters, None / NaN / integers."""
    from tttlab.core.testing import imported_afresh

    for rank, chash in ((0, "a"), (1, "b"), (2, "a")):
        with R.RecordWriter(tmp_path / ("records.jsonl" if rank == 0 else f"records-rank{rank}.jsonl")) as w:
            for step in (None, 1, 2):
                for metric, value in (("accuracy", 0.5), ("loss", float("nan"))):
                    w.write(method="m", metric=metric, value=value, step=step, config_hash=chash,
                            corruption=None if step is None else "fog", severity=step)  # fmt: skip
    (tmp_path / "sub").mkdir()
    with R.RecordWriter(tmp_path / "sub" / "records.jsonl") as w:
        w.write(method="n", metric="accuracy", value=1.0, step=7, config_hash="a")
    cases = [
        (["metric", "step"], {"config_hash": "a"}), (["metric", "step"], {}), (["corruption", "severity"], {}),
        (["value", "method"], {"metric": "loss"}), (["step"], {"config_hash": "nothing"}),
    ]  # fmt: skip
    for sources in ([tmp_path], [tmp_path / "sub"], [tmp_path / "records-rank1.jsonl", tmp_path / "sub"]):
        for keys, filters in cases:
            expected = R.done_keys(R.load_records(*sources), keys, **filters)
            assert R.recorded_keys(*sources, keys=keys, **filters) == expected, (sources, keys, filters)
    assert R.recorded_keys(tmp_path, keys=["metric", "step"], config_hash="b") == {
        ("accuracy", None), ("accuracy", 1), ("accuracy", 2), ("loss", None), ("loss", 1), ("loss", 2)
    }  # fmt: skip
    with pytest.raises(InvalidInputError, match="no column 'stepz'"):
        R.recorded_keys(tmp_path, keys=["stepz"])
    with imported_afresh([], blocked=["pandas"]):
        assert R.recorded_keys(tmp_path, keys=["step"], config_hash="b") == {(None,), (1,), (2,)}


def test_recorded_keys_filters_as_load_records_filters(tmp_path):
    """``recorded_keys``' filters are :func:`load_records`' (so that it is ``done_keys(load_records(...,
    **filters), keys)``): None keeps the records missing the field (NaN too), a list, tuple or set those whose
    field is in it, each column's missing value as pandas' ``isin`` treats it.  It compared with ``==`` only:
    ``corruption=None`` (the clean records) and ``step=[1, 2]`` kept what load_records' filters do not."""
    with R.RecordWriter(tmp_path / "records.jsonl") as w:
        w.write(
            method="m", metric="accuracy", value=1, config_hash="a"
        )  # clean: no corruption, step, severity
        w.write(
            method="m",
            metric="loss",
            value=float("nan"),
            step=2,
            corruption="fog",
            severity=3,
            config_hash="a",
        )
        w.write(method="m", metric="error", value=2.5, step=3, corruption="fog", severity=3, wall_time_s=1.0)
    nan = float("nan")
    values = [
        None,
        nan,
        "fog",
        "a",
        2,
        3,
        2.5,
        [None],
        [nan],
        [None, "fog"],
        [None, 3],
        (3,),
        {"a"},
        [1.0],
        [],
    ]
    for column in ("corruption", "step", "severity", "value", "wall_time_s", "config_hash"):
        for value in values:
            expected = R.done_keys(R.load_records(tmp_path, **{column: value}), ["metric"])
            got = R.recorded_keys(tmp_path, keys=["metric"], **{column: value})
            assert got == expected, (column, value, got, expected)
    assert R.recorded_keys(tmp_path, keys=["metric"], corruption=None) == {("accuracy",)}
    assert R.recorded_keys(tmp_path, keys=["metric"], step=[2, 3]) == {("loss",), ("error",)}


def test_rank_files_merge_and_resume_keys(tmp_path):
    for rank in (0, 1, 2):
        run = R.RunDir(tmp_path, config={"seed": 0}, rank=rank)
        with run.writer(method="m", metric="accuracy", corruption="fog") as w:
            w.write(value=float(rank), severity=rank + 1, step=rank)
    assert sorted(p.name for p in tmp_path.glob("records*.jsonl")) == [
        "records-rank1.jsonl", "records-rank2.jsonl", "records.jsonl",
    ]  # fmt: skip
    assert len(R.load_records(tmp_path)) == 3  # readable before the merge too
    with pytest.raises(InvalidInputError, match=r"rank\(s\) \[3\]"):
        R.merge_records(tmp_path, world_size=4)
    R.merge_records(tmp_path, world_size=3)
    assert not list(tmp_path.glob("records-rank*.jsonl"))
    df = R.load_records(tmp_path)
    assert df["step"].tolist() == [0, 1, 2]
    assert R.done_keys(df, ["method", "corruption", "severity"]) == {("m", "fog", 1), ("m", "fog", 2),
                                                                     ("m", "fog", 3)}  # fmt: skip
    assert R.done_keys(df, ["severity"], step=0) == {(1,)}
    assert R.done_keys(df.iloc[:0], ["method"]) == set()


def test_load_many_runs(tmp_path):
    for name in ("a", "b"):
        with R.RunDir(tmp_path / "sweep" / name).writer(method=name, metric="accuracy") as w:
            w.write(value=0.5)
    df = R.load_records(tmp_path / "sweep", with_source=True)
    assert sorted(df["method"]) == ["a", "b"] and df["source"].str.endswith("records.jsonl").all()
    df2 = R.load_records([tmp_path / "sweep" / "a", tmp_path / "sweep" / "b" / "records.jsonl"])
    assert sorted(df2["method"]) == ["a", "b"]
    assert len(R.load_records(tmp_path / "sweep", method=["b"])) == 1


def test_write_domain_summary_counts_images_and_means_over_corruptions(tmp_path):
    from tttlab.core.benchmark import Domain
    from tttlab.core.records import RecordWriter, read_jsonl, write_domain_summary

    totals = {Domain(None, None): [9, 10, 1.0], Domain("fog", 5): [3, 4, 2.0], Domain("snow", 5): [1, 4, 0.5],
              Domain("frost", 5): [0, 0, 0.0]}  # fmt: skip
    with RecordWriter(tmp_path / "r.jsonl", {"method": "m"}) as w:
        write_domain_summary(w, totals, {"k": 1}, domain_extra=lambda d, row: {"secs": row[2]})
    recs = read_jsonl(tmp_path / "r.jsonl")
    acc = {r["corruption"]: r for r in recs if r["metric"] == "accuracy"}
    assert set(acc) == {None, "fog", "snow", "mean"}, "empty domains are skipped"
    assert acc["fog"]["value"] == 0.75 and acc["fog"]["extra"] == {"k": 1, "correct": 3, "secs": 2.0}
    assert acc["mean"]["value"] == (0.75 + 0.25) / 2, "the mean is over corruptions, not over clean data"
    assert acc["mean"]["n"] == 18 and acc["mean"]["severity"] == 5 and acc["mean"]["wall_time_s"] == 3.5
    spi = {r["corruption"]: r["value"] for r in recs if r["metric"] == "s_per_image"}
    assert spi["snow"] == 0.125
    with RecordWriter(tmp_path / "one.jsonl", {"method": "m"}) as w:
        write_domain_summary(w, {Domain("fog", 5): [1, 2, 1.0]}, min_domains_for_mean=2)
    assert "mean" not in {r["corruption"] for r in read_jsonl(tmp_path / "one.jsonl")}


def test_merge_orders_rank_files_numerically(tmp_path):
    """Twelve ranks: rank 10's records follow rank 9's, not rank 1's (a name sort would put
    ``records-rank10`` before ``records-rank2``)."""
    for rank in range(12):
        run = R.RunDir(tmp_path, config={"seed": 0}, rank=rank)
        with run.writer(method="m", metric="accuracy", corruption="fog") as w:
            w.write(value=0.5, severity=1, step=rank)
    R.merge_records(tmp_path, world_size=12)
    assert R.load_records(tmp_path)["step"].tolist() == list(range(12))


def test_writer_fields_override_the_record_which_overrides_the_defaults(tmp_path):
    """``write(record, **fields)`` stores ``{**defaults, **record, **fields}``: a run's defaults (method,
    seed, ...) fill only what a call leaves out (mutation audit: defaults winning over the call survived)."""
    with R.RecordWriter(tmp_path / "r.jsonl", {"method": "m", "seed": 0, "metric": "accuracy"}) as w:
        w.write(value=0.5)
        w.write({"seed": 1, "value": 0.25, "corruption": "fog"}, seed=2, metric="error")
        w.write({"seed": 3, "value": 0.75})
    rows = R.read_jsonl(tmp_path / "r.jsonl")
    assert [(r["method"], r["seed"], r["metric"], r["value"]) for r in rows] == [
        ("m", 0, "accuracy", 0.5), ("m", 2, "error", 0.25), ("m", 3, "accuracy", 0.75),
    ]  # fmt: skip
    assert rows[1]["corruption"] == "fog"


def test_a_summary_killed_midway_leaves_no_partial_summary(tmp_path):
    """Kill audit: a run killed while write_domain_summary wrote its records line by line left part of the
    summary; started again it appended the whole summary after that part (records twice).  The summary is
    now one group: nothing reaches the file before the last record (an exception stands for the kill)."""
    from tttlab.core.benchmark import Domain
    from tttlab.core.records import RecordWriter, read_jsonl, write_domain_summary

    totals = {Domain("fog", 5): [3, 4, 2.0], Domain("snow", 5): [1, 4, 0.5]}

    def killed_at_snow(dom, row):
        if dom.corruption == "snow":
            raise KeyboardInterrupt
        return {}

    path = tmp_path / "records.jsonl"
    with RecordWriter(path, {"method": "m"}) as w:
        w.write(metric="train_loss", value=1.0)
        with pytest.raises(KeyboardInterrupt):
            write_domain_summary(w, totals, domain_extra=killed_at_snow)
    assert [r["metric"] for r in read_jsonl(path)] == ["train_loss"]
    with RecordWriter(path, {"method": "m"}) as w:  # the run started again
        written = write_domain_summary(w, totals)
        assert w.count == len(written) == 5
    assert len(read_jsonl(path)) == 6
    with RecordWriter(path, {"method": "m"}) as w:
        with w.group():
            w.write(metric="a", value=1.0)
            with w.group():  # nested: joins the outer group
                w.write(metric="b", value=2.0)
            assert len(read_jsonl(path)) == 6, "held back until the group ends"
    assert [r["metric"] for r in read_jsonl(path)][-2:] == ["a", "b"]


def test_drop_records_removes_one_config_and_a_torn_tail(tmp_path):
    path = tmp_path / "records.jsonl"
    with R.RecordWriter(path, {"method": "m", "metric": "accuracy"}) as w:
        for h in ("a", "b", "a"):
            w.write(value=1.0, config_hash=h)
    with open(path, "ab") as f:
        f.write(b'{"method": "m", "config_hash": "b", "val')  # a writer killed mid-line
    assert R.drop_records(path, "a") == 2
    assert [r["config_hash"] for r in R.read_jsonl(path)] == ["b"]
    assert path.read_bytes().endswith(b"\n"), "the torn tail went too"
    assert R.drop_records(path, "zzz") == 0 and R.drop_records(tmp_path / "none.jsonl", "a") == 0


def test_rundir_start_over_says_what_it_removes_and_replaces_in_one_warning(tmp_path, caplog):
    """``RunDir(start_over=why, removed=...)``: a training run that starts over in a folder of another
    config warned twice, core's UserWarning 'created with a different config ... overwriting it' (with a
    stray source line) and the start over's own line.  Now one line: what the command removed, the records
    by hash, and the replaced config's hash with the keys that differ (resumable keys aside); nothing where
    nothing went, and no config part for a config that differs in resumable keys only."""
    import warnings

    old = {"lr": 0.1, "every": 1}
    rd = R.RunDir(tmp_path, old)
    with rd.writer(method="m", metric="loss") as w:
        w.write(value=1.0, step=1)
        w.write(value=0.5, step=2)
    h_old, h_new = R.config_hash(old), R.config_hash({"lr": 0.2, "every": 5})
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="tttlab.core.records"):
        warnings.simplefilter("error")  # no UserWarning beside it
        new = R.RunDir(tmp_path, {"lr": 0.2, "every": 5}, resumable_keys=("every",), start_over="x=false",
                       removed=["its checkpoint checkpoints/last.ckpt"])  # fmt: skip
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: starting over (x=false): removing its checkpoint checkpoints/last.ckpt and the 2 "
        f"records in the folder (2 of config_hash {h_old}), and replacing the folder's config.yaml (hash "
        f"{h_old}) with this run's (hash {h_new}), which differs in lr: 0.1 -> 0.2"
        "; x=false starts over on every run: leave it out of the next command to resume"
    ]
    assert R.read_jsonl(new.records_path) == [] and new.config_hash == h_new
    caplog.clear()
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="tttlab.core.records"):
        warnings.simplefilter("error")
        same = R.RunDir(tmp_path, {"lr": 0.2, "every": 1}, resumable_keys=("every",), start_over="x=false")
    assert caplog.records == [], "nothing removed, the same run's config: nothing said"
    with same.writer(method="m", metric="loss") as w:
        w.write(value=1.0, step=1)
    with caplog.at_level("WARNING", logger="tttlab.core.records"):
        R.RunDir(tmp_path, {"lr": 0.2, "every": 2}, resumable_keys=("every",), start_over="x=false")
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: starting over (x=false): removing the 1 record in the folder (1 of config_hash "
        f"{R.config_hash({'lr': 0.2, 'every': 2})})"  # re-tagged first: the same run
        "; x=false starts over on every run: leave it out of the next command to resume"
    ]


def test_rundir_start_over_removes_every_configs_records_and_names_them(tmp_path, caplog):
    """``RunDir.start_over``: a training run's explicit start over (torch_ttt/pilimit ``train.resume=false``,
    mttt_jax ``resume=false``) leaves a clean folder: the records of every config (pilimit kept another
    config's beside the new run's, mttt_jax only removed its own) and a torn line, with one warning that
    counts them by hash.  A distributed rank 0 empties its own file only; a subfolder's records (an
    evaluate's ``<run>/eval``) stay.  ``check_run_dir(start_over=...)`` names that setting as a way out."""
    rd = R.RunDir(tmp_path, {"lr": 0.1})
    for h in ("a", "b", "a"):
        with rd.writer(method="m", metric="loss", config_hash=h) as w:
            w.write(value=1.0)
    with open(rd.records_path, "ab") as f:
        f.write(b'{"method": "m", "config_hash": "b", "val')  # a writer killed mid-line
    rank1 = {"method": "m", "metric": "loss", "value": 2.0, "config_hash": "a"}
    (tmp_path / "records-rank1.jsonl").write_text(json.dumps(rank1) + "\n")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "records.jsonl").write_text(json.dumps({"config_hash": "e"}) + "\n")
    with caplog.at_level("WARNING", logger="tttlab.core.records"):
        assert R.RunDir(tmp_path, {"lr": 0.1}, rank=0).start_over("x=false") == {"a": 2, "b": 1, None: 1}
    assert (tmp_path / "records-rank1.jsonl").read_text() != "", "another rank's file is its own"
    assert (
        f"{tmp_path}: starting over (x=false): removing the 4 records in the folder (2 of config_hash a, "
        in caplog.text
    )
    assert "1 of config_hash b, 1 without a config_hash)" in caplog.text, caplog.text
    assert rd.start_over("x=false") == {"a": 1}
    caplog.clear()
    assert [p.stat().st_size for p in sorted(tmp_path.glob("records*.jsonl"))] == [0, 0]
    assert (tmp_path / "eval" / "records.jsonl").read_text() != "", "a subfolder is not the run's records"
    assert rd.start_over("x=false") == {} and caplog.text == "", "nothing to remove: no warning"
    (tmp_path / "records.jsonl").write_text(json.dumps({"config_hash": "a", "metric": "loss"}) + "\n")
    with pytest.raises(R.RunDirConflictError) as e:
        R.check_run_dir(tmp_path, {"lr": 0.2}, append_env=False, start_over="train.resume=false")
    assert "set train.resume=false to start over there (it removes the records of every config in the " in (
        str(e.value)
    ) and f"or delete {tmp_path}" in str(e.value)


def test_start_over_removes_tttlab_records_only_and_refuses_another_tools_file(tmp_path, caplog):
    """``RunDir.start_over`` emptied every ``records*.jsonl`` whatever it held: a training run with
    ``train.resume=false`` (or torch_ttt with no checkpoint, its default) given ``out_dir=.`` or a folder of
    another tool wiped that tool's ``records.jsonl`` (JSON lines of its own, or text), counting the lines as
    'torn'.  A complete line that is not a tttlab record is a RunDirConflictError naming the file and line,
    and no file of the folder is changed (the check comes before any is emptied); a torn last line, a
    subfolder and a folder named like a records file are no obstacle."""
    ours = {"method": "m", "metric": "loss", "value": 1.0, "config_hash": "a"}
    contents = {
        "records-rank1.jsonl": (json.dumps(ours) + "\n").encode(),  # sorted first: emptied first, before
        "records.jsonl": b'{"epoch": 1, "loss": 0.3}\n{"epoch": 2, "loss": 0.2}\n',
        "records_notes.jsonl": b"free text\n",
    }
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "records-old.jsonl").mkdir()  # not a file: left alone
    rd = R.RunDir(tmp_path, {"lr": 0.1})
    with caplog.at_level("WARNING", logger="tttlab.core.records"):
        with pytest.raises(R.RunDirConflictError) as e:
            rd.start_over("train.resume=false")
    assert f"{tmp_path / 'records.jsonl'}:1 is not a tttlab record" in str(e.value), str(e.value)
    assert "starting over (train.resume=false)" in str(e.value) and "another out_dir" in str(e.value)
    assert {n: (tmp_path / n).read_bytes() for n in contents} == contents, "nothing removed"
    assert "removing" not in caplog.text
    (tmp_path / "records.jsonl").unlink()
    with pytest.raises(R.RunDirConflictError, match="records_notes.jsonl:1 is not a tttlab record"):
        rd.start_over("train.resume=false")
    (tmp_path / "records_notes.jsonl").unlink()
    with open(tmp_path / "records-rank1.jsonl", "ab") as f:
        f.write(b'{"epoch": 3, "lo')  # a torn last line goes, whatever it held
    assert rd.start_over("train.resume=false") == {"a": 1, None: 1}
    assert (tmp_path / "records-rank1.jsonl").read_bytes() == b""


def test_rundir_start_over_refuses_another_tools_file_before_writing_anything(tmp_path):
    """``RunDir(start_over=...)`` (how every training command starts over) checks the folder's records files
    before it writes its ``config.yaml`` / ``env.json``: a folder of another tool given as ``out_dir`` is
    refused as it was, not left with our files in it (they were written first, then the refusal came)."""
    (tmp_path / "records.jsonl").write_bytes(b'{"epoch": 1, "loss": 0.3}\n')
    (tmp_path / "config.yaml").write_text("theirs: 1\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(R.RunDirConflictError, match="records.jsonl:1 is not a tttlab record"):
        R.RunDir(tmp_path, {"lr": 0.1}, start_over="train.resume=false")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_rundir_drop_records_replaces_only_its_configs_records_atomically(tmp_path, caplog, monkeypatch):
    """``RunDir.drop_records()``: what an evaluate run again (e.g. after a kill) calls before it writes."""
    cfg = {"method": "m", "seed": 0}
    rd = R.RunDir(tmp_path, cfg)
    with rd.writer(method="m", metric="accuracy") as w:
        w.write(value=0.1, step=0)
    with R.RecordWriter(rd.records_path, {"method": "m", "metric": "accuracy", "config_hash": "other"}) as w:
        w.write(value=0.2, step=1)
    with rd.writer(method="m", metric="accuracy") as w:
        w.write(value=0.3, step=2)
    with open(rd.records_path, "ab") as f:
        f.write(b'{"method": "m", "metric": "acc')  # a writer killed mid-line
    before = rd.records_path.read_bytes()
    # atomic: a rewrite that fails (killed) before its rename leaves the file as it was, and no temp file
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        rd.drop_records()
    monkeypatch.undo()
    assert rd.records_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "env.json", "records.jsonl"]
    inode = rd.records_path.stat().st_ino
    again = R.RunDir(tmp_path, cfg)  # the same config run again
    assert again.config_hash == rd.config_hash == R.config_hash(cfg)
    assert again.drop_records() == 2
    assert rd.records_path.stat().st_ino != inode, "rewritten by a rename, not in place"
    kept = R.read_jsonl(rd.records_path)
    assert [(r["config_hash"], r["step"]) for r in kept] == [("other", 1)]
    assert rd.records_path.read_bytes().endswith(b"\n"), "the torn tail went too"
    assert again.drop_records() == 0 and R.read_jsonl(rd.records_path) == kept
    # another config in the same folder drops its own records only
    with _config_replaced(caplog):
        other = R.RunDir(tmp_path, {"method": "m", "seed": 1})
    assert other.drop_records() == 0 and R.read_jsonl(rd.records_path) == kept


def test_a_merge_killed_before_removing_the_rank_files_merges_once(tmp_path):
    """Kill audit: merge_records writes records.jsonl, then removes the rank files; killed in between, the
    next merge (the run started again) added the rank files' records a second time."""
    for rank in (0, 1):
        with R.RunDir(tmp_path, rank=rank).writer(method="m", metric="accuracy") as w:
            w.write(value=float(rank), step=rank, wall_time_s=0.25 * rank)
    R.merge_records(tmp_path, world_size=2, remove=False)  # as if killed before the unlink
    with R.RunDir(tmp_path, rank=1).writer(method="m", metric="accuracy") as w:  # rank 1 goes on
        w.write(value=2.0, step=2)
    R.merge_records(tmp_path, world_size=2)
    assert R.load_records(tmp_path)["step"].tolist() == [0, 1, 2]


def test_rundir_checkpoint_path_without_making_the_run(tmp_path):
    """``RunDir.checkpoint_path_in``: the same path as a RunDir's ``checkpoint_path``, made without
    creating anything (a trainer reads the checkpoint to resume before it opens the run)."""
    from tttlab.core.records import RunDir

    out = tmp_path / "run"
    assert RunDir.checkpoint_path_in(out) == out / "checkpoints" / "last.ckpt" and not out.exists()
    assert RunDir.checkpoint_path_in(str(out), "best", ".pt") == out / "checkpoints" / "best.pt"
    assert RunDir(out).checkpoint_path("best", ".pt") == RunDir.checkpoint_path_in(out, "best", ".pt")


def _evaluated(path, cfg, **kw) -> R.RunDir:
    rd = R.RunDir(path, cfg, **kw)
    with rd.writer(method=cfg["method"], metric="accuracy") as w:
        w.write(value=0.5, corruption="fog", severity=5)
    return rd


def test_an_evaluation_into_a_folder_with_another_configs_records_is_an_error(tmp_path, caplog, monkeypatch):
    """``other_config="error"`` (the evaluates): the error names the folder, both hashes and methods and the
    differing keys, and leaves the folder as it was; the same config resumes; the default still warns."""
    monkeypatch.delenv(R.APPEND_ENV, raising=False)
    first = {"method": "pkg.tent", "benchmark": {"severities": [3]}, "seed": 0}
    second = {"method": "pkg.tent", "benchmark": {"severities": [5]}, "seed": 0}
    rd = _evaluated(tmp_path, first, other_config="error")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(R.RunDirConflictError) as err:
        R.RunDir(tmp_path, second, other_config="error")
    msg = str(err.value)
    assert str(tmp_path) in msg and rd.config_hash in msg and R.config_hash(second) in msg
    assert "benchmark.severities: [3] -> [5]" in msg and "'pkg.tent'" in msg
    assert "new out_dir" in msg and f"{R.APPEND_ENV}=1" in msg
    assert isinstance(err.value, TTTLabError)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, "nothing written"
    # the same check before an evaluate computes anything (no RunDir yet)
    with pytest.raises(R.RunDirConflictError, match=r"benchmark\.severities: \[3\] -> \[5\]"):
        R.check_run_dir(tmp_path, second)
    R.check_run_dir(tmp_path, first)
    R.check_run_dir(tmp_path / "new", second)
    monkeypatch.setenv(R.APPEND_ENV, "1")
    R.check_run_dir(tmp_path, second)
    monkeypatch.delenv(R.APPEND_ENV)
    again = R.RunDir(tmp_path, first, other_config="error")  # the same config: resumes
    assert again.config_hash == rd.config_hash
    # a folder whose config wrote no records yet is taken over
    empty = tmp_path / "empty"
    R.RunDir(empty, first, other_config="error")
    assert R.RunDir(empty, second, other_config="error").config_hash == R.config_hash(second)
    # identity: keys left out of it (say the device) do not make another config
    keyed = tmp_path / "keyed"
    _evaluated(keyed, {**first, "device": "cpu"}, other_config="error")

    def without_device(c):
        return {k: v for k, v in c.items() if k != "device"}

    R.RunDir(keyed, {**first, "device": "cuda"}, other_config="error", identity=without_device)
    with pytest.raises(R.RunDirConflictError, match="device: 'cuda' -> 'mps'"):
        R.RunDir(keyed, {**first, "device": "mps"}, other_config="error")
    # the default (training runs, which check their own config) replaces it with a warning, as before
    with _config_replaced(caplog):
        R.RunDir(tmp_path, second)
    with pytest.raises(InvalidInputError, match="other_config='keep'"):
        R.RunDir(tmp_path / "x", first, other_config="keep")


@pytest.mark.parametrize("policy", ["error", "warn"])
def test_a_config_that_differs_only_in_display_keys_is_the_same_run(tmp_path, monkeypatch, policy):
    """Rerunning a command with only ``logging.progress`` / ``logging.level`` / ``progress`` changed was
    refused as 'holds the records of another config ... differs in logging.progress' (evaluates) or warned
    'created with a different config' and left the records under the old hash (training runs).  It is the
    same run now: no error, no warning, the records carry the new config's hash (one folder, one hash)."""
    import warnings

    monkeypatch.delenv(R.APPEND_ENV, raising=False)
    quiet = {
        "method": "pkg.tent",
        "seed": 0,
        "progress": False,
        "logging": {"progress": False, "level": "INFO"},
    }
    shown = {**quiet, "progress": True, "logging": {"progress": True, "level": "DEBUG"}}
    assert R.config_hash(quiet) != R.config_hash(shown), "config_hash itself keeps every key"
    _evaluated(tmp_path, quiet, other_config=policy)
    with (tmp_path / "records.jsonl").open("a") as f:
        f.write('{"method": "pkg.tent", "metr')  # a torn last line stays as it is
    R.check_run_dir(tmp_path, shown)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rd = R.RunDir(tmp_path, shown, other_config=policy)
    assert rd.config_hash == R.config_hash(shown) == R.config_hash(R._load_yaml_config(rd.config_path))
    with pytest.warns(UserWarning, match="torn last record"):
        df = R.load_records(tmp_path)
    assert list(df["config_hash"]) == [R.config_hash(shown)] and list(df["value"]) == [0.5]
    assert (tmp_path / "records.jsonl").read_text().endswith('"metr'), "the torn line kept"
    assert rd.drop_records() == 1, "an evaluate run again replaces them"
    # display keys only: another value of a real key is still another config, with or beside them
    other = {**shown, "seed": 1}
    _evaluated(tmp_path / "b", shown, other_config="error")
    with pytest.raises(R.RunDirConflictError, match="seed: 0 -> 1"):
        R.check_run_dir(tmp_path / "b", {**other, "progress": False})
    with pytest.raises(R.RunDirConflictError, match="seed: 0 -> 1"):
        R.RunDir(tmp_path / "b", other, other_config="error")
    # display_keys=() restores the strict check; dotted keys name nested ones; identity applies as well
    with pytest.raises(R.RunDirConflictError, match="progress: True -> False"):
        R.check_run_dir(tmp_path / "b", quiet, display_keys=())
    R.check_run_dir(
        tmp_path / "b",
        {**shown, "logging": {"progress": False, "level": "DEBUG"}},
        display_keys=["logging.progress"],
    )
    with pytest.raises(R.RunDirConflictError, match="logging.level"):
        R.check_run_dir(
            tmp_path / "b",
            {**shown, "logging": {"progress": True, "level": "INFO"}},
            display_keys=["logging.progress"],
        )
    R.check_run_dir(
        tmp_path / "b",
        {**quiet, "device": "cpu"},
        identity=lambda c: {k: v for k, v in c.items() if k != "device"},
    )
    assert R.without_keys({"a": 1, "b": {"c": 2, "d": 3}}, ["b.c", "x.y", "z"]) == {"a": 1, "b": {"d": 3}}


def test_a_config_that_differs_only_in_resumable_keys_is_the_same_run(tmp_path, caplog, monkeypatch):
    """A training run resumed with only ``train.checkpoint_every`` changed warned 'created with a different
    config' and left its records under the old hash beside the new config.yaml.  A command's
    ``resumable_keys`` are left out as display keys are: no warning, the records re-tagged; any other key
    still makes another config.  ``check_run_dir(append_env=False)`` (a training run without a checkpoint
    to resume) ignores TTTLAB_APPEND_TO_OTHER_CONFIG and says to delete the folder instead."""
    import warnings

    monkeypatch.delenv(R.APPEND_ENV, raising=False)
    keys = ("train.checkpoint_every", "out_dir")
    first = {"method": "pkg.ttt", "seed": 0, "out_dir": "a", "train": {"checkpoint_every": 200, "lr": 0.1}}
    changed = {**first, "out_dir": "b", "train": {"checkpoint_every": 7, "lr": 0.1}}
    _evaluated(tmp_path, first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        R.check_run_dir(tmp_path, changed, resumable_keys=keys)
        rd = R.RunDir(tmp_path, changed, resumable_keys=keys)
    assert rd.config_hash == R.config_hash(changed) != R.config_hash(first), "config_hash keeps every key"
    assert list(R.load_records(tmp_path)["config_hash"]) == [R.config_hash(changed)]
    # without them (the default): another config, as before
    with _config_replaced(caplog):
        R.RunDir(tmp_path, first)
    assert list(R.load_records(tmp_path)["config_hash"]) == [R.config_hash(changed)], "not re-tagged"
    other = {**changed, "train": {"checkpoint_every": 7, "lr": 0.2}}
    # the folder's config is `first` again: out_dir and checkpoint_every differ too, but only lr counts
    with pytest.raises(R.RunDirConflictError, match=r"differs in train\.lr: 0\.1 -> 0\.2\. Records"):
        R.check_run_dir(tmp_path, other, resumable_keys=keys)
    monkeypatch.setenv(R.APPEND_ENV, "1")
    R.check_run_dir(tmp_path, other, resumable_keys=keys)  # an evaluate may be asked to append
    with pytest.raises(R.RunDirConflictError, match=f"or delete {tmp_path} to start this config there") as e:
        R.check_run_dir(tmp_path, other, resumable_keys=keys, append_env=False)
    assert R.APPEND_ENV not in str(e.value)


def _configs_of_records(path) -> dict[str, str]:
    """``{config_hash: file}`` of the configs a run folder holds (``config.yaml`` and ``config-<hash>.yaml``)."""
    return {R.config_hash(R._load_yaml_config(f)): f.name for f in sorted(path.glob("config*.yaml"))}


def test_a_rerun_with_other_keys_keeps_the_earlier_config_beside_its_records(tmp_path, caplog):
    """A training run resumed with a key changed that is neither a training key nor a resumable one (torch_ttt
    ``eval.noise_std``: the trained model is kept, the evaluations computed anew under the new hash) printed
    core's UserWarning 'created with a different config ... overwriting it' with a stray source line, and the
    earlier records kept a ``config_hash`` that no ``config.yaml`` of the folder matched any more.  Now the
    earlier config is kept as ``config-<hash>.yaml`` beside its records (every record's hash names a config
    file of the folder), and one logged warning names both hashes, the keys that count and what was kept;
    a folder with no record of the earlier config keeps no copy and says so."""
    keys = ("out_dir",)
    first = {"method": "pkg.ttt", "seed": 0, "out_dir": "a", "logging": {"progress": False},
             "eval": {"noise_std": 2.0, "steps": [0, 1]}}  # fmt: skip
    second = {
        **first,
        "out_dir": "b",
        "logging": {"progress": True},
        "eval": {"noise_std": 1.0, "steps": [0, 1]},
    }
    h1, h2 = R.config_hash(first), R.config_hash(second)
    rd = R.RunDir(tmp_path, first, resumable_keys=keys)
    with rd.writer(method="pkg.ttt", metric="accuracy") as w:
        w.write(value=0.5, step=0)
        w.write(value=0.6, step=1)
    with _config_replaced(caplog):
        rd = R.RunDir(tmp_path, second, resumable_keys=keys)
    assert caplog.records[0].getMessage() == (
        f"{tmp_path}: this run's config (hash {h2}) differs from the folder's config.yaml (hash {h1}) in "
        "eval.noise_std: 2.0 -> 1.0; config.yaml now holds this run's; the folder's 2 records of the earlier "
        f"config keep its config_hash, and that config is kept as config-{h1}.yaml"
    ), "the display and resumable keys (logging.progress, out_dir) are not named"
    assert _configs_of_records(tmp_path) == {h2: "config.yaml", h1: f"config-{h1}.yaml"}
    with rd.writer(method="pkg.ttt", metric="accuracy") as w:
        w.write(value=0.7, step=0)
    df = R.load_records(tmp_path)
    assert list(df["config_hash"]) == [h1, h1, h2], "no record is re-tagged or removed"
    # back to the first config: the second's record keeps its config too; every record names a config file
    with _config_replaced(
        caplog,
        f"1 record of the earlier config keeps its config_hash, and that config is kept as config-{h2}.yaml",
    ):
        R.RunDir(tmp_path, first, resumable_keys=keys)
    assert set(R.load_records(tmp_path)["config_hash"]) <= set(_configs_of_records(tmp_path))
    assert R._load_yaml_config(tmp_path / f"config-{h2}.yaml") == second
    # ... and config.yaml holds the first config again: its kept copy goes (one file per config)
    assert sorted(p.name for p in tmp_path.glob("config*.yaml")) == [f"config-{h2}.yaml", "config.yaml"]
    # a start over removes the kept configs with their records (and says so, with how to resume next time)
    caplog.clear()
    with caplog.at_level("WARNING", logger="tttlab.core.records"):
        R.RunDir(tmp_path, first, resumable_keys=keys, start_over="train.resume=false")
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: starting over (train.resume=false): removing the 3 records in the folder (2 of config_hash "
        f"{h1}, 1 of config_hash {h2}) and config-{h2}.yaml; train.resume=false starts over on every run: leave "
        "it out of the next command to resume"
    ]
    assert sorted(p.name for p in tmp_path.glob("config*.yaml")) == ["config.yaml"]
    # only kept configs go: a file of the user's named like one stays (a start over removed any config-*.yaml)
    (tmp_path / "config-mine.yaml").write_text("a: 1\n")
    R.RunDir(tmp_path, first, resumable_keys=keys, start_over="train.resume=false")
    assert (tmp_path / "config-mine.yaml").read_text() == "a: 1\n"
    (tmp_path / "config-mine.yaml").unlink()
    # a distributed rank 0 keeps it for another rank's records of it too (it looked in its own file only)
    ranks = tmp_path / "ranks"
    R.RunDir(ranks, first, rank=0)
    with R.RunDir(ranks, first, rank=1).writer(method="pkg.ttt", metric="accuracy") as w:
        w.write(value=0.5, step=0)
    with _config_replaced(caplog, "the folder's 1 record of the earlier config keeps its config_hash"):
        R.RunDir(ranks, second, rank=0)
    assert _configs_of_records(ranks) == {h2: "config.yaml", h1: f"config-{h1}.yaml"}
    # a folder without a record of the earlier config keeps no copy of it
    empty = tmp_path / "empty"
    R.RunDir(empty, first)
    with _config_replaced(
        caplog, r"config.yaml now holds this run's \(no record was written under the earlier one\)$"
    ):
        R.RunDir(empty, second)
    assert sorted(p.name for p in empty.glob("config*.yaml")) == ["config.yaml"]


def test_a_distributed_rank_0_retags_its_own_records_file_only(tmp_path):
    """Rank 0's RunDir re-tagged every records*.jsonl of the folder (temp file + rename), other ranks'
    ``records-rank<r>.jsonl`` too, which those ranks may be opening to append to: lines appended to the
    replaced file were lost.  A distributed rank 0 re-tags its own file only; a run without ranks (one
    process, e.g. the merge's) all of them."""
    quiet = {"method": "pkg.tent", "logging": {"progress": False}}
    shown = {**quiet, "logging": {"progress": True}}
    for rank in (0, 1):
        _evaluated(tmp_path, quiet, rank=rank)
    shard = tmp_path / "records-rank1.jsonl"
    appender = shard.open("ab")  # rank 1, about to append
    inode = shard.stat().st_ino
    R.RunDir(tmp_path, shown, rank=0)
    assert shard.stat().st_ino == inode, "rank 1's file was replaced under it"
    appender.write(b'{"method": "pkg.tent", "metric": "accuracy", "value": 1.0}\n')
    appender.close()
    assert len(R.read_jsonl(shard)) == 2, "rank 1's line reached its file"
    by_file = R.load_records(tmp_path, with_source=True)
    own = by_file[by_file["source"] == str(tmp_path / "records.jsonl")]
    assert list(own["config_hash"]) == [R.config_hash(shown)]
    one = tmp_path / "one"  # no ranks (one process): every file of the folder
    for rank in (0, 1):
        _evaluated(one, quiet, rank=rank)
    R.RunDir(one, shown)
    assert list(R.load_records(one)["config_hash"]) == [R.config_hash(shown)] * 2


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_appending_to_another_configs_folder_is_explicit_and_keeps_both_configs(tmp_path, monkeypatch, how):
    monkeypatch.delenv(R.APPEND_ENV, raising=False)
    first = {"method": "pkg.tent", "lr": 0.1}
    second = {"method": "pkg.tent", "lr": 0.2}
    rd = _evaluated(tmp_path, first, other_config="error")
    if how == "environment":
        monkeypatch.setenv(R.APPEND_ENV, "1")
        kw = {"other_config": "error"}
    else:
        kw = {"other_config": "append"}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        other = _evaluated(tmp_path, second, **kw)
    df = R.load_records(tmp_path)
    assert sorted(df["config_hash"]) == sorted([rd.config_hash, other.config_hash])
    assert R._load_yaml_config(tmp_path / "config.yaml") == second
    assert R._load_yaml_config(tmp_path / f"config-{rd.config_hash}.yaml") == first
