"""Atomic writes, run directories and the records schema, including a writer killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tttlab.core import records as R
from tttlab.core._io import atomic_write_bytes, atomic_write_json
from tttlab.core.errors import InvalidInputError


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "a.json"
    atomic_write_json(p, {"v": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"new")
    assert json.loads(p.read_text()) == {"v": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind


def test_records_roundtrip_and_fsync_per_record(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    run = R.RunDir(tmp_path / "run", config={"lr": 0.1})
    with run.writer(method="torch_ttt.tent", package="torch_ttt", framework="torch", seed=0) as w:
        for s in (1, 2, 3):
            w.write(corruption="fog", severity=s, metric="accuracy", value=0.5 + s / 10, n=100)
    assert len(calls) >= 3
    df = run.records()
    assert list(df["severity"]) == [1, 2, 3] and df["value"].tolist() == pytest.approx([0.6, 0.7, 0.8])
    assert set(df.columns) == set(R.COLUMNS)
    assert (tmp_path / "run" / "config.yaml").read_text().strip() == "lr: 0.1"
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["python"] and "numpy" in env["packages"]
    assert len(R.load_records(tmp_path / "run", severity=[1, 3])) == 2


def test_schema_errors(tmp_path):
    w = R.RecordWriter(tmp_path / "r.jsonl")
    with pytest.raises(InvalidInputError, match="acuracy"):
        w.write(method="m", metric="accuracy", value=1.0, acuracy=1)
    with pytest.raises(InvalidInputError, match="severity"):
        w.write(method="m", metric="accuracy", value=1.0, severity="5")
    with pytest.raises(InvalidInputError, match="value"):
        w.write(method="m", metric="accuracy")
    w.close()


def test_config_hash_stable():
    assert R.config_hash({"a": 1, "b": [1, 2]}) == R.config_hash({"b": [1, 2], "a": 1})
    assert R.config_hash({"a": 1}) != R.config_hash({"a": 2})


def test_killed_writer_leaves_complete_lines(tmp_path):
    path = tmp_path / "records.jsonl"
    code = textwrap.dedent(f"""
        import sys
        from tttlab.core.records import RecordWriter
        w = RecordWriter({str(path)!r})
        i = 0
        while True:
            w.write(method="m", metric="accuracy", value=float(i), step=i)
            if i == 50:
                print("ready", flush=True)
            # a torn record: half a line written, flushed, never finished
            if i == 200:
                w._file.write('{{"method": "m", "metr'); w._file.flush()
                print("torn", flush=True)
                import time; time.sleep(60)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert proc.stdout.readline().strip() == "torn"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with pytest.warns(UserWarning, match="torn"):
        df = R.load_records(path)
    assert df["step"].tolist() == list(range(201))
    # a malformed line in the middle is an error, not silently skipped
    lines = path.read_text().split("\n")
    lines[5] = "{broken"
    path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(InvalidInputError, match=":6:"):
        R.load_records(path)


def test_merge_rank_files(tmp_path):
    for rank in (0, 1, 2):
        run = R.RunDir(tmp_path, rank=rank)
        with run.writer(method="m", metric="accuracy") as w:
            w.write(value=float(rank), step=rank)
    R.merge_records(tmp_path, world_size=3)
    df = R.load_records(tmp_path)
    assert df["step"].tolist() == [0, 1, 2]
    assert not list(tmp_path.glob("records-rank*.jsonl"))
    assert R.done_keys(df, ["method", "step"]) == {("m", 0), ("m", 1), ("m", 2)}
    time.sleep(0)
