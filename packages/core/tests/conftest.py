from __future__ import annotations

import ast
import functools
import importlib.abc
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

# ---- make test's split of these tests between its core-only and its full phase -------------------------------
# `make test` runs this folder in the core-only environment (.venv-core: no torch, jax, tfds, rich, reference
# packages, subpackages) and then in the full one (.venv).  A test that passes in the core-only environment
# and does not depend on what the full one adds gains nothing from the second run, so the Makefile sets
# TTTLAB_CORE_TESTS_PHASE:
#   core  every test here runs.  One that is not marked full_env FAILS when, while it runs (fixtures too),
#         it looks for a module this environment lacks (import, pytest.importorskip,
#         importlib.util.find_spec: each reaches _MissingModules, the last finder on sys.meta_path, only
#         when no other finder has the module) or at the installed tttlab.* entry points (the registry's
#         methods, which the subpackages add).  A test file that is skipped as a whole FAILS unless it sets
#         `pytestmark = pytest.mark.full_env` at its top.  So a test that needs or depends on the full
#         environment cannot end up running only here: the message says to mark it.
#   full  only full_env tests here run, the others are deselected (they passed in the core phase).  A
#         full_env test that skips after looking for a module this environment lacks too FAILS: it would
#         run in neither phase.
#   unset (a plain pytest run) every test runs, nothing is checked or deselected.
# Blind spots, where the mark is set by hand: a dependence seen only in a subprocess (e.g. "compare imports
# no torch" holds trivially where there is no torch), and a module that looks for an extra while it is
# imported (not counted: which test imports it first depends on the scheduling).
PHASE_VAR = "TTTLAB_CORE_TESTS_PHASE"
HERE = Path(__file__).resolve().parent
# frames of the test runner: a lookup reached from one without passing a module's import is a test's
_RUNNER_DIRS = tuple(
    str(Path(__import__(name).__file__).resolve().parent) + os.sep for name in ("pytest", "_pytest", "pluggy")
)
_PROBES = pytest.StashKey["_MissingModules"]()
_PROBES_AT_IMPORT = pytest.StashKey[list]()
_REAL_ENTRY_POINTS = pytest.StashKey[object]()
_ENTRY_POINTS_NOTE = "the installed "
_PHASE = pytest.StashKey[str]()
# Looked for, absent from both environments (the full phase checks that): no test depends on them.  Tests of
# error messages use made-up names; third-party libraries look for optional codecs (pillow_heif, zstandard)
# while they work, Hydra for its plugins (once a process: whichever test comes first).
ABSENT_EVERYWHERE = frozenset(
    {
        "no_such_module_xyz",
        "no_such_package_xyz",
        "tttlab_no_such_module",
        "pillow_heif",
        "zstandard",
        "hydra_plugins",
    }
)


