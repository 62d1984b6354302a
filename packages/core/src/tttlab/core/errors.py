"""Errors a user can cause.

Every error raised on bad user input is a :class:`TTTLabError`; the message names the offending path or
value and says what was expected.  The subclasses also derive from the matching builtin exception so
that ``except FileNotFoundError`` / ``except ValueError`` keep working for callers that use them.
"""

from __future__ import annotations


class TTTLabError(Exception):
    """Base class of every error tttlab raises on bad user input."""


class DatasetNotFoundError(TTTLabError, FileNotFoundError):
    """A dataset path does not exist."""


class DatasetLayoutError(TTTLabError, ValueError):
    """A dataset path exists but its files are not laid out as the format requires."""


class InvalidInputError(TTTLabError, ValueError):
    """An array has the wrong dtype, shape, range, or contains NaN/inf."""


class UnknownNameError(TTTLabError, KeyError):
    """A name (corruption, dataset, benchmark, setting, method, metric) is not known.

    ``KeyError`` quotes its message in ``str()``; we override ``__str__`` to keep it readable.
    """

    def __str__(self) -> str:  # pragma: no cover - trivial
        return str(self.args[0]) if self.args else ""


class SeverityError(TTTLabError, ValueError):
    """A corruption severity outside 1..5."""


class ConfigError(TTTLabError, ValueError):
    """A configuration has an unknown key or a value of the wrong type."""


class RunDirConflictError(ConfigError):
    """A run directory already holds the records of another config (see ``tttlab.core.records.RunDir``)."""


class CheckpointError(TTTLabError, ValueError):
    """A checkpoint is missing, unreadable, or does not match the model."""


class MissingDependencyError(TTTLabError, ImportError):
    """An optional dependency is not installed; the message gives the install command."""


def require(module: str, extra: str | None = None, package: str = "tttlab-core", reason: str | None = None):
    """Import ``module`` or raise :class:`MissingDependencyError` naming the install command.

    ``reason``: the message's start (``"the MAE model needs timm, which is not installed"``; default: the
    module's name is required).  Only a missing ``module`` (its top-level package) is this error: a module that is
    there but lacks one of its own dependencies raises its own ``ModuleNotFoundError``, which names that one."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != module.partition(".")[0]:
            raise
        head = reason or f"{module!r} is required for this feature but is not installed"
        raise MissingDependencyError(f"{head}; install it with: {install_command(package, extra)}") from exc


def install_command(package: str = "tttlab-core", extra: str | None = None) -> str:
    """The command that installs ``package`` (with ``extra``) from a tttlab checkout.

    The subpackages are not published on a package index: they install editable from their folder
    (``tttlab-memo-tpt`` -> ``packages/memo_tpt``), with the repository's pins.
    """
    folder = "packages/" + package.removeprefix("tttlab-").replace("-", "_")
    target = f"'{folder}[{extra}]'" if extra else folder
    return f"pip install -c constraints.txt -e {target}  (from the tttlab repository root)"
