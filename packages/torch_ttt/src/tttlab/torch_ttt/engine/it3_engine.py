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
  Not built: the paper's online variant (the adapted weights carried over from sample to sample, the
  anchor an exponential moving average of them): its decay, and whether the average steps per optimizer
  step or per sample, could not be read (README, IT3 reading, 2026-12-02), and neither notebook nor
  torch-ttt has it.
* training (``training=``): torch-ttt, and this engine by default (``"torch_ttt"``), put both terms on
  every batch.  The notebooks instead draw per batch whether the first pass gets the ground truth
  (probability 0.75 MNIST, 0.2 CIFAR: ``torch.rand(1) > 0.25`` / ``> 0.8``) or a neutral signal (a one-hot
  random class per sample for MNIST, the uniform distribution, 0.1 for 10 classes, for CIFAR), then put
  the task loss on both that pass and a second pass fed its prediction (with its gradient; CIFAR feeds
  its softmax).  ``training="notebook"`` is that scheme (opt-in): ``truth_probability`` (default 0.75)
  and ``neutral`` (``"random_class"``, default, or ``"uniform"``: ``1/K``) set the draw, one uniform
  number per batch from ``generator`` (default torch's global generator, which the training checkpoint
  saves), then, for ``"random_class"``, one class per sample from the same generator
  (:meth:`IT3Engine.first_pass_signal`).  The first pass is ``y1 = f(x, signal)``; the second runs the
  layers after the features layer on ``combine(h, embedder(s(y1)))`` with ``h`` the first pass's
  features (the notebooks compute their ``f1(x)`` once; here the layers before the features layer run
  again and their output is replaced, so the gradient is the notebooks', and the train-mode normalisation
  layers that run before the features layer's output is out - before it, it, inside it - keep the running
  statistics the first pass left (running mean / variance, ``num_batches_tracked``), as after the
  notebooks' one ``f1(x)``; the layers after it update theirs on both passes, as the notebooks' ``f2``.
  Until 2026-12-02 the second pass updated the statistics before the features a second time per batch:
  notebook models trained since have a cache key of their own); the engine returns ``(y1,
  cross_entropy(y2, target))`` and the trainer's ``cross_entropy(y1, y) + 1.0 *`` that is the notebooks'
  sum of the two task losses (the trainer's accuracy is then ``y1``'s, which saw the labels on the
  truth batches).  A model trained so never sees "0" (no embedding), the test-time first pass's
  input by default: ``test_signal="neutral"`` (test time only, like ``anchor``; needs
  ``training="notebook"``) feeds the neutral signal there instead, as the notebooks do at test time (the
  uniform 0.1 for CIFAR; a random class per sample and per step for MNIST's adaptation), in the
  idempotence loss and in the prediction ``f(x, neutral)`` (a random class is drawn anew for it), which
  then runs eagerly.  Still different from the notebooks with it: their latent output (MNIST feeds the
  second pass its first pass's latent ``z1`` in place of the features, CIFAR adds it to them; our models
  have none).  With ``"torch_ttt"`` there is no neutral signal: "0", no embedding at all.  The weight:
  both notebooks add their two cross-entropies
  with weight 1 each and torch-ttt's IT3 example adds its engine loss with weight 1
  (``nll + loss_ttt``), so :attr:`IT3Engine.joint_training_weight` is 1.0: ``tttlab-torch-ttt-train``
  with ``train.ssl_weight: null`` (the shipped configs) uses it, where it used the TTT tutorial's 0.35
  until 2026-12-01 (a given ``train.ssl_weight`` still wins).
* distances (``distance=``) and steps: torch-ttt's default, and ours, is MSE (``distance=None`` or
  ``"mse"``; ``distance_fn=`` any callable).  The notebooks compare the two passes' probabilities with a
  function they call ``js_div`` that is not the Jensen-Shannon divergence: ``(KL(m || p) + KL(m || q)) /
  2`` with ``m = (p + q) / 2`` (torch's ``kl_div(log p, m)`` is ``KL(m || p)``), symmetric and zero on
  equal inputs but unbounded; ``distance="notebook_js"`` is that (:func:`notebook_js`),
  ``distance="js"`` the Jensen-Shannon divergence itself, ``(KL(p || m) + KL(q || m)) / 2``, at most ln 2
  (:func:`js_divergence`); both sum over the classes (dim 1) and average over the batch, and want
  probabilities (``feedback="softmax"`` for a logit model).  The distance is also the torch-ttt training
  term's, not used by the notebook scheme.  Steps: the notebooks use Adam at 1e-3, 10 steps (MNIST,
  test-time signal a random class; its loop makes one more update after the forward it reports) or 1
  step (CIFAR, the network in train mode); torch-ttt's default is 3 Adam steps at 1e-2
  (``conf/engine/ittt.yaml``: 1 step at 1e-3, as torch-ttt's own IT3 example).  The notebooks report the
  first pass of the last step (MNIST) or the second pass (CIFAR), computed before that step's update;
  here, as torch-ttt, ``f(x, 0)`` after the steps.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from tttlab.core.errors import InvalidInputError

from ..engine_registry import EngineRegistry
from ..heads import has_training_batchnorm, infer_feature_shape, place_like_model, run_model
from ..precision import eager
from .base_engine import BaseEngine, FeatureHook, find_module

__all__ = [
    "ANCHORS",
    "DISTANCES",
    "IT3Engine",
    "NEUTRAL_SIGNALS",
    "TEST_SIGNALS",
    "TRAINING_SCHEMES",
    "broadcast_add",
    "build_embedder",
    "js_divergence",
    "notebook_js",
]

_OUTPUT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)
#: what ``feedback=`` accepts: the signal fed back to the embedder and compared by the distance
FEEDBACK = ("output", "softmax")
#: what ``anchor=`` accepts: the network of the test-time second pass (see the module docstring)
ANCHORS = ("none", "frozen")
#: what ``training=`` accepts: torch-ttt's two terms on every batch, or the official notebooks' scheme
TRAINING_SCHEMES = ("torch_ttt", "notebook")
#: what ``neutral=`` accepts: the notebook scheme's first-pass signal when the ground truth is not given
NEUTRAL_SIGNALS = ("random_class", "uniform")
#: what ``test_signal=`` accepts: the test-time first pass's input, "0" (no embedding) or the neutral signal
TEST_SIGNALS = ("zero", "neutral")
#: the notebook scheme's defaults, the MNIST notebook's (the CIFAR notebook's: 0.2 and "uniform")
NOTEBOOK_TRUTH_PROBABILITY = 0.75
NOTEBOOK_NEUTRAL = "random_class"


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The Jensen-Shannon divergence ``(KL(p || m) + KL(q || m)) / 2``, ``m = (p + q) / 2``, of two
    distributions over dim 1 (natural log: between 0 and ln 2), summed over the classes and averaged over
    the other axes (the batch).  Zero probabilities contribute nothing (``0 log 0 = 0``)."""
    m = 0.5 * (p + q)
    inner = torch.xlogy(p, p) - torch.xlogy(p, m) + torch.xlogy(q, q) - torch.xlogy(q, m)
    return 0.5 * inner.sum(dim=1).mean()


def notebook_js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The official notebooks' ``js_div(p, q)``: ``(KL(m || p) + KL(m || q)) / 2``, ``m = (p + q) / 2``,
    i.e. the two Kullback-Leibler terms taken *from* the midpoint (torch's ``kl_div(log p, m)`` is
    ``KL(m || p)``), summed over the classes (dim 1) and averaged over the batch (their
    ``reduction="batchmean"`` for ``(N, K)`` inputs).  Symmetric and zero on equal inputs like the
    Jensen-Shannon divergence (:func:`js_divergence`), but not bounded by ln 2: it grows without limit as
    ``p`` or ``q`` puts vanishing mass where the other does not."""
    m = 0.5 * (p + q)
    inner = 2 * torch.xlogy(m, m) - torch.xlogy(m, p) - torch.xlogy(m, q)
    return 0.5 * inner.sum(dim=1).mean()


