"""Seed 002's ensemble of test-time adapted models (MEMO and TPT members, any mix).

Seed 002 (DavidC001/MEMO-TPT-DL2024, ``Ensemble``); no paper of its own (it combines zhang2022memo and
shu2022tpt).  For member i with temperature T_i and its (selected) view logits z_i (n_i, classes), the
members' raw logits as seed 002's ``Ensemble.marginal_distribution`` takes them (not log-softmaxed per view,
so a view with larger logits weighs more):

    a_i = (logsumexp_views z_i - log n_i) / T_i        log p_i = log_softmax(a_i)
    H_i = entropy(p_i)        w_i = (sum_j H_j) / H_i, normalised to sum 1
    m = sum_i w_i log p_i     loss = -sum_c exp(m_c) m_c

One backward of the loss and a step of every member's optimizer (``steps`` times, fresh views each time
for MEMO members, as MEMO's own steps; TPT members' views and their step-0 selection fixed per image, as TPT
and seed 002's ``EasyTPT.selected_idx``); prediction: the same combination of the
members' logits on their original view (n = 1).  ``simple=True`` is the "simple ensemble": the combination
over the views with no backpropagation, argmax of m.

The weights w_i are constants in the backward pass (seed 002 computes them under ``no_grad``).  Each
member draws its own views (its own resolution and normalisation), as seed 002's members read the image
through their own data transforms.

Deviation for ``steps > 1`` (seed 002 ran 1): seed 002's MEMO members adapt on the same views at every step
(its data loader's fixed list), here on fresh views.

Members run as the ensemble's, not with their own adaptation: the ensemble's ``steps`` replace a member's
``tts`` / ``steps`` (as seed 002's ``niter``), and a TPT member's own modes are refused
(:func:`check_member`): ``align_steps > 0`` (seed 002's visual alignment) and ``ensemble=True`` (the
view-ensemble).  Seed 002's ``Ensemble.forward`` runs a member's alignment only inside that member's own
single-model ``predict``; the ``reset`` that follows restores the visual encoder (``clip_init_state``) and its
optimizer, so neither its ensemble step, its prediction nor its simple ensemble sees an aligned encoder.  Before,
both were silently ignored here too; now they are a ConfigError naming the value.

Deviation (an upstream bug not reproduced): seed 002's ``Ensemble.forward`` first runs every member's own
``predict`` (the single-model results: a zero_grad, backward and step of the member alone), then resets the
weights and optimizers, which leaves the members' ``.grad`` in place, and its ensemble backward adds to them:
each member's ensemble step there is the sum of its own single-model gradient and the ensemble's.  Here the
step uses the ensemble loss's gradient only (the simple ensemble, with no backward, is the same in both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tttlab.core.errors import ConfigError

from .memo import Memo
from .tpt import TPT

__all__ = ["Ensemble", "check_member", "combine"]


def check_member(where: str, align_steps=0, ensemble=False) -> None:
    """A TPT ensemble member's own modes, which the ensemble never runs, as a ConfigError naming the value
    (``where``: how the caller names the member, e.g. ``models[1].``): ``align_steps > 0`` (seed 002's
    visual alignment; its own ensemble undoes it with a reset before the ensemble step) and ``ensemble``
    (the view-ensemble: the ensemble tunes the member's prompt instead)."""
    if int(align_steps) != 0:
        raise ConfigError(
            f"{where}align_steps={align_steps}: the ensemble steps its TPT members' prompts on the combined "
            "loss and never runs their visual alignment (seed 002's Ensemble neither: its reset restores the "
            "visual encoder before its ensemble step); expected 0 (the alignment is TPT's own: "
            "tttlab-memo-tpt-tpt align_steps=k)"
        )
    if ensemble:
        raise ConfigError(
            f"{where}ensemble={ensemble!r}: the ensemble tunes its TPT members' prompts (or, as the simple "
            "ensemble, combines their view logits) and never runs a member's view-ensemble mode; expected "
            "false (the view-ensemble is TPT's own: tttlab-memo-tpt-tpt ensemble=true)"
        )


def combine(
    logits: Sequence[torch.Tensor], temperatures: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, weights)`` of the formula above for per-member view logits (n_i, classes)."""
    sizes = {int(z.shape[-1]) for z in logits}
    if len(sizes) != 1:
        raise ConfigError(
            f"ensemble members predict different numbers of classes {sorted(sizes)}; expected one"
        )
    logps, ents = [], []
    for z, t in zip(logits, temperatures):
        a = torch.logsumexp(z.float(), 0) - math.log(z.shape[0])
        a = a.clamp_min(torch.finfo(a.dtype).min) / float(t)
        logp = a.log_softmax(-1)
        logps.append(logp)
        ents.append(-(logp.exp() * logp).sum())
    h = torch.stack(ents).detach()
    w = h.sum() / h.clamp_min(1e-12)
    w = w / w.sum()
    m = sum(wi * lp for wi, lp in zip(w, logps))
    return m, w


def ensemble_loss(m: torch.Tensor) -> torch.Tensor:
    return -(m.exp() * m).sum()


class Ensemble:
    """Members (:class:`Memo` / :class:`TPT`) adapted together on one image per call."""

    def __init__(self, members: Sequence[Memo | TPT], temperatures: Sequence[float] | None = None,
                 steps: int = 1, simple: bool = False):  # fmt: skip
        if not members:
            raise ConfigError("an ensemble needs at least one member")
        temperatures = [1.0] * len(members) if temperatures is None else list(temperatures)
        if len(temperatures) != len(members):
            raise ConfigError(
                f"{len(temperatures)} temperatures for {len(members)} members; expected one each"
            )
        if any(t <= 0 for t in temperatures):
            raise ConfigError(f"temperatures must be > 0, got {temperatures}")
        for i, m in enumerate(members):
            if isinstance(m, TPT):
                check_member(f"members[{i}] (TPT): ", m.align_steps, m.ensemble)
        self.members, self.temperatures, self.steps, self.simple = (
            list(members),
            temperatures,
            int(steps),
            simple,
        )
        self.last_weights: torch.Tensor | None = None

    @property
    def adaptation_steps(self) -> int:
        """Ensemble steps per image, as records' ``step`` (each steps every member once); 0 for the simple
        ensemble (no backpropagation)."""
        return 0 if self.simple else self.steps

    def reset(self) -> None:
        for m in self.members:
            m.reset()

    def _member_logits(self, member, views, chosen: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """The member's logits of its selected views; with ``chosen``, a TPT member keeps the selection of
        its first call (TPT selects at step 0 only), a MEMO member selects anew."""
        logits = member.logits(views)
        if chosen is None or not isinstance(member, TPT):
            return logits[member.select(logits)]
        if id(member) not in chosen:
            chosen[id(member)] = member.select(logits)
        return logits[chosen[id(member)]]

    def __call__(self, image, reset: bool = True) -> torch.Tensor:
        """Log-weights ``m`` (1, classes) after adapting every member on ``image``."""
        if reset:
            self.reset()
        tpt_views = {id(m): m.views(image) for m in self.members if isinstance(m, TPT)}

        def views_of(member):
            return tpt_views[id(member)] if isinstance(member, TPT) else member.views(image)

        if self.simple:
            with torch.no_grad():
                m, self.last_weights = combine([self._member_logits(mb, views_of(mb)) for mb in self.members],
                                               self.temperatures)  # fmt: skip
            return m[None]
        chosen: dict[int, torch.Tensor] = {}  # TPT members: the views selected at step 0, kept (as TPT)
        for _ in range(self.steps):
            logits = [self._member_logits(mb, views_of(mb), chosen) for mb in self.members]
            m, self.last_weights = combine(logits, self.temperatures)
            loss = ensemble_loss(m)
            for mb in self.members:
                mb.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for mb in self.members:
                mb.optimizer.step()
        with torch.no_grad():
            originals = [mb.logits(mb.original(image)) if isinstance(mb, Memo) else mb.logits(tpt_views[id(mb)][:1])
                         for mb in self.members]  # fmt: skip
            m, _ = combine(originals, self.temperatures)
        return m[None]


# python -m tttlab.memo_tpt.ensemble: the tttlab-memo-tpt-ensemble command (it imported this module and did nothing)
if __name__ == "__main__":
    from tttlab.memo_tpt.main import ensemble_main

    ensemble_main()
