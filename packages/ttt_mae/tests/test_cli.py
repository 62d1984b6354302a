"""The Hydra entry point as a user runs it (``python -m``, a closed pipe), on the cached smoke model."""

import contextlib
import sys

import pytest
import torch

from tttlab.core.records import load_records
from tttlab.core.testing import run_faked_command_into_a_closed_pipe
from tttlab.ttt_mae.evaluate import trained_model

# Hydra's default logging config runs logging.config.dictConfig, which closes every existing handler;
# absl's handler (registered once tensorflow_datasets is imported, e.g. by core's TFDS tests earlier in
# the session) writes to pytest's global capture stream and closes it when sys.stderr is capsys' stream,
# which crashed the whole pytest session ("lost sys.stderr").  The CLI behaviour tested here does not
# depend on Hydra's logging.
NO_HYDRA_LOGGING = ("hydra/job_logging=none", "hydra/hydra_logging=none")


def test_python_m_baseline(tmp_path, smoke_cache, monkeypatch, capsys):
    """``python -m tttlab.ttt_mae.baseline``: the module's ``__main__`` block runs the command (as runpy runs it
    for ``-m``, in this process: a subprocess cost ~8 s of start-up; the closed-pipe test below starts a real
    one), which prints the result table and the records' path."""
    import runpy

    pre, probe = trained_model("smoke", smoke_cache, 0, "cpu", False)
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "tttlab.ttt_mae.baseline", raising=False)  # run fresh, as python -m does
    monkeypatch.setattr(sys, "argv", ["-m", "+experiment=smoke_ttt", f"out_dir={out}", f"resume_model={pre}",
                                      f"resume_finetune={probe}", "benchmark.corruptions=[fog]",
                                      "benchmark.num_examples=2", "logging.progress=false", *NO_HYDRA_LOGGING])  # fmt: skip
    runpy.run_module(
        "tttlab.ttt_mae.baseline", run_name="__main__", alter_sys=True
    )  # an error: SystemExit 1/2
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].endswith("records.jsonl")
    # the result as a table before the path (it was only in the log lines): accuracy % and ms/image
    # (one corruption: no mean line)
    # (the title names the reset policy and the steps per image: the baseline takes none)
    title = "ttt_mae.baseline on mnist_c (episodic, reset per_image, 0 step(s)): accuracy %, ms/image"
    assert lines[-3] == title, lines
    assert lines[-2].split()[0] == "fog-5" and len(lines[-2].split()) == 3, lines
    df = load_records(out / "records.jsonl", metric="accuracy")
    assert (
        df.corruption.tolist() == ["fog"] and df.n.tolist() == [2] and set(df.method) == {"ttt_mae.baseline"}
    )


@pytest.mark.parametrize(("override", "expected"), [
    ("mask_ratio=1.0", "InvalidInputError: mask_ratio=1.0; "),
    ("resume_model=/nonexistent/mae.pth", "CheckpointError: resume_model /nonexistent/mae.pth does not exist"),
    # bad-input audit: NaN momentum trained silently, -1 and device=cuda without CUDA were torch tracebacks
    ("optimizer_momentum=nan", "ConfigError: optimizer_momentum=nan; expected a finite number >= 0"),
    ("optimizer_momentum=-1", "ConfigError: optimizer_momentum=-1.0; expected a finite number >= 0"),
    ("crop_scale=[0.9,0.1]", "ConfigError: crop_scale=[0.9, 0.1]; expected two area fractions"),
    pytest.param("device=cuda", "ConfigError: device='cuda', but torch finds no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])  # fmt: skip
def test_bad_input_is_a_one_line_error_not_a_traceback(tmp_path, monkeypatch, capsys, override, expected):
    import logging

    from tttlab.ttt_mae.ttt_main import main

    # Hydra configures logging in-process (handlers on this test's captured stderr): restore it afterwards
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)

    monkeypatch.setattr(sys, "argv", ["tttlab-ttt-mae-ttt", "+experiment=smoke_ttt", f"out_dir={tmp_path}",
                                      "resume_model=/nonexistent/mae.pth", override, *NO_HYDRA_LOGGING])  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"tttlab-ttt-mae-ttt: error: {expected}" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("entry", "override"), [("ttt", "start_over=true"), ("baseline", "+start_over=true")]
)
def test_start_over_on_a_test_time_command_says_it_is_pretrain_and_probes(
    tmp_path, monkeypatch, capsys, entry, override
):
    """``start_over=true`` (the README's flag list names it) given to ttt / baseline: Hydra answered "To append
    to your config use +start_over=true", and that was refused next as an unknown key.  Now one line says
    whose key it is and that another out_dir starts a test-time run afresh; nothing runs."""
    from tttlab.ttt_mae.cli import hydra_main

    monkeypatch.setattr(sys, "argv", [f"tttlab-ttt-mae-{entry}", "+experiment=smoke_ttt", f"out_dir={tmp_path}/run",
                                      override, *NO_HYDRA_LOGGING])  # fmt: skip
    with pytest.raises(SystemExit) as e:
        hydra_main(entry)
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        f"tttlab-ttt-mae-{entry}: error: ConfigError: {override}: tttlab-ttt-mae-{entry} has no start_over (a "
        "key of pretrain and probe, which keep a checkpoint); a test-time run resumes the images already "
        "recorded in its out_dir, so give another out_dir to run from the start\n"
    )
    assert not (tmp_path / "run").exists()


