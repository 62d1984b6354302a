"""TTT: test-time training with rotation prediction as the self-supervised task.

Paper: Sun, Wang, Liu, Miller, Efros, Hardt, "Test-Time Training with Self-Supervision for Generalization
under Distribution Shifts", ICML 2020 (bibtex ``sun2020ttt``); upstream yueatsprograms/ttt_cifar_release;
API of torch-ttt's ``TTTEngine(model, features_layer_name, angle_head, angle_criterion,
optimization_parameters)``.

A 4-way rotation classifier (0, 90, 180, 270 degrees) reads the features of ``features_layer_name``;
training minimises task loss + alpha * rotation loss; at test time the model's parameters take
``num_steps`` steps on the rotation loss of the test batch, then predict.

Differences from torch-ttt 0.0.2 and why:

* the angle head is built at construction (from the features layer: ``nn.Linear`` -> its
  ``out_features``, ``nn.Conv2d``/``nn.Conv3d`` -> ``out_channels``; else pass ``feature_shape`` or
  ``example_input``), so an optimizer made from ``engine.parameters()`` before the first call trains it.
  Upstream built it lazily at the first forward, so the tutorial's head was never trained.
* rotations use ``torch.rot90`` (exact, a memory permutation) instead of torchvision's interpolating
  ``rotate``;
* at test time only the rotated copies are run, and the forward stops at the features layer (layers
  after it do not influence the rotation loss); upstream ran the full model twice per step;
* no deep copy of the engine per batch (snapshot/restore of the adapted parameters, see ``BaseEngine``).

As upstream, the angle head is trained jointly but not adapted at test time (only model parameters are).
``rotation_type="expand"`` (default, as upstream) rotates every image 4 ways; ``"rand"`` gives each image
one random rotation (Sun et al.'s training variant), 4x cheaper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tttlab.core.errors import InvalidInputError

from ..engine_registry import EngineRegistry
from .base_engine import BaseEngine, FeatureHook, find_module

__all__ = ["TTTEngine", "build_angle_head", "rotate_batch"]


class _StopForward(Exception):
    """Raised by a hook to end the forward pass at the features layer."""

    def __init__(self, output):
        super().__init__()
        self.output = output


def rotate_batch(x: torch.Tensor, rotation_type: str = "expand", generator: torch.Generator | None = None):
    """Rotated copies of an NCHW batch and their labels (k: rotation by k * 90 degrees, counter-clockwise)."""
    if x.ndim != 4:
        raise InvalidInputError(f"rotation needs NCHW images, got shape {tuple(x.shape)}")
    if rotation_type == "expand":
        rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
        labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
        return rotated, labels
    if rotation_type == "rand":
        labels = torch.randint(0, 4, (x.shape[0],), generator=generator).to(x.device)
        rotated = torch.empty_like(x) if x.shape[2] == x.shape[3] else None
        if rotated is None:
            raise InvalidInputError("rotation_type='rand' needs square images")
        for k in range(4):
            idx = (labels == k).nonzero(as_tuple=True)[0]
            if idx.numel():
                rotated[idx] = torch.rot90(x[idx], k, dims=(2, 3))
        return rotated, labels
    raise InvalidInputError(f"rotation_type={rotation_type!r}; expected 'expand' or 'rand'")


def build_angle_head(feature_shape: Sequence[int]) -> nn.Module:
    """Upstream's head shapes: 2-D features Linear(d,16)-ReLU-Linear(16,8)-ReLU-Linear(8,4);
    4-D features Conv(C,16,3)-ReLU-Conv(16,4,3)-GAP-Flatten; 5-D the Conv3d analogue."""
    if len(feature_shape) == 2:
        d = int(feature_shape[1])
        return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    if len(feature_shape) == 4:
        c = int(feature_shape[1])
        return nn.Sequential(
            nn.Conv2d(c, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )  # fmt: skip
    if len(feature_shape) == 5:
        c = int(feature_shape[1])
        return nn.Sequential(
            nn.Conv3d(c, 16, 3), nn.ReLU(), nn.Conv3d(16, 4, 3), nn.AdaptiveAvgPool3d(1), nn.Flatten()
        )  # fmt: skip
    raise InvalidInputError(f"features of shape {tuple(feature_shape)}: expected 2-D, 4-D or 5-D features")


def _infer_feature_shape(model: nn.Module, layer: nn.Module, name: str, feature_shape, example_input):
    if feature_shape is not None:
        return tuple(feature_shape)
    if isinstance(layer, nn.Linear):
        return (1, layer.out_features)
    if isinstance(layer, nn.Conv2d):
        return (1, layer.out_channels, 1, 1)
    if isinstance(layer, nn.Conv3d):
        return (1, layer.out_channels, 1, 1, 1)
    if example_input is not None:
        with torch.no_grad(), FeatureHook(layer) as hook:
            was = model.training
            model.eval()
            model(example_input)
            model.train(was)
        return tuple(hook.output.shape)
    raise InvalidInputError(
        f"cannot tell the feature shape of layer {name!r} ({type(layer).__name__}); pass "
        "feature_shape=(batch, features...) or example_input=<a batch> so the angle head can be built now"
    )


@EngineRegistry.register("ttt")
class TTTEngine(BaseEngine):
    def __init__(
        self,
        model: nn.Module,
        features_layer_name: str,
        angle_head: nn.Module | None = None,
        angle_criterion: nn.Module | None = None,
        optimization_parameters=None,
        *,
        rotation_type: str = "expand",
        feature_shape: Sequence[int] | None = None,
        example_input: torch.Tensor | None = None,
    ) -> None:
        super().__init__(model, optimization_parameters)
        self.features_layer_name = features_layer_name
        self.target_module = find_module(model, features_layer_name)
        if rotation_type not in ("expand", "rand"):
            raise InvalidInputError(f"rotation_type={rotation_type!r}; expected 'expand' or 'rand'")
        self.rotation_type = rotation_type
        if angle_head is None:
            shape = _infer_feature_shape(
                model, self.target_module, features_layer_name, feature_shape, example_input
            )
            angle_head = build_angle_head(shape)
            ref = next(model.parameters(), None)
            if ref is not None:
                angle_head = angle_head.to(device=ref.device, dtype=ref.dtype)
        self.angle_head = angle_head
        self.angle_criterion = angle_criterion if angle_criterion is not None else nn.CrossEntropyLoss()

    def _features_only(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the model up to (and including) the features layer; the rest is not computed."""

        def stop(module, args, output):
            raise _StopForward(output)

        handle = self.target_module.register_forward_hook(stop)
        try:
            self.model(inputs)
        except _StopForward as done:
            return done.output
        finally:
            handle.remove()
        raise InvalidInputError(f"layer {self.features_layer_name!r} was not called by the model's forward")

    def rotation_loss(self, inputs: torch.Tensor) -> torch.Tensor:
        rotated, labels = rotate_batch(inputs, self.rotation_type)
        return self.angle_criterion(self.angle_head(self._features_only(rotated)), labels)

    def ttt_forward(self, inputs, **kwargs):
        """Train mode: ``(model(inputs), rotation loss)``; two forwards, so BatchNorm statistics of the
        clean batch are not mixed with those of the rotated copies (as upstream)."""
        outputs = self.model(inputs)
        return outputs, self.rotation_loss(inputs)

    def adapt_loss(self, inputs, **kwargs):
        return self.rotation_loss(inputs)
