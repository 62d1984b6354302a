"""IT3: idempotent test-time training.

Paper: Durasov, Shocher, Oner, Chechik, Efros, Fua, "IT3: Idempotent Test-Time Training", ICML 2025
(bibtex ``durasov2025it3``; openreview MHiTGWDbIb, arXiv 2410.04201); upstream nikitadurasov/ittt
(training scripts and notebooks) and torch-ttt's ``IT3Engine(model, features_layer_name, embeder, combine_fn,
distance_fn, optimization_parameters)``, whose API this engine keeps.

The model becomes a function of its input and of a guess of its own output, ``f(x, y)``: an embedder maps
``y`` to the features layer's channel count and ``combine_fn`` merges it into that layer's output (default:
broadcast addition, so ``y = "0"`` - nothing added - is the plain model).  Training (``engine(x,
target=y_onehot)``): the task loss is put on ``y0 = f(x, 0)`` and the engine's loss is
``distance(s(f(x, y)), y)``, so the network learns both ``f(x, 0) ~ y`` and ``f(x, y) ~ y`` (the paper's
two terms).  Test time: ``y0 = f(x, 0)``, ``y1 = f(x, s(y0))``, the parameters take ``num_steps`` steps on
``distance(s(y1), s(y0))`` (idempotence: ``f(x, f(x, 0)) = f(x, 0)``), then ``f(x, 0)`` is the prediction.
As torch-ttt, gradients flow through both applications and only the model's parameters adapt (the
embedder is trained jointly and then kept fixed).

``s`` is the signal fed back, ``feedback=``: ``"output"`` (default, torch-ttt) the model's output as it is,
for a model whose output is the prediction itself (torch-ttt's example model ends in a softmax);
``"softmax"`` its softmax over dim 1, for a classifier that returns logits: every official experiment
feeds back probabilities (the MNIST notebook's network ends in a softmax, the CIFAR notebook feeds
``y_1.softmax(-1)``) and trains with one-hot labels, so a logit model with ``"output"`` would be trained
on one-hot inputs and tested on logits.  ``tttlab-torch-ttt-train`` passes the one-hot labels as
``target`` (``conf/engine/ittt.yaml`` uses ``"softmax"`` for the logit models).

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
* ``feedback="softmax"`` (above); no deep copy per batch, no prints.

Against the paper and the official notebooks (nikitadurasov/ittt, read for this engine):

* anchor: the paper describes the update with a *frozen* copy of the trained network as an anchor (an
  exponential moving average of the weights in its online variant).  The official MNIST notebook applies
  the second pass with the frozen network's layers after the injection point (fed the adapted network's
  features and prediction); the official CIFAR notebook, like torch-ttt, uses the adapted network for both
  passes with gradients through both.  This engine keeps torch-ttt's formulation (one network, no anchor
  copy), so that a torch-ttt script gets the same method.
* training: torch-ttt, and this engine, put both terms on every batch; the notebooks instead draw per batch
  whether the first pass gets the ground truth (probability 0.75 MNIST, 0.2 CIFAR) or a neutral signal (a
  random class for MNIST, the uniform distribution 0.1 for CIFAR) and put the task loss on both that pass
  and a second pass fed its prediction.  The neutral signal there is an input to the embedder; here, as
  torch-ttt, "0" means no embedding at all.  The notebooks and torch-ttt's example weigh the two terms
  equally; ``tttlab-torch-ttt-train`` multiplies the engine's term by ``train.ssl_weight`` (0.35, the TTT
  tutorial's weight, shared by every engine).
* distances and steps: the notebooks use the Jensen-Shannon divergence of the two passes' probabilities,
  Adam at 1e-3, 10 steps (MNIST, test-time signal a random class; its loop makes one more update after
  the forward it reports) or 1 step (CIFAR, the network in train mode); torch-ttt's default is MSE, 3
  Adam steps at 1e-2 (``conf/engine/ittt.yaml``: 1 step at 1e-3, as torch-ttt's own IT3 example).  The
  notebooks report the first pass of the last step (MNIST) or the
  second pass (CIFAR), computed before that step's update; here, as torch-ttt, ``f(x, 0)`` after the steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tttlab.core.errors import InvalidInputError

from ..engine_registry import EngineRegistry
from ..heads import has_training_batchnorm, infer_feature_shape, place_like_model, run_model
from .base_engine import BaseEngine, FeatureHook, find_module

__all__ = ["IT3Engine", "broadcast_add", "build_embedder"]

_OUTPUT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)
#: what ``feedback=`` accepts: the signal fed back to the embedder and compared by the distance
FEEDBACK = ("output", "softmax")


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
    default embedder when the layers do not tell); feedback (``"output"`` or ``"softmax"``, see the
    module docstring).  ``engine(x, target=y)`` in train mode uses the training scheme; ``target`` must
    have the model output's shape (e.g. one-hot labels)."""

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
        feedback: str = "output",
    ) -> None:
        super().__init__(model, optimization_parameters)
        if feedback not in FEEDBACK:
            raise InvalidInputError(f"feedback={feedback!r}; expected one of {FEEDBACK}")
        self.feedback = feedback
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

    def training_kwargs(self, labels: torch.Tensor) -> dict[str, Any]:
        """Joint training feeds the ground truth: ``target`` = the one-hot labels (:meth:`label_target`)."""
        return {"target": self.label_target(labels)}

    def label_target(self, labels: torch.Tensor) -> torch.Tensor:
        """Integer class labels ``(N,)`` as the one-hot float ``target`` of the training scheme, with the
        model output's channel count (known when the default embedder was built)."""
        k = self._expected_output_channels
        if k is None:
            raise InvalidInputError(
                "label_target needs the model's output size: build the engine with the default embedder "
                "(output_shape= or example_input=), or pass target= yourself"
            )
        if labels.ndim != 1 or labels.is_floating_point():
            raise InvalidInputError(
                f"labels of shape {tuple(labels.shape)} ({labels.dtype}); expected (N,) integers"
            )
        dtype = next((p.dtype for p in self.embeder.parameters() if p.is_floating_point()), torch.float32)
        return F.one_hot(labels.long(), k).to(dtype)

    def signal(self, outputs: torch.Tensor) -> torch.Tensor:
        """What is fed back and compared: the outputs (``feedback="output"``) or their softmax over dim 1."""
        return outputs.softmax(dim=1) if self.feedback == "softmax" else outputs

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
        """``(f(x, 0), loss)``: with ``target`` the training loss ``distance(s(f(x, target)), target)``,
        else the idempotence loss ``distance(s(f(x, s(f(x, 0)))), s(f(x, 0)))``; ``s`` = :meth:`signal`."""
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
            return y0, self.distance_fn(self.signal(y1), target)
        y0 = run_model(self.model, inputs)
        self._check_output(y0)
        s0 = self.signal(y0)
        y1 = self._with_embedding(inputs, self.embeder(s0))
        return y0, self.distance_fn(self.signal(y1), s0)