def test_ttt_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """``tttlab-ttt-mae-ttt``'s result table into a closed pipe (``execute`` is faked) ended in Hydra's error report
    with a BrokenPipeError and exit status 1: it was printed outside user_errors."""
    records = tmp_path / "records.jsonl"
    records.touch()
    res = run_faked_command_into_a_closed_pipe(
        "tttlab-ttt-mae-ttt",
        "tttlab.ttt_mae.cli",
        "execute",
        repr(str(records)),
        "hydra_main('ttt')",
        "hydra.run.dir=" + str(tmp_path / "run"),
    )
    assert (res.returncode, res.stderr) == (141, ""), res.stderr[-2000:]


def test_setup_logging_level_applies_under_hydra_handlers():
    """``logging.level=WARNING`` silenced nothing: ``setup_logging`` used ``basicConfig``, a no-op once Hydra
    has put its handler on the root logger; DEBUG now shows the package's debug lines."""
    import io
    import logging

    from tttlab.ttt_mae.common import setup_logging

    root, pkg = logging.getLogger(), logging.getLogger("tttlab")
    saved = (root.level, root.handlers[:], pkg.level)
    stream = io.StringIO()
    for h in saved[1]:
        root.removeHandler(h)
    root.addHandler(logging.StreamHandler(stream))
    root.setLevel(logging.INFO)
    try:
        log = logging.getLogger("tttlab.ttt_mae.train")
        setup_logging("WARNING")
        log.info("info line")
        log.warning("warning line")
        setup_logging("DEBUG")
        log.debug("debug line")
        assert stream.getvalue().splitlines() == ["warning line", "debug line"]
        assert len(root.handlers) == 1
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in saved[1]:
            root.addHandler(h)
        root.setLevel(saved[0])
        pkg.setLevel(saved[2])


def test_the_console_scripts_module_loads_no_timm_and_the_package_names_load_on_use():
    """``tttlab.ttt_mae.cli`` (every console script's ``--help`` and its Hydra checks) imports no timm: the
    package's names (``build_model``, ``TTTAdapter``, ...) load their module on first use.  timm imports
    torchvision and torch._dynamo, ~2-3 s of each command's start-up, before a model is ever built."""
    import importlib

    from tttlab.core.testing import imported_afresh

    with imported_afresh(["tttlab.ttt_mae"], blocked=["timm"]):
        cli = importlib.import_module("tttlab.ttt_mae.cli")
        for script in ("pretrain", "probe", "ttt_main", "baseline"):
            assert callable(importlib.import_module(f"tttlab.ttt_mae.{script}").main)
        assert callable(cli.hydra_main)
        with pytest.raises(ImportError, match="timm"):
            sys.modules["tttlab.ttt_mae"].build_model  # noqa: B018 - loads tttlab.ttt_mae.model: timm
    with imported_afresh(["tttlab.ttt_mae"]):
        package = importlib.import_module("tttlab.ttt_mae")
        from tttlab.ttt_mae import ARCHS, TTTAdapter, build_model

        model = importlib.import_module("tttlab.ttt_mae.model")
        ttt = importlib.import_module("tttlab.ttt_mae.ttt")
        assert (build_model, ARCHS, TTTAdapter) == (model.build_model, model.ARCHS, ttt.TTTAdapter)
        assert all(getattr(package, name) is not None for name in package.__all__)
        with pytest.raises(AttributeError, match="no attribute 'nothing'"):
            package.nothing  # noqa: B018


