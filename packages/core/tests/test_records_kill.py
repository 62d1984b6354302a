"""A run folder survives a kill at any file operation of :class:`~tttlab.core.records.RunDir`.

For each way a command opens its run folder (a fresh run, the same config again, a config changed in a resumable
key only: re-tagged records, another config under ``"warn"`` or ``"append"``: a kept ``config-<hash>.yaml``, back
at an earlier config, a start over), the command's ``RunDir(...)`` is killed before its k-th file operation, for
every k: temp file made, rename, unlink, directory made, file touched.  A kill is a :class:`Killed`
(``BaseException``) raised there and at every later file operation, so no clean-up handler of the dying process
touches the folder either (its temp files stay, as after a SIGKILL).  Then the same ``RunDir(...)`` runs again
without a fault, as a user reruns the command.

Guaranteed directly after a kill at any point:

* every record (every complete line of every ``records*.jsonl``) names a ``config_hash`` that a config file of the
  folder holds: ``config.yaml``, or ``config-<hash>.yaml`` (whose content has that hash);
* every config file reads whole (atomic writes), and each records file holds either the records it held before
  the command or those it holds after an uninterrupted one, up to their ``config_hash`` (none lost or doubled;
  a start over empties a file whole);
* the folder may hold temp files of the killed writes and a ``config-<hash>.yaml`` no record names yet (or any
  more).

After the rerun the folder equals, file by file and byte by byte, the folder an uninterrupted command leaves
(``env.json`` is made constant: it holds the time), with no temp file left (a temp of a dead writer, a minute
old, is removed when the folder is opened).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tttlab.core import _io
from tttlab.core import records as R


class Killed(BaseException):  # noqa: N818 - a kill, not an error: no ``except Exception`` stops it
    """The simulated kill: raised at the chosen file operation and at every one after it."""


class _Faults:
    """Counts the file operations that change a folder; the ``kill_at``-th (from 0) and all later ones raise."""

    def __init__(self, kill_at: int | None = None):
        self.kill_at = kill_at
        self.ops: list[str] = []
        self.dead = False

    def wrap(self, what: str, real, path_arg: int = 0):
        def op(*args, **kwargs):
            if what == "mkstemp":  # named after the file it will replace: ".<name>.tttlab-<host>-<pid>-"
                path = kwargs["prefix"][1:].split(".tttlab-")[0] + " (temp)"
            else:
                path = args[path_arg]
            if self.dead:
                raise Killed(f"{what} {path} after the kill")
            if what == "mkdir" and os.path.isdir(path):  # Path.mkdir(exist_ok=True) of an existing folder
                return real(*args, **kwargs)
            if self.kill_at is not None and len(self.ops) == self.kill_at:
                self.dead = True
                raise Killed(f"killed before {what} {Path(path).name}")
            self.ops.append(f"{what} {Path(path).name}")
            return real(*args, **kwargs)

        return op


def _with_faults(monkeypatch, faults: _Faults, command):
    real_touch = Path.touch
    with monkeypatch.context() as m:
        for name in ("unlink", "remove", "mkdir", "rmdir", "truncate"):
            m.setattr(os, name, faults.wrap(name, getattr(os, name)))
        for name in ("replace", "rename"):  # named after the destination
            m.setattr(os, name, faults.wrap(name, getattr(os, name), path_arg=1))
        m.setattr(tempfile, "mkstemp", faults.wrap("mkstemp", tempfile.mkstemp))

        def touch(self, *args, **kwargs):
            if self.exists():  # only the time changes
                return real_touch(self, *args, **kwargs)
            return faults.wrap("touch", lambda p: real_touch(p, *args, **kwargs))(self)

        m.setattr(Path, "touch", touch)
        command()


def _state(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) below ``folder``."""
    if not folder.exists():
        return {}
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def _untraceable(folder: Path) -> list[str]:
    """The records of ``folder`` whose ``config_hash`` no config file of the folder holds (and any config file
    that is torn, or a ``config-<hash>.yaml`` holding another hash)."""
    if not folder.exists():
        return []
    held, bad = set(), []
    for f in sorted(folder.glob("config*.yaml")):
        h = R.config_hash(R._load_yaml_config(f))  # a torn file: InvalidInputError
        if f.name != "config.yaml" and f.name != f"config-{h}.yaml":
            bad.append(f"{f.name} holds config {h}")
        held.add(h)
    for f in sorted(folder.glob("records*.jsonl")):
        bad += [f"{f.name}: {r['config_hash']}" for r in R.read_jsonl(f) if r["config_hash"] not in held]
    return bad


def _records(folder: Path) -> dict[str, list[dict]]:
    """``{records file: its records without their config_hash}``."""
    if not folder.exists():
        return {}
    return {
        f.name: [{k: v for k, v in r.items() if k != "config_hash"} for r in R.read_jsonl(f)]
        for f in sorted(folder.glob("records*.jsonl"))
    }


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if _io._TEMP_RE.match(p.name)) if folder.exists() else []


# ---------------------------------------------------------------------------------------------------------
# the scenarios: a folder made by earlier runs, and the command's RunDir

KEYS = ("every",)  # the resumable key of these configs
A = {"method": "pkg.m", "lr": 0.1, "every": 1, "device": "cpu"}
A2 = {**A, "every": 5}  # A up to a resumable key: the same run
A_CUDA = {**A, "device": "cuda"}  # A up to a key the identity leaves out (it changes float rounding only)
B = {**A, "lr": 0.2}
C = {**A, "lr": 0.3}


