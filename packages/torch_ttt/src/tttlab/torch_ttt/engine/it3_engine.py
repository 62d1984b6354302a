"""IT3: idempotent test-time training.

Paper: Durasov, Shocher, Oner, Chechik, Efros, Fua, "IT3: Idempotent Test-Time Training", ICML 2025
(bibtex ``durasov2025it3``); upstream nikitadurasov/ittt; API of torch-ttt's ``IT3Engine(model,
features_layer_name, embeder, combine_fn, distance_fn, optimization_parameters)``.

The model becomes a function of its input and of a guess of its own output, ``f(x, y)``: an embedder maps
``y`` to the features layer's channel count and ``combine_fn`` merges it into that layer's output (default:
broadcast addition, so ``y = "0"`` - nothing added - is the plain model).  Training (``engine(x,
target=y_onehot)``): the task loss is put on ``y0 = f(x, 0)`` and the engine's loss is
``distance(f(x, y), y)``, so the network learns both ``f(x, 0) ~ y`` and ``f(x, y) ~ y``.  Test time:
``y0 = f(x, 0)``, ``y1 = f(x, y0)``, the parameters take ``num_steps`` steps on ``distance(y1, y0)``
(idempotence: ``f(x, f(x, 0)) = f(x, 0)``), then ``f(x, 0)`` is the prediction.  As upstream, gradients
flow through both applications and only the model's parameters adapt (the embedder is trained jointly).

Differences from torch-ttt 0.0.2 and why:

* the embedder exists at construction (so the optimizer trains it): its input size is the model's output
  size, from ``output_shape=``, a dry run on ``example_input=``, or else the last ``nn.Linear``/``nn.Conv*``
  layer the model registers (checked against the real output at the first call, with an error naming the
  arguments to pass); its output size comes from the features layer (``nn.Linear``/``nn.Conv*`` or
  ``feature_shape=``/``example_input=``).  Shapes (upstream's): 2-D outputs Linear-LeakyReLU-Linear-
  LeakyReLU, 4-D outputs the 1x1-convolution analogue; upstream silently used an identity otherwise, here
  other ranks need an ``embeder``.
* with a target and no BatchNorm layer using batch statistics, ``f(x, 0)`` and ``f(x, y)`` run as one
  concatenated forward (the embedding added to the second half only); with such BatchNorm, two forwards.
* no deep copy per batch, no prints.

Against the paper: IT3 describes the test-time update with a *frozen* copy of the trained network as an
anchor (an exponential moving average of the weights in its online variant) next to the network being
updated; this engine keeps torch-ttt's formulation (one network, gradients through both applications, no
anchor copy), so that a torch-ttt script gets the same method.  Not audited further: the authors'
repository (nikitadurasov/ittt) ships training scripts and notebooks, and its test-time code was not
compared line by line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tttlab.core.errors import InvalidInputError

from ..engine_registry import EngineRegistry
from ..heads import has_training_batchnorm, infer_feature_shape, place_like_model, run_model
from .base_engine import BaseEngine, FeatureHook, find_module

__all__ = ["IT3Engine", "broadcast_add", "build_embedder"]

_OUTPUT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)


def broadcast_add(features: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """``features + embedding`` with singleton axes appended to the embedding (a (N, C) embedding adds a
    per-channel offset to (N, C, H, W) features)."""
    while embedding.ndim < features.ndim:
        embedding = embedding.unsqueeze(-1)
    return features + embedding


def build_embedder(output_shape: Sequence[int], feature_channels: int) -> nn.Module:
    """Upstream's embedder shapes: (N, K) outputs -> Linear(K, C)-LeakyReLU-Linear(C, C)-LeakyReLU;
    (N, K, H, W) outputs -> the same with 1x1 convolutions."""
    rank, k, c = len(output_shape), int(output_shape[1]), int(feature_channels)
    if rank == 2:
        return nn.Sequential(nn.Linear(k, c), nn.LeakyReLU(), nn.Linear(c, c), nn.LeakyReLU())
    if rank == 4:
        return nn.Sequential(nn.Conv2d(k, c, 1), nn.LeakyReLU(), nn.Conv2d(c, c, 1), nn.LeakyReLU())
    raise InvalidInputError(
        f"model outputs of shape {tuple(output_shape)}: the default embedder handles (N, K) and (N, K, H, W); "
        "pass embeder=<module mapping the output to the features layer's channels>"
    )


def _guess_output_shape(model: nn.Module):
    last = None
    for m in model.modules():
        if isinstance(m, _OUTPUT_LAYERS):
            last = m
    if isinstance(last, nn.Linear):
        return (1, last.out_features)
    if isinstance(last, (nn.Conv2d, nn.ConvTranspose2d)):
        return (1, last.out_channels, 1, 1)
    return None


@EngineRegistry.register("ittt")
class IT3Engine(BaseEngine):
    """Args (upstream's, then keyword-only): model; features_layer_name (where the embedded prediction
    is added); embeder (default built now); combine_fn (default :func:`broadcast_add`); distance_fn
    (default MSE); optimization_parameters; output_shape / feature_shape / example_input (to size the
    default embedder when the layers do not tell).  ``engine(x, target=y)`` in train mode uses the
    training scheme; ``target`` must have the model output's shape (e.g. one-hot labels)."""

    compiled_adaptation = False  # reads inner layers through hooks: eager under engine.compile()

    @property
    def target_module(self) -> nn.Module:
        """The features layer (a reference into ``model``)."""
        return self._target[0]

    def __init__(
        self,
        model: nn.Module,
        features_layer_name: str,
        embeder: nn.Module | None = None,
        combine_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        distance_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        optimization_parameters=None,
        *,
        output_shape: Sequence[int] | None = None,
        feature_shape: Sequence[int] | None = None,
        example_input: torch.Tensor | None = None,
    ) -> None:
        super().__init__(model, optimization_parameters)
        self.features_layer_name = features_layer_name
        # a tuple, so the layer is not registered twice (engine.state_dict() keeps one copy)
        self._target = (find_module(model, features_layer_name),)
        self.combine_fn = combine_fn if combine_fn is not None else broadcast_add
        self.distance_fn = distance_fn if distance_fn is not None else F.mse_loss
        self._expected_output_channels: int | None = None
        if embeder is None:
            if example_input is not None and (output_shape is None or feature_shape is None):
                was = model.training
                model.eval()
                try:
                    with torch.no_grad(), FeatureHook(self.target_module) as hook:
                        out = run_model(model, example_input)
                finally:
                    model.train(was)
                output_shape = output_shape if output_shape is not None else tuple(out.shape)
                feature_shape = feature_shape if feature_shape is not None else tuple(hook.output.shape)
            shape = infer_feature_shape(
                model, self.target_module, features_layer_name, feature_shape, None, "the embedder"
            )
            if output_shape is None:
                output_shape = _guess_output_shape(model)
            if output_shape is None:
                raise InvalidInputError(
                    f"cannot tell the output size of {type(model).__name__}; pass output_shape=(batch, K, ...) "
                    "or example_input=<a batch> so the embedder can be built now"
                )
            self._expected_output_channels = int(output_shape[1])
            embeder = place_like_model(build_embedder(output_shape, shape[1]), model)
        self.embeder = embeder

    def _check_output(self, y0: torch.Tensor) -> None:
        k = self._expected_output_channels
        if k is not None and (y0.ndim < 2 or y0.shape[1] != k):
            raise InvalidInputError(
                f"the default embedder was built for model outputs with {k} channels, but the model returned "
                f"shape {tuple(y0.shape)}; pass output_shape= or example_input= (or an embeder)"
            )

    def _with_embedding(self, inputs, embedding: torch.Tensor, start: int = 0):
        """The model's output with ``embedding`` combined into the features of rows ``start:``."""

        def inject(module, args, output):
            if start == 0:
                return self.combine_fn(output, embedding)
            return torch.cat([output[:start], self.combine_fn(output[start:], embedding)])

        handle = self.target_module.register_forward_hook(inject)
        try:
            return run_model(self.model, inputs)
        finally:
            handle.remove()

    def ttt_forward(self, inputs, target: torch.Tensor | None = None, **kwargs):
        """``(f(x, 0), loss)``: with ``target`` the training loss ``distance(f(x, target), target)``, else
        the idempotence loss ``distance(f(x, f(x, 0)), f(x, 0))``."""
        if target is not None:
            k = self._expected_output_channels
            if k is not None and (target.ndim < 2 or target.shape[1] != k):
                raise InvalidInputError(
                    f"target of shape {tuple(target.shape)}: expected the model output's shape (N, {k}, ...), "
                    "e.g. one-hot labels"
                )
            embedding = self.embeder(target)
            if isinstance(inputs, torch.Tensor) and not has_training_batchnorm(self.model):
                n = inputs.shape[0]
                both = self._with_embedding(torch.cat([inputs, inputs]), embedding, start=n)
                y0, y1 = both[:n], both[n:]
            else:
                y0 = run_model(self.model, inputs)
                y1 = self._with_embedding(inputs, embedding)
            self._check_output(y0)
            return y0, self.distance_fn(y1, target)
        y0 = run_model(self.model, inputs)
        self._check_output(y0)
        y1 = self._with_embedding(inputs, self.embeder(y0))
        return y0, self.distance_fn(y1, y0)
