"""Package names that load their submodule on first use (PEP 562), for the subpackages' ``__init__``.

A console script's module is a submodule of its package, so the package's ``__init__`` runs before its
``--help``: names exported there load their module (and its framework: torch, timm) only when asked for.

>>> __getattr__, __dir__ = lazy_exports(globals(), {"build_model": "model"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    namespace: dict[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of the package whose globals are ``namespace``:
    ``exports`` maps a name to the submodule that defines it (relative: ``"engine.base_engine"``).  A name is
    imported on first use and kept in the package's globals; ``dir()`` lists each name once, loaded or not;
    another name is Python's ``AttributeError``."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