def _no_device(cfg):
    return {k: v for k, v in cfg.items() if k != "device"}


def _run(path: Path, cfg, n: int, rank: int | None = None, **kw) -> None:
    rd = R.RunDir(path, cfg, rank=rank, resumable_keys=KEYS, **kw)
    with rd.writer(method="pkg.m", metric="loss", git_sha="0" * 40) as w:
        for i in range(n):
            w.write(value=float(i) + (rank or 0) / 10 + len(list(path.glob("config*"))) / 100, step=i)


def _a(p):
    _run(p, A, 2)


def _a_two_files(p):  # one process wrote records.jsonl and a rank file (folded by merge_records later)
    _run(p, A, 2)
    _run(p, None, 1, rank=1)


def _a_two_ranks(p):
    _run(p, A, 2, rank=0)
    _run(p, None, 1, rank=1)


def _a_then_b(p):  # B under "warn": config-<A>.yaml kept beside A's records
    _run(p, A, 2)
    _run(p, B, 1)


SCENARIOS = {
    "fresh run": (None, A, {}),
    "same config again": (_a, A, {}),
    "resumable key changed: re-tagged": (_a_two_files, A2, {}),
    "distributed rank 0, resumable key changed": (_a_two_ranks, A2, {"rank": 0}),
    "key outside the identity changed": (_a, A_CUDA, {"identity": _no_device}),
    "other config, warn: kept copy": (_a, B, {}),
    "other config, append: kept copy": (_a, B, {"other_config": "append"}),
    "back at an earlier config": (_a_then_b, A, {}),
    "start over, another config": (_a_then_b, C, {"start_over": "x=false"}),
    "start over, resumable key changed": (_a_two_files, A2, {"start_over": "x=false"}),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_run_folder_survives_a_kill_at_every_file_operation_of_rundir(tmp_path, monkeypatch, scenario):
    """See the module docstring: the invariants right after a kill before each file operation of the command's
    ``RunDir``, and after the rerun the same folder as an uninterrupted command leaves."""
    monkeypatch.setattr(R, "environment", lambda: {"fixed": True})  # env.json: no time, no host
    setup, cfg, kw = SCENARIOS[scenario]
    before = tmp_path / "before"
    if setup is not None:
        setup(before)
    # the reference: uninterrupted, counting the operations
    ref = tmp_path / "reference"
    if before.exists():
        shutil.copytree(before, ref)
    counted = _Faults()
    _with_faults(monkeypatch, counted, lambda: R.RunDir(ref, cfg, resumable_keys=KEYS, **kw))
    assert counted.ops, "the command changed nothing"
    assert _untraceable(ref) == [], "an uninterrupted command leaves every record traceable"
    expected, allowed = _state(ref), (_records(before), _records(ref))

    problems = []
    for k, op in enumerate(counted.ops):
        run = tmp_path / f"kill{k}"
        if before.exists():
            shutil.copytree(before, run)
        faults = _Faults(kill_at=k)
        with pytest.raises(Killed):
            _with_faults(monkeypatch, faults, lambda run=run: R.RunDir(run, cfg, resumable_keys=KEYS, **kw))
        where = f"killed before {op} (operation {k})"
        if bad := _untraceable(run):
            problems.append(f"{where}: records without their config file: {bad}")
        for name, recs in _records(run).items():
            if not any(recs == side.get(name, []) for side in allowed):
                problems.append(f"{where}: {name} holds records neither before nor after the command: {recs}")
        # the rerun, a minute later, in a new process (the killed one's temp files are stale)
        stale = time.time() - 120
        for t in _temps(run):
            os.utime(run / t, (stale, stale))
        with monkeypatch.context() as m:
            m.setattr(_io, "_pid_alive", lambda pid: False)
            R.RunDir(run, cfg, resumable_keys=KEYS, **kw)
        if _temps(run):
            problems.append(f"{where}: the rerun left temp files {_temps(run)}")
        got = _state(run)
        if got != expected:
            diff = sorted(n for n in set(got) | set(expected) if got.get(n, b"?") != expected.get(n, b"?"))
            problems.append(
                f"{where}: after the rerun the folder differs from an uninterrupted run's in {diff}"
            )
    assert problems == [], "\n".join([f"the command's file operations: {counted.ops}", *problems])


def test_a_retag_parses_each_record_once(tmp_path, monkeypatch):
    """The order of writes that makes a kill safe costs no second parse of the folder: a run folder of per-image
    records whose config changed in a resumable key is re-tagged with one ``json.loads`` per record (finding
    which files name the earlier hash stops at the first record that does; it parsed them all, then the re-tag
    again: 1.6x the time on 50,000 records)."""
    n = 100
    _run(tmp_path, A, n)
    _run(tmp_path, None, n, rank=1)  # a second records file, re-tagged too
    real, calls = R.json.loads, []

    def loads(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(R.json, "loads", loads)
    R.RunDir(tmp_path, A2, resumable_keys=KEYS)
    monkeypatch.undo()
    hashes = {r["config_hash"] for f in tmp_path.glob("records*.jsonl") for r in R.read_jsonl(f)}
    assert hashes == {R.config_hash(A2)}, "every record re-tagged"
    assert 2 * n <= len(calls) <= 2 * n + 10, len(calls)
