"""PiSGD: SGD for infinite pi-nets (appends rows) and finite pi-nets (Gproj), with the paper's options.

Paper: Yang, Santacroce, Hu, ICLR 2022 (``yang2022pinets``); upstream ``pilimit_lib/inf/{optim,utils}.py``
and ``experiments/cifar10/cifar10mlp.py`` of github.com/santacml/pilim (facts: parameter groups, weight
decay, clipping norm; our own code).

Parameter groups and their lr multipliers: ``first`` (input layer weights, ``first_layer_lr_mult``),
``hidden`` (hidden layers, 1), ``last`` (output layer weights, ``last_layer_lr_mult``), ``bias`` (all
biases, ``bias_lr_mult``).  With ``lr_g = lr * mult`` and ``wd_g = wd`` (or ``wd / mult`` with
``apply_lr_mult_to_wd=False``, so that the decay ``1 - lr_g wd_g`` is ``1 - lr wd``):

* ordinary tensors (input layer A, biases, every finite weight): ``p <- (1 - lr_g wd_g) p - lr_g grad``;
* an infinite pi-layer: ``Amult <- (1 - lr_g wd_g) Amult``, then the batch's rows are appended:
  ``A += grad_out * s``, ``B += gbar``, ``Amult += -lr_g`` (nothing is appended when ``lr_g == 0``);
* finite nets with ``gproj=True`` first project the gradients (``FinPiMLP.project_gradients_``).

Clipping (``gclip > 0``): by the norm of each would-be update — ``|grad|`` for a tensor,
``sqrt(tr(A^T V(B B^T) A))`` of the appended rows for a pi-layer — per parameter
(``gclip_per_param=True``) or globally; scale ``gclip / (norm + 1e-6)`` when below 1.  With
``last_layer_lr_mult == 0`` the global norm leaves the output layer's weight gradient out (it updates
nothing), as ``pilimit_orig`` (``InfPiMLP.gclip(exclude_last_layer=...)``, ``GClipWrapper``) and
``pilimit_lib`` (``MetaInfSGD``, ``GClipWrapper``) do; it matters for the MAML experiments, where the
frozen readout still gets an outer gradient.  Non-finite
gradients raise :class:`~tttlab.core.errors.InvalidInputError` before anything changes.

Schedules (:class:`MultiStepLR`, :class:`CosineLR`) set ``optimizer.lr`` per step.  Clip schedule:
``pilimit_lib`` builds one from the lr milestones and ``lr_drop_ratio`` but clips with the fixed value
(our default), while ``pilimit_orig`` (the paper's code) clips with it, so its clip drops with the lr at
the milestones: ``MultiStepLR(drop_gclip=True)`` (``optim.gclip_drop_with_lr=true``).  Deviations: its cosine uses
``T_max = len(loader)^2``, ours ``T_max`` = the number of steps given; finite nets are clipped after Gproj
(as ``pilimit_orig``, the paper's code; ``pilimit_lib`` clips before projecting).  No momentum (the
paper uses none).  Checked against upstream: per-group lr and weight decay (``wd / mult`` with
``--no-apply-lr-mult-to-wd``, biases included), decay of Amult before the append, Amult rows ``-lr_g``,
clip norm ``sqrt(tr(A^T V(B B^T) A))`` and ``gclip / (norm + 1e-6)``, multistep milestones in epochs
converted to steps and stepped once per optimizer step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tttlab.core.errors import InvalidInputError

from .functional import pi_update_norm
from .layers import InfPiLinear
from .nets import FinPiMLP, InfMLP


def _groups(model: nn.Module) -> dict[str, tuple[list[nn.Parameter], list[InfPiLinear]]]:
    if isinstance(model, InfMLP):
        biases = [
            p for p in [model.input_layer.bias, *(layer.bias for layer in model.pi_layers)] if p is not None
        ]
        return {
            "first": ([model.input_layer.A], []), "hidden": ([], list(model.hidden)),
            "last": ([], [model.output_layer]), "bias": (biases, []),
        }  # fmt: skip
    if isinstance(model, FinPiMLP):
        w, L = list(model.weights), model.depth
        biases = [b for b, has in zip(model.biases, model.has_bias) if has]
        return {
            "first": ([w[0]], []),
            "hidden": (w[1 : L + 1], []),
            "last": ([w[L + 1]], []),
            "bias": (biases, []),
        }
    raise InvalidInputError(f"PiSGD needs an InfMLP or FinPiMLP, got {type(model).__name__}")


class PiSGD:
    """SGD for pi-nets (see the module docstring).  Torch-like: ``zero_grad()``, ``step()``,
    ``state_dict()`` / ``load_state_dict()``, ``param_groups`` (dicts with ``lr``/``weight_decay``)."""

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        weight_decay: float = 0.0,
        first_layer_lr_mult: float = 1.0,
        last_layer_lr_mult: float = 1.0,
        bias_lr_mult: float = 1.0,
        apply_lr_mult_to_wd: bool = True,
        gclip: float = 0.0,
        gclip_per_param: bool = False,
        gproj: bool = True,
    ):
        for name, v in (("lr", lr), ("weight_decay", weight_decay), ("gclip", gclip)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise InvalidInputError(f"{name}={v!r}: expected a finite number >= 0")
        self.model = model
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.mults = {"first": float(first_layer_lr_mult), "hidden": 1.0, "last": float(last_layer_lr_mult),
                      "bias": float(bias_lr_mult)}  # fmt: skip
        self.apply_lr_mult_to_wd = bool(apply_lr_mult_to_wd)
        self.gclip, self.gclip_per_param, self.gproj = float(gclip), bool(gclip_per_param), bool(gproj)
        self.groups = _groups(model)
        self.num_steps = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [
            {"name": k, "lr": self.lr * self.mults[k], "weight_decay": self._wd(k),
             "params": ps, "pi_layers": ls}
            for k, (ps, ls) in self.groups.items()
        ]  # fmt: skip

    def _wd(self, group: str) -> float:
        m = self.mults[group]
        if self.apply_lr_mult_to_wd:
            return self.weight_decay
        return self.weight_decay / m if m else 0.0

    def zero_grad(self) -> None:
        for ps, layers in self.groups.values():
            for p in ps:
                p.grad = None
            for layer in layers:
                layer.zero_pi_grad()
        self.model.zero_grad(set_to_none=True)

    def _check_finite(self) -> None:
        for gname, (ps, layers) in self.groups.items():
            for i, p in enumerate(ps):
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    raise InvalidInputError(
                        f"non-finite gradient in parameter group {gname!r} (tensor {i}, shape {tuple(p.shape)}); "
                        "expected finite numbers: lower the lr, enable gclip or use float32"
                    )
            for i, layer in enumerate(layers):
                pg = layer.pi_grad()
                if pg is not None and not (torch.isfinite(pg[0]).all() and torch.isfinite(pg[1]).all()):
                    raise InvalidInputError(
                        f"non-finite pi-gradient in {gname!r} pi-layer {i} (M={layer.M}); expected finite "
                        "numbers: lower the lr, enable gclip or use float32"
                    )

    def _clip(self) -> None:
        items: list[tuple[torch.Tensor, Any]] = []  # (norm, target: tensor grad or (layer, idx))
        for gname, (ps, layers) in self.groups.items():
            if gname == "last" and self.mults["last"] == 0 and not self.gclip_per_param:
                continue  # a frozen readout's gradient stays out of the global norm (as both upstreams)
            for p in ps:
                if p.grad is not None:
                    items.append((p.grad.detach().float().norm(), p))
            for layer in layers:
                pg = layer.pi_grad()
                if pg is not None:
                    items.append((pi_update_norm(*pg), layer))
        if not items:
            return

        def scale(target, coef):
            if isinstance(target, InfPiLinear):
                a, b = target.pi_grad()
                target.pi_rows = [(a * coef.to(a.dtype), b)]
            else:
                target.grad.mul_(coef.to(target.grad.dtype))

        if self.gclip_per_param:
            for norm, target in items:
                coef = self.gclip / (norm + 1e-6)
                if coef < 1:
                    scale(target, coef)
        else:
            total = torch.stack([n for n, _ in items]).norm()
            coef = self.gclip / (total + 1e-6)
            if coef < 1:
                for _, target in items:
                    scale(target, coef)

    @torch.no_grad()
    def step(self) -> None:
        self._check_finite()
        if self.gproj and hasattr(self.model, "project_gradients_"):
            self.model.project_gradients_()
        if self.gclip > 0:
            self._clip()
        for gname, (ps, layers) in self.groups.items():
            lr_g = self.lr * self.mults[gname]
            decay = 1.0 - lr_g * self._wd(gname)
            for p in ps:
                if p.grad is None:
                    continue
                if decay != 1.0:
                    p.mul_(decay)
                p.add_(p.grad.to(p.dtype), alpha=-lr_g)
            for layer in layers:
                pg = layer.pi_grad()
                if decay != 1.0:
                    layer.Amult.mul_(decay)
                if pg is not None and lr_g != 0.0:
                    layer.append_rows(pg[0], pg[1], -lr_g)
                layer.zero_pi_grad()
        self.num_steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr, self.num_steps = float(state["lr"]), int(state["num_steps"])


class MultiStepLR:
    """``lr = lr0 * gamma^(number of milestones <= step)``; call :meth:`step` after each optimizer step.

    ``drop_gclip=True`` also sets ``optimizer.gclip = gclip0 * gamma^(number of milestones < step)``:
    ``pilimit_orig`` (the paper's code) builds its clip schedule from the lr milestones and ratio and clips
    with it, so its clip drops with the lr, one step after it (its ``MultiStepGClip.step`` tests the step
    count before incrementing it, torch's ``MultiStepLR`` after); ``pilimit_lib`` builds the same schedule
    but clips with the fixed value (``drop_gclip=False``, the default)."""

    def __init__(self, optimizer: PiSGD, milestones, gamma: float, drop_gclip: bool = False):
        self.optimizer, self.milestones, self.gamma = (
            optimizer,
            sorted(int(m) for m in milestones),
            float(gamma),
        )
        self.lr0, self.t = optimizer.lr, 0
        self.drop_gclip, self.gclip0 = bool(drop_gclip), optimizer.gclip

    def lr_at(self, t: int) -> float:
        return self.lr0 * self.gamma ** sum(1 for m in self.milestones if m <= t)

    def gclip_at(self, t: int) -> float:
        if not self.drop_gclip:
            return self.gclip0
        return self.gclip0 * self.gamma ** sum(1 for m in self.milestones if m < t)

    def _apply(self) -> None:
        self.optimizer.lr = self.lr_at(self.t)
        self.optimizer.gclip = self.gclip_at(self.t)

    def step(self) -> None:
        self.t += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "lr0": self.lr0, "gclip0": self.gclip0}

    def load_state_dict(self, state) -> None:
        self.t, self.lr0 = int(state["t"]), float(state["lr0"])
        self.gclip0 = float(state.get("gclip0", self.gclip0))
        self._apply()


class CosineLR(MultiStepLR):
    """``lr = lr_min + (lr0 - lr_min) (1 + cos(pi t / total_steps)) / 2``."""

    def __init__(self, optimizer: PiSGD, total_steps: int, lr_min: float = 0.0):
        self.optimizer, self.total, self.lr_min = optimizer, max(int(total_steps), 1), float(lr_min)
        self.lr0, self.t = optimizer.lr, 0
        self.drop_gclip, self.gclip0 = False, optimizer.gclip

    def lr_at(self, t: int) -> float:
        return self.lr_min + 0.5 * (self.lr0 - self.lr_min) * (
            1 + math.cos(math.pi * min(t, self.total) / self.total)
        )


def make_scheduler(
    optimizer: PiSGD, name: str | None, total_steps: int, milestones=(), gamma: float = 0.1,
    drop_gclip: bool = False,
):  # fmt: skip
    if name in (None, "none", "None"):
        return None
    if name == "multistep":
        return MultiStepLR(optimizer, milestones, gamma, drop_gclip=drop_gclip)
    if name == "cosine":
        return CosineLR(optimizer, total_steps)
    raise InvalidInputError(f"scheduler={name!r}; expected none, multistep or cosine")
