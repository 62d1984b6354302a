"""benchmarks/bench_corruptions.py (BENCHMARKS.md's corruption table): without the reference
(imagecorruptions-imaug, core's ``reference`` extra) it stops at once with argparse's usage error giving the
install command, and a bad ``--corruptions``/``--images`` is a usage error too, before the photos load (they
were a ``ModuleNotFoundError`` traceback before ``--help`` could even print, an ``UnknownNameError``
traceback after loading the photos, and numpy's "need at least one array to stack")."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_corruptions.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_corruptions_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fail_photos(n):
    raise AssertionError("the photos were loaded before the arguments were checked")


def test_missing_reference_is_a_usage_error_with_the_install_command(monkeypatch, capsys):
    bench = load_script()
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # import raises ImportError
    monkeypatch.setattr(bench, "load_photos", fail_photos)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--images", "1", "--repeats", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "pip install imagecorruptions-imaug==1.1.5" in err


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--corruptions", "gaussian_nois"], "unknown corruption 'gaussian_nois'"),
     (["--corruptions", "fog,bogus"], "unknown corruption 'bogus'"),
     (["--images", "0"], "--images 0"),
     (["--repeats", "0"], "--repeats 0")],
)  # fmt: skip
def test_bad_argument_is_a_usage_error(args, says, monkeypatch, capsys):
    pytest.importorskip("tttlab.core.corruptions")
    bench = load_script()
    monkeypatch.setitem(sys.modules, "imagecorruptions", types.ModuleType("imagecorruptions"))
    monkeypatch.setattr(bench, "load_photos", fail_photos)
    with pytest.raises(SystemExit) as exc:
        bench.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in err, err
    assert says in err, err
