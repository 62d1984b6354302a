"""Contract of every installed ``tttlab-*`` command, in whichever environment runs the tests (core only: core's
two commands; torch-free: core's and MTTT's; full: all of them).

A user's mistake on the command line ends the command with a non-zero exit status and a message that names
what was wrong, without a Python traceback and without writing anything (no run directory, no Hydra log):

- a mistyped key (``bogus_key=1``);
- a bad ``compile=`` value, for the commands whose config has a ``compile`` key: core's one-line
  ``ConfigError`` with exit status 2, before Hydra would make the run directory (``out_dir`` given too);
- for the Hydra commands, a mistyped experiment, and any override Hydra cannot apply (a misspelt key, a value
  of the wrong type, a malformed value), in a ``-m`` sweep too, and two of Hydra's modes at once
  (``--cfg job -m``): one line, exit status 2.

The commands are the console scripts found in the installed packages' metadata, so a new command is checked
without editing this file; the full environment must expose every script the packages' ``pyproject.toml``
files declare (the parametrization cannot shrink unnoticed).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import sys
from pathlib import Path

import pytest

from tttlab.core.testing import hydra_state_kept

ROOT = Path(__file__).resolve().parents[1]
CORE_ONLY = os.environ.get("TTTLAB_EXPECT_CORE_ONLY") == "1"
NO_TORCH = os.environ.get("TTTLAB_EXPECT_NO_TORCH") == "1"

#: commands whose config has a ``compile`` key (torch.compile: false, true or a mode)
COMPILE_COMMANDS = {
    "tttlab-memo-tpt-ensemble", "tttlab-memo-tpt-evaluate", "tttlab-memo-tpt-memo", "tttlab-memo-tpt-tpt",
    "tttlab-pilimit-evaluate", "tttlab-pilimit-train", "tttlab-torch-ttt-evaluate", "tttlab-torch-ttt-train",
    "tttlab-ttt-mae-baseline", "tttlab-ttt-mae-pretrain", "tttlab-ttt-mae-probe", "tttlab-ttt-mae-ttt",
}  # fmt: skip


def installed_commands() -> dict[str, md.EntryPoint]:
    return {ep.name: ep for ep in md.entry_points(group="console_scripts") if ep.name.startswith("tttlab-")}


def declared_commands() -> set[str]:
    """Every ``tttlab-*`` script in the packages' ``[project.scripts]`` tables."""
    import tomllib

    names = set()
    for pyproject in (ROOT / "packages").glob("*/pyproject.toml"):
        scripts = tomllib.loads(pyproject.read_text()).get("project", {}).get("scripts", {})
        names |= {n for n in scripts if n.startswith("tttlab-")}
    return names


COMMANDS = sorted(installed_commands())


def test_the_environment_exposes_the_declared_commands():
    """Core's commands everywhere; in the full environment every declared command (no silent shrinking of
    the parametrization below); every declared command with a ``compile`` key is in COMPILE_COMMANDS."""
    declared = declared_commands()
    assert {"tttlab-compare", "tttlab-core-demo"} <= set(COMMANDS) <= declared
    assert COMPILE_COMMANDS <= declared and HYDRA_COMMANDS <= declared
    if not (CORE_ONLY or NO_TORCH):
        assert set(COMMANDS) == declared


def run_command(name: str, args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """The console script ``name`` in this process, as ``name *args`` typed in ``cwd``: (exit status, output).
    Hydra's process-wide state (its HydraConfig, the root logger's handlers and levels) is put back after, as
    the package tests' conftests do after each test: the next test file on this worker may be a package's."""
    main = installed_commands()[name].load()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [name, *args])
    try:
        with hydra_state_kept():
            code = main()  # a console script exits with its main's return value
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    if code is None or isinstance(code, int):
        return int(code or 0), out.out + out.err
    return 1, out.out + out.err + str(code)  # sys.exit("message"): status 1, the message on stderr


