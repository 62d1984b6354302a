"""A mistyped choice in a benchmark's arguments is argparse's usage error (exit status 2, the bad value and
the valid ones named) before any work, instead of: bench_mttt.py ``--mixers`` a ``KeyError`` traceback;
bench_pilimit.py ``--paths`` silently timing the chunked path under the unknown name; bench_ttt_mae.py
``--paths`` silently dropping the unknown path (``--paths bogus`` timed the reference alone);
bench_pilimit_amp.py ``--variants`` a ``KeyError`` and ``--kinds`` a ``ConfigError`` traceback;
bench_ttt_mae_amp.py / bench_memo_tpt_amp.py ``--modes`` a ``KeyError`` (the latter's ``--methods`` a
``ConfigError``) traceback; bench_tpt_zero_shot.py ``--arch`` an ``UnknownNameError`` traceback
(bench_memo_tpt.py ``--tpt-arch`` the same, after the whole views benchmark); a bad ``--dtype`` a
``TypeError`` traceback (bench_mttt.py) or a table of failed rows with exit status 0 (bench_pilimit.py);
ttt_rand_accuracy.py ``--models 0`` a ``StatisticsError``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

CASES = [
    ("bench_mttt.py", "jax", ["--mixers", "linear_attention", "mttt_mpl"], "invalid choice: 'mttt_mpl'"),
    ("bench_pilimit.py", "argparse", ["--paths", "reference", "chunk"], "invalid choice: 'chunk'"),
    ("bench_ttt_mae.py", "torch", ["--paths", "loop,batch"], "--paths loop,batch: batch unknown"),
    ("bench_pilimit_amp.py", "tttlab.pilimit", ["--variants", "fp32,fp16"], "fp16 unknown"),
    ("bench_pilimit_amp.py", "tttlab.pilimit", ["--kinds", "inf,infinite"], "model.kind='infinite'"),
    ("bench_ttt_mae_amp.py", "torch", ["--modes", "fp32,fp16"], "--modes fp32,fp16: fp16 unknown"),
    ("bench_memo_tpt_amp.py", "torch", ["--modes", "bf16,compiled"], "compiled unknown"),
    (
        "bench_memo_tpt_amp.py",
        "torch",
        ["--methods", "memo_tpt.memo,tpt"],
        "--methods memo_tpt.memo,tpt: tpt unknown",
    ),
    ("bench_memo_tpt.py", "open_clip", ["--tpt-arch", "ViT-B-61"], "--tpt-arch 'ViT-B-61': not an open_clip"),
    ("bench_mttt.py", "jax", ["--dtype", "bfloat61"], "--dtype 'bfloat61'"),
    ("bench_pilimit.py", "argparse", ["--dtype", "bf16"], "invalid choice: 'bf16'"),
    ("ttt_rand_accuracy.py", "torch", ["--models", "0"], "--models 0"),
    (
        "bench_tpt_zero_shot.py",
        "open_clip",
        ["--arch", "RN5O", "--classes", "2"],
        "unknown CLIP architecture 'RN5O'",
    ),
]


@pytest.mark.parametrize(("script", "needs", "args", "says"), CASES)
def test_bad_choice_is_a_usage_error(script, needs, args, says, monkeypatch, capsys):
    pytest.importorskip(needs)
    spec = importlib.util.spec_from_file_location(script[:-3] + "_under_test", BENCH / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exc:
        mod.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{script}: error: " in err and says in err, err
