"""Engines, one module each, named as upstream (``tttlab.torch_ttt.engine.ttt_engine.TTTEngine``)."""

from .base_engine import BaseEngine, OptimizationParameters, Reset

__all__ = ["BaseEngine", "OptimizationParameters", "Reset"]