#: what ``distance=`` accepts (the default, None, is ``distance_fn`` or else MSE as torch-ttt)
DISTANCES = {"mse": F.mse_loss, "js": js_divergence, "notebook_js": notebook_js}


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


@contextlib.contextmanager
def _running_statistics_kept_until(model: nn.Module, layer: nn.Module):
    """Inside the context, a forward of ``model`` leaves the running statistics (``running_mean``,
    ``running_var``, ``num_batches_tracked``) of its normalisation layers that start computing before
    ``layer``'s output is out (those before ``layer``, ``layer`` itself and the layers inside it) as they
    were: each such call updates fresh copies of its buffers, and the layer gets its own tensors back when
    the call returns (the copies, which autograd may hold, are dropped).  The layers after ``layer`` update
    theirs as usual; a module called both before and after it keeps only its later calls' updates (the
    notebooks run ``f1`` once and ``f2`` on both passes).  A forward that raises part-way still gives every
    layer its own tensors back.  Only layers that update statistics (train mode, ``track_running_stats``)
    are touched."""
    done = [False]
    kept: dict[nn.Module, dict[str, torch.Tensor]] = {}

    def keep(module, args):
        if done[0] or not module.training or not module.track_running_stats:
            return
        own = {k: b for k, b in module._buffers.items() if b is not None}
        kept[module] = own
        for name, buf in own.items():
            setattr(module, name, buf.clone())

    def give_back(module, *_):
        for name, buf in kept.pop(module, {}).items():
            setattr(module, name, buf)

    def mark(module, args, output):
        done[0] = True

    handles = [layer.register_forward_hook(mark)]
    for m in model.modules():
        if isinstance(m, _NormBase):
            handles += [m.register_forward_pre_hook(keep), m.register_forward_hook(give_back)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in list(kept):  # a forward that raised mid-way: its tensors back all the same
            give_back(m)


@EngineRegistry.register("ittt")
class IT3Engine(BaseEngine):
    """Args (upstream's, then keyword-only): model; features_layer_name (where the embedded prediction
    is added); embeder (default built now); combine_fn (default :func:`broadcast_add`); distance_fn
    (default MSE); optimization_parameters; output_shape / feature_shape / example_input (to size the
    default embedder when the layers do not tell); feedback (``"output"`` or ``"softmax"``), anchor
    (``"none"`` or ``"frozen"``), distance (``"mse"``, ``"js"``, ``"notebook_js"``; instead of
    ``distance_fn``), training (``"torch_ttt"`` or ``"notebook"``) with truth_probability, neutral and
    generator (the notebook scheme's draws) and test_signal (``"zero"`` or, with the notebook scheme,
    ``"neutral"``), see the module docstring.  ``engine(x, target=y)`` in train
    mode uses the training scheme; ``target`` must have the model output's shape (e.g. one-hot labels)."""

    compiled_adaptation = False  # reads inner layers through hooks: eager under engine.compile()
    #: upstream's joint-training weight of the engine's loss: the notebooks and torch-ttt's example add the
    #: two terms with equal weights (``train.ssl_weight: null`` uses it)
    joint_training_weight = 1.0
    #: ``anchor`` and ``test_signal`` act at test time only: a model trained for one value serves the other
    test_time_kwargs = ("anchor", "test_signal")

    @classmethod
    def training_inert_kwargs(cls, kwargs: Mapping[str, Any]) -> set[str]:
        """``anchor`` and ``test_signal``, and ``distance`` under ``training="notebook"``: that scheme's two
        task losses do not use it (:meth:`_notebook_training`), so a notebook model serves every distance."""
        inert = super().training_inert_kwargs(kwargs)
        if kwargs.get("training") == "notebook":
            inert.add("distance")
        return inert

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
        distance: str | None = None,
        training: str = "torch_ttt",
        truth_probability: float | None = None,
        neutral: str | None = None,
        generator: torch.Generator | None = None,
        test_signal: str = "zero",
    ) -> None:
        super().__init__(model, optimization_parameters)
        if feedback not in FEEDBACK:
            raise InvalidInputError(f"feedback={feedback!r}; expected one of {FEEDBACK}")
        if anchor not in ANCHORS:
            raise InvalidInputError(f"anchor={anchor!r}; expected one of {ANCHORS}")
        if distance is not None and distance not in DISTANCES:
            raise InvalidInputError(f"distance={distance!r}; expected one of {list(DISTANCES)} (or null)")
        if distance is not None and distance_fn is not None:
            raise InvalidInputError(f"distance={distance!r} and a distance_fn: expected one of them")
        if training not in TRAINING_SCHEMES:
            raise InvalidInputError(f"training={training!r}; expected one of {TRAINING_SCHEMES}")
        if training != "notebook" and (truth_probability is not None or neutral is not None):
            raise InvalidInputError(
                f"truth_probability={truth_probability!r}, neutral={neutral!r} with training={training!r}: "
                "they set the notebook scheme's draws; expected training='notebook' (or leave them null)"
            )
        if truth_probability is None:
            truth_probability = NOTEBOOK_TRUTH_PROBABILITY
        if isinstance(truth_probability, bool) or not 0.0 <= float(truth_probability) <= 1.0:
            raise InvalidInputError(f"truth_probability={truth_probability!r}; expected a number in [0, 1]")
        if neutral is None:
            neutral = NOTEBOOK_NEUTRAL
        if neutral not in NEUTRAL_SIGNALS:
            raise InvalidInputError(f"neutral={neutral!r}; expected one of {NEUTRAL_SIGNALS}")
        if test_signal not in TEST_SIGNALS:
            raise InvalidInputError(f"test_signal={test_signal!r}; expected one of {TEST_SIGNALS}")
        if test_signal == "neutral" and training != "notebook":
            raise InvalidInputError(
                f"test_signal='neutral' with training={training!r}: the neutral signal is the notebook "
                "scheme's, and a model trained otherwise never saw it; expected training='notebook'"
            )
        self.feedback = feedback
        self.anchor = anchor
        self.distance = distance
        # not ``self.training``: that is nn.Module's train/eval flag
        self.training_scheme = training
        self.truth_probability = float(truth_probability)
        self.neutral = neutral
        self.generator = generator
        self.test_signal = test_signal
        self._output_shape: tuple[int, ...] | None = None
        #: the notebook scheme's last draw: True when the first pass got the ground truth
        self.last_first_pass_truth: bool | None = None
        # the frozen copy (anchor="frozen"), in a tuple so it is neither a submodule nor in state_dict
        self._anchor_copy: tuple[nn.Module, ...] = ()
        self.features_layer_name = features_layer_name
        # a tuple, so the layer is not registered twice (engine.state_dict() keeps one copy)
        self._target = (find_module(model, features_layer_name),)
        self.combine_fn = combine_fn if combine_fn is not None else broadcast_add
        if distance is not None:
            distance_fn = DISTANCES[distance]
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
            self._output_shape = tuple(int(d) for d in output_shape)
            embeder = place_like_model(build_embedder(output_shape, shape[1]), model)
        self.embeder = embeder
        if test_signal == "neutral" and self._output_shape is None:
            raise InvalidInputError(
                "test_signal='neutral' needs the model's output shape to build the neutral signal: use the "
                "default embedder (output_shape= or example_input=)"
            )

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
            if self.training_scheme == "notebook":
                return self._notebook_training(inputs, target)
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
        y0 = self._first_pass(inputs)
        self._check_output(y0)
        s0 = self.signal(y0)
        y1 = self._with_embedding(inputs, self.embeder(s0))
        return y0, self.distance_fn(self.signal(y1), s0)

    def first_pass_signal(self, target: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The notebook scheme's first-pass input for one batch, and whether it is the ground truth: one
        uniform draw ``u`` per batch (``self.generator``, else torch's global generator), the ``target``
        when ``u > 1 - truth_probability`` (the notebooks' ``torch.rand(1) > 0.25`` / ``> 0.8``), else the
        neutral signal: ``"random_class"`` one-hot of a class drawn uniformly per sample (the same
        generator, after ``u``), ``"uniform"`` ``1 / K`` everywhere (the CIFAR notebook's 0.1)."""
        if bool(torch.rand((), generator=self.generator) > 1.0 - self.truth_probability):
            return target, True
        return self.neutral_signal(target), False

    def neutral_signal(self, like: torch.Tensor) -> torch.Tensor:
        """The neutral signal shaped like ``like`` ``(N, K, ...)``: ``1 / K`` everywhere (``"uniform"``), or
        the one-hot of a class drawn uniformly per sample from ``self.generator`` (``"random_class"``)."""
        k = like.shape[1]
        if self.neutral == "uniform":
            return torch.full_like(like, 1.0 / k)
        classes = torch.randint(0, k, (like.shape[0],), generator=self.generator)
        onehot = F.one_hot(classes, k).to(device=like.device, dtype=like.dtype)
        onehot = onehot.reshape(*onehot.shape, *([1] * (like.ndim - 2)))
        return onehot.expand_as(like)

    @property
    def compiled_prediction(self) -> bool:
        """The prediction ``f(x, neutral)`` (``test_signal="neutral"``) needs the injection hook: eager."""
        return self.test_signal == "zero"

    def _first_pass(self, inputs) -> torch.Tensor:
        """The test-time first pass: ``f(x, 0)``, or ``f(x, neutral signal)`` with ``test_signal="neutral"``
        (the notebooks' test time: a random class for MNIST's adaptation, the uniform 0.1 for CIFAR)."""
        if self.test_signal == "zero":
            return run_model(self.model, inputs)
        n = inputs.shape[0] if isinstance(inputs, torch.Tensor) else len(next(iter(inputs.values())))
        dtype = next((p.dtype for p in self.embeder.parameters() if p.is_floating_point()), torch.float32)
        device = next((p.device for p in self.embeder.parameters()), torch.device("cpu"))
        like = torch.empty((n, *self._output_shape[1:]), dtype=dtype, device=device)
        return self._with_embedding(inputs, self.embeder(self.neutral_signal(like)))

    def predict(self, inputs, **kwargs) -> torch.Tensor:
        if self.test_signal == "zero":
            return super().predict(inputs, **kwargs)
        with torch.no_grad(), self.inference_context(), self._autocast(), eager(self.model):
            return self._first_pass(inputs)

    def _notebook_training(self, inputs, target: torch.Tensor):
        """``(y1, cross_entropy(y2, target))`` of the notebook scheme: ``y1 = f(x, y_first)``
        (:meth:`first_pass_signal`), ``y2`` the layers after the features layer on ``combine(h,
        embedder(s(y1)))`` with ``h`` the first pass's features (one ``h``, as the notebooks' one ``f1(x)``;
        gradients flow through ``s(y1)`` and ``h``).  The trainer's cross-entropy on ``y1`` plus this one
        is the notebooks' two task losses.  The second pass re-runs the layers up to the features layer
        (the model's forward cannot start after it): their running statistics stay as the first pass left
        them (:func:`_running_statistics_kept_until`)."""
        first, truth = self.first_pass_signal(target)
        self.last_first_pass_truth = truth
        first_embedding = self.embeder(first)
        seen: dict[str, torch.Tensor] = {}

        def inject_first(module, args, output):
            seen["h"] = output
            return self.combine_fn(output, first_embedding)

        handle = self.target_module.register_forward_hook(inject_first)
        try:
            y1 = run_model(self.model, inputs)
        finally:
            handle.remove()
        self._check_output(y1)
        second_embedding = self.embeder(self.signal(y1))

        def inject_second(module, args, output):  # the first pass's features, not this pass's
            return self.combine_fn(seen["h"], second_embedding)

        handle = self.target_module.register_forward_hook(inject_second)
        try:
            with _running_statistics_kept_until(self.model, self.target_module):
                y2 = run_model(self.model, inputs)
        finally:
            handle.remove()
        return y1, F.cross_entropy(y2, target)

    def _anchored_forward(self, inputs):
        """``anchor="frozen"``: ``y0 = f(x, 0)`` keeping the features ``h`` of the adapted network, then the
        frozen copy's layers after the features layer on ``combine(h, embedder(s(y0)))``; the loss compares
        their signal with ``s(y0)``."""
        frozen = self.anchor_model if self.anchor_model is not None else self._freeze_anchor()
        with FeatureHook(self.target_module) as hook:  # registered first: it sees the features unchanged
            y0 = self._first_pass(inputs)
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
