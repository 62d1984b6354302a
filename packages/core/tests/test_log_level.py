"""``logging.level`` under Hydra: the root logger already has handlers when a command's task runs, so the
level must be set on the loggers, not through ``logging.basicConfig`` (a no-op then)."""

import io
import logging
import logging.config

import pytest

from tttlab.core.cli import apply_log_level


@pytest.fixture
def hydra_like_root():
    """The root logger as Hydra's default job logging leaves it: one console handler, level INFO; restored
    afterwards (levels of root and ``tttlab``, the root's handlers)."""
    root, pkg = logging.getLogger(), logging.getLogger("tttlab")
    saved = (root.level, root.handlers[:], pkg.level)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
    for h in root.handlers[:]:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    pkg.setLevel(logging.NOTSET)
    yield stream
    root.removeHandler(handler)
    for h in saved[1]:
        root.addHandler(h)
    root.setLevel(saved[0])
    pkg.setLevel(saved[2])


def _emit(name="tttlab.some_pkg.train"):
    log = logging.getLogger(name)
    log.debug("a debug line")
    log.info("an info line")
    log.warning("a warning line")


def test_basic_config_is_a_no_op_under_hydra(hydra_like_root):
    """The defect: what the commands did before (``basicConfig(level=WARNING)``) leaves INFO lines on."""
    logging.basicConfig(level=logging.WARNING)
    _emit()
    assert "an info line" in hydra_like_root.getvalue()


@pytest.mark.parametrize(
    "level", ["WARNING", "warning", {"logging": {"level": "WARNING", "progress": False}}]
)
def test_warning_silences_info_with_hydra_handlers(hydra_like_root, level):
    before = logging.getLogger().handlers[:]
    apply_log_level(level)
    _emit()
    _emit("some_library")
    out = hydra_like_root.getvalue()
    assert "info line" not in out and "debug line" not in out
    assert out.count("a warning line") == 2  # once per logger: no handler added
    assert logging.getLogger().handlers == before


def test_debug_shows_tttlab_debug_lines_only(hydra_like_root):
    apply_log_level("DEBUG")
    _emit()
    _emit("some_library")
    lines = hydra_like_root.getvalue().splitlines()
    assert lines.count("[tttlab.some_pkg.train][DEBUG] - a debug line") == 1
    assert "[some_library][DEBUG] - a debug line" not in lines  # other libraries stay at INFO
    assert lines.count("[some_library][INFO] - an info line") == 1
    assert logging.getLogger("tttlab.some_pkg.train").getEffectiveLevel() == logging.DEBUG


def test_back_to_info_and_bad_or_missing_values_change_nothing(hydra_like_root):
    apply_log_level("WARNING")
    apply_log_level("INFO")
    assert logging.getLogger("tttlab.x").getEffectiveLevel() == logging.INFO
    for value in ("LOUD", None, {"logging": {"progress": True}}, {"seed": 0}):
        apply_log_level(value)  # validate() names a bad level; nothing changes here
        assert logging.getLogger("tttlab.x").getEffectiveLevel() == logging.INFO
        assert logging.getLogger().level == logging.INFO


def test_adds_a_handler_only_to_a_bare_root(hydra_like_root):
    root = logging.getLogger()
    for h in root.handlers[:]:
        root.removeHandler(h)
    try:
        apply_log_level("WARNING")
        assert len(root.handlers) == 1
        apply_log_level("WARNING")
        assert len(root.handlers) == 1
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)


@pytest.mark.parametrize(
    "verbose, level, debug_from",
    [("true", "INFO", {"tttlab.x", "other"}), ("tttlab", "INFO", {"tttlab.x"}),
     ("[tttlab,other]", "WARNING", {"tttlab.x", "other"}), ("false", "INFO", set())],
)  # fmt: skip
def test_hydra_verbose_keeps_its_debug_lines(tmp_path, monkeypatch, verbose, level, debug_from):
    """``hydra.verbose=true`` puts the root logger at DEBUG before the task runs; the task's
    ``apply_log_level`` with the default ``logging.level=INFO`` reset it to INFO, so no debug line showed
    (``hydra.verbose=tttlab``: the same for the tttlab logger).  A logger Hydra's verbose named now keeps
    DEBUG, whatever ``logging.level`` says; without it, ``logging.level`` alone decides.  A real Hydra task,
    in-process: the lines are those of the job's log file."""
    pytest.importorskip("hydra")
    import sys

    import hydra
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)
    for name in ("", "tttlab", "other"):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", logger.handlers[:])
        monkeypatch.setattr(logger, "level", logger.level)

    @hydra.main(config_path="pkg://tttlab.core.conf", config_name="compare", version_base=None)
    def task(cfg):
        apply_log_level(level)
        for name in ("tttlab.x", "other"):
            logging.getLogger(name).debug("debug line of %s", name)

    monkeypatch.setattr(
        sys, "argv", ["x", f"hydra.verbose={verbose}", "hydra.run.dir=run", "hydra.job.name=job"]
    )
    task()
    lines = (tmp_path / "run" / "job.log").read_text().splitlines()
    shown = {
        n
        for n in ("tttlab.x", "other")
        if any(line.endswith(f"[DEBUG] - debug line of {n}") for line in lines)
    }
    assert shown == debug_from, lines
