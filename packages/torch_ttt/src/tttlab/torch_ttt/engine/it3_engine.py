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

* anchor (``anchor=``): the paper anchors the test-time update on a *frozen* copy of the trained network
  (an exponential moving average of the weights in its online variant).  The two official notebooks
  differ (nikitadurasov/ittt, read 2026-12-01): the MNIST one (``exps/mnist/mnist_ittt.ipynb``) resets an
  adapted copy ``f_ttt`` to the trained ``f`` every batch, runs ``y1, z1 = f_ttt(x, y0)`` and then the
  second pass through the *frozen* ``f``'s layers after the injection point, ``y2 = f.f2(z1, y1)``, fed
  the adapted network's latent ``z1`` and prediction ``y1``; its loss ``JS(y1, y2)`` updates every
  parameter of ``f_ttt`` (Adam over ``f_ttt.parameters()``), never ``f``.  The CIFAR one
  (``exps/cifar/cifar_ittt.ipynb``) runs both passes through ``f_ttt`` (gradients through both) and uses
  ``f`` only to reset it; so does torch-ttt's ``IT3Engine``.  ``anchor="none"`` (default) is torch-ttt's
  and the CIFAR notebook's single network; the README's numbers use it unless a row says
  ``anchor=frozen``.
  ``anchor="frozen"`` is the MNIST notebook's: at the first adaptation after construction or
  ``engine.train()`` (when the reset snapshot is taken) the engine keeps a frozen copy ``F`` of the model
  (eval mode, no gradients, not in ``state_dict``; a second copy of the weights in memory; the embedder is
  not adapted in either variant), and the
  test-time loss is ``distance(s(F_after(combine(h, embedder(s(y0))))), s(y0))`` with ``y0 = f(x, 0)`` and
  ``h`` the adapted network's features-layer output of that pass, ``F_after`` the frozen copy's layers
  after the features layer: gradients reach the adapted parameters through ``h`` and ``y0`` only.  Our
  models have no latent output, so ``h`` stands where the notebook feeds ``z1``.  Training is the same
  for both (one network; ``anchor`` only acts at test time, so it does not change the trained model).
* training: torch-ttt, and this engine, put both terms on every batch; the notebooks instead draw per batch
  whether the first pass gets the ground truth (probability 0.75 MNIST, 0.2 CIFAR) or a neutral signal (a
  random class for MNIST, the uniform distribution 0.1 for CIFAR) and put the task loss on both that pass
  and a second pass fed its prediction.  The neutral signal there is an input to the embedder; here, as
  torch-ttt, "0" means no embedding at all.  The weight: both notebooks add their two cross-entropies
  with weight 1 each and torch-ttt's IT3 example adds its engine loss with weight 1
  (``nll + loss_ttt``), so :attr:`IT3Engine.joint_training_weight` is 1.0: ``tttlab-torch-ttt-train``
  with ``train.ssl_weight: null`` (the shipped configs) uses it, where it used the TTT tutorial's 0.35
  until 2026-12-01 (a given ``train.ssl_weight`` still wins).
