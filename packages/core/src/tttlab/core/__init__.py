"""tttlab.core: datasets, corruption benchmarks, metrics, run records and plots shared by every method.

Importing this package imports no deep-learning framework: submodules are loaded on first use, and only
``tttlab.core.torch`` / ``tttlab.core.jax`` touch torch / jax (behind the ``[torch]`` / ``[jax]`` extras).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "benchmark", "config", "corruptions", "data", "errors", "metrics", "plots", "records", "registry", "testing",
)  # fmt: skip


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
