"""TTT: test-time training with rotation prediction as the self-supervised task.

Paper: Sun, Wang, Liu, Miller, Efros, Hardt, "Test-Time Training with Self-Supervision for Generalization
under Distribution Shifts", ICML 2020 (bibtex ``sun2020ttt``); upstream yueatsprograms/ttt_cifar_release;
API of torch-ttt's ``TTTEngine(model, features_layer_name, angle_head, angle_criterion,
optimization_parameters)``.

A 4-way rotation classifier (0, 90, 180, 270 degrees) reads the output of ``features_layer_name``;
training minimises task loss + alpha * rotation loss; at test time the model's parameters take
``num_steps`` steps on the rotation loss of the test batch, then predict.

Differences from torch-ttt 0.0.2 and why:

* the angle head is built at construction (from the features layer: ``nn.Linear`` -> ``out_features``,
  ``nn.Conv2d``/``nn.Conv3d`` -> ``out_channels``; for other layer types pass ``feature_shape=`` or
  ``example_input=``), on the model's device and dtype, so an optimizer made from ``engine.parameters()``
  before the first call trains it.  Upstream built it lazily in the first forward, so the tutorial's head
  was never trained.
* rotations use ``torch.rot90`` (exact, a memory permutation) instead of torchvision's interpolating
  ``rotate``; images must be square (a 90-degree rotation of a non-square image changes its shape).
* train mode, no BatchNorm using batch statistics: one forward over the rotated batch, whose
  0-degree copy gives the task outputs (``rotation_type="expand"``; ``"rand"`` prepends the clean batch).
  With BatchNorm in train mode concatenating would change the batch statistics the clean outputs see,
  so the clean batch and the rotated batch keep two forwards (as upstream); the rotated one stops at the
  features layer.
* eval (adaptation): only the rotated copies are run and the forward stops at the features layer
  (the layers after it do not affect the rotation loss); upstream ran the whole model on the clean and
  on the rotated batch at every step.
* no deep copy of the engine per batch (snapshot/restore of the adapted parameters, see ``BaseEngine``).

As upstream torch-ttt and the paper (which updates the shared extractor only), the angle head is trained
jointly but not adapted at test time: only the model's parameters are (``adapted_parameters``); layers
after the features layer get no gradient and stay as they are.  ``rotation_type="expand"`` (default, as
upstream torch-ttt) rotates every image 4 ways; ``"rand"`` gives each image one random rotation, 4x
cheaper.  Random rotations use ``generator`` (a ``torch.Generator``) or the global torch RNG.

Against the official code (yueatsprograms/ttt_cifar_release), deliberately, for torch-ttt's batch API:

* the official "standard" TTT adapts on ONE test image at a time: 32 copies of it with the training
  augmentation (random crop and flip), each with one random rotation (``rotate_batch(..., 'rand')``;
  ``'expand'`` is only used there to measure the rotation error, and joint training also defaults to
  ``'rand'``), one plain SGD step at lr 1e-3 (no momentum, no weight decay; 3 or 10 steps in its
  "medium"/"slow" settings), reset per image ("online": never reset; ``optimizer_name="sgd",
  momentum=0, lr=1e-3, num_steps=1`` are its step).  Here the batch's own images are rotated, without
  extra augmentation, with the engine's optimizer settings (torch-ttt's 3 Adam steps at 1e-2 by default)
  and the reset policy;
* its optimizer covers the extractor *and* the rotation head (``ssh.parameters()``) unless ``--fix_ssh``;
  here the head stays fixed (the paper's formulation and torch-ttt's);
* with BatchNorm it adapts in train mode (batch statistics, running statistics updated); here the model
  stays in eval mode, so BatchNorm layers use their stored statistics during adaptation and prediction.
  The paper's main CIFAR results use GroupNorm, where the two agree.
* its rotation head is a copy of the network's own layers after the split (ResNet-26 shared up to
  ``layer2``; the head: a copy of ``layer3``, the final norm, ReLU, average pooling and a
  ``Linear(64 * width, 4)``), trained jointly with weight 1 on the rotation loss; the default head here is
  torch-ttt's small one (see :func:`build_angle_head`): pass ``angle_head=`` (e.g. such a copy) for the
  official construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tttlab.core.errors import InvalidInputError

from ..engine_registry import EngineRegistry
from ..heads import (
    build_angle_head,
    features_only,
    has_training_batchnorm,
    infer_feature_shape,
    place_like_model,
)
from .base_engine import BaseEngine, FeatureHook, find_module

__all__ = ["TTTEngine", "build_angle_head", "rotate_batch"]

ROTATION_TYPES = ("expand", "rand")


def rotate_batch(x: torch.Tensor, rotation_type: str = "expand", generator: torch.Generator | None = None):
    """Rotated copies of an NCHW batch and their labels (label k: rotated by k * 90 degrees,
    counter-clockwise).

    ``"expand"``: ``(4N, C, H, W)``, rotation-major (rows ``k * N + i``), labels ``[0]*N + [1]*N + ...``.
    ``"rand"``: ``(N, C, H, W)``, one rotation per image drawn from ``generator`` (or the global RNG).
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 3:
        raise InvalidInputError(f"rotation needs images (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    if x.shape[-1] != x.shape[-2]:
        raise InvalidInputError(
            f"rotation by 90 degrees needs square images, got H x W = {tuple(x.shape[-2:])}"
        )
    dims = (x.ndim - 2, x.ndim - 1)
    if rotation_type == "expand":
        rotated = torch.cat([torch.rot90(x, k, dims=dims) for k in range(4)])
        labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
        return rotated, labels
    if rotation_type == "rand":
        gen_device = generator.device if generator is not None else "cpu"
        labels = torch.randint(0, 4, (x.shape[0],), generator=generator, device=gen_device).to(x.device)
        rotated = x.clone()
        for k in range(1, 4):
            idx = (labels == k).nonzero(as_tuple=True)[0]
            if idx.numel():
                rotated[idx] = torch.rot90(x[idx], k, dims=dims)
        return rotated, labels
    raise InvalidInputError(f"rotation_type={rotation_type!r}; expected one of {ROTATION_TYPES}")


@EngineRegistry.register("ttt")
class TTTEngine(BaseEngine):
    """Args (upstream's first five, then keyword-only additions):
    model; features_layer_name; angle_head (default: built from the features' shape); angle_criterion
    (default cross-entropy); optimization_parameters (defaults: 3 Adam steps at lr 1e-2, reset per batch);
    rotation_type ``"expand"`` | ``"rand"``; feature_shape / example_input (to build the head when the
    layer type does not tell the shape); generator (for ``"rand"``).
    """

    compiled_adaptation = False  # reads inner layers through hooks: eager under engine.compile()

    def feature_modules(self):
        """Under ``engine.compile()`` the adaptation runs a compiled copy of the model truncated here."""
        return [[self.target_module]]

    @property
    def target_module(self) -> nn.Module:
        """The features layer (a reference into ``model``)."""
        return self._target[0]

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
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(model, optimization_parameters)
        self.features_layer_name = features_layer_name
        # a tuple, so the layer is not registered twice (engine.state_dict() keeps one copy)
        self._target = (find_module(model, features_layer_name),)
        if rotation_type not in ROTATION_TYPES:
            raise InvalidInputError(f"rotation_type={rotation_type!r}; expected one of {ROTATION_TYPES}")
        self.rotation_type = rotation_type
        self.generator = generator
        if angle_head is None:
            shape = infer_feature_shape(
                model, self.target_module, features_layer_name, feature_shape, example_input, "the angle head"
            )
            angle_head = place_like_model(build_angle_head(shape), model)
        self.angle_head = angle_head
        self.angle_criterion = angle_criterion if angle_criterion is not None else nn.CrossEntropyLoss()

    def _features_only(self, inputs: torch.Tensor) -> torch.Tensor:
        """The features layer's output; the model is computed only up to that layer."""
        return features_only(self.model, self.target_module, inputs, names=[self.features_layer_name])

    def _check_images(self, inputs) -> None:
        if not isinstance(inputs, torch.Tensor) or inputs.ndim < 4 or not inputs.is_floating_point():
            raise InvalidInputError(
                f"TTTEngine rotates images: expected a float (N, C, H, W) batch, got "
                f"{getattr(inputs, 'shape', type(inputs).__name__)}"
            )

    def rotation_loss(self, inputs: torch.Tensor) -> torch.Tensor:
        """Rotation-prediction loss of ``inputs`` (features computed up to the features layer only)."""
        self._check_images(inputs)
        rotated, labels = rotate_batch(inputs, self.rotation_type, self.generator)
        return self.angle_criterion(self.angle_head(self._features_only(rotated)), labels)

    def ttt_forward(self, inputs, **kwargs):
        """``(model(inputs), rotation loss)`` with the graph attached (train mode: for joint training)."""
        self._check_images(inputs)
        if has_training_batchnorm(self.model):
            # two forwards: the clean batch's BatchNorm statistics stay its own
            return self.model(inputs), self.rotation_loss(inputs)
        n = inputs.shape[0]
        rotated, labels = rotate_batch(inputs, self.rotation_type, self.generator)
        batch = rotated if self.rotation_type == "expand" else torch.cat([inputs, rotated])
        with FeatureHook(self.target_module) as hook:
            outputs = self.model(batch)
        features = hook.output if self.rotation_type == "expand" else hook.output[n:]
        return outputs[:n], self.angle_criterion(self.angle_head(features), labels)

    def adapt_loss(self, inputs, **kwargs):
        return self.rotation_loss(inputs)