class _MissingModules(importlib.abc.MetaPathFinder):
    """Last finder on sys.meta_path: records the modules that no other finder has (it finds none itself)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] not in ABSENT_EVERYWHERE and _looked_for_by_a_test():
            self.names.append(fullname)
        return None

    def entry_points(self, real):
        """importlib.metadata.entry_points, recording a look at the installed subpackages' entry points
        (the registry's methods): what it finds differs between the two environments."""

        def entry_points(**params):
            if str(params.get("group", "")).startswith("tttlab") and _looked_for_by_a_test():
                self.names.append(f"{_ENTRY_POINTS_NOTE}{params['group']} entry points")
            return real(**params)

        return entry_points

    def take(self) -> list[str]:
        names, self.names = sorted(set(self.names)), []
        return names


def _looked_for_by_a_test() -> bool:
    """False when a module outside this folder looks for it while being imported (see the header)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_RUNNER_DIRS):
            return True
        if frame.f_code.co_name == "<module>" and not name.startswith("<") and HERE not in Path(name).parents:
            return False
        frame = frame.f_back
    return True


@functools.cache
def _module_is_full_env(path: Path) -> bool:
    """The test file sets pytestmark, at its top level, to something that names full_env."""
    for stmt in ast.parse(path.read_text(encoding="utf-8")).body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
        if any(getattr(t, "id", None) == "pytestmark" for t in targets) and any(
            isinstance(node, ast.Attribute) and node.attr == "full_env" for node in ast.walk(stmt)
        ):
            return True
    return False


def _here(path) -> bool:
    return HERE == Path(path).resolve().parent


def _is_full_env(item: pytest.Item) -> bool:
    return item.get_closest_marker("full_env") is not None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "full_env: a packages/core test that needs or depends on packages only the full environment has "
        f"(torch, jax, tfds, rich, reference packages); the only core tests make test's full phase runs "
        f"({PHASE_VAR}, packages/core/tests/conftest.py)",
    )
    phase = os.environ.get(PHASE_VAR, "")
    if phase not in ("", "core", "full"):
        raise pytest.UsageError(f"{PHASE_VAR}={phase!r}: expected 'core', 'full' or unset")
    if phase == "full":
        present = sorted(name for name in ABSENT_EVERYWHERE if importlib.util.find_spec(name) is not None)
        if present:
            raise pytest.UsageError(
                f"{', '.join(present)}: in the full environment, so not ABSENT_EVERYWHERE "
                "(packages/core/tests/conftest.py): remove them there; tests that look for them are full_env"
            )
    if phase:
        finder = _MissingModules()
        sys.meta_path.append(finder)
        config.stash[_PROBES] = finder
        config.stash[_PHASE] = phase
        config.stash[_REAL_ENTRY_POINTS] = importlib.metadata.entry_points
        importlib.metadata.entry_points = finder.entry_points(importlib.metadata.entry_points)


def pytest_unconfigure(config: pytest.Config) -> None:
    finder = config.stash.get(_PROBES, None)
    if finder is not None:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
        importlib.metadata.entry_points = config.stash[_REAL_ENTRY_POINTS]


def _phase(config: pytest.Config) -> str:
    return config.stash.get(_PHASE, "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _phase(config) != "full":
        return
    keep, drop = [], []
    for item in items:
        (drop if _here(item.path) and not _is_full_env(item) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    finder = collector.config.stash.get(_PROBES, None)
    if finder is None or not isinstance(collector, pytest.Module) or not _here(collector.path):
        return (yield)
    finder.take()
    report = yield
    missing = finder.take()
    if missing:
        collector.stash[_PROBES_AT_IMPORT] = missing
    phase, path = _phase(collector.config), Path(collector.path)
    if report.skipped and phase == "core" and not _module_is_full_env(path):
        report.outcome = "failed"
        report.longrepr = (
            f"{path.name} is skipped as a whole in the core-only environment ({report.longrepr[2]}) "
            "but make test's full phase runs only full_env tests: set `pytestmark = pytest.mark.full_env` "
            "at its top, before the skip (packages/core/tests/conftest.py)"
        )
    if report.skipped and phase == "full" and missing and _module_is_full_env(path):
        report.outcome = "failed"
        report.longrepr = (
            f"{path.name} is skipped as a whole after looking for {', '.join(missing)}, which the full "
            f"environment lacks too: it runs in neither phase of make test ({report.longrepr[2]})"
        )
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    finder = item.config.stash.get(_PROBES, None)
    if finder is not None:
        finder.take()  # what tests of other folders looked for
        module = item.getparent(pytest.Module)
        finder.names += module.stash.get(_PROBES_AT_IMPORT, []) if module is not None else []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    finder = item.config.stash.get(_PROBES, None)
    if finder is None:
        return report
    missing = finder.take()
    phase = _phase(item.config)
    if phase == "core" and missing and not _is_full_env(item) and not report.failed:
        report.outcome = "failed"
        report.longrepr = (
            f"looked for what only the full environment has ({', '.join(missing)}), so it needs or depends "
            "on that environment, but make test's full phase runs only full_env core tests: mark it "
            "@pytest.mark.full_env (packages/core/tests/conftest.py)"
        )
    missing = [name for name in missing if not name.startswith(_ENTRY_POINTS_NOTE)]
    if phase == "full" and missing and report.skipped and _is_full_env(item):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped after looking for {', '.join(missing)}, which the full environment lacks too: "
            f"it runs in neither phase of make test ({report.longrepr[2]})"
        )
    return report


@pytest.fixture(scope="session")
def photos224() -> np.ndarray:
    """Four scikit-image photos, resized (shorter side 256) and centre-cropped to 224 px, uint8 (4,224,224,3)."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from tttlab.core.data import resize_center_crop

    transform = resize_center_crop(256, 224)
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
        out.append(np.asarray(transform(img)))
    return np.stack(out)


@pytest.fixture(scope="session")
def digits28() -> np.ndarray:
    """Eight synthetic 28x28 single-channel digit-like images (strokes on black), uint8 (8,28,28,1)."""
    rng = np.random.default_rng(0)
    x = np.zeros((8, 28, 28, 1), np.uint8)
    for i in range(8):
        r0, c0 = rng.integers(4, 10, size=2)
        x[i, r0 : r0 + 14, c0 : c0 + 3, 0] = 255
        x[i, r0 : r0 + 3, c0 : c0 + 10, 0] = 230
        x[i, r0 + 12 : r0 + 15, c0 : c0 + 12, 0] = 200
    return x
