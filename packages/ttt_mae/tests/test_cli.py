"""The Hydra entry point as a user runs it (``python -m``), on the cached smoke model."""

import subprocess
import sys

from tttlab.core.records import load_records
from tttlab.ttt_mae.evaluate import trained_model


def test_python_m_baseline(tmp_path, smoke_cache):
    pre, probe = trained_model("smoke", smoke_cache, 0, "cpu", False)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tttlab.ttt_mae.baseline", "+experiment=smoke_ttt", f"out_dir={out}",
           f"resume_model={pre}", f"resume_finetune={probe}", "benchmark.corruptions=[fog]",
           "benchmark.num_examples=2", "logging.progress=false"]  # fmt: skip
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", **__import__("os").environ},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("records.jsonl")
    df = load_records(out / "records.jsonl", metric="accuracy")
    assert (
        df.corruption.tolist() == ["fog"] and df.n.tolist() == [2] and set(df.method) == {"ttt_mae.baseline"}
    )
