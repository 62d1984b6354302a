"""The maths shared by MEMO, TPT and the ensemble: entropies, confidence selection, the BN prior.

* :func:`marginal_entropy`: entropy of ``p = mean_b softmax(z_b)`` formed in log space
  (``log p = logsumexp_b log_softmax(z_b) - log B``, clamped at ``finfo.min`` as upstream), MEMO's and
  TPT's loss (upstream MEMO's ``marginal_entropy`` and TPT's ``avg_entropy`` compute the same);
* :func:`select_confident`: indices of the ``fraction`` of views with the lowest prediction entropy
  (TPT's confidence selection, 10% = 6 of 64; seed 002's top-k MEMO);
* :func:`bn_prior`: MEMO's BatchNorm adaptation (Schneider et al. 2020): normalise with
  ``p * source + (1 - p) * test`` statistics, ``p = N / (N + 1)``.  As upstream MEMO, the test statistics
  are the batch's mean and unbiased variance taken without gradient (upstream computes them with a
  ``batch_norm`` call in training mode with momentum 1 into scratch buffers), so gradients reach the
  parameters only through the normalised activations.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tttlab.core.errors import ConfigError, InvalidInputError

__all__ = ["bn_prior", "entropy", "marginal_entropy", "marginal_log_probs", "select_confident"]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy (nats) of ``softmax(logits)``."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def marginal_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log mean_b softmax(logits_b)`` over the leading axis, by logsumexp, clamped below at the dtype's
    most negative finite value as upstream MEMO and TPT do (a class with probability 0 in every view, e.g. a
    ``-inf`` logit, then adds 0 to the entropy instead of ``0 * -inf = nan``)."""
    logp = logits.float().log_softmax(-1)
    avg = torch.logsumexp(logp, 0) - math.log(logits.shape[0])
    return avg.clamp_min(torch.finfo(avg.dtype).min)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the marginal (view-averaged) prediction of ``logits`` (views, classes)."""
    avg = marginal_log_probs(logits)
    return -(avg.exp() * avg).sum(-1)


def check_rates(**values) -> None:
    """Learning rates, decays, momenta, prior strengths: ``None`` (the default) or a finite number >= 0."""
    for key, v in values.items():
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf
        ):
            raise ConfigError(f"{key}={v!r}; expected a finite number >= 0")


def check_selection(key: str, value) -> None:
    """``None``, a fraction (float) or a count (int) of views; strings and the like are ConfigErrors."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{key}={value!r}; expected a fraction in (0, 1], a number of views, or null")
    # what select_confident refuses, refused when the method is built, not at its first image (an
    # evaluate or paper run used to load its model and data first)
    if isinstance(value, int) and value < 1:
        raise ConfigError(f"{key}={value!r}; expected a number of views >= 1, a fraction in (0, 1], or null")
    if isinstance(value, float) and not value > 0:  # NaN too
        raise ConfigError(f"{key}={value!r}; expected a fraction in (0, 1], a number of views >= 1, or null")


def select_confident(logits: torch.Tensor, fraction: float | int | None) -> torch.Tensor:
    """Indices of the ``fraction`` (float in (0, 1]) or ``fraction`` views (int) with the lowest entropy,
    most confident first; all views when ``fraction`` is None or 1.0.  TPT keeps ``int(B * 0.1)``; at least
    one view is kept here (upstream TPT and seed 002 keep ``int(B * fraction)``, which is 0 views, a nan
    loss, for B * fraction < 1, e.g. fewer than 10 views at 10%; the same for every B >= 1 / fraction).
    Ties keep the view order (a stable sort; upstream's is not, so equal entropies may pick other views)."""
    n = logits.shape[0]
    if fraction is None or (isinstance(fraction, float) and fraction >= 1.0):
        return torch.arange(n, device=logits.device)
    if isinstance(fraction, float):
        if not 0 < fraction <= 1:
            raise InvalidInputError(f"selection fraction must be in (0, 1], got {fraction}")
        k = max(1, int(n * fraction))
    else:
        k = int(fraction)
        if not 1 <= k:
            raise InvalidInputError(f"selection count must be >= 1, got {fraction}")
        k = min(k, n)
    ent = entropy(logits.detach())
    return torch.argsort(ent, stable=True)[:k]


BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextlib.contextmanager
def bn_prior(model: nn.Module, prior: float | None, forwards: dict | None = None):
    """Within the block every BatchNorm of ``model`` normalises with ``prior * running + (1 - prior) *
    batch`` statistics (``prior`` = N / (N + 1); MEMO: N = 16).  ``prior=None`` leaves the model as it is
    (eval-mode BN); ``prior=1`` = source statistics; ``prior=0`` = the batch's.  Running buffers are not
    modified.  A layer that sees a single value per channel keeps its source statistics.

    ``forwards``: a dict kept by the caller (one per model and prior) that holds the patched forward of
    each layer, so that every use installs the same function objects (a compiled model's guards on them
    then hold instead of recompiling per call)."""
    if prior is None:
        yield model
        return
    if not 0 <= prior <= 1:
        raise InvalidInputError(f"BN prior must be in [0, 1] (N / (N + 1)), got {prior}")
    layers = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.running_mean is not None]

    def make(bn):
        def forward(x):
            dims = [0, *range(2, x.ndim)]
            count = x.numel() // x.shape[1]
            if count > 1:
                with torch.no_grad():
                    xf = x.detach().float()
                    mean = prior * bn.running_mean + (1 - prior) * xf.mean(dims)
                    var = prior * bn.running_var + (1 - prior) * xf.var(dims, unbiased=True)
            else:
                mean, var = bn.running_mean, bn.running_var
            return F.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)

        return forward

    for bn in layers:
        bn.forward = make(bn) if forwards is None else forwards.setdefault(bn, make(bn))
    try:
        yield model
    finally:
        for bn in layers:
            del bn.forward
