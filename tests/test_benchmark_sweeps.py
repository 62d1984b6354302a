"""benchmarks/sweep_*.py: a bad argument ends the sweep at once with argparse's one-line usage error (exit
status 2, no traceback, no run started), instead of a ``ValueError``/``KeyError`` traceback or subprocesses
that fail one by one (an unknown engine or setting) or a sweep that silently runs nothing (``--only`` with a
label that does not exist).  The scripts import no torch/JAX before parsing, so each call takes well under a
second.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    out = tmp_path / "runs"
    return subprocess.run([sys.executable, str(BENCH / script), "--out-dir", str(out), *args],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip


@pytest.mark.parametrize(
    ("script", "args", "says"),
    [
        ("sweep_mttt_mnist.py", ["--sgd-t", "pixel"], "--sgd-t: 'pixel'"),
        ("sweep_mttt_mnist.py", ["--sgd-t", "pixel=x"], "--sgd-t: 'pixel=x'"),
        ("sweep_mttt_mnist.py", ["--sgd-t", "pix=7"], "--sgd-t: 'pix=7'"),
        ("sweep_mttt_mnist.py", ["--tokens", "patches"], "invalid choice: 'patches'"),
        ("sweep_mttt_mnist.py", ["--only", "mttt_mlp"], "--only mttt_mlp: not a mixer label"),
        ("sweep_torch_ttt_mnist_c.py", ["--engines", "tentt"], "invalid choice: 'tentt'"),
        ("sweep_torch_ttt_mnist_c.py", ["--engines", "source", "--settings", "episodicc"], "'episodicc'"),
    ],
)
def test_bad_argument_is_a_usage_error(script, args, says, tmp_path):
    res = run(script, *args, tmp_path=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: ") and says in last, last
    assert not (tmp_path / "runs").exists()  # nothing started


def test_only_accepts_a_label_made_by_sgd_t(tmp_path):
    """``--sgd-t pixel=7`` renames the SGD mixer to ``mttt_mlp_T7_sgd``; ``--only`` knows that label (the
    check passes, then ``--deadline 0`` kills the one run at once and the table reports it)."""
    res = run("sweep_mttt_mnist.py", "--tokens", "pixel", "--sgd-t", "pixel=7", "--only", "mttt_mlp_T7_sgd",
              "--deadline", "0", tmp_path=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "| pixel | mttt_mlp_T7_sgd |" in res.stdout


def test_sweep_choices_match_the_package():
    """The torch_ttt sweep's hard-coded choices (kept import-free for a fast usage error) are the engines of
    ``conf/engine`` and the settings ``evaluate`` knows."""
    conf = ROOT / "packages/torch_ttt/src/tttlab/torch_ttt/conf/engine"
    sys.path.insert(0, str(BENCH))
    try:
        import sweep_torch_ttt_mnist_c as sweep
    finally:
        sys.path.remove(str(BENCH))
    assert sorted(sweep.ENGINES) == sorted(p.stem for p in conf.glob("*.yaml"))
    evaluate = pytest.importorskip("tttlab.torch_ttt.evaluate")
    assert sorted(sweep.ALL_SETTINGS) == sorted(evaluate.RESET_FOR_SETTING)


def test_evaluate_modes_with_one_corruption(monkeypatch):
    """bench_ttt_mae_amp.py / bench_memo_tpt_amp.py ``--corruptions gaussian_noise`` ended in an IndexError
    traceback after all the evaluations: with one corruption the evaluate commands write no "mean" record
    (they need two domains).  The mean is then that domain's accuracy; s/image after the first domain is nan."""
    pd = pytest.importorskip("pandas")
    records = pytest.importorskip("tttlab.core.records")
    frame = pd.DataFrame({"corruption": ["gaussian_noise"], "value": [0.625], "wall_time_s": [2.0], "n": [8]})
    monkeypatch.setattr(records, "load_records", lambda *a, **k: frame)
    sys.path.insert(0, str(BENCH))
    try:
        import _sweep
    finally:
        sys.path.remove(str(BENCH))
    rows = _sweep.evaluate_modes(lambda cfg: "unused", ["m"], ["fp32", "bf16"], {"fp32": {}, "bf16": {}}, {},
                                 "gaussian_noise")  # fmt: skip
    assert [(r["mode"], r["acc"], r["spi"]) for r in rows] == [("fp32", 0.625, 0.25), ("bf16", 0.625, 0.25)]
    assert all(r["warm"] != r["warm"] for r in rows)  # nan


def test_torch_ttt_sweep_pins_torch_threads_whatever_the_callers_mkl_says(monkeypatch):
    """The sweep's tables depend on torch's thread count (the trained models do: IT3's episodic mean was 72.5
    with one thread against the published 75.4 with two).  It set only ``OMP_NUM_THREADS=2``; torch takes
    ``MKL_NUM_THREADS`` over it, so a caller's ``MKL_NUM_THREADS=1`` made every evaluation single-threaded.
    A torch started in the evaluation's environment must report the sweep's thread count."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(BENCH))
    try:
        import sweep_torch_ttt_mnist_c as sweep
    finally:
        sys.path.remove(str(BENCH))
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    res = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         capture_output=True, text=True, timeout=60, env=sweep.child_env())  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip()) == sweep.THREADS == 2
