"""Hydra entry points: ``pretrain``, ``probe``, ``ttt``, ``baseline`` (console scripts and ``python -m``).

A :class:`~tttlab.core.errors.TTTLabError` (bad input: a missing file, a checkpoint of another
architecture, a value out of range) ends the run with its one-line message on stderr and exit status 2,
without a traceback; any other exception keeps Hydra's report (``HYDRA_FULL_ERROR=1``: full traceback)."""

from __future__ import annotations

import sys

from tttlab.core.cli import check_hydra_command, user_errors

from .common import register_configs, setup_logging, to_dict


def execute(entry: str, cfg) -> str:
    from tttlab.core.config import validate

    from .common import SCHEMAS

    schema = SCHEMAS[f"tttlab_ttt_mae_{'ttt' if entry == 'baseline' else entry}"]
    c = to_dict(validate(to_dict(cfg), schema))
    setup_logging(c["logging"]["level"])
    _check_timm()
    if entry in ("pretrain", "probe"):
        from . import train

        return str(train.run(c, entry))
    from .evaluate import run_benchmark

    return str(run_benchmark(c, "ttt_mae.ttt" if entry == "ttt" else "ttt_mae.baseline"))


def _check_timm() -> None:
    """The model needs timm, which the package's names load on first use (``--help`` and Hydra's checks need
    none): without it, one line naming the install command, before any work (a missing timm stopped every
    command at its import before; left to the model's import inside the run it was Hydra's traceback, exit
    status 1).  ``model`` raises the :class:`~tttlab.core.errors.MissingDependencyError` itself."""
    from . import model  # noqa: F401 - imports timm


def check_no_start_over(entry: str, argv: list[str] | None = None) -> None:
    """``start_over=true`` (or ``+start_over=true``) on ``ttt`` / ``baseline``: that key is pretrain/probe's, which
    keep a checkpoint to start over from.  Hydra's answer, "To append to your config use +start_over=true",
    led to a second refusal (the schema has no such key); a test-time run resumes the images its folder
    already records and refuses another config's records, so the way to a fresh run is another ``out_dir``.
    One ``ConfigError`` line saying so, exit status 2, before Hydra runs."""
    import sys

    from tttlab.core.cli import refuse
    from tttlab.core.errors import ConfigError

    if entry not in ("ttt", "baseline"):
        return
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.lstrip("+~").partition("=")[0].strip() == "start_over":
            refuse(f"tttlab-ttt-mae-{entry}", ConfigError(
                f"{arg}: tttlab-ttt-mae-{entry} has no start_over (a key of pretrain and probe, which keep a "
                "checkpoint); a test-time run resumes the images already recorded in its out_dir, so give "
                "another out_dir to run from the start"
            ))  # fmt: skip


def hydra_main(entry: str) -> None:
    import hydra

    register_configs()

    @hydra.main(config_path="conf", config_name=entry, version_base=None)
    def _main(cfg) -> None:
        with user_errors(f"tttlab-ttt-mae-{entry}"):  # the user's bad input: one line, not Hydra's traceback
            path = execute(entry, cfg)
            # inside user_errors: `| head` ends it quietly, not in Hydra's error report
            from tttlab.core.torch import init_distributed

            if init_distributed().rank == 0:
                if entry in ("ttt", "baseline"):  # the result as a table (it was only in the log lines)
                    from tttlab.core.cli import domain_table

                    print("\n".join(domain_table(path)))
                print(path)

    check_no_start_over(entry)
    check_hydra_command(f"tttlab-ttt-mae-{entry}", "tttlab.ttt_mae.conf", entry)
    try:
        _main()
    finally:  # a run imports torch; --help and Hydra's checks do not, and start no process group
        torch = sys.modules.get("torch")
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
