"""The engine protocol every test-time method follows (the torch-ttt API, corrected).

An engine is an ``nn.Module`` wrapping a model.

* ``engine.train()``: ``engine(x)`` returns ``(outputs, ssl_loss)`` with the graph attached, for joint
  training (``loss = task_loss + alpha * ssl_loss``).  Every auxiliary head exists from construction, so an
  optimizer built with ``optimizer(engine.parameters())`` before the first call trains it (upstream built
  heads lazily at the first call, so the tutorial's rotation head was never trained).
* ``engine.eval()``: ``engine(x)`` adapts the *adapted parameters* for ``num_steps`` steps of the
  self-supervised loss, then predicts; returns ``(outputs, last_ssl_loss)``.  ``num_steps=0`` is exactly the
  wrapped model's forward (plus whatever normalisation change the method defines, e.g. TENT/BN use test
  batch statistics).

State and resets.  Only the adapted state (the parameters the method updates, plus buffers it may change)
is snapshotted, once, at the first adaptation after construction or after ``engine.train()``; the model is
never deep-copied.  ``optimization_parameters["reset"]`` is a :class:`Reset`:

* ``per_batch``  (upstream's default ``copy_model=True``): every batch starts from the snapshot (episodic).
* ``per_domain``: the state carries over batches until ``engine.reset()`` (the evaluator calls it when the
  domain changes).
* ``never``: continual adaptation; ``engine.reset()`` still restores the snapshot if called explicitly.

Restoring copies the snapshot back in place, bit for bit, and drops the optimizer state.

Additions to the torch-ttt API (constructors unchanged; defaults change nothing):

* ``engine.amp = "bf16"`` (default ``"none"``): the adaptation forwards and losses and the prediction
  forward run under ``torch.autocast(<model's device>, dtype=torch.bfloat16)``, as do train-mode calls;
  gradients, the optimizer step and the snapshot/restore stay float32 (see :mod:`tttlab.torch_ttt.precision`)
  and the returned outputs and loss are cast back to the parameters' dtype.
* ``engine.compile(**torch_compile_kwargs)`` compiles the *wrapped model* in place (``nn.Module.compile``
  on ``engine.model``; ``nn.Module.compile`` on the engine itself would trace the Python loop and the
  hooks, which it cannot).  A compiled graph does not run hooks added after it was traced, so forwards
  that read inner layers take another way: the adaptation of TTT, TTT++, ActMAD and masked TTT (a forward
  stopped at the features layer(s), :func:`~tttlab.torch_ttt.heads.features_only`) runs a compiled
  ``torch.fx`` copy of the model truncated after those layers (``feature_modules``; sharing the
  parameters), or the eager model when the model cannot be traced symbolically
  (``engine.compiled_features`` False); forwards with a hook on the whole model (their train mode, IT3's
  adaptation: ``compiled_adaptation = False``) and forwards under a prior-mixed BatchNorm
  (``compiled_prediction`` False) run the eager model.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tttlab.core.errors import ConfigError, InvalidInputError

from ..norm import check_batchnorm_values
from ..precision import autocast, check_amp, eager, is_compiled

OPTIMIZERS = ("adam", "sgd", "adamw")


class Reset(str, enum.Enum):
    """When the adapted state returns to the source model's."""

    PER_BATCH = "per_batch"
    PER_DOMAIN = "per_domain"
    NEVER = "never"

    @classmethod
    def parse(cls, value: Reset | str | bool) -> Reset:
        if isinstance(value, Reset):
            return value
        if isinstance(value, bool):  # upstream's copy_model flag
            return cls.PER_BATCH if value else cls.NEVER
        try:
            return cls(str(value))
        except ValueError:
            raise ConfigError(
                f"reset={value!r} is not a reset policy; expected one of {[r.value for r in cls]}"
            ) from None


DEFAULT_OPTIMIZATION: dict[str, Any] = {
    "num_steps": 3,
    "lr": 1e-2,
    "optimizer_name": "adam",
    "reset": Reset.PER_BATCH,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 0.0,
    "betas": (0.9, 0.999),
}


