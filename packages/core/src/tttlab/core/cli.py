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


__all__ = ["user_errors"]
