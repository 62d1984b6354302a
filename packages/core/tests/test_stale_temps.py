"""Every caller of ``remove_stale_temps`` really cleans its folder, and the clean-up keeps what may be live.

(Mutation audit: dropping the clean-up from the run directory's top folder, from the benchmark cache or from
compare's out_dir, or treating a process that cannot be signalled as dead, passed every earlier test.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tttlab.core import records as R
from tttlab.core._io import _host_tag, remove_stale_temps
from tttlab.core.benchmark import Benchmark
from tttlab.core.data import ArrayDataset


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stale(folder: Path, name: str, pid: int | None = None, age_s: float = 3600.0) -> Path:
    """The temp file a killed atomic write of ``name`` by ``pid`` (default: a finished process) leaves."""
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f".{name}.tttlab-{_host_tag()}-{_dead_pid() if pid is None else pid}-abc123.tmp"
    p.write_bytes(b"half a file")
    old = p.stat().st_mtime - age_s
    os.utime(p, (old, old))
    return p


def test_run_dir_cleans_its_top_folder_and_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    R.RunDir(run, {"a": 1})
    top, ck = _stale(run, "records.jsonl"), _stale(run / "checkpoints", "last.ckpt")
    young = _stale(run, "config.yaml", age_s=0.0)  # a dead writer, but touched just now: kept
    R.RunDir(run, {"a": 1})
    assert not top.exists() and not ck.exists() and young.exists()


def test_benchmark_cache_folder_is_cleaned_when_a_domain_is_generated(tmp_path):
    rng = np.random.default_rng(0)
    source = ArrayDataset(rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8), np.arange(8) % 10, name="toy")

    def images():
        b = Benchmark("toy_c", source, family="mnist", corruptions=("fog",), severities=(5,), batch_size=8,
                      num_examples=8, cache_dir=tmp_path)  # fmt: skip
        return np.concatenate([x.images for x in b])

    first = images()
    (npy,) = tmp_path.rglob("*.npy")
    stale = _stale(npy.parent, npy.name)
    npy.unlink()  # the domain is generated (and saved) again
    assert np.array_equal(images(), first)
    assert npy.exists() and not stale.exists()


def test_compare_cleans_its_out_dir(tmp_path, monkeypatch):
    from tttlab.core import compare as cmp
    from tttlab.core import registry

    monkeypatch.setitem(registry.KNOWN_PACKAGES, "notapkg", "tttlab-notapkg")
    out = tmp_path / "cmp"
    stale = _stale(out, "results.csv")
    cfg = {"methods": ["notapkg.method"], "benchmark": "digits_c", "profile": "smoke", "corruptions": ["fog"],
           "num_examples": 20, "batch_size": 20, "out_dir": str(out), "jobs": 1, "progress": False}  # fmt: skip
    cmp.compare(cfg, echo=lambda *a: None)
    assert not stale.exists() and (out / "compare.yaml").exists()


def test_a_writer_that_cannot_be_signalled_is_treated_as_alive(tmp_path, monkeypatch):
    """``os.kill(pid, 0)`` raising PermissionError means the process exists (another user's): keep its file."""
    stale = _stale(tmp_path, "x.npy", pid=4242)
    real_kill = os.kill

    def kill(pid, sig):
        if pid == 4242:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(pid, sig)

    dead = _stale(tmp_path, "y.npy")
    monkeypatch.setattr(os, "kill", kill)
    assert remove_stale_temps(tmp_path, min_age_s=0) == [dead] and stale.exists()
