"""DeYO: destroy your object, entropy minimisation on samples whose prediction depends on the object's shape.

Paper: Lee, Jung, Lee, Park, Shin, Hwang, Yoon, "Entropy is not Enough for Test-Time Adaptation: From the
Perspective of Disentangled Factors", ICLR 2024 (bibtex ``lee2024deyo``); upstream Jhyun17/DeYO; API of
torch-ttt's ``DeYOEngine(model, optimization_parameters, e_margin, plpd_thresh, ent_norm, patch_len,
reweight_ent, reweight_plpd)``.

Algorithm (one adaptation step, normalisation layers using the test batch's statistics):

1. entropy filter: keep samples with prediction entropy ``H(x) < e_margin`` (default ``0.5 ln C``);
2. destroy the object: split each kept image into a ``patch_len x patch_len`` grid and shuffle the
   patches (:func:`patch_shuffle`), predict the shuffled images without gradient;
3. PLPD (pseudo-label probability difference) ``p(x)[y] - p(x')[y]``, ``y = argmax p(x)``
   (:func:`plpd`); keep samples with ``PLPD > plpd_thresh`` (0.2);
4. loss = mean over kept samples of ``H(x) * (reweight_ent * exp(-(H(x) - ent_norm)) + reweight_plpd *
   exp(PLPD))`` (``ent_norm`` default ``0.4 ln C``), the weight not differentiated; no step when no sample
   is kept (as the official code).

Only the affine parameters of normalisation layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm) adapt.
The official ``collect_params`` (taken over from SAR) also leaves out, by module name, every layer under
``layer4`` (ResNets), ``blocks.9``-``blocks.11`` and the final ``norm`` (ViT-Base); that choice is tied to
those architectures' names and is not reproduced here: restrict ``adapted_parameters`` in a subclass to
match it on such models.  Defaults are the official ``config.py``'s (``plpd_threshold`` 0.2, ``deyo_margin``
0.5, ``deyo_margin_e0`` 0.4, ``patch_len`` 4, both re-weightings on); its script ``exp_deyo.sh`` uses
``plpd_thresh=0.3`` for the BatchNorm ResNet-50 in the mild (i.i.d.) ImageNet-C setting.  The official
``main.py`` builds a fresh model and optimizer for every corruption (``reset="per_domain"`` here; the
default is torch-ttt's ``"per_batch"``) and puts the whole model in train mode, so dropout, where a model
has it, is active in its forwards; here every layer but the BatchNorm statistics stays in eval mode.

Differences from torch-ttt 0.0.2 and why:

* test-batch statistics through :func:`~tttlab.torch_ttt.norm.batch_statistics` (upstream deleted the
  running statistics of every ``BatchNorm2d`` permanently, so the model could no longer be used
  without the engine and a reset could not restore it); every norm type, not only ``BatchNorm2d``.
* the sample weights are detached, as in the official code (upstream torch-ttt back-propagated through
  them, which adds a gradient pushing PLPD and the entropy weight up);
* ``e_margin=None`` / ``ent_norm=None`` (defaults) are the official ``0.5 ln C`` / ``0.4 ln C`` with ``C``
  read from the model's output; upstream fixed ``C = 1000`` (give the numbers to reproduce upstream);
* the shuffled copies are predicted as one batch of the kept samples, as the official code; when only one
  sample is kept and the model has BatchNorm, the whole batch is shuffled instead (the statistics of a
  single image are not those of a batch, and BatchNorm1d cannot normalise one sample);
* grids that do not divide the image are resized with ``F.interpolate`` (bilinear, antialiased) to the
  next smaller multiple and back, as the official ``Resize``; patch permutations come from
  ``generator`` (a ``torch.Generator``) or the global torch RNG, so runs are reproducible under a seed;
* defaults ``num_steps=1``, SGD lr 2.5e-4 momentum 0.9 (the paper's ImageNet setting, batch 64;
  upstream: its generic 3 Adam steps at 1e-2); the prediction is made after the update steps as upstream
  torch-ttt (the official code returns the outputs of the forward that computed the loss, the last
  step's when ``steps > 1``: ``predict_before_update=True`` returns the same, and also saves that forward);
* train mode returns ``(outputs, DeYO loss)`` with the shuffled forward run under batch statistics, so it
  does not pollute BatchNorm running statistics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tttlab.core.errors import InvalidInputError

from ..engine_registry import EngineRegistry
from ..norm import batch_statistics, batchnorm_layers, entropy, norm_affine_parameters, norm_layers
from ..precision import full_precision
from .base_engine import BaseEngine, PredictBeforeUpdate

__all__ = ["DeYOEngine", "deyo_weights", "patch_shuffle", "plpd"]


def patch_shuffle(x: torch.Tensor, patch_len: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each NCHW image cut into a ``patch_len x patch_len`` grid of patches, shuffled independently."""
    if x.ndim != 4:
        raise InvalidInputError(f"DeYO's patch shuffle needs NCHW images, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    p = int(patch_len)
    ph, pw = h // p, w // p
    if ph == 0 or pw == 0:
        raise InvalidInputError(f"patch_len={p} is larger than the {h}x{w} image")
    resized = (h, w) != (ph * p, pw * p)
    if resized:
        x = F.interpolate(x, size=(ph * p, pw * p), mode="bilinear", align_corners=False, antialias=True)
    patches = x.reshape(b, c, p, ph, p, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, p * p, c, ph, pw)
    order = torch.argsort(torch.rand(b, p * p, generator=generator), dim=1).to(x.device)
    patches = patches[torch.arange(b, device=x.device).unsqueeze(1), order]
    out = patches.reshape(b, p, p, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, p * ph, p * pw)
    if resized:
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out


def plpd(probs: torch.Tensor, probs_destroyed: torch.Tensor) -> torch.Tensor:
    """Pseudo-label probability difference ``probs[y] - probs_destroyed[y]``, ``y = argmax probs``."""
    label = probs.argmax(dim=-1, keepdim=True)
    return (probs.gather(-1, label) - probs_destroyed.gather(-1, label)).squeeze(-1)


def deyo_weights(
    ent: torch.Tensor,
    plpd_values: torch.Tensor,
    ent_norm: float,
    reweight_ent: float = 1.0,
    reweight_plpd: float = 1.0,
) -> torch.Tensor:
    """``reweight_ent / exp(H - ent_norm) + reweight_plpd * exp(PLPD)`` (ones when both factors are 0)."""
    if not reweight_ent and not reweight_plpd:
        return torch.ones_like(ent)
    return reweight_ent * torch.exp(-(ent - ent_norm)) + reweight_plpd * torch.exp(plpd_values)


@EngineRegistry.register("deyo")
class DeYOEngine(PredictBeforeUpdate, BaseEngine):
    """Args: ``model``; ``optimization_parameters``; ``e_margin`` (None: ``0.5 ln C``); ``plpd_thresh``;
    ``ent_norm`` (None: ``0.4 ln C``); ``patch_len`` (patches per side); ``reweight_ent``;
    ``reweight_plpd``; ``predict_before_update``; ``generator`` for the patch permutations."""

    batch_statistics_always = True  # the prediction uses batch statistics: the batch checks apply at 0 steps

    optimization_defaults = {"num_steps": 1, "lr": 2.5e-4, "optimizer_name": "sgd", "momentum": 0.9}

    def __init__(
        self,
        model: nn.Module,
        optimization_parameters: Mapping | None = None,
        e_margin: float | None = None,
        plpd_thresh: float = 0.2,
        ent_norm: float | None = None,
        patch_len: int = 4,
        reweight_ent: float = 1.0,
        reweight_plpd: float = 1.0,
        *,
        predict_before_update: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__(model, optimization_parameters)
        if not norm_layers(model):
            raise InvalidInputError(
                f"DeYOEngine adapts normalisation layers (BatchNorm/GroupNorm/LayerNorm); "
                f"{type(model).__name__} has none"
            )
        if isinstance(patch_len, bool) or not isinstance(patch_len, int) or patch_len < 1:
            raise InvalidInputError(f"patch_len must be an integer >= 1, got {patch_len!r}")
        self.e_margin = e_margin
        self.plpd_thresh = plpd_thresh
        self.ent_norm = ent_norm
        self.patch_len = patch_len
        self.reweight_ent = reweight_ent
        self.reweight_plpd = reweight_plpd
        self.predict_before_update = predict_before_update
        self.generator = generator
        self._has_bn = bool(batchnorm_layers(model))
        # a batch of one is accepted when every BatchNorm layer gets more than one value per channel from it
        self.batchnorm_batch_statistics = self._has_bn
        self.last_selected = (0, 0)  # (after the entropy filter, after the PLPD filter) at the last step

    def adapted_parameters(self):
        return norm_affine_parameters(self.model)

    def inference_context(self):
        return batch_statistics(self.model)

    def margins(self, num_classes: int) -> tuple[float, float]:
        """``(e_margin, ent_norm)``: as given, else ``0.5 ln C`` and ``0.4 ln C``."""
        log_c = math.log(num_classes)
        e_margin = float(self.e_margin) if self.e_margin is not None else 0.5 * log_c
        ent_norm = float(self.ent_norm) if self.ent_norm is not None else 0.4 * log_c
        return e_margin, ent_norm

    def deyo_loss(self, inputs: torch.Tensor, outputs: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``(loss, kept by entropy, kept by PLPD)``; the loss has no graph when nothing is kept."""
        ent = entropy(outputs)
        e_margin, ent_norm = self.margins(outputs.shape[-1])
        idx = (ent.detach() < e_margin).nonzero().squeeze(1)
        if idx.numel() == 0:
            return outputs.new_zeros(()), 0, 0
        probs = outputs.detach().softmax(dim=-1)
        with torch.no_grad(), batch_statistics(self.model):
            if idx.numel() >= 2 or not self._has_bn:
                destroyed = self.model(patch_shuffle(inputs[idx].detach(), self.patch_len, self.generator))
            else:  # one kept sample: shuffle the whole batch so BatchNorm sees batch statistics
                destroyed = self.model(patch_shuffle(inputs.detach(), self.patch_len, self.generator))[idx]
            values = plpd(probs[idx], full_precision(destroyed).softmax(dim=-1))
        keep = values > self.plpd_thresh
        if not bool(keep.any()):
            return outputs.new_zeros(()), int(idx.numel()), 0
        idx, values = idx[keep], values[keep]
        ent = ent[idx]
        weights = deyo_weights(ent.detach(), values, ent_norm, self.reweight_ent, self.reweight_plpd)
        return (ent * weights).mean(), int(keep.numel()), int(idx.numel())

    def ttt_forward(self, inputs, **kwargs):
        """Train mode: ``(outputs, DeYO loss)`` (zero with a graph when no sample is kept)."""
        outputs = full_precision(self.model(inputs))
        loss, _, kept = self.deyo_loss(inputs, outputs)
        return outputs, loss if kept else outputs.sum() * 0.0

    def adapt_loss(self, inputs, **kwargs):
        outputs = full_precision(self.model(inputs))
        self._keep_outputs(outputs)
        loss, n_ent, n_plpd = self.deyo_loss(inputs, outputs)
        self.last_selected = (n_ent, n_plpd)
        return loss
