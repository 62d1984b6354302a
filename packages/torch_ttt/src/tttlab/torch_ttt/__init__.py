"""tttlab-torch-ttt: test-time training engines for any PyTorch model (the torch-ttt API, corrected).

>>> from tttlab.torch_ttt import get_engine
>>> TENT = get_engine("tent")

Porting a torch-ttt script: replace ``torch_ttt.`` by ``tttlab.torch_ttt.`` in its imports
(``from tttlab.torch_ttt.engine.ttt_engine import TTTEngine``); the differences are listed in the README.

The names below load their module on first use: importing a submodule (``train``, the console script's
module: ``--help``, Hydra's checks) does not import torch (1.3-2.5 s) through the engines' base module.
"""

from __future__ import annotations

from tttlab.core.lazy import lazy_exports

#: name -> the submodule that defines it
_EXPORTS = {
    "BaseEngine": ".engine.base_engine", "OptimizationParameters": ".engine.base_engine",
    "Reset": ".engine.base_engine", "ENGINE_MODULES": ".engine_registry", "EngineRegistry": ".engine_registry",
    "get_engine": ".engine_registry",
}  # fmt: skip

__all__ = ["BaseEngine", "ENGINE_MODULES", "EngineRegistry", "OptimizationParameters", "Reset", "get_engine"]


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
