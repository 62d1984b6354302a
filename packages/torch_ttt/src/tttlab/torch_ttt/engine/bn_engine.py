"""``bn``: test-batch normalisation statistics, no gradient step.

Paper: Schneider et al., "Improving robustness against common corruptions by covariate shift adaptation"
(NeurIPS 2020), bibtex ``schneider2020improving``; also Nado et al. 2020 ("prediction-time BN").
With ``prior_strength=None`` (default) every BatchNorm layer normalises with the test batch's statistics
only (N=0, the biased batch variance, as a train-mode BatchNorm); with ``prior_strength=N`` the source
statistics are mixed in with weight N/(N+1) and the test variance is the unbiased one, as in the
bethgelab code of that paper (the test statistics read from ``F.batch_norm``'s running-buffer update).
The prior exists for small test batches (the paper's smallest is one image): a single image is accepted
with or without it (its statistics over the spatial positions); without a prior, a BatchNorm layer that
would get one value per channel from it (a BatchNorm1d on flat features) is an error.
Running statistics are never changed (:func:`~tttlab.torch_ttt.norm.batch_statistics`), and the
engine takes no gradient step.
No upstream torch-ttt engine exists; this is the "BN" baseline of the TTA literature.
"""

from __future__ import annotations

import torch

from tttlab.core.errors import InvalidInputError

from ..engine_registry import EngineRegistry
from ..norm import batch_statistics, batchnorm_layers, prior_mixed_statistics
from .base_engine import BaseEngine

__all__ = ["BNEngine"]


@EngineRegistry.register("bn")
class BNEngine(BaseEngine):
    optimization_defaults = {"num_steps": 0}

    def __init__(self, model, optimization_parameters=None, prior_strength: float | None = None):
        super().__init__(model, optimization_parameters)
        if not batchnorm_layers(model):
            raise InvalidInputError(
                f"BNEngine needs a model with BatchNorm layers; {type(model).__name__} has none"
            )
        self.prior_strength = prior_strength

    @property
    def batchnorm_batch_statistics(self) -> bool:
        """Test-batch statistics alone need more than one value per channel in every BatchNorm layer; with a
        prior a layer with one value per channel uses the source statistics plus a zero test variance term
        (:func:`~tttlab.torch_ttt.norm.prior_mixed_statistics`), so any single image is accepted."""
        return self.prior_strength is None

    @property
    def compiled_prediction(self) -> bool:
        """The prior-mixed statistics replace the BatchNorm layers' forward: a compiled model runs eagerly."""
        return self.prior_strength is None

    def inference_context(self):
        if self.prior_strength is None:
            return batch_statistics(self.model)
        return prior_mixed_statistics(self.model, self.prior_strength)

    def ttt_forward(self, inputs, **kwargs):
        outputs = self.model(inputs)
        return outputs, outputs.new_zeros(())

    def adapted_parameters(self):
        return iter(())

    def check_inputs(self, inputs) -> None:
        """Every prediction normalises with the test batch (no step needed): its statistics are checked."""
        from .base_engine import check_batch

        check_batch(inputs)
        self.check_batch_statistics(inputs)

    def forward(self, inputs, **kwargs):
        if self.training:
            return self.ttt_forward(inputs, **kwargs)
        self.check_inputs(inputs)
        return self.predict(inputs, **kwargs), torch.zeros(())
