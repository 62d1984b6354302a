"""Module names that load their module on first use (PEP 562): a package's exports, a module's re-exports.

A console script's module is a submodule of its package, so the package's ``__init__`` runs before its
``--help``: names exported there (and the names a command module takes from torch-importing modules) load
their module (and its framework: torch, timm) only when asked for.

>>> __getattr__, __dir__ = lazy_exports(globals(), {"build_model": ".model", "resolve_device": "tttlab.core.torch"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    namespace: dict[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of the package or module whose globals are ``namespace``:
    ``exports`` maps a name to the module that defines it, as ``importlib.import_module`` takes it from there
    (relative to the module's package, ``".engine.base_engine"``, or absolute, ``"tttlab.core.torch"``).  A name
    is imported on first use and kept in the module's globals (as a ``from ... import`` at its top would have
    bound it); ``dir()`` lists each name once, loaded or not; another name is Python's ``AttributeError``."""
    module, package = namespace["__name__"], namespace.get("__package__") or namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