* distances and steps: the notebooks use the Jensen-Shannon divergence of the two passes' probabilities,
  Adam at 1e-3, 10 steps (MNIST, test-time signal a random class; its loop makes one more update after
  the forward it reports) or 1 step (CIFAR, the network in train mode); torch-ttt's default is MSE, 3
  Adam steps at 1e-2 (``conf/engine/ittt.yaml``: 1 step at 1e-3, as torch-ttt's own IT3 example).  The
  notebooks report the first pass of the last step (MNIST) or the
  second pass (CIFAR), computed before that step's update; here, as torch-ttt, ``f(x, 0)`` after the steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tttlab.core.errors import InvalidInputError

from ..engine_registry import EngineRegistry
from ..heads import has_training_batchnorm, infer_feature_shape, place_like_model, run_model
from ..precision import eager
from .base_engine import BaseEngine, FeatureHook, find_module

__all__ = ["ANCHORS", "IT3Engine", "broadcast_add", "build_embedder"]

_OUTPUT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)
#: what ``feedback=`` accepts: the signal fed back to the embedder and compared by the distance
FEEDBACK = ("output", "softmax")
#: what ``anchor=`` accepts: the network of the test-time second pass (see the module docstring)
ANCHORS = ("none", "frozen")


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
    default embedder when the layers do not tell); feedback (``"output"`` or ``"softmax"``) and anchor
    (``"none"`` or ``"frozen"``), see the module docstring.  ``engine(x, target=y)`` in train mode uses
    the training scheme; ``target`` must have the model output's shape (e.g. one-hot labels)."""

    compiled_adaptation = False  # reads inner layers through hooks: eager under engine.compile()
    #: upstream's joint-training weight of the engine's loss: the notebooks and torch-ttt's example add the
    #: two terms with equal weights (``train.ssl_weight: null`` uses it)
    joint_training_weight = 1.0
    #: ``anchor`` acts at test time only: a model trained for one value serves the other
    test_time_kwargs = ("anchor",)

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
        anchor: str = "none",
    ) -> None:
        super().__init__(model, optimization_parameters)
        if feedback not in FEEDBACK:
            raise InvalidInputError(f"feedback={feedback!r}; expected one of {FEEDBACK}")
        if anchor not in ANCHORS:
            raise InvalidInputError(f"anchor={anchor!r}; expected one of {ANCHORS}")
        self.feedback = feedback
        self.anchor = anchor
        # the frozen copy (anchor="frozen"), in a tuple so it is neither a submodule nor in state_dict
        self._anchor_copy: tuple[nn.Module, ...] = ()
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

    @property
    def anchor_model(self) -> nn.Module | None:
        """The frozen copy of the model the test-time second pass runs (``anchor="frozen"``, once the first
        adaptation took it), else None."""
        return self._anchor_copy[0] if self._anchor_copy else None

    def take_snapshot(self) -> None:
        """The reset snapshot and, with ``anchor="frozen"``, the frozen copy: both the weights as trained."""
        super().take_snapshot()
        self._anchor_copy = ()
        if self.anchor == "frozen":
            self._freeze_anchor()

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:  # the weights are about to change: the next adaptation copies them again
            self._anchor_copy = ()
        return self

    def _freeze_anchor(self) -> nn.Module:
        with eager(self.model):  # copy the eager module (a hook replaces the copy's features)
            frozen = copy.deepcopy(self.model)
        frozen.eval().requires_grad_(False)  # eval: its BatchNorm buffers stay as trained
        self._anchor_copy = (frozen,)
        return frozen

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
        if self.anchor == "frozen" and not self.training:
            return self._anchored_forward(inputs)
        y0 = run_model(self.model, inputs)
        self._check_output(y0)
        s0 = self.signal(y0)
        y1 = self._with_embedding(inputs, self.embeder(s0))
        return y0, self.distance_fn(self.signal(y1), s0)

    def _anchored_forward(self, inputs):
        """``anchor="frozen"``: ``y0 = f(x, 0)`` keeping the features ``h`` of the adapted network, then the
        frozen copy's layers after the features layer on ``combine(h, embedder(s(y0)))``; the loss compares
        their signal with ``s(y0)``."""
        frozen = self.anchor_model if self.anchor_model is not None else self._freeze_anchor()
        with FeatureHook(self.target_module) as hook:
            y0 = run_model(self.model, inputs)
        self._check_output(y0)
        s0 = self.signal(y0)
        injected = self.combine_fn(hook.output, self.embeder(s0))

        def replace(module, args, output):  # the frozen layers after this one see the adapted features
            return injected

        handle = find_module(frozen, self.features_layer_name).register_forward_hook(replace)
        try:
            y1 = run_model(frozen, inputs)
        finally:
            handle.remove()
        return y0, self.distance_fn(self.signal(y1), s0)
