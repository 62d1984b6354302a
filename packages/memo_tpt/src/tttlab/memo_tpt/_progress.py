"""The package's progress bars: drawn when asked for *and* stderr is a terminal, so that a command whose
output goes to a log file or a pipe writes no bar frames into it (as the other subpackages' commands)."""

from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, enabled: bool, **kwargs):
    """A ``tqdm`` bar over ``total`` steps, disabled unless ``enabled`` and ``sys.stderr`` is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not (enabled and sys.stderr.isatty()), **kwargs)
