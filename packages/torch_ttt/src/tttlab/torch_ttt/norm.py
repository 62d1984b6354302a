"""Normalisation-layer helpers shared by the entropy-style engines (BN, TENT, EATA, DeYO, MEMO).

Upstream torch-ttt switched the whole model to train mode and only looked at ``BatchNorm2d``, so TENT
normalised with the training statistics it had stored, and models with BatchNorm1d/3d, GroupNorm or
LayerNorm were not adapted at all.  Here:

* :func:`batch_statistics` is a context in which every BatchNorm layer (1d/2d/3d, SyncBatchNorm)
  normalises with the statistics of the current batch and leaves its running statistics untouched
  (``training=True, track_running_stats=False`` for the duration), while dropout and every other layer
  stay in eval mode.  Nothing is mutated permanently, so resets are exact.
* :func:`check_batchnorm_values` tells, before any update, whether every BatchNorm layer gets more than
  one value per channel from a batch (what batch statistics need): a single image does for a
  BatchNorm2d (its spatial positions), not for a BatchNorm1d on flat ``(1, C)`` features.
* :func:`norm_affine_parameters` lists the affine weight/bias of BatchNorm, GroupNorm, LayerNorm and
  InstanceNorm layers: the parameters TENT-style methods adapt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from tttlab.core.errors import InvalidInputError

from .precision import full_precision

NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)
if hasattr(nn, "RMSNorm"):
    NORM_TYPES = NORM_TYPES + (nn.RMSNorm,)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]


def norm_affine_parameters(model: nn.Module, prefix: str = "model.") -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the affine weights and biases of every normalisation layer."""
    for name, module in norm_layers(model):
        for pname, p in module.named_parameters(recurse=False):
            if pname in ("weight", "bias"):
                yield f"{prefix}{name}.{pname}" if name else f"{prefix}{pname}", p


@contextlib.contextmanager
def batch_statistics(model: nn.Module, enabled: bool = True):
    """BatchNorm layers use the current batch's mean/variance; running statistics stay as they are."""
    if not enabled:
        yield
        return
    saved = []
    for _, bn in batchnorm_layers(model):
        saved.append((bn, bn.training, bn.track_running_stats))
        bn.training, bn.track_running_stats = True, False
    try:
        yield
    finally:
        for bn, training, track in saved:
            bn.training, bn.track_running_stats = training, track


def check_batchnorm_values(model: nn.Module, inputs: torch.Tensor, what: str = "inputs") -> None:
    """An :class:`InvalidInputError` naming the first BatchNorm layer that would get only one value per
    channel from ``inputs`` under :func:`batch_statistics` (train-mode BatchNorm cannot estimate a
    variance from it: PyTorch raises ``ValueError``); nothing otherwise.  Runs one forward without
    gradients in which each BatchNorm layer's input is checked before it is used; parameters, buffers and
    ``.grad`` are left as they are.  Callers run it under :func:`~tttlab.torch_ttt.precision.eager` for a
    compiled model (the checks are forward pre-hooks)."""
    layers = batchnorm_layers(model)
    if not layers:
        return

    def make_check(name, bn):
        def check(module, args):
            x = args[0]
            per_channel = x.numel() // max(x.shape[1], 1) if x.ndim >= 2 else x.numel()
            if per_channel <= 1:
                raise InvalidInputError(
                    f"{what}: BatchNorm layer {name!r} ({type(bn).__name__}) gets an input of shape "
                    f"{tuple(x.shape)}, one value per channel; normalising with batch statistics needs more "
                    f"than one value per channel (batch size x spatial positions > 1): use a batch of at "
                    f"least 2 samples"
                )

        return check

    handles = [bn.register_forward_pre_hook(make_check(name, bn)) for name, bn in layers]
    try:
        with torch.no_grad(), batch_statistics(model):
            model(inputs)
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def prior_mixed_statistics(model: nn.Module, prior_strength: float):
    """MEMO's BN adaptation (the prior of Schneider et al. 2020): normalise with
    ``w * source + (1 - w) * test`` mean and variance, ``w = N / (N + 1)``, N = ``prior_strength``
    (MEMO uses N = 16), test statistics from the current batch (for MEMO: the augmented views).

    Implemented by temporarily replacing each BatchNorm layer's forward; running buffers are untouched.
    ``prior_strength=inf`` keeps the source statistics; ``0`` uses the test batch only.

    As the MEMO code (and the bethgelab code it took the layer from): the test statistics are the batch
    mean and the *unbiased* batch variance (what ``F.batch_norm`` writes into running buffers with momentum
    1), and they are constants for autograd: no gradient flows through them, only through the normalised
    input and the affine parameters.  (A batch with one value per channel, e.g. BatchNorm1d on one image,
    has no unbiased variance; its variance term is then 0.)
    """
    import math

    patched = []

    def make_forward(bn):
        def forward(x):
            dims = [0] + list(range(2, x.ndim))
            with torch.no_grad():  # constants, as the running-buffer update the MEMO code reads them from
                count = x.numel() // max(x.shape[1], 1)
                batch_mean = x.mean(dim=dims)
                batch_var = x.var(dim=dims, correction=1 if count > 1 else 0)
            if bn.running_mean is None or math.isinf(prior_strength):
                mean, var = (
                    (bn.running_mean, bn.running_var)
                    if bn.running_mean is not None
                    else (batch_mean, batch_var)
                )
            else:
                w = prior_strength / (prior_strength + 1.0)
                mean = w * bn.running_mean + (1 - w) * batch_mean
                var = w * bn.running_var + (1 - w) * batch_var
            shape = [1, -1] + [1] * (x.ndim - 2)
            y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
            if bn.weight is not None:
                y = y * bn.weight.view(shape) + bn.bias.view(shape)
            return y

        return forward

    for _, bn in batchnorm_layers(model):
        patched.append(bn)
        bn.forward = make_forward(bn)
    try:
        yield
    finally:
        for bn in patched:
            del bn.forward


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy of ``softmax(logits)`` (natural log), computed stably (bfloat16 logits
    of ``amp="bf16"`` in float32)."""
    logp = full_precision(logits).log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean predictive distribution over the leading (view) axis: MEMO's loss.

    ``logits`` (V, ..., C); the average of probabilities is formed in log space with logsumexp (bfloat16
    logits in float32).
    """
    logp = full_precision(logits).log_softmax(dim=-1)
    avg = torch.logsumexp(logp, dim=0) - torch.log(torch.tensor(float(logits.shape[0]), device=logits.device))
    return -(avg.exp() * avg).sum(dim=-1)
