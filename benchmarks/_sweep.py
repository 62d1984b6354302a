"""Helpers shared by the sweep scripts in this folder (``sweep_*.py``; run as ``python benchmarks/<x>.py``,
so this folder is on ``sys.path``)."""

from __future__ import annotations

import subprocess
import time


def run_until(cmd, stop_at, env) -> subprocess.CompletedProcess:
    """``subprocess.run`` that kills the run at the monotonic time ``stop_at`` (rc -9, output kept)."""
    timeout = None if stop_at is None else max(1.0, stop_at - time.monotonic())
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return subprocess.CompletedProcess(cmd, -9, out, err + "\nkilled at the deadline")