@pytest.mark.parametrize("entry", ["pretrain", "ttt_main"])  # all four share cli.hydra_main
def test_help_and_the_config_check_import_no_torch(entry, monkeypatch, capsys):
    """Every console script's ``--help`` and ``--cfg job`` (Hydra's checks, the composed config) run with torch
    unimportable: ``cli`` and ``common`` imported it at their top (1.3-2.5 s of each start-up), and core's torch
    helpers that ``common`` re-exports now load on first use."""
    import importlib

    from tttlab.core.errors import MissingDependencyError
    from tttlab.core.testing import imported_afresh

    conf = {"pretrain": "pretrain", "ttt_main": "ttt"}[entry]
    with imported_afresh(["tttlab.ttt_mae", "tttlab.core.torch"], blocked=["torch"]):
        main = importlib.import_module(f"tttlab.ttt_mae.{entry}").main
        for argv in (["--help"], ["--cfg", "job", "seed=7", *NO_HYDRA_LOGGING]):
            monkeypatch.setattr(sys, "argv", [f"tttlab-ttt-mae-{conf}", *argv])
            with pytest.raises(SystemExit) if argv == ["--help"] else contextlib.nullcontext():
                main()
        assert "tttlab.core.torch" not in sys.modules
        with pytest.raises(MissingDependencyError, match="'torch' is required"):
            sys.modules["tttlab.ttt_mae.common"].resolve_device  # noqa: B018 - core's helpers: torch
    out = capsys.readouterr().out
    assert f"{conf} is powered by Hydra" in out and "\nseed: 7\n" in out, out[-2000:]


def test_the_package_names_star_import_and_dir_lists_each_once():
    """``from tttlab.ttt_mae import *`` gives every name of ``__all__`` (each its module's object), and
    ``dir(tttlab.ttt_mae)`` lists each name once, before and after the names load (a loaded name is a module
    global too: it was listed twice), as the package's eager imports did."""
    import importlib

    from tttlab.core.testing import imported_afresh

    with imported_afresh(["tttlab.ttt_mae"]):
        package = importlib.import_module("tttlab.ttt_mae")
        before = dir(package)
        assert len(before) == len(set(before)) and set(package.__all__) <= set(before)
        namespace: dict = {}
        exec("from tttlab.ttt_mae import *", namespace)  # noqa: S102 - the star import itself
        assert sorted(k for k in namespace if k != "__builtins__") == sorted(package.__all__)
        model = importlib.import_module("tttlab.ttt_mae.model")
        ttt = importlib.import_module("tttlab.ttt_mae.ttt")
        for name in package.__all__:
            assert namespace[name] is getattr(model if hasattr(model, name) else ttt, name), name
        after = dir(package)
        assert after == sorted(set(after)), [n for n in set(after) if after.count(n) > 1]
        assert set(before) | {"model", "ttt"} <= set(after)


@pytest.mark.parametrize("entry", ["pretrain", "ttt_main"])
def test_a_run_without_timm_is_one_line_naming_the_install_command(tmp_path, monkeypatch, capsys, entry):
    """timm missing (a broken install: the package's names load it on first use, so ``--help`` runs without it):
    a run stops with one line naming the install command, exit status 2, before it writes anything.  It was
    Hydra's error report of the model's import (exit status 1); before the names were lazy, every command's
    import failed with Python's traceback."""
    import importlib
    import logging

    from tttlab.core.testing import imported_afresh

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    experiment = "smoke_pretrain" if entry == "pretrain" else "smoke_ttt"
    prog = "tttlab-ttt-mae-" + ("pretrain" if entry == "pretrain" else "ttt")
    monkeypatch.setattr(sys, "argv", [prog, f"+experiment={experiment}", f"out_dir={tmp_path / 'run'}",
                                      *NO_HYDRA_LOGGING])  # fmt: skip
    with imported_afresh(["tttlab.ttt_mae"], blocked=["timm"]):
        main = importlib.import_module(f"tttlab.ttt_mae.{entry}").main
        with pytest.raises(SystemExit) as exit_info:
            main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert err.strip() == (
        f"{prog}: error: MissingDependencyError: the MAE model needs timm, which is not installed; install it "
        "with: pip install -c constraints.txt -e packages/ttt_mae  (from the tttlab repository root)"
    ), err[-2000:]
    assert not list((tmp_path / "run").rglob("*")), "nothing written"


def test_the_model_without_timm_names_the_install_command():
    """timm missing: importing the model (``tttlab.ttt_mae.evaluate``, which ``tttlab-compare`` runs for
    ``ttt_mae.*``; the package's names) is a MissingDependencyError naming the install command.  It was
    "ModuleNotFoundError: No module named 'timm'" (compare's failed-run line), only the console scripts
    named the command."""
    import importlib

    from tttlab.core.errors import MissingDependencyError
    from tttlab.core.testing import imported_afresh

    importlib.import_module("tttlab.ttt_mae.evaluate")  # its other imports load outside the block
    line = (
        "the MAE model needs timm, which is not installed; install it with: pip install -c constraints.txt -e "
        "packages/ttt_mae  (from the tttlab repository root)"
    )
    with imported_afresh(["tttlab.ttt_mae"], blocked=["timm"]):
        with pytest.raises(MissingDependencyError) as info:
            importlib.import_module("tttlab.ttt_mae.evaluate")
        assert str(info.value) == line
        with pytest.raises(MissingDependencyError, match="install it with: pip install"):
            sys.modules["tttlab.ttt_mae"].build_model  # noqa: B018 - loads tttlab.ttt_mae.model: timm
