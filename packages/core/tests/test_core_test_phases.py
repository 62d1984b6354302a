"""make test's split of packages/core/tests between its two phases (conftest.py, TTTLAB_CORE_TESTS_PHASE).

A small suite under a copy of this folder's conftest, run in this process: in the core phase a test that
looks for a missing module without the full_env mark fails, and so does a file skipped as a whole without
it; in the full phase only full_env tests run, and one whose module is missing there too fails (it would run
in neither phase).  Together: every test runs in at least one phase, or make test fails."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

EXTRA = "tttlab_phase_split_extra"  # stands for torch & co.: absent, or present only in the "full" run

SUITE = {
    "test_plain.py": "def test_plain():\n    assert 1 + 1 == 2\n",
    "test_looks.py": (
        "import importlib.util\n\n\n"
        f"def test_looks():\n    assert importlib.util.find_spec({EXTRA!r}) is None or True\n"
    ),
    "test_marked.py": (
        f"import pytest\n\n\n@pytest.mark.full_env\ndef test_marked():\n    pytest.importorskip({EXTRA!r})\n"
    ),
    "test_whole.py": (
        "import pytest\n\npytestmark = pytest.mark.full_env\n"
        f"pytest.importorskip({EXTRA!r})\n\n\ndef test_whole():\n    pass\n"
    ),
    "test_whole_unmarked.py": (
        f"import pytest\n\npytest.importorskip({EXTRA!r})\n\n\ndef test_whole_unmarked():\n    pass\n"
    ),
}


@pytest.fixture
def suite(pytester, monkeypatch):
    # this session's own recorder (when make test runs this file) must not see the small suite's lookups
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if type(f).__name__ != "_MissingModules"])
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(**{name[:-3]: text for name, text in SUITE.items()})
    return pytester


def run(pytester, monkeypatch, phase):
    monkeypatch.setenv("TTTLAB_CORE_TESTS_PHASE", phase)
    args = ("-p", "no:cacheprovider", "-p", "no:xdist", "-rA", "--continue-on-collection-errors")
    return pytester.runpytest_inprocess(*args)


def test_core_phase_fails_the_unmarked_tests_that_need_the_full_environment(suite, monkeypatch):
    res = run(suite, monkeypatch, "core")
    res.assert_outcomes(passed=1, failed=1, skipped=2, errors=1)
    res.stdout.fnmatch_lines_random(
        [
            "PASSED test_plain.py::test_plain",
            "FAILED test_looks.py::test_looks - *",
            f"looked for what only the full environment has ({EXTRA}), *: mark it @pytest.mark.full_env *",
            "SKIPPED [[]1[]] test_marked.py:*",
            "SKIPPED [[]1[]] test_whole.py:*",
            "test_whole_unmarked.py is skipped as a whole *: set `pytestmark = pytest.mark.full_env` *",
        ]
    )


def test_full_phase_runs_only_full_env_tests_and_fails_one_that_runs_nowhere(suite, monkeypatch):
    res = run(suite, monkeypatch, "full")  # the extra is missing here too: the marked ones run nowhere
    res.assert_outcomes(failed=1, skipped=1, errors=1, deselected=2)
    res.stdout.fnmatch_lines_random(
        [
            "FAILED test_marked.py::test_marked - *",
            f"skipped after looking for {EXTRA}, which the full environment lacks too: *",
            f"test_whole.py is skipped as a whole after looking for {EXTRA}, which the full environment lacks *",
            "SKIPPED [[]1[]] test_whole_unmarked.py:*",
        ]
    )
    suite.makepyfile(**{EXTRA: "VALUE = 1\n"})
    suite.syspathinsert()
    res = run(suite, monkeypatch, "full")
    res.assert_outcomes(passed=2, deselected=3)  # test_plain, test_looks, test_whole_unmarked
    res.stdout.fnmatch_lines_random(
        ["PASSED test_marked.py::test_marked", "PASSED test_whole.py::test_whole"]
    )


def test_unset_runs_everything_and_checks_nothing(suite, monkeypatch):
    monkeypatch.delenv("TTTLAB_CORE_TESTS_PHASE", raising=False)
    res = suite.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    res.assert_outcomes(passed=2, skipped=3)
