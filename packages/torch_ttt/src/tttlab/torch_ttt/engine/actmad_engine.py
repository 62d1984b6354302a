"""ActMAD: test-time training by matching activation statistics of several layers to the training data's.

Paper: Mirza, Soneira, Lin, Kozinski, Possegger, Bischof, "ActMAD: Activation Matching to Align
Distributions for Test-Time Training", CVPR 2023 (bibtex ``mirza2023actmad``); upstream
jmiemirza/ActMAD; API of torch-ttt's ``ActMADEngine(model, features_layer_names,
optimization_parameters)``.

Statistics are pixel-wise, as in the paper: for every chosen layer the mean and the (unbiased) variance
over the batch of every activation element (channel x position), not per channel.  The test-time loss
is ``sum over layers of L1(mean_test, mean_train) + L1(var_test, var_train)`` (element-mean L1, as
torch-ttt; the official CIFAR script multiplies the sum by 0.5, which only rescales the step size for SGD
and is invisible to Adam).  All model parameters adapt (as the paper and upstream); the model stays in
eval mode, so BatchNorm layers normalise with their stored statistics (the official script sets every
BatchNorm layer to eval during adaptation) and dropout is off.

Against the official CIFAR script (jmiemirza/ActMAD ``actmad_cifar``), deliberately: it hooks the output of
every ``BatchNorm2d`` layer (here: the layers you name, as torch-ttt); its clean variance is the mean of
per-batch unbiased variances (here: the variance over all calibration samples; both estimate the same
quantity); it runs the model in train mode with the BatchNorm layers in eval mode (dropout active; here
everything in eval mode); the batches it adapts on are the test images under the *training* transform (random
crop and flip: ``get_loader(..., use_tr_transform=True)``) while it predicts on the plain test images, and its
clean statistics come from the training loader with the same augmentation (here: the batches given,
un-augmented, in both places); it adapts online within a corruption (reset per domain) with one SGD step per
batch (its defaults: batch 128, lr 1e-2 on CIFAR-10 and 1e-3 on CIFAR-100; Nesterov, momentum 0.9, weight
decay 5e-4; with its 0.5 factor folded in, CIFAR-10's step is ``{"optimizer_name": "sgd", "lr": 5e-3,
"weight_decay": 1e-3, "momentum": 0.9, "nesterov": True, "num_steps": 1, "reset": "per_domain"}`` here), while
the defaults here are torch-ttt's (3 Adam steps at 1e-2, reset per batch; ``evaluate.py`` maps the benchmark
setting onto the reset policy). That script also scores the whole test set after every adapted batch and
reports the *minimum* error over those evaluations (a choice made with the labels); ``evaluate.py`` scores
each batch's prediction once, as it streams.

Training statistics: ``engine.compute_statistics(batches)`` (eval mode, float64 pairwise accumulation,
no stacking of all activations as upstream did); train-mode forwards also accumulate them (model in
train mode, changing weights: an approximation), restarting whenever the engine goes from eval to train
mode and stored at ``engine.eval()`` unless ``compute_statistics`` was called after them.

Differences from torch-ttt 0.0.2: no ``print`` in the loss, statistics on the model's device, memory
O(activation size) instead of the whole training set's activations, the forward stops once the deepest
chosen layer has run, a missing layer name lists the available names, adapting without statistics is a
clear error, no deep copy per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from tttlab.core.errors import InvalidInputError

from ..engine_registry import EngineRegistry
from ..heads import RunningMoments, features_only, model_device_dtype, run_model
from ..precision import full_precision
from .base_engine import BaseEngine, check_batch, find_module
from .ttt_pp_engine import iterate_inputs

__all__ = ["ActMADEngine"]


class _Capture:
    """Forward hooks keeping the last output of each of several modules."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules, self.outputs, self.handles = list(modules), [None] * len(modules), []

    def __enter__(self):
        for i, m in enumerate(self.modules):
            self.handles.append(m.register_forward_hook(self._make(i)))
        return self

    def _make(self, i):
        def hook(module, args, output):
            self.outputs[i] = output

        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


