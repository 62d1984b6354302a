"""tttlab-torch-ttt: test-time training engines for any PyTorch model (the torch-ttt API, corrected).

>>> from tttlab.torch_ttt import get_engine
>>> TENT = get_engine("tent")

Porting a torch-ttt script: replace ``torch_ttt.`` by ``tttlab.torch_ttt.`` in its imports
(``from tttlab.torch_ttt.engine.ttt_engine import TTTEngine``); the differences are listed in the README.
"""

from .engine.base_engine import BaseEngine, OptimizationParameters, Reset
from .engine_registry import ENGINE_MODULES, EngineRegistry, get_engine

__all__ = ["BaseEngine", "ENGINE_MODULES", "EngineRegistry", "OptimizationParameters", "Reset", "get_engine"]
