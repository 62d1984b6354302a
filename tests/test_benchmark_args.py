"""A mistyped choice in a benchmark's arguments is argparse's usage error (exit status 2, the bad value and
the valid ones named) before any work, instead of: bench_mttt.py ``--mixers`` a ``KeyError`` traceback;
bench_pilimit.py ``--paths`` silently timing the chunked path under the unknown name; bench_ttt_mae.py
``--paths`` silently dropping the unknown path (``--paths bogus`` timed the reference alone);
bench_pilimit_amp.py ``--variants`` a ``KeyError`` and ``--kinds`` a ``ConfigError`` traceback;
bench_ttt_mae_amp.py / bench_memo_tpt_amp.py ``--modes`` a ``KeyError`` (the latter's ``--methods`` a
``ConfigError``) traceback; bench_tpt_zero_shot.py ``--arch`` an ``UnknownNameError`` traceback
(bench_memo_tpt.py ``--tpt-arch`` the same, after the whole views benchmark); a bad ``--dtype`` a
``TypeError`` traceback (bench_mttt.py) or a table of failed rows with exit status 0 (bench_pilimit.py);
ttt_rand_accuracy.py ``--models 0`` a ``StatisticsError``.

Dependencies and choices are checked before any work: bench_corruptions.py without its reference
(imagecorruptions-imaug) stops with the install command (it was a ``ModuleNotFoundError`` traceback before
``--help`` could print) and its bad ``--corruptions``/``--images``/``--repeats`` are usage errors before the
photos load; bench_torch_ttt.py without upstream torch-ttt stops with the install command and an unknown
``--engines``/``--variants`` value is a usage error, both before its two models train (it trained them, then
stopped in a traceback or printed an empty table with exit status 0)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_bench(script: str):
    """``benchmarks/<script>`` imported as a module (its ``main`` not run), with ``benchmarks/`` on
    ``sys.path`` as when it is run (for ``_sweep``)."""
    spec = importlib.util.spec_from_file_location(script[:-3] + "_under_test", BENCH / script)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def usage_error(capsys, exc) -> str:
    """The last stderr line of a usage error (exit status 2)."""
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def no_work(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} before the arguments were checked")

    return fail


CASES = [
    ("bench_mttt.py", "jax", ["--mixers", "linear_attention", "mttt_mpl"], "invalid choice: 'mttt_mpl'"),
    ("bench_pilimit.py", "argparse", ["--paths", "reference", "chunk"], "invalid choice: 'chunk'"),
    (
        "bench_ttt_mae.py",
        "torch",
        ["--paths", "loop,batch"],
        "argument --paths: unknown path 'batch' (did you mean 'batched'?); "
        "expected a comma-separated subset of loop,batched,bf16,compiled,compiled_bf16",
    ),
    (
        "bench_pilimit_amp.py",
        "tttlab.pilimit",
        ["--variants", "fp32,fp16"],
        "argument --variants: unknown variant 'fp16' (did you mean 'bf16'?); "
        "expected a comma-separated subset of fp32,bf16,compile,bf16+compile",
    ),
    ("bench_pilimit_amp.py", "tttlab.pilimit", ["--kinds", "inf,infinite"], "model.kind='infinite'"),
    (
        "bench_ttt_mae_amp.py",
        "torch",
        ["--modes", "fp32,fp16"],
        "argument --modes: unknown mode 'fp16' (did you mean 'bf16'?); "
        "expected a comma-separated subset of fp32,bf16,compile",
    ),
    (
        "bench_memo_tpt_amp.py",
        "torch",
        ["--modes", "bf16,compiled"],
        "argument --modes: unknown mode 'compiled' (did you mean 'compile'?); expected a comma-separated subset",
    ),
    (
        "bench_memo_tpt_amp.py",
        "torch",
        ["--methods", "memo_tpt.memo,tpt"],
        "argument --methods: unknown method 'tpt' (did you mean 'memo_tpt.tpt'?); expected a comma-separated "
        "subset of memo_tpt.memo,memo_tpt.tpt,memo_tpt.tpt_ensemble,memo_tpt.clip_zeroshot",
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
    mod = load_bench(script)
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exc:
        mod.main()
    err = usage_error(capsys, exc)
    assert f"{script}: error: " in err and says in err, err


def test_corruptions_without_the_reference_is_a_usage_error_with_the_install_command(monkeypatch, capsys):
    bench = load_bench("bench_corruptions.py")
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # import raises ImportError
    monkeypatch.setattr(bench, "load_photos", no_work("the photos were loaded"))
    with pytest.raises(SystemExit) as exc:
        bench.main(["--images", "1", "--repeats", "1"])
    assert "pip install imagecorruptions-imaug==1.1.5" in usage_error(capsys, exc)


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--corruptions", "gaussian_nois"], "unknown corruption 'gaussian_nois'"),
     (["--corruptions", "fog,bogus"], "unknown corruption 'bogus'"),
     (["--images", "0"], "--images 0"),
     (["--repeats", "0"], "--repeats 0")],
)  # fmt: skip
def test_corruptions_bad_argument_is_a_usage_error(args, says, monkeypatch, capsys):
    pytest.importorskip("tttlab.core.corruptions")
    bench = load_bench("bench_corruptions.py")
    monkeypatch.setitem(sys.modules, "imagecorruptions", types.ModuleType("imagecorruptions"))
    monkeypatch.setattr(bench, "load_photos", no_work("the photos were loaded"))
    with pytest.raises(SystemExit) as exc:
        bench.main(args)
    err = usage_error(capsys, exc)
    assert ": error: " in err and says in err, err


def test_torch_ttt_without_upstream_stops_before_training(monkeypatch, capsys):
    pytest.importorskip("tttlab.torch_ttt")
    bench = load_bench("bench_torch_ttt.py")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torch_ttt" else real(n, *a))
    monkeypatch.setattr(bench, "train", no_work("trained"))
    with pytest.raises(SystemExit) as exc:
        bench.main(["--batches", "1", "--repeats", "1"])
    assert exc.value.code == 2
    assert "pip install --no-deps torch-ttt==0.0.2 einops" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--engines", "tnet"], "argument --engines: unknown engine 'tnet' (did you mean 'tent'?); expected a "
                              "comma-separated subset of ttt,tent,memo"),
     (["--engines", "ttt,mem", "--variants", "none"], "unknown engine 'mem' (did you mean 'memo'?)"),
     (["--variants", "none,bf61"], "argument --variants: unknown variant 'bf61' (did you mean 'bf16'?)"),
     (["--variants", "compile+bf16"], "unknown variant 'compile+bf16'")],
)  # fmt: skip
def test_torch_ttt_bad_argument_stops_before_training(args, says, monkeypatch, capsys):
    pytest.importorskip("tttlab.torch_ttt")
    bench = load_bench("bench_torch_ttt.py")
    monkeypatch.setattr(bench, "train", no_work("trained"))
    with pytest.raises(SystemExit) as exc:
        bench.main(["--batches", "1", "--repeats", "1", *args])
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--classes", "0"], "--classes 0: expected 1..1000"),
     (["--images", "0"], "--images, --views and --threads must be >= 1"),
     (["--amp", "fp8"], "invalid choice: 'fp8'"),
     (["--arch", "ViT-B-61", "--classes", "2"], "--arch: unknown CLIP architecture 'ViT-B-61'")],
)  # fmt: skip
def test_tpt_prompt_length_bad_argument_is_a_usage_error(args, says, monkeypatch, capsys):
    pytest.importorskip("open_clip")
    bench = load_bench("bench_tpt_prompt_length.py")
    with pytest.raises(SystemExit) as exc:
        bench.main(args)
    err = usage_error(capsys, exc)
    assert "error: " in err and says in err, err


def test_names_subset_keeps_order_drops_repeats_and_parses_the_default():
    """``_sweep.names_subset``, the ``type=`` of the five scripts' comma-separated options: the names in the
    order given, a repeated one once; a string default comes out as the list too; every unknown name is
    reported (each with its did-you-mean), with the choices."""
    import argparse

    sys.path.insert(0, str(BENCH))
    try:
        from _sweep import names_subset
    finally:
        sys.path.remove(str(BENCH))
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", type=names_subset(("fp32", "bf16", "compile"), "mode"), default="fp32,bf16")
    assert ap.parse_args([]).modes == ["fp32", "bf16"]
    assert ap.parse_args(["--modes", "compile,fp32,compile"]).modes == ["compile", "fp32"]
    with pytest.raises(argparse.ArgumentTypeError) as exc:
        names_subset(("fp32", "bf16", "compile"), "mode")("fp16,compile,xyz")
    assert str(exc.value) == (
        "unknown mode 'fp16' (did you mean 'bf16'?); unknown mode 'xyz'; "
        "expected a comma-separated subset of fp32,bf16,compile"
    )


SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if "\ndef main(" in p.read_text())


def help_text(script, monkeypatch, capsys) -> str:
    """``python benchmarks/<script> --help`` in this process (the scripts import torch or JAX at the top; a
    subprocess per script would import them again)."""
    try:
        mod = load_bench(script)
    except ModuleNotFoundError as exc:
        pytest.skip(f"{script} needs {exc.name}")
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exc:
        mod.main()
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_what_the_script_measures(script, monkeypatch, capsys):
    """``--help`` of every script shows at least the first sentence of its docstring (bench_memo_tpt_amp.py,
    bench_ttt_mae_amp.py, bench_pilimit_amp.py and bench_mttt_dtype.py printed the bare usage and options)."""
    doc = " ".join(load_doc(script).split())
    sentence = doc[: doc.index(". ") + 1] if ". " in doc else doc
    assert sentence.endswith(".") and len(sentence.split()) >= 5, sentence
    # whitespace ignored: argparse re-wraps a plain description, breaking lines at hyphens too
    assert "".join(sentence.split()) in "".join(help_text(script, monkeypatch, capsys).split())


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_the_commands_in_the_docstring(script, monkeypatch, capsys):
    """``--help`` shows every command its docstring gives (bench_memo_tpt.py, bench_mttt.py,
    bench_ttt_mae.py and bench_tpt_zero_shot.py showed only their first line or paragraph)."""
    commands = [
        " ".join(line.split()) for line in load_doc(script).splitlines() if f"benchmarks/{script}" in line
    ]
    if not commands:
        pytest.skip(f"{script}'s docstring gives no command")
    shown = " ".join(help_text(script, monkeypatch, capsys).split())
    assert all(c in shown for c in commands), [c for c in commands if c not in shown]


def load_doc(script: str) -> str:
    import ast

    return ast.get_docstring(ast.parse((BENCH / script).read_text())) or ""


@pytest.mark.parametrize(
    "script", ["bench_memo_tpt_amp.py", "bench_ttt_mae_amp.py", "bench_pilimit_amp.py", "bench_mttt_dtype.py"]
)
def test_help_gives_the_command_of_benchmarks_md(script, monkeypatch, capsys):
    """The mixed-precision scripts' ``--help`` gives the command that BENCHMARKS.md documents for their tables
    (their docstrings had other arguments: a smaller run, or ``--out`` onto the hand-annotated .md file)."""
    import re

    documented = re.findall(rf"`[^`]*?python (benchmarks/{re.escape(script)}[^`;]*)`",
                            (BENCH.parent / "BENCHMARKS.md").read_text())  # fmt: skip
    assert documented, f"BENCHMARKS.md documents no command for {script}"
    assert documented[0].strip() in help_text(script, monkeypatch, capsys)
