"""EATA: efficient test-time adaptation without forgetting.

Paper: Niu, Wu, Zhang, Chen, Zheng, Zhao, Tan, "Efficient Test-Time Model Adaptation without Forgetting",
ICML 2022 (bibtex ``niu2022eata``); upstream mr-eggplant/EATA; API of torch-ttt's
``EataEngine(model, optimization_parameters, e_margin, d_margin, fisher_alpha, fishers)``.

Algorithm (one adaptation step, normalisation layers using the test batch's statistics):

1. entropy filter: keep samples with prediction entropy ``H(x) < e_margin``;
2. redundancy filter: of those, keep samples whose probability vector has ``|cos(p(x), m)| < d_margin``,
   ``m`` being a moving average of the kept samples' mean probabilities (``m <- 0.9 m + 0.1 mean(p)``;
   no filter before ``m`` exists);
3. loss = mean over kept samples of ``H(x) / exp(H(x) - e_margin)`` (the weight is not differentiated)
   plus the anti-forgetting term ``fisher_alpha * sum_i F_i (theta_i - theta0_i)^2`` when Fisher
   information has been computed (:meth:`EataEngine.compute_fishers`) or given (``fishers``);
4. no step at all when no sample is kept (as the official code).

ETA, the paper's variant without the anti-forgetting term (official ``main.py --algorithm eta``), is
this engine without ``fishers`` (no :meth:`EataEngine.compute_fishers` call); ``fisher_alpha=0`` takes
the same steps (``tttlab-torch-ttt-evaluate engine=eata engine.kwargs.fisher_alpha=0``, which still
computes the Fisher information, unused).

Only the affine parameters of the normalisation layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm)
are adapted; the moving average ``m`` is an adapted buffer (``current_model_probs``), so ``reset()``
restores it with the parameters.  The official code puts the whole model in train mode (dropout, where
a model has it, active); here every layer but the BatchNorm statistics stays in eval mode.

Differences from torch-ttt 0.0.2 and why:

* ``compute_fishers(batches_or_loader)`` works (upstream iterated over ``enumerate(loader)`` and called
  ``.to`` on the batch index, and re-configured the model with a function that returns ``None``).  As the
  paper, the Fisher diagonal is the mean over batches of the squared gradients of the cross-entropy to the
  model's own pseudo-labels (``use_labels=True`` uses the labels of ``(x, y)`` batches instead), computed
  with test-batch statistics, w.r.t. the adapted parameters only, on clean (source) data, or on unlabeled
  test data as in the paper's 2,000-sample variant; ``theta0`` is the parameters at calibration time.
* test-batch normalisation statistics (upstream kept the stored training statistics) and every norm type
  (upstream: ``BatchNorm2d`` only); the model is never mutated permanently, so ``reset`` is exact.
* ``e_margin=None`` (default) is the paper's ``0.4 * ln(C)``, ``C`` read from the model's output at the
  first call; upstream's default was the constant ``ln(1000) / 2 - 1`` (about 2.45, tuned for 1000
  classes, :data:`UPSTREAM_E_MARGIN`); pass it explicitly to reproduce upstream.
* ``d_margin`` filters samples *similar* to the moving average (``|cos| < d_margin`` are kept), as the
  paper and both upstreams; the moving average is updated with the finally kept samples only.  Its
  default 0.05 is the official ImageNet value and, unlike ``e_margin``, does not scale with the number
  of classes by itself: a confident prediction against a class-balanced average has ``cos ~ 1/sqrt(C)``
  (0.03 for 1000 classes, 0.32 for 10), so with 10 classes and 0.05 almost no sample passes once the
  average exists and EATA degenerates to BN.  Use about 0.4 for 10 classes (``conf/engine/eata.yaml``
  does, for MNIST-C; the value the test-time-adaptation benchmark uses on CIFAR-10-C).
* ``fisher_alpha=2000`` is the official ImageNet default; the official Fisher pass uses ``fisher_size``
  (2,000) clean validation images drawn at random without repeats (``main.py``:
  ``SelectedRotateImageFolder.set_dataset_size``, Python's ``random`` seeded by ``--seed``, 2020), with
  the test transform, the test batch size (64) and test-batch statistics, as :meth:`compute_fishers`
  does on the batches it is given.  ``tttlab-torch-ttt-evaluate`` gives it ``calibration.num_examples``
  clean *training* images of the model's source dataset (as mariodoebler/test-time-adaptation for
  CIFAR-10-C), a random subset drawn with the run's ``seed`` (``evaluate.fisher_subset``): the same kind
  of sample as the official one, not the same draws.
* defaults: the paper's ImageNet setting, one SGD step, lr 2.5e-4, momentum 0.9 (upstream: its generic
  3 Adam steps at 1e-2).  EATA is meant to run over a stream (``reset="per_domain"`` or ``"never"``); the
  default ``"per_batch"`` (upstream's ``copy_model=True``) makes the moving average and the Fisher term
  act only within one batch's steps.  The official ``reset()`` (its ``episodic=True``) restores the
  model and optimizer but keeps the moving average; here the average is part of the adapted state and
  is restored with it, so every reset is exact (the official ImageNet-C protocol never resets: one
  engine over all corruptions, our ``reset="never"``).
* ``fishers`` keys are the engine's parameter names (``model.<name>``, what :meth:`compute_fishers`
  returns); upstream's keys (the model's own names) are accepted too.
* the prediction is made after the update steps, as upstream torch-ttt (the official code returns the
  outputs of the forward that computed the loss, the last step's when ``steps > 1``:
  ``predict_before_update=True`` returns the same, and also saves that forward).
* train mode returns ``(outputs, entropy-filtered weighted entropy)`` without touching the moving average.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tttlab.core.errors import InvalidInputError

from ..engine_registry import EngineRegistry
from ..norm import batch_statistics, batchnorm_layers, entropy, norm_affine_parameters, norm_layers
from ..precision import full_precision
from .base_engine import BaseEngine, PredictBeforeUpdate, check_batch

__all__ = ["EataEngine", "EATAEngine", "UPSTREAM_E_MARGIN", "eata_selection", "update_model_probs"]

#: torch-ttt 0.0.2's default ``e_margin`` (a constant for 1000 classes).
UPSTREAM_E_MARGIN = math.log(1000) / 2 - 1
#: momentum of the moving average of probabilities (paper and official code).
PROBS_MOMENTUM = 0.9


def eata_selection(
    ent: torch.Tensor, probs: torch.Tensor, model_probs: torch.Tensor | None, e_margin: float, d_margin
) -> torch.Tensor:
    """Boolean mask of the samples EATA adapts on: ``ent < e_margin`` and, when a moving average
    ``model_probs`` exists and ``d_margin`` is not None, ``|cos(probs, model_probs)| < d_margin``."""
    keep = ent < e_margin
    if model_probs is not None and model_probs.numel() and d_margin is not None:
        cos = F.cosine_similarity(model_probs.unsqueeze(0), probs, dim=1)
        keep = keep & (cos.abs() < d_margin)
    return keep


def update_model_probs(model_probs: torch.Tensor | None, new_probs: torch.Tensor) -> torch.Tensor | None:
    """``0.9 * m + 0.1 * mean(new_probs)``; ``mean(new_probs)`` if there is no ``m`` yet; ``m`` unchanged
    when ``new_probs`` is empty."""
    if new_probs.shape[0] == 0:
        return model_probs
    mean = new_probs.detach().mean(0)
    if model_probs is None or model_probs.numel() == 0:
        return mean
    return PROBS_MOMENTUM * model_probs + (1 - PROBS_MOMENTUM) * mean


@EngineRegistry.register("eata")
class EataEngine(PredictBeforeUpdate, BaseEngine):
    """Args: ``model``; ``optimization_parameters``; ``e_margin`` (None: ``0.4 ln C``); ``d_margin``
    (cosine threshold, None disables the redundancy filter); ``fisher_alpha``; ``fishers`` (``{name:
    (fisher, theta0)}``, e.g. from :meth:`compute_fishers`; names as ``engine.named_parameters()``
    (``model.<name>``) or, as upstream, as ``model.named_parameters()``); ``predict_before_update``."""

    batch_statistics_always = True  # the prediction uses batch statistics: the batch checks apply at 0 steps

    optimization_defaults = {"num_steps": 1, "lr": 2.5e-4, "optimizer_name": "sgd", "momentum": 0.9}

    def __init__(
        self,
        model: nn.Module,
        optimization_parameters: Mapping | None = None,
        e_margin: float | None = None,
        d_margin: float | None = 0.05,
        fisher_alpha: float = 2000.0,
        fishers: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        *,
        predict_before_update: bool = False,
    ):
        super().__init__(model, optimization_parameters)
        if not norm_layers(model):
            raise InvalidInputError(
                f"EataEngine adapts normalisation layers (BatchNorm/GroupNorm/LayerNorm); "
                f"{type(model).__name__} has none"
            )
        self.e_margin = e_margin
        self.d_margin = d_margin
        self.fisher_alpha = float(fisher_alpha)
        self.fishers = dict(fishers) if fishers is not None else None
        self.predict_before_update = predict_before_update
        # a batch of one is accepted when every BatchNorm layer gets more than one value per channel from it
        self.batchnorm_batch_statistics = bool(batchnorm_layers(model))
        # moving average of probabilities: None until the first kept sample (its size C is unknown before)
        self.register_buffer("current_model_probs", None, persistent=False)
        self.num_selected = 0  # samples adapted on since construction (all steps, as the official counters)
        self.last_selected = 0  # samples the last step adapted on (0: no step)

    # -- what adapts --------------------------------------------------------------------------------
    def adapted_parameters(self):
        return norm_affine_parameters(self.model)

    def adapted_buffers(self):
        if self.current_model_probs is not None:
            yield "current_model_probs", self.current_model_probs

    def inference_context(self):
        return batch_statistics(self.model)

    def margin(self, num_classes: int) -> float:
        """The entropy threshold: ``e_margin`` if given, else the paper's ``0.4 * ln(num_classes)``."""
        return float(self.e_margin) if self.e_margin is not None else 0.4 * math.log(num_classes)

    @torch.no_grad()
    def reset(self) -> None:
        if self._snapshot is not None:  # the average may have appeared (or not) since the snapshot
            saved = self._snapshot.get("buffer:current_model_probs")
            self.current_model_probs = None if saved is None else saved.clone()
        super().reset()

    # -- Fisher regulariser -------------------------------------------------------------------------
    def compute_fishers(
        self,
        data: Iterable,
        loss_fn: Callable | None = None,
        lr: float | None = None,
        *,
        use_labels: bool = False,
        num_batches: int | None = None,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Diagonal Fisher information of the adapted parameters, stored in ``self.fishers`` and returned
        as ``{"model.<name>": (fisher, theta0)}``.

        ``data``: an iterable of batches (a ``DataLoader``, a list of tensors or of ``(x, y, ...)``
        tuples); at most ``num_batches`` are read.  ``loss_fn(outputs, targets)`` defaults to
        cross-entropy; targets are the model's argmax pseudo-labels (paper) unless ``use_labels=True``.
        ``lr`` is accepted for upstream compatibility and unused (upstream built a throwaway optimizer).
        The model's parameters, buffers and ``.grad`` fields are left untouched.
        """
        del lr
        loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        params = dict(self.adapted_parameters())
        names, tensors = list(params), list(params.values())
        sums = [torch.zeros_like(p) for p in tensors]
        count = 0
        with torch.enable_grad(), batch_statistics(self.model):
            for batch in data:
                if num_batches is not None and count >= num_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                if not isinstance(x, torch.Tensor):
                    raise InvalidInputError(
                        f"compute_fishers expects batches of tensors or (x, y) tuples, got {type(x).__name__}"
                    )
                check_batch(x, what="Fisher calibration batch")
                x = x.to(tensors[0].device)
                self.check_batch_statistics(x, what="Fisher calibration batch")
                outputs = self.model(x)
                if use_labels:
                    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                        raise InvalidInputError("compute_fishers(use_labels=True) needs (x, y) batches")
                    targets = batch[1].to(outputs.device)
                else:
                    targets = outputs.detach().argmax(dim=-1)
                grads = torch.autograd.grad(loss_fn(outputs, targets), tensors, allow_unused=True)
                for total, g in zip(sums, grads):
                    if g is not None:
                        total.add_(g.detach().square())
                count += 1
        if count == 0:
            raise InvalidInputError("compute_fishers got no batches; expected at least one")
        self.fishers = {n: (s / count, p.detach().clone()) for n, s, p in zip(names, sums, tensors)}
        return self.fishers

    def fisher_regularizer(self) -> torch.Tensor:
        """``fisher_alpha * sum_i F_i (theta_i - theta0_i)^2`` over the parameters with Fisher information
        (0 at the calibrated parameters)."""
        params = dict(self.named_parameters())
        terms = []
        for name, (fisher, theta0) in (self.fishers or {}).items():
            p = params.get(name, params.get(f"model.{name}"))
            if p is not None:
                terms.append((fisher.to(p) * (p - theta0.to(p)).square()).sum())
        if not terms:
            return torch.zeros((), device=self.current_device())
        return self.fisher_alpha * torch.stack(terms).sum()

    fisher_penalty = fisher_regularizer  # the name used in earlier tttlab versions

    def current_device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # -- the method ---------------------------------------------------------------------------------
    def select(self, outputs: torch.Tensor):
        """``(kept indices, their entropies, their weights 1/exp(H - e_margin), their probabilities)``
        after the entropy and redundancy filters; the moving average is not changed."""
        ent = entropy(outputs)
        e_margin = self.margin(outputs.shape[-1])
        probs = outputs.softmax(dim=-1)
        keep = eata_selection(ent.detach(), probs.detach(), self.current_model_probs, e_margin, self.d_margin)
        idx = keep.nonzero().squeeze(1)
        return idx, ent[idx], torch.exp(-(ent[idx].detach() - e_margin)), probs[idx]

    def ttt_forward(self, inputs, **kwargs):
        """Train mode: ``(outputs, weighted entropy of the samples under e_margin)``; no state changes."""
        outputs = full_precision(self.model(inputs))
        ent = entropy(outputs)
        e_margin = self.margin(outputs.shape[-1])
        keep = ent.detach() < e_margin
        coeff = torch.exp(-(ent.detach() - e_margin)) * keep
        return outputs, (ent * coeff).sum() / keep.sum().clamp_min(1)

    def adapt_loss(self, inputs, **kwargs):
        outputs = full_precision(self.model(inputs))
        self._keep_outputs(outputs)
        idx, ent, weights, probs = self.select(outputs)
        with torch.no_grad():
            self.current_model_probs = update_model_probs(self.current_model_probs, probs.detach())
        self.last_selected = int(idx.numel())
        self.num_selected += self.last_selected
        if self.last_selected == 0:  # no reliable, non-redundant sample: no step (official code)
            return outputs.new_zeros(())
        loss = (ent * weights).mean()
        if self.fishers:
            loss = loss + self.fisher_regularizer()
        return loss


#: the name torch-ttt 0.0.2 exported in ``__all__`` (its class is ``EataEngine``).
EATAEngine = EataEngine
