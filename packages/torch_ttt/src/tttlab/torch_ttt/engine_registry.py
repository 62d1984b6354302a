"""Name -> engine class, under the upstream registry names (``EngineRegistry.get_engine("tent")``).

Engines register themselves with ``@EngineRegistry.register(name)`` when their module is imported;
``get_engine`` imports the engine modules on first use, so a lookup never depends on import order.
"""

from __future__ import annotations

import importlib

from tttlab.core.errors import UnknownNameError

#: registry name -> module under ``tttlab.torch_ttt.engine`` that defines it.
ENGINE_MODULES: dict[str, str] = {
    "source": "source_engine",
    "bn": "bn_engine",
    "ttt": "ttt_engine",
    "ttt_pp": "ttt_pp_engine",
    "tent": "tent_engine",
    "eata": "eata_engine",
    "memo": "memo_engine",
    "actmad": "actmad_engine",
    "deyo": "deyo_engine",
    "sar": "sar_engine",
    "ittt": "it3_engine",
    "masked_ttt": "masked_ttt_engine",
}


class EngineRegistry:
    _registry: dict[str, type] = {}

    @classmethod
    def register(cls, name: str):
        def decorator(engine_class):
            from .engine.base_engine import BaseEngine

            if not (isinstance(engine_class, type) and issubclass(engine_class, BaseEngine)):
                raise TypeError(f"engine {name!r} must subclass BaseEngine, got {engine_class!r}")
            existing = cls._registry.get(name)
            if existing is not None and existing.__qualname__ != engine_class.__qualname__:
                raise ValueError(f"engine name {name!r} is already registered by {existing.__qualname__}")
            cls._registry[name] = engine_class
            engine_class.registry_name = name
            return engine_class

        return decorator

    @classmethod
    def get_engine(cls, name: str) -> type:
        if name not in cls._registry and name in ENGINE_MODULES:
            importlib.import_module(f"tttlab.torch_ttt.engine.{ENGINE_MODULES[name]}")
        if name not in cls._registry:
            raise UnknownNameError(f"unknown engine {name!r}; expected one of {sorted(ENGINE_MODULES)}")
        return cls._registry[name]

    @classmethod
    def names(cls) -> list[str]:
        return list(ENGINE_MODULES)


def get_engine(name: str) -> type:
    return EngineRegistry.get_engine(name)