class OptimizationParameters(dict):
    """``dict`` of the adaptation settings that validates every key and value it is given.

    Keeps upstream's dict interface (``engine.optimization_parameters["num_steps"] = 1``) while turning a
    typo (``"num_step"``) or a bad value into a ``ConfigError`` instead of a silently ignored setting.
    Upstream's ``copy_model`` flag is accepted and translated to ``reset``.  ``where``: what the messages put
    before a key, the config node the values came from (``"engine.optimization."``: the evaluate command's
    ``engine.optimization.lr=abc`` is named so, not as a bare ``lr``).
    """

    def __init__(
        self,
        values: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
        *,
        where: str = "",
    ):
        super().__init__()
        self._where = where
        for key, value in {**DEFAULT_OPTIMIZATION, **(defaults or {})}.items():
            super().__setitem__(key, value)
        if values is not None and not isinstance(values, Mapping):
            raise ConfigError(
                f"optimization_parameters must be a mapping (e.g. {{'num_steps': 1}}), got {values!r}"
            )
        for key, value in (values or {}).items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        name = f"{getattr(self, '_where', '')}{key}"  # the key as the messages name it
        if key == "copy_model":  # upstream name; its default is the string "True"
            if isinstance(value, str) and value.strip().lower() in ("true", "false"):
                value = value.strip().lower() == "true"  # upstream would read "False" as true (non-empty)
            if not isinstance(value, bool):
                raise ConfigError(
                    f"{name}={value!r}: expected True or False (also the strings 'True'/'False', as "
                    "torch-ttt); or use reset='per_batch' | 'per_domain' | 'never'"
                )
            key, value = "reset", Reset.parse(value)
        if key not in DEFAULT_OPTIMIZATION:
            import difflib

            close = difflib.get_close_matches(str(key), list(DEFAULT_OPTIMIZATION), n=1)
            hint = f" (did you mean {getattr(self, '_where', '') + close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown optimization parameter {name!r}{hint}; expected one of {sorted(DEFAULT_OPTIMIZATION)}"
            )
        if key == "num_steps" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if key in ("lr", "momentum", "weight_decay") and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf
        ):  # NaN fails the comparison too
            raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if key == "nesterov" and not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}")
        if key == "betas" and (
            isinstance(value, (str, bytes))
            or not isinstance(value, Sequence)
            or len(value) != 2
            or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1 for b in value)
        ):
            raise ConfigError(f"{name} must be two numbers in [0, 1), got {value!r}")
        if key == "optimizer_name" and str(value).lower() not in OPTIMIZERS:
            raise ConfigError(f"{name}={value!r}; expected one of {OPTIMIZERS}")
        if key == "optimizer_name":
            value = str(value).lower()
        if key == "reset":
            try:
                value = Reset.parse(value)
            except ConfigError as exc:  # "reset='x' is not a reset policy", named as the config names it
                raise ConfigError(f"{getattr(self, '_where', '')}{exc}") from None
        super().__setitem__(key, value)

    def update(self, other=(), **kwargs) -> None:  # route through __setitem__
        for key, value in dict(other, **kwargs).items():
            self[key] = value

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]


def check_optimizer_settings(settings: Mapping[str, Any]) -> None:
    """The combinations :func:`build_optimizer` refuses (each value alone is checked by
    :class:`OptimizationParameters`), without building an optimizer: torch's first optimizer of a process
    imports ``torch._dynamo`` (~2 s), which a config check need not pay."""
    name = settings["optimizer_name"]
    if bool(settings.get("nesterov", False)) and (name != "sgd" or float(settings["momentum"]) <= 0):
        raise ConfigError(
            f"nesterov=True needs optimizer_name='sgd' and momentum > 0, got optimizer_name={name!r}, "
            f"momentum={settings['momentum']!r}"
        )


