"""SAR: sharpness-aware and reliable entropy minimisation, with model recovery.

Paper: Niu, Wu, Zhang, Wen, Chen, Zhao, Tan, "Towards Stable Test-Time Adaptation in Dynamic Wild World",
ICLR 2023 (bibtex ``niu2023sar``); upstream mr-eggplant/SAR (``sar.py``, ``sam.py``, ``main.py``), also
mariodoebler/test-time-adaptation (``classification/methods/sar.py``).  Not part of torch-ttt 0.0.2: the
constructor follows this package's entropy engines (``SAREngine(model, optimization_parameters, e_margin,
...)``).

Algorithm (one adaptation step; normalisation layers use the test batch's statistics):

1. forward at the current weights ``theta``; reliable samples: entropy ``H(x) < e_margin`` (``E0``,
   default ``0.4 ln C``, ``C`` read from the model's output);
2. ``g = grad`` of the mean entropy of the reliable samples w.r.t. the adapted parameters; move to
   ``theta + eps``, ``eps = rho * g / (||g|| + 1e-12)`` (SAM's first-order worst case, ``rho`` 0.05, one
   norm over all adapted parameters; a zero gradient gives ``eps = 0`` exactly);
3. forward at ``theta + eps`` (the whole batch, for the batch statistics); of the samples kept in 1, keep
   again those with ``H(x; theta + eps) < e_margin``; ``g'`` = gradient of their mean entropy at
   ``theta + eps``;
4. back to ``theta`` (bit for bit) and one step of the engine's optimizer with ``g'`` (SGD, momentum 0.9,
   by default);
5. model recovery: ``ema <- 0.9 ema + 0.1 L2`` (``L2``: the step-3 loss; the first value is ``L2``
   itself); when ``ema < reset_constant`` (0.2) the engine resets to its initial state (parameters,
   optimizer state, and the average, which starts over).

When no sample passes the filter of step 1, or none passes it again in step 3, nothing is updated (no
optimizer step, no momentum change, the average unchanged) and the step's loss is 0.

Which parameters adapt: the affine weights and biases of every normalisation layer (BatchNorm 1d/2d/3d,
GroupNorm, LayerNorm, InstanceNorm), except those inside the modules named in ``exclude``.  The official
``collect_params`` skips, by module name, everything under ``layer4`` (ResNets) and ``blocks.9``-
``blocks.11`` plus the final ``norm`` (ViT-Base, 12 blocks); that rule is tied to those architectures'
names, so here it is an argument, default none (every normalisation layer adapts, as for TENT/EATA/DeYO):
``exclude=RESNET_TOP_LAYERS`` (``("layer4",)``) or ``exclude=VIT_BASE_TOP_LAYERS`` reproduce it on
torchvision/timm ResNets and timm's ``vit_base_patch16_224``.  An entry is a module name as
``model.named_modules()`` gives it and covers that module and everything under it (``"blocks.1"`` does
not cover ``blocks.10``); a name the model does not have is an error, so a typo does not silently adapt
everything.  BatchNorm layers in excluded modules still normalise with the test batch's statistics (as
upstream: its ``configure_model`` switches every BatchNorm to batch statistics).

Learning rate (official ``main.py``, SGD momentum 0.9; :func:`upstream_lr`): ResNet-50 (BN or GN) 2.5e-4
at batch >= 32, else ``2.5e-4 * bs / 64 * 2``; ViT-Base ``1e-3 * bs / 64``; at batch size 1 (its ``bs1``
experiments, SAR's headline setting on GN/LN models) SAR doubles that again.  The engine's default is the
ResNet-50 value at batch 64 (1 SGD step, lr 2.5e-4, momentum 0.9), as EATA's and DeYO's here.

Deliberate differences from the official code, and why:

* every normalisation type (upstream: ``BatchNorm2d``, ``LayerNorm``, ``GroupNorm``; the
  test-time-adaptation benchmark adds ``BatchNorm1d``); test-batch statistics without deleting the running
  buffers (upstream sets them to ``None``), so the model works without the engine and resets are exact;
  every layer but BatchNorm's statistics stays in eval mode (upstream: the whole model in train mode, so
  dropout/stochastic depth is active where a model has it; the benchmark's version uses eval mode too);
* the recovery compares with ``reset_constant`` (upstream's ``forward_and_adapt_sar`` compares with the
  literal 0.2 and ignores its ``reset_constant_em`` argument; the same at the default); after a recovery
  the moving average starts over, as upstream's ``reset()`` and the benchmark's version do.  Upstream's
  ``SAR.forward`` then writes the pre-recovery average (below 0.2) back into ``self.ema``, so its next
  steps tend to recover again until the average climbs above 0.2; that looks unintended and is not
  reproduced;
* a recovery clears the SGD momentum buffers.  Upstream saves the model's ``state_dict`` and the SAM
  optimizer's ``state_dict`` once, at construction (before any step), and a recovery loads both back; but
  SAM's ``load_state_dict`` restores only the SAM wrapper's own state (its ``old_p`` copies) and re-links
  the param groups, while the momentum buffers live in the wrapped SGD's ``state``, which it leaves alone:
  upstream's momentum survives a recovery (checked on a copy of that mechanism, and again on 2026-12-02 by
  running the official ``sar.py``/``sam.py``), so its first step after a recovery also moves by
  ``lr * 0.9 * buf``.  The stated intent is a return to the saved model and
  optimizer, which is what this engine does (the next step equals the first step from the source);
  either way the prediction right after a recovery is the source weights with the test batch's
  statistics (``bn``'s prediction; ``tests/test_photos_mobilenet.py``);
* no sample kept (step 1, or step 3): no step.  Upstream back-propagates the mean of an empty tensor
  (NaN, zero gradients) and still calls SGD's ``step``, which moves the parameters by the momentum buffer
  alone (``lr * 0.9 * buf``) when earlier steps left one (the same as skipping when they did not);
  EATA's official code skips the step in that case, and so does this engine;
* the prediction is made after the update (and after a recovery, on the recovered model), as the other
  engines here; the official code returns the logits of step 1's forward (before the update):
  ``predict_before_update=True`` returns those, with one forward less;
* SAM's base optimizer is the engine's (``optimizer_name``, ``lr``, ``momentum``, ...; default SGD with
  momentum 0.9 as upstream); adaptive SAM (ASAM, ``adaptive=True`` in ``sam.py``, unused by SAR) is not
  offered;
* upstream's default never resets (``episodic=False``), and its ImageNet-C script builds a fresh model per
  corruption (``reset="per_domain"`` here); the engine's default is this package's ``"per_batch"``
  (``evaluate.py`` maps the benchmark setting onto the reset policy).

``engine.ema`` is the moving average (None before the first counted step), ``engine.num_recoveries`` the
number of recoveries since construction, ``engine.last_selected`` the samples kept by the two filters at
the last step.  Train mode returns ``(outputs, mean entropy of the samples under e_margin)`` (0 with a
graph when none is), without touching the average.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from tttlab.core.errors import ConfigError, InvalidInputError

from ..engine_registry import EngineRegistry
from ..norm import batch_statistics, batchnorm_layers, entropy, norm_affine_parameters, norm_layers
from ..precision import eager, full_precision
from .base_engine import BaseEngine, PredictBeforeUpdate

__all__ = [
    "EMA_MOMENTUM",
    "RESNET_TOP_LAYERS",
    "SAREngine",
    "VIT_BASE_TOP_LAYERS",
    "sam_perturbation",
    "update_ema",
    "upstream_lr",
]

log = logging.getLogger(__name__)

#: momentum of the moving average of the step-3 loss that drives the recovery (paper and official code)
EMA_MOMENTUM = 0.9
#: added to the gradient norm in SAM's perturbation (official ``sam.py``): a zero gradient perturbs by 0
GRAD_NORM_EPS = 1e-12
#: the top layers the official code leaves fixed on ResNets (torchvision / timm names)
RESNET_TOP_LAYERS = ("layer4",)
#: the top layers the official code leaves fixed on timm's ViT-Base (12 blocks): the last three and the final norm
VIT_BASE_TOP_LAYERS = ("blocks.9", "blocks.10", "blocks.11", "norm")


def update_ema(ema: float | None, value: float) -> float:
    """``0.9 * ema + 0.1 * value``; ``value`` when there is no average yet."""
    return float(value) if ema is None else EMA_MOMENTUM * ema + (1 - EMA_MOMENTUM) * float(value)


def sam_perturbation(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """SAM's ``eps = rho * g / (||g|| + 1e-12)``, ``||g||`` the L2 norm over all tensors of ``grads``
    (one norm for the whole parameter set, as ``sam.py``); zeros for a zero gradient."""
    if not grads:
        return []
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = rho / (norm + GRAD_NORM_EPS)
    return [g * scale.to(g.dtype) for g in grads]


def upstream_lr(architecture: str, batch_size: int) -> float:
    """The SGD learning rate of the official ``main.py`` for SAR: ``"resnet50"`` (its ResNet-50-BN and
    ResNet-50-GN) 2.5e-4 at batch >= 32, else ``2.5e-4 * batch_size / 64 * 2``; ``"vit_base"``
    ``1e-3 * batch_size / 64``; both doubled at batch size 1 (its ``bs1`` experiments)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if architecture == "resnet50":
        lr = 2.5e-4 if batch_size >= 32 else 2.5e-4 / 64 * batch_size * 2
    elif architecture == "vit_base":
        lr = 1e-3 / 64 * batch_size
    else:
        raise ConfigError(f"architecture={architecture!r}; expected 'resnet50' or 'vit_base'")
    return 2 * lr if batch_size == 1 else lr


