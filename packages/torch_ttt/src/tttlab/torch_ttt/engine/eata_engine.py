"""EATA: efficient test-time adaptation without forgetting.

Paper: Niu, Wu, Zhang, Chen, Zheng, Zhao, Tan, "Efficient Test-Time Model Adaptation without Forgetting",
ICML 2022 (bibtex ``niu2022eata``); upstream mr-eggplant/EATA; API of torch-ttt's
``EataEngine(model, optimization_parameters, e_margin, d_margin, fisher_alpha, fishers)``.

Like TENT (test-batch normalisation statistics, normalisation affine parameters adapted), with:

* sample selection: only samples whose prediction entropy is below ``e_margin`` (default
  0.4 ln C, the paper's E0, with C the number of classes of the model's output) and whose probability
  vector is not redundant with the moving average of past selected predictions (|cos| < ``d_margin``);
* reweighting by ``1 / exp(entropy - e_margin)``;
* an anti-forgetting regulariser ``fisher_alpha * sum_i F_i (theta_i - theta0_i)^2`` with diagonal Fisher
  information ``F`` from :meth:`EataEngine.compute_fishers` (upstream's calibration raised an error).

The moving average of probabilities is part of the adapted state: ``reset`` forgets it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from tttlab.core.errors import InvalidInputError

from ..engine_registry import EngineRegistry
from ..norm import batch_statistics, entropy, norm_affine_parameters, norm_layers
from .base_engine import BaseEngine, check_batch

__all__ = ["EataEngine"]


@EngineRegistry.register("eata")
class EataEngine(BaseEngine):
    optimization_defaults = {"num_steps": 1, "lr": 2.5e-4, "optimizer_name": "sgd", "momentum": 0.9}
    min_batch = 2

    def __init__(
        self,
        model,
        optimization_parameters=None,
        e_margin: float | None = None,
        d_margin: float = 0.05,
        fisher_alpha: float = 2000.0,
        fishers: dict | None = None,
    ):
        super().__init__(model, optimization_parameters)
        if not norm_layers(model):
            raise InvalidInputError(
                f"EataEngine needs normalisation layers (BatchNorm/GroupNorm/LayerNorm); {type(model).__name__} has none"
            )
        self.e_margin, self.d_margin, self.fisher_alpha = e_margin, d_margin, fisher_alpha
        self.fishers = fishers
        self.current_model_probs: torch.Tensor | None = None
        self._saved_probs: torch.Tensor | None = None
        self.num_selected = 0

    def adapted_parameters(self):
        return norm_affine_parameters(self.model)

    def inference_context(self):
        return batch_statistics(self.model)

    def take_snapshot(self) -> None:
        super().take_snapshot()
        self._saved_probs = None if self.current_model_probs is None else self.current_model_probs.clone()

    def reset(self) -> None:
        super().reset()
        self.current_model_probs = None if self._saved_probs is None else self._saved_probs.clone()

    def margin(self, num_classes: int) -> float:
        return self.e_margin if self.e_margin is not None else 0.4 * math.log(num_classes)

    def select(self, outputs: torch.Tensor):
        """Indices kept by the entropy and redundancy filters, their entropies and the weights."""
        ent = entropy(outputs)
        e_margin = self.margin(outputs.shape[-1])
        keep = torch.nonzero(ent < e_margin, as_tuple=True)[0]
        probs = outputs[keep].softmax(-1)
        if self.current_model_probs is not None and keep.numel():
            cos = F.cosine_similarity(self.current_model_probs.unsqueeze(0), probs, dim=1)
            redundant = cos.abs() >= self.d_margin
            keep, probs = keep[~redundant], probs[~redundant]
        weights = torch.exp(-(ent[keep].detach() - e_margin))
        return keep, ent[keep], weights, probs

    def fisher_penalty(self) -> torch.Tensor:
        if not self.fishers:
            return torch.zeros(())
        total = torch.zeros(())
        for name, p in self.adapted_parameters():
            if name in self.fishers:
                fisher, anchor = self.fishers[name]
                total = total + (fisher * (p - anchor) ** 2).sum()
        return self.fisher_alpha * total

    def ttt_forward(self, inputs, **kwargs):
        outputs = self.model(inputs)
        return outputs, entropy(outputs).mean()

    def adapt_loss(self, inputs, **kwargs):
        outputs = self.model(inputs)
        keep, ent, weights, probs = self.select(outputs)
        self.num_selected += int(keep.numel())
        if keep.numel():
            mean_probs = probs.detach().mean(0)
            self.current_model_probs = (
                mean_probs
                if self.current_model_probs is None
                else 0.9 * self.current_model_probs + 0.1 * mean_probs
            )
            loss = (ent * weights).mean()
        else:
            loss = outputs.sum() * 0.0  # nothing selected: no update from entropy, only the regulariser
        return loss + self.fisher_penalty()

    def compute_fishers(self, batches: Iterable, num_batches: int | None = None) -> dict:
        """Diagonal Fisher information of the adapted parameters at their current values.

        ``batches`` yields input tensors (or ``(inputs, labels)``; labels are ignored: the model's own
        predictions are the targets, as in EATA's unlabeled calibration on in-distribution samples).
        Returns and stores ``{name: (fisher, anchor)}``.
        """
        params = dict(self.adapted_parameters())
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        for i, batch in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            check_batch(x, min_batch=self.min_batch)
            for p in params.values():
                p.grad = None
            with torch.enable_grad(), self.inference_context():
                outputs = self.model(x)
                F.cross_entropy(outputs, outputs.argmax(-1).detach()).backward()
            for n, p in params.items():
                if p.grad is not None:
                    sums[n] += p.grad.detach() ** 2
            count += 1
        if count == 0:
            raise InvalidInputError("compute_fishers needs at least one batch")
        for p in params.values():
            p.grad = None
        self.fishers = {n: (s / count, params[n].detach().clone()) for n, s in sums.items()}
        return self.fishers

    def forward(self, inputs, **kwargs):
        if not self.training:
            check_batch(inputs, min_batch=self.min_batch)
        return super().forward(inputs, **kwargs)