def build_optimizer(params: list[torch.Tensor], settings: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Adam / SGD (momentum, optionally Nesterov's: the official ActMAD step and the official TENT code's
    SGD option) / AdamW over ``params`` with the engine's settings (foreach kernels)."""
    check_optimizer_settings(settings)
    name, lr, wd = settings["optimizer_name"], float(settings["lr"]), float(settings["weight_decay"])
    nesterov = bool(settings.get("nesterov", False))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(settings["betas"]), weight_decay=wd, foreach=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(settings["betas"]), weight_decay=wd, foreach=True)
    return torch.optim.SGD(
        params, lr=lr, momentum=float(settings["momentum"]), weight_decay=wd, nesterov=nesterov, foreach=True
    )


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; an error listing the available names otherwise."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        available = [n for n in modules if n]
        raise InvalidInputError(
            f"features layer {name!r} not found in {type(model).__name__}; available layers: {available}"
        )
    return modules[name]


def check_batch(inputs: Any, *, min_batch: int = 1, what: str = "inputs") -> None:
    """NaN/inf inputs and too-small batches are user errors, reported before any adaptation."""
    if isinstance(inputs, torch.Tensor):
        if inputs.is_floating_point() and not torch.isfinite(inputs).all():
            raise InvalidInputError(f"{what} contain NaN or inf values; expected finite numbers")
        if inputs.ndim == 0 or inputs.shape[0] < min_batch:
            raise InvalidInputError(
                f"{what}: batch of size {inputs.shape[0] if inputs.ndim else 0}; this engine estimates "
                f"statistics over the batch and needs at least {min_batch} samples"
            )


class FeatureHook:
    """Forward hook that keeps the output of one module (``hook.output``); use as a context manager."""

    def __init__(self, module: nn.Module):
        self.module, self.output, self._handle = module, None, None

    def __enter__(self) -> FeatureHook:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def _hook(self, module, args, output):
        self.output = output

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None