def _excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in exclude)


@EngineRegistry.register("sar")
class SAREngine(PredictBeforeUpdate, BaseEngine):
    """Args: ``model``; ``optimization_parameters`` (defaults: 1 SGD step, lr 2.5e-4, momentum 0.9);
    ``e_margin`` (None: ``0.4 ln C``); ``rho`` (SAM radius, 0.05); ``reset_constant`` (recovery threshold
    on the moving average, 0.2; None never recovers); ``exclude`` (module names whose normalisation layers
    stay fixed, e.g. :data:`RESNET_TOP_LAYERS`); ``predict_before_update``."""

    batch_statistics_always = True  # the prediction uses batch statistics: the batch checks apply at 0 steps

    optimization_defaults = {"num_steps": 1, "lr": 2.5e-4, "optimizer_name": "sgd", "momentum": 0.9}

    def __init__(
        self,
        model: nn.Module,
        optimization_parameters: Mapping | None = None,
        e_margin: float | None = None,
        rho: float = 0.05,
        reset_constant: float | None = 0.2,
        exclude: Iterable[str] | str = (),
        *,
        predict_before_update: bool = False,
    ):
        super().__init__(model, optimization_parameters)
        if not norm_layers(model):
            raise InvalidInputError(
                f"SAREngine adapts normalisation layers (BatchNorm/GroupNorm/LayerNorm); "
                f"{type(model).__name__} has none"
            )
        for key, value, allow_none in (("e_margin", e_margin, True), ("rho", rho, False),
                                       ("reset_constant", reset_constant, True)):  # fmt: skip
            if value is None and allow_none:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(
                    f"{key} must be a number >= 0{' or None' if allow_none else ''}, got {value!r}"
                )
        self.exclude = self._check_exclude(model, exclude)
        if not any(True for _ in self.adapted_parameters()):
            raise InvalidInputError(
                f"SAREngine: exclude={list(self.exclude)} leaves no normalisation parameters of "
                f"{type(model).__name__} to adapt"
            )
        self.e_margin = e_margin
        self.rho = float(rho)
        self.reset_constant = reset_constant
        self.predict_before_update = predict_before_update
        # a batch of one is accepted when every BatchNorm layer gets more than one value per channel from it
        self.batchnorm_batch_statistics = bool(batchnorm_layers(model))
        self.ema: float | None = None
        self.num_recoveries = 0
        self.last_selected = (0, 0)  # samples kept by the filter at theta, and again at theta + eps

    @staticmethod
    def _check_exclude(model: nn.Module, exclude) -> tuple[str, ...]:
        names = (exclude,) if isinstance(exclude, str) else exclude
        try:
            names = tuple(names)
        except TypeError:
            raise ConfigError(f"exclude must be a list of module names, got {exclude!r}") from None
        modules = {n for n, _ in model.named_modules() if n}
        for name in names:
            if not isinstance(name, str) or name not in modules:
                raise ConfigError(
                    f"exclude: {name!r} is not a module of {type(model).__name__}; expected names from "
                    f"model.named_modules(), e.g. {sorted(modules)[:12]}"
                )
        return names

    # -- what adapts --------------------------------------------------------------------------------
    def adapted_parameters(self):
        for name, p in norm_affine_parameters(self.model):
            if not _excluded(name.removeprefix("model."), self.exclude):
                yield name, p

    def inference_context(self):
        return batch_statistics(self.model)

    def margin(self, num_classes: int) -> float:
        """The entropy threshold ``E0``: ``e_margin`` if given, else the paper's ``0.4 * ln(num_classes)``."""
        return float(self.e_margin) if self.e_margin is not None else 0.4 * math.log(num_classes)

    # -- state --------------------------------------------------------------------------------------
    def take_snapshot(self) -> None:
        super().take_snapshot()
        self.ema = None

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the snapshot (parameters bit for bit, optimizer state cleared); the average starts over."""
        super().reset()
        self.ema = None

    # -- the method ---------------------------------------------------------------------------------
    def ttt_forward(self, inputs, **kwargs):
        """Train mode: ``(outputs, mean entropy of the samples under e_margin)``; no state changes."""
        outputs = full_precision(self.model(inputs))
        ent = entropy(outputs)
        keep = ent.detach() < self.margin(outputs.shape[-1])
        return outputs, (ent * keep).sum() / keep.sum().clamp_min(1)

    def _entropies(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, per-sample entropies)`` of a forward with graph, under the engine's contexts."""
        with self.inference_context(), self._autocast():
            with eager(self.model, enabled=self._adaptation_eager()):
                outputs = full_precision(self.model(inputs))
                return outputs, entropy(outputs)

    def adapt_step(self, inputs, **kwargs) -> torch.Tensor:
        """One SAR step (module docstring); returns the loss at ``theta + eps`` (0 when nothing is kept)."""
        params = self._params
        outputs, ent = self._entropies(inputs)
        self._keep_outputs(outputs)
        margin = self.margin(outputs.shape[-1])
        keep = ent.detach() < margin
        kept_first = int(keep.sum())
        self.last_selected = (kept_first, 0)
        if kept_first == 0:  # no reliable sample: no update
            return outputs.new_zeros(())
        grads = torch.autograd.grad(ent[keep].mean(), params, allow_unused=True)
        moved = [(p, g) for p, g in zip(params, grads) if g is not None]
        theta = [p.detach().clone() for p, _ in moved]
        with torch.no_grad():
            torch._foreach_add_([p for p, _ in moved], sam_perturbation([g for _, g in moved], self.rho))
        try:
            _, ent_perturbed = self._entropies(inputs)
            keep = keep & (ent_perturbed.detach() < margin)  # re-filtered at theta + eps
            kept_second = int(keep.sum())
            if kept_second:
                loss = ent_perturbed[keep].mean()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            with torch.no_grad():  # back to theta, bit for bit
                if moved:
                    torch._foreach_copy_([p for p, _ in moved], theta)
        self.last_selected = (kept_first, kept_second)
        if kept_second == 0:
            return outputs.new_zeros(())
        for p, g in zip(params, grads):
            p.grad = g
        self.optimizer.step()
        for p in params:
            p.grad = None
        loss = loss.detach()
        self.ema = update_ema(self.ema, loss.item())
        if self.reset_constant is not None and self.ema < self.reset_constant:
            self.num_recoveries += 1
            log.debug(
                "SAR: moving average %.4f < %s, back to the initial state", self.ema, self.reset_constant
            )
            self.reset()
        return loss