@EngineRegistry.register("actmad")
class ActMADEngine(BaseEngine):
    """Args: model; features_layer_names (a name or a list of names); optimization_parameters (defaults:
    3 Adam steps at lr 1e-2, reset per batch, as torch-ttt)."""

    compiled_adaptation = False  # reads inner layers through hooks: eager under engine.compile()

    def feature_modules(self):
        """Under ``engine.compile()`` the adaptation runs a compiled copy of the model truncated here."""
        return [list(self.target_modules)]

    min_batch = 2

    def __init__(
        self, model: nn.Module, features_layer_names: str | Sequence[str], optimization_parameters=None
    ):
        super().__init__(model, optimization_parameters)
        names = (
            [features_layer_names] if isinstance(features_layer_names, str) else list(features_layer_names)
        )
        if not names:
            raise InvalidInputError("features_layer_names is empty; give at least one layer name")
        self.features_layer_names = names
        self.target_modules = [find_module(model, n) for n in names]
        self.reference_mean: list[torch.Tensor] | None = None
        self.reference_var: list[torch.Tensor] | None = None
        self._new_accumulators()

    # -- statistics ---------------------------------------------------------------------------------
    def _new_accumulators(self) -> None:
        self._moments = [RunningMoments() for _ in self.target_modules]

    def _features(self, outputs: list) -> list[torch.Tensor]:
        for name, out in zip(self.features_layer_names, outputs):
            if out is None:
                raise InvalidInputError(f"layer {name!r} was not called by the model's forward")
            if not isinstance(out, torch.Tensor):
                raise InvalidInputError(f"layer {name!r} returns {type(out).__name__}; ActMAD needs tensors")
        return outputs

    def _accumulate(self, features: list[torch.Tensor]) -> None:
        for moments, f in zip(self._moments, features):
            moments.update(f)

    def _store_accumulated(self) -> None:
        _, dtype = model_device_dtype(self.model)
        self.reference_mean = [m.mean.to(dtype) for m in self._moments]
        self.reference_var = [m.var.to(dtype) for m in self._moments]
        self._new_accumulators()

    def _apply(self, fn, recurse=True):  # engine.to(device/dtype) moves the statistics too
        super()._apply(fn, recurse)
        if self.reference_mean is not None:
            self.reference_mean = [fn(t) for t in self.reference_mean]
            self.reference_var = [fn(t) for t in self.reference_var]
        return self

    def train(self, mode: bool = True):
        was = self.training
        super().train(mode)
        if hasattr(self, "_moments"):
            if mode and not was:
                self._new_accumulators()
            elif not mode and was and self._moments[0].count >= 2:
                self._store_accumulated()
        return self

    @torch.no_grad()
    def compute_statistics(self, batches: Iterable) -> None:
        """Clean statistics from ``batches`` (e.g. the training loader), model in eval mode."""
        device = next(self.model.parameters()).device
        was = self.model.training
        self.model.eval()
        self._new_accumulators()
        try:
            for x in iterate_inputs(batches, device):
                self._accumulate(self._features(self._layer_outputs(x)))
        finally:
            self.model.train(was)
        if self._moments[0].count < 2:
            raise InvalidInputError("compute_statistics needs at least 2 samples; the batches gave fewer")
        self._store_accumulated()

    # -- losses -------------------------------------------------------------------------------------
    def _layer_outputs(self, inputs) -> list[torch.Tensor]:
        return features_only(self.model, self.target_modules, inputs, self.features_layer_names)

    def alignment_loss(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Sum over layers of L1(batch mean, clean mean) + L1(batch variance, clean variance)."""
        if self.reference_mean is None:
            raise InvalidInputError(
                "ActMADEngine has no clean statistics: call engine.compute_statistics(train_batches) "
                "(or run train-mode forwards) before adapting"
            )
        loss = features[0].new_zeros(())
        for f, mean, var, name in zip(
            features, self.reference_mean, self.reference_var, self.features_layer_names
        ):
            if f.shape[1:] != mean.shape:
                raise InvalidInputError(
                    f"layer {name!r}: activations of shape {tuple(f.shape[1:])}, but the clean statistics "
                    f"have shape {tuple(mean.shape)} (pixel-wise statistics need the training input size)"
                )
            f = full_precision(f)
            mean, var = mean.to(f.device, f.dtype), var.to(f.device, f.dtype)
            loss = loss + (f.mean(dim=0) - mean).abs().mean() + (f.var(dim=0) - var).abs().mean()
        return loss

    def ttt_forward(self, inputs, **kwargs):
        """Train mode: ``(model(inputs), 0)`` and the clean statistics accumulate; eval: the ActMAD loss."""
        with _Capture(self.target_modules) as capture:
            outputs = run_model(self.model, inputs)
        features = self._features(capture.outputs)
        if self.training:
            self._accumulate(features)
            return outputs, outputs.new_zeros(())
        return outputs, self.alignment_loss(features)

    def adapt_loss(self, inputs, **kwargs):
        return self.alignment_loss(self._features(self._layer_outputs(inputs)))

    def forward(self, inputs, **kwargs):
        if not self.training and self.optimization_parameters["num_steps"] > 0:
            check_batch(inputs, min_batch=self.min_batch)
            if self.reference_mean is None:
                self.alignment_loss([torch.zeros(1)])  # raises the explanatory error before any change
        return super().forward(inputs, **kwargs)