class BaseEngine(nn.Module):
    """Base of every engine: optimization settings, snapshot/reset, the adapt-then-predict loop.

    Subclasses implement :meth:`ttt_forward` and may override :meth:`adapted_parameters`,
    :meth:`adapted_buffers`, :meth:`adapt_step` (one optimisation step; default: ``ttt_forward`` + backward
    + step) and :meth:`predict` (default: the wrapped model's forward in :meth:`inference_context`).
    """

    #: Minimum batch size the self-supervised loss needs (ActMAD's and TTT++'s statistics over samples: 2).
    min_batch: int = 1
    #: True when the BatchNorm layers normalise with the test batch's statistics (TENT, EATA, DeYO, BN): a
    #: batch of one sample is accepted when every BatchNorm layer gets more than one value per channel from
    #: it (a BatchNorm2d: the image's spatial positions), refused with a clear error otherwise (e.g. a
    #: BatchNorm1d on flat features), before any update (:meth:`check_batch_statistics`).
    batchnorm_batch_statistics: bool = False
    #: True when even the prediction uses batch statistics (TENT, BN): the batch checks apply at num_steps=0.
    batch_statistics_always: bool = False
    #: Per-engine defaults layered over DEFAULT_OPTIMIZATION (e.g. TENT: 1 step, lr 1e-3).
    optimization_defaults: dict[str, Any] = {}
    #: False when adaptation and train-mode forwards read inner layers through hooks: with a compiled model
    #: (:meth:`compile`) they run its eager forward (a compiled graph skips hooks added after tracing).
    compiled_adaptation: bool = True
    #: Weight of the engine's loss in joint training (``loss = task + w * ssl``) when the training config
    #: leaves ``train.ssl_weight`` null: the torch-ttt MNIST tutorial's 0.35 (TTT); IT3 overrides it.
    joint_training_weight: float = 0.35
    #: Constructor arguments that only act at test time: a model trained with other values serves as well
    #: (``tttlab-torch-ttt-evaluate`` leaves them out of the training config and its cache key).
    test_time_kwargs: tuple[str, ...] = ()

    @classmethod
    def training_inert_kwargs(cls, kwargs: Mapping[str, Any]) -> set[str]:
        """The names of constructor arguments that do not change the jointly trained model when the engine
        is built with ``kwargs``: ``tttlab-torch-ttt-evaluate`` leaves them out of the training config and
        its cache key (a model trained with other values serves as well) and does not warn when they differ
        from a trained head's.  By default :attr:`test_time_kwargs`; an engine whose training scheme ignores
        an argument only under some settings adds it there (IT3's ``distance`` under ``training="notebook"``)."""
        return set(cls.test_time_kwargs)

    def __init__(self, model: nn.Module, optimization_parameters: Mapping[str, Any] | None = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.optimization_parameters = OptimizationParameters(
            optimization_parameters, defaults=self.optimization_defaults
        )
        self.optimizer: torch.optim.Optimizer | None = None
        self._snapshot: dict[str, torch.Tensor] | None = None
        self._params: list[torch.Tensor] = []
        self._amp = "none"
        #: True after :meth:`compile` built compiled truncated copies for every ``feature_modules()`` entry
        self.compiled_features = False
        self._batch_statistics_shapes: set[tuple[int, ...]] = set()  # one-sample shapes checked already

    # -- precision and compilation ------------------------------------------------------------------
    @property
    def amp(self) -> str:
        """``"none"`` (float32) or ``"bf16"`` (bfloat16 autocast of the forwards and losses)."""
        return self._amp

    @amp.setter
    def amp(self, value: str | None) -> None:
        self._amp = check_amp(value)

    @property
    def compiled_prediction(self) -> bool:
        """Whether the prediction forward may use the compiled model (False while
        :meth:`inference_context` replaces layers' forward, e.g. a prior-mixed BatchNorm)."""
        return True

    def feature_modules(self) -> list[list[nn.Module]]:
        """The layer sets the adaptation reads with :func:`~tttlab.torch_ttt.heads.features_only` (one
        compiled truncated copy of the model each under :meth:`compile`); default none."""
        return []

    def compile(self, **kwargs) -> None:
        """Compile the wrapped model in place: ``self.model.compile(**kwargs)`` (``torch.compile``
        arguments, e.g. ``mode="reduce-overhead"``), and the truncated copies of :meth:`feature_modules`.
        Parameters, buffers and ``state_dict`` keys stay the model's own; forwards that need hooks run
        eagerly (see the module docstring)."""
        from ..heads import compile_features

        self.model.compile(**kwargs)
        wanted = self.feature_modules()
        self.compiled_features = bool(wanted) and all(
            compile_features(self.model, mods, **kwargs) for mods in wanted
        )

    def _adaptation_eager(self) -> bool:
        """Whether the adaptation forwards must run the eager model (see the module docstring)."""
        return not self.compiled_prediction or not (self.compiled_adaptation or self.compiled_features)

    def _autocast(self):
        if self._amp == "none":
            return contextlib.nullcontext()
        p = next(self.model.parameters(), None)
        return autocast(p.device.type if p is not None else "cpu", self._amp)

    def _cast_back(self, value):
        """bfloat16 tensors (of a tuple) to the parameters' dtype."""
        if isinstance(value, tuple):
            return tuple(self._cast_back(v) for v in value)
        if isinstance(value, torch.Tensor) and value.dtype in (torch.bfloat16, torch.float16):
            p = next((t for t in self.model.parameters() if t.is_floating_point()), None)
            return value.to(p.dtype if p is not None else torch.float32)
        return value

    def __call__(self, *args, **kwargs):
        if self._amp == "none" and not is_compiled(self.model):
            return super().__call__(*args, **kwargs)  # the default: nn.Module's call, nothing added
        if not self.training:  # adapt_step and predict enter their own contexts
            return self._cast_back(super().__call__(*args, **kwargs))
        # train mode: one forward with a graph; the caller's backward runs outside the autocast region
        with self._autocast(), eager(self.model, enabled=not self.compiled_adaptation):
            return self._cast_back(super().__call__(*args, **kwargs))

    # -- joint training --------------------------------------------------------------------------------
    def training_kwargs(self, labels: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of the train-mode call ``engine(x, **kwargs)`` for a batch with these class
        labels, in joint training (``tttlab-torch-ttt-train``).  Default: none (the self-supervised loss needs
        no labels); IT3 takes them as its ``target``."""
        return {}

    # -- what adapts --------------------------------------------------------------------------------
    def adapted_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` pairs updated at test time. Default: every trainable model parameter."""
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                yield f"model.{name}", p

    def adapted_buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Buffers adaptation may change (restored on reset). Default: none."""
        return iter(())

    # -- the method ---------------------------------------------------------------------------------
    def ttt_forward(self, inputs, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outputs, ssl_loss)`` of the wrapped model on ``inputs`` (graph attached)."""
        raise NotImplementedError

    def adapt_loss(self, inputs, **kwargs) -> torch.Tensor:
        """The loss one adaptation step minimises. Default: the ``ttt_forward`` loss."""
        return self.ttt_forward(inputs, **kwargs)[1]

    def inference_context(self):
        """Context in which the final prediction (and adaptation) runs; e.g. batch-statistics BN."""
        return contextlib.nullcontext()

    def predict(self, inputs, **kwargs) -> torch.Tensor:
        with torch.no_grad(), self.inference_context(), self._autocast():
            with eager(self.model, enabled=not self.compiled_prediction):
                return self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)

    # -- state --------------------------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        state = {name: p for name, p in self.adapted_parameters()}
        state.update({f"buffer:{name}": b for name, b in self.adapted_buffers()})
        return state

    def take_snapshot(self) -> None:
        """Remember the current adapted state as the one :meth:`reset` returns to."""
        self._snapshot = {name: t.detach().clone() for name, t in self._state().items()}
        self.optimizer = None

    @torch.no_grad()
    def reset(self) -> None:
        """Restore the adapted state from the snapshot (bit for bit) and forget the optimizer state.

        The optimizer object is kept and its per-parameter state (Adam moments and step counts, SGD
        momentum buffers) cleared: the next step behaves exactly as a freshly built optimizer's, without
        the cost of building one per batch.
        """
        if self._snapshot is not None:
            current = self._state()
            dst = [t for t in current.values()]
            src = [self._snapshot[name] for name in current]
            if dst:
                torch._foreach_copy_(dst, src)
        if self.optimizer is not None:
            self.optimizer.state.clear()

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:  # weights are about to change: the next evaluation takes a fresh snapshot
            self._snapshot, self.optimizer = None, None
        return self

    def check_batch_statistics(self, inputs: Any, what: str = "inputs") -> None:
        """For :attr:`batchnorm_batch_statistics` engines, a batch of one sample: an error naming the
        BatchNorm layer that would get one value per channel (:func:`~tttlab.torch_ttt.norm.check_batchnorm_values`,
        one forward without gradients per input shape, before any update).  Batches of 2 or more are not
        looked at: every BatchNorm layer gets at least two values per channel from them."""
        if not self.batchnorm_batch_statistics or not isinstance(inputs, torch.Tensor):
            return
        if inputs.ndim == 0 or inputs.shape[0] != 1 or tuple(inputs.shape) in self._batch_statistics_shapes:
            return
        with eager(self.model):
            check_batchnorm_values(self.model, inputs, what=what)
        self._batch_statistics_shapes.add(tuple(inputs.shape))

    # -- the loop -----------------------------------------------------------------------------------
    def adapt_step(self, inputs, **kwargs) -> torch.Tensor:
        """One step: the loss, gradients of the *adapted* parameters only, an optimizer step.

        ``torch.autograd.grad`` over the adapted parameters (not ``loss.backward()``) lets autograd skip
        every gradient nothing uses: the weights of layers that do not adapt (TENT: all but the norm
        affine parameters), auxiliary heads that are not adapted (TTT's angle head), and it leaves no
        stale ``.grad`` on them.  The adapted parameters get exactly the gradient ``backward`` gave them.
        """
        params = self._params
        # autocast around the forward and the loss only: gradients and the step below are outside it
        with self.inference_context(), self._autocast():
            with eager(self.model, enabled=self._adaptation_eager()):
                loss = self.adapt_loss(inputs, **kwargs)
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = g
            self.optimizer.step()
            for p in params:
                p.grad = None
        return loss.detach()

    def _optimizer_for(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """The engine's optimizer over ``params``, rebuilt only when the parameters or settings change."""
        settings = self.optimization_parameters
        key = (
            tuple(id(p) for p in params),
            settings["optimizer_name"],
            float(settings["lr"]),
            tuple(settings["betas"]),
            float(settings["momentum"]),
            bool(settings["nesterov"]),
            float(settings["weight_decay"]),
        )
        if self.optimizer is None or getattr(self, "_optimizer_key", None) != key:
            self.optimizer = build_optimizer(params, settings)
            self._optimizer_key = key
        return self.optimizer

    def check_inputs(self, inputs) -> None:
        """The checks :meth:`forward` runs on a test batch before anything changes: finite values, the batch
        size the adaptation needs (:attr:`min_batch`) and, for batch statistics, every BatchNorm layer's
        values per channel (:meth:`check_batch_statistics`).  ``evaluate.py`` runs them on a throw-away
        engine with the stream's smallest batch before it trains a model."""
        needs_stats = self.batch_statistics_always or self.optimization_parameters["num_steps"]
        check_batch(inputs, min_batch=self.min_batch if needs_stats else 1)
        if needs_stats:
            self.check_batch_statistics(inputs)

    def forward(self, inputs, **kwargs):
        if self.training:
            return self.ttt_forward(inputs, **kwargs)
        self.check_inputs(inputs)
        settings = self.optimization_parameters
        num_steps, reset = settings["num_steps"], settings["reset"]
        loss = torch.zeros(())
        if num_steps > 0:
            if self._snapshot is None:
                self.take_snapshot()
            params = [p for _, p in self.adapted_parameters()]
            if not params:
                raise InvalidInputError(f"{type(self).__name__}: the model has no parameters to adapt")
            self._optimizer_for(params)
            self._params = params
            with torch.enable_grad():
                for _ in range(num_steps):
                    loss = self.adapt_step(inputs, **kwargs)
        outputs = self.predict(inputs, **kwargs)
        if num_steps > 0 and reset is Reset.PER_BATCH:
            self.reset()
        return outputs, loss


class PredictBeforeUpdate:
    """Mix-in (before :class:`BaseEngine`) for the entropy engines' ``predict_before_update=True`` (TENT, EATA,
    DeYO): a batch's prediction is the logits of the forward that computed its *last* adaptation loss, i.e.
    the model before the batch's last update, as those methods' official code reports it (their loop
    ``for _ in range(steps): outputs = forward_and_adapt(...)`` returns the last step's forward; with one
    step, the model before any update), with no second forward.  The engine calls :meth:`_keep_outputs`
    with those logits in its ``adapt_loss``; they are dropped when the batch is done, also when it fails."""

    _predict_before_update: bool = False
    _adapt_outputs: torch.Tensor | None = None

    @property
    def predict_before_update(self) -> bool:
        return self._predict_before_update

    @predict_before_update.setter
    def predict_before_update(self, value: bool) -> None:
        # a string from a config ('maybe', 'false') was kept as it was and read as true
        if not isinstance(value, bool):
            raise ConfigError(f"predict_before_update={value!r}: expected True or False")
        self._predict_before_update = value

    def _keep_outputs(self, outputs: torch.Tensor) -> None:
        self._adapt_outputs = outputs.detach()  # each step replaces the previous step's logits

    def predict(self, inputs, **kwargs):
        if self.predict_before_update and self._adapt_outputs is not None:
            return self._adapt_outputs
        return super().predict(inputs, **kwargs)

    def forward(self, inputs, **kwargs):
        if self.training:
            return self.ttt_forward(inputs, **kwargs)
        self._adapt_outputs = None
        try:
            return super().forward(inputs, **kwargs)
        finally:
            self._adapt_outputs = None
