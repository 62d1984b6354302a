"""TENT: fully test-time adaptation by entropy minimisation.

Paper: Wang, Shelhamer, Liu, Olshausen, Darrell, "Tent: Fully Test-Time Adaptation by Entropy
Minimization", ICLR 2021 (bibtex ``wang2021tent``); upstream DequanWang/tent; API of torch-ttt's TentEngine.

Algorithm: normalisation layers use the statistics of the test batch; only their affine parameters
(BatchNorm, GroupNorm, LayerNorm, InstanceNorm) are updated, by minimising the mean prediction entropy.

Deviations from torch-ttt 0.0.2 (all fixes): test-batch statistics (upstream kept the stored training
statistics because it only set ``track_running_stats=False`` with buffers still present); every norm
type (upstream: BatchNorm2d only); nothing in the model is mutated permanently (``requires_grad`` and
running statistics are left alone; the engine selects what it optimises), so ``reset`` is exact.
As in upstream the returned prediction is made after the update steps (the official TENT code returns the
logits of the forward that computed the loss, i.e. before its update; with ``steps > 1`` the last
step's forward, after ``steps - 1`` updates: ``predict_before_update=True`` returns the same, and skips
the prediction forward: one forward and one backward per batch and step).

Against the official code (DequanWang/tent), deliberately: it adapts ``BatchNorm2d`` only (we take every
norm type, the same thing on BatchNorm2d models); it puts the whole model in train mode, so dropout is
active during adaptation and prediction (we keep every other layer in eval mode: a TENT user wants the
deterministic eval network, and for models without dropout the two agree); its CIFAR-10-C protocol resets
per corruption (``reset="per_domain"``), batch 200, one Adam step at 1e-3, while our default reset is
torch-ttt's ``per_batch`` (``evaluate.py`` maps the benchmark setting onto the reset policy).  Same loss
(mean softmax entropy of the batch) and the same adapted parameters otherwise.
"""

from __future__ import annotations

from tttlab.core.errors import InvalidInputError

from ..engine_registry import EngineRegistry
from ..norm import batch_statistics, batchnorm_layers, entropy, norm_affine_parameters, norm_layers
from .base_engine import BaseEngine, PredictBeforeUpdate

__all__ = ["TentEngine"]


@EngineRegistry.register("tent")
class TentEngine(PredictBeforeUpdate, BaseEngine):
    """Args: model; optimization_parameters (defaults: 1 step, Adam lr 1e-3, betas 0.9/0.999, no weight
    decay: the TENT code's CIFAR-10-C setting, ``cfgs/tent.yaml``; upstream torch-ttt's generic defaults
    were 3 steps at 1e-2).  The paper's ImageNet setting is SGD, lr 2.5e-4, momentum 0.9, batch 64:
    ``{"optimizer_name": "sgd", "lr": 2.5e-4, "momentum": 0.9}`` (the TENT baselines of the EATA, SAR and
    DeYO code take exactly that; the TENT code's own SGD option adds ``nesterov=True``)."""

    optimization_defaults = {"num_steps": 1, "lr": 1e-3}
    batch_statistics_always = True

    def __init__(self, model, optimization_parameters=None, predict_before_update: bool = False):
        super().__init__(model, optimization_parameters)
        if not norm_layers(model):
            raise InvalidInputError(
                f"TentEngine needs normalisation layers (BatchNorm/GroupNorm/LayerNorm) to adapt; "
                f"{type(model).__name__} has none"
            )
        self.predict_before_update = predict_before_update
        # single images are accepted (batch size 1, the DeYO/SAR papers' setting for TENT): GroupNorm/LayerNorm
        # work per sample; a BatchNorm layer normalises with the image's spatial positions, and one that gets
        # a single value per channel (BatchNorm1d on flat features) is refused before any update
        self.batchnorm_batch_statistics = bool(batchnorm_layers(model))

    def adapted_parameters(self):
        return norm_affine_parameters(self.model)

    def inference_context(self):
        return batch_statistics(self.model)

    def ttt_forward(self, inputs, **kwargs):
        outputs = self.model(inputs)
        return outputs, entropy(outputs).mean()

    def adapt_loss(self, inputs, **kwargs):
        outputs, loss = self.ttt_forward(inputs, **kwargs)
        self._keep_outputs(outputs)  # predict_before_update: the prediction, with no second forward pass
        return loss
