"""``source``: no adaptation, the wrapped model as trained (the baseline every method is compared to)."""

from __future__ import annotations

import torch

from ..engine_registry import EngineRegistry
from .base_engine import BaseEngine, check_batch

__all__ = ["SourceEngine"]


@EngineRegistry.register("source")
class SourceEngine(BaseEngine):
    """Plain inference; ``ttt_forward`` returns a zero self-supervised loss so joint training still works."""

    optimization_defaults = {"num_steps": 0}

    def __init__(self, model, optimization_parameters=None):
        super().__init__(model, optimization_parameters)

    def ttt_forward(self, inputs, **kwargs):
        outputs = self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)
        return outputs, outputs.new_zeros(())

    def adapted_parameters(self):
        return iter(())

    def forward(self, inputs, **kwargs):
        if self.training:
            return self.ttt_forward(inputs, **kwargs)
        check_batch(inputs)  # NaN/inf inputs are user errors here too
        return self.predict(inputs, **kwargs), torch.zeros(())
