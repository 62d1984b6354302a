"""Command-line helpers shared by every subpackage's entry points.

:func:`user_errors` turns the user's bad input (a :class:`~tttlab.core.errors.TTTLabError`: a missing path,
a bad value, a checkpoint of another architecture) into one ``<prog>: error: <Type>: <message>`` line on
stderr and exit status 2, the convention of ``argparse``, instead of a traceback through our internals
(Hydra prints one for every exception).  Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from .errors import TTTLabError


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Run the body; a :class:`TTTLabError` ends the command with its message and exit status 2."""
    try:
        yield
    except TTTLabError as exc:
        print(f"{prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


#: Overrides whose value Hydra turns into its run directory (``hydra.run.dir: ${out_dir}``) and creates
#: before any of our code runs.
DIR_KEYS = ("out_dir", "run_dir", "hydra.run.dir")


def check_dir_overrides(prog: str, argv: list[str] | None = None, keys: tuple[str, ...] = DIR_KEYS) -> None:
    """Stop a Hydra command whose ``out_dir=`` (or ``run_dir=``) override is, or lies below, an existing file.

    Hydra creates the run directory before the task function runs, so that mistake would otherwise end in
    a ``FileExistsError`` / ``NotADirectoryError`` traceback from Hydra.  Call it just before the
    ``@hydra.main`` function; it prints the usual one-line error and exits with status 2.
    """
    from pathlib import Path

    for arg in sys.argv[1:] if argv is None else argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in keys or value.strip() in ("", "null", "None") or "${" in value:
            continue
        path = Path(value.strip().strip("'\"")).expanduser()
        for p in (path, *path.parents):
            if p.exists():
                if not p.is_dir():
                    where = "is a file" if p == path else f"lies below the file {p}"
                    print(
                        f"{prog}: error: InvalidInputError: {key}={value}: the path {where}; expected a "
                        "directory (or a path that does not exist yet)",
                        file=sys.stderr,
                    )
                    raise SystemExit(2)
                break


__all__ = ["DIR_KEYS", "check_dir_overrides", "user_errors"]