def written(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("name", COMMANDS)
def test_a_mistyped_key_is_a_clear_error_and_writes_nothing(name, tmp_path, monkeypatch, capsys):
    code, out = run_command(name, ["bogus_key=1"], tmp_path, monkeypatch, capsys)
    assert code != 0, out
    assert "bogus_key" in out and "Traceback" not in out, out
    assert written(tmp_path) == []


@pytest.mark.parametrize("name", sorted(COMPILE_COMMANDS & set(COMMANDS)))
def test_a_bad_compile_value_stops_the_command_before_it_writes(name, tmp_path, monkeypatch, capsys):
    """``compile=fast``: exit status 2 and core's one-line ConfigError naming the key, the value and the
    accepted values, before Hydra makes ``out_dir`` (its schemas type ``compile`` as ``Any``, so Hydra alone
    would accept the value and make the directory first)."""
    code, out = run_command(
        name, [f"out_dir={tmp_path / 'run'}", "compile=fast"], tmp_path, monkeypatch, capsys
    )
    assert code == 2, out
    assert re.search(
        rf"^{re.escape(name)}: error: ConfigError: compile='fast'; expected .*reduce-overhead", out, re.M
    )
    assert "Traceback" not in out
    assert written(tmp_path) == []


#: the Hydra commands (the others take argparse flags)
HYDRA_COMMANDS = {
    "tttlab-memo-tpt-ensemble", "tttlab-memo-tpt-memo", "tttlab-memo-tpt-tpt", "tttlab-mttt-evaluate",
    "tttlab-mttt-train", "tttlab-pilimit-train", "tttlab-torch-ttt-evaluate", "tttlab-torch-ttt-train",
    "tttlab-ttt-mae-baseline", "tttlab-ttt-mae-pretrain", "tttlab-ttt-mae-probe", "tttlab-ttt-mae-ttt",
}  # fmt: skip
#: the Hydra commands whose config folder has an experiment group (tttlab-mttt-evaluate takes none: its
#: evaluate.yaml has a folder of its own)
EXPERIMENT_COMMANDS = HYDRA_COMMANDS - {"tttlab-mttt-evaluate"}


@pytest.mark.parametrize("name", sorted(EXPERIMENT_COMMANDS & set(COMMANDS)))
def test_a_mistyped_experiment_is_one_line_exit_2_and_writes_nothing(name, tmp_path, monkeypatch, capsys):
    """``+experiment=<typo>``: core's one-line ConfigError naming the value and the experiments there are,
    exit status 2, before Hydra makes ``out_dir`` (Hydra alone prints a many-line report, exit status 1)."""
    code, out = run_command(
        name, [f"out_dir={tmp_path / 'run'}", "+experiment=no_such_experiment"], tmp_path, monkeypatch, capsys
    )
    assert code == 2, out
    assert re.fullmatch(
        rf"{re.escape(name)}: error: ConfigError: experiment='no_such_experiment': no such experiment config; "
        r"expected one of \w.*\n",
        out,
    ), out
    assert written(tmp_path) == []


#: commands whose config is plain YAML (no schema): Hydra takes ``seed=abc`` and the command itself refuses it
#: (one line, exit 2: memo_tpt's test_errors_and_runs, mttt's test_commands), inside Hydra's job, whose logging
#: set-up closes pytest's capture handlers: the ``type`` case runs on the schema-typed commands only
UNTYPED_HYDRA_COMMANDS = {
    "tttlab-memo-tpt-ensemble", "tttlab-memo-tpt-memo", "tttlab-memo-tpt-tpt", "tttlab-mttt-evaluate",
    "tttlab-mttt-train",
}  # fmt: skip
OVERRIDE_CASES = {
    "key": ("bogus_key=1", "'bogus_key'"),
    "near-key": ("out_dri=x", "; did you mean 'out_dir'?"),
    "type": ("seed=abc", "seed"),
    "syntax": ("seed=[1", "'[1'"),
}


@pytest.mark.parametrize(
    ("name", "case"),
    [(n, c) for n in sorted(HYDRA_COMMANDS & set(COMMANDS)) for c in OVERRIDE_CASES
     if not (c == "type" and n in UNTYPED_HYDRA_COMMANDS)],
)  # fmt: skip
def test_an_override_hydra_cannot_apply_is_one_line_exit_2(name, case, tmp_path, monkeypatch, capsys):
    """A misspelt key, a value of the wrong type, a malformed value: core's one-line ConfigError naming the
    override, exit status 2, nothing written (``check_config_overrides`` composes the config before
    ``@hydra.main``; Hydra alone prints a few lines and exits with status 1)."""
    arg, needle = OVERRIDE_CASES[case]
    code, out = run_command(name, [f"out_dir={tmp_path / 'run'}", arg], tmp_path, monkeypatch, capsys)
    assert code == 2, out
    assert re.fullmatch(rf"{re.escape(name)}: error: \w*ConfigError: .+\n", out), out
    assert needle in out, out
    assert written(tmp_path) == []


#: Hydra's own options that its parser takes and Hydra then refused with a ValueError traceback (exit status
#: 1), and a sweep (``-m``) with a misspelt key, which Hydra reported in a few lines after it made its sweep
#: folder: every Hydra command stops first with core's one line (check_hydra_command); the sweep on two commands
#: (the same code in core, tested there; mttt's evaluate checks its training keys first)
HYDRA_FLAG_CASES = {
    "modes": (
        ["--cfg", "job", "-m"],
        "ConfigError: --multirun and --cfg job together: Hydra does one of them",
    ),
    "sweep": (["-m", "out_dri=a,b"], "ConfigError: the sweep's job out_dri=a: "),
}
SWEEP_COMMANDS = {"tttlab-mttt-evaluate", "tttlab-torch-ttt-train"}


@pytest.mark.parametrize(
    ("name", "case"),
    [(n, c) for n in sorted(HYDRA_COMMANDS & set(COMMANDS)) for c in HYDRA_FLAG_CASES
     if c != "sweep" or n in SWEEP_COMMANDS],
)  # fmt: skip
def test_hydra_options_hydra_refuses_and_a_bad_sweep_are_one_line_exit_2(
    name, case, tmp_path, monkeypatch, capsys
):
    args, needle = HYDRA_FLAG_CASES[case]
    code, out = run_command(name, args, tmp_path, monkeypatch, capsys)
    assert code == 2, out
    assert re.fullmatch(rf"{re.escape(name)}: error: {re.escape(needle)}.*\n", out), out
    assert written(tmp_path) == []
