"""Mixed precision (``amp``) and ``torch.compile`` for the engines and the entry points.

``amp``: ``"none"`` (default, float32 as before) | ``"bf16"``: ``torch.autocast(device.type,
dtype=torch.bfloat16)`` around the model's forwards and the losses computed from them (CPU and CUDA).
The parameters, their gradients, the optimizer state and the snapshot an engine restores stay float32;
gradients are computed and the optimizer steps outside the autocast region.  Loss reductions that a
bfloat16 rounding would blur (entropies, the contrastive similarities, covariances and feature
statistics, the reconstruction error) upcast their inputs to float32 (:func:`full_precision`), a no-op
for float32 inputs, so ``amp="none"`` is bit for bit the code without this option.  float16 is not
offered: it needs a gradient scaler, bfloat16 does not.

``compile`` (the entry points' option): ``false`` | ``true`` (torch's default mode) | a ``torch.compile`` mode
(``default``, ``reduce-overhead``, ``max-autotune``, ``max-autotune-no-cudagraphs``; core's
:func:`~tttlab.core.torch.compile_kwargs` turns it into ``engine.compile(**kwargs)``).
:meth:`BaseEngine.compile` compiles the *wrapped model* in place (``nn.Module.compile``,
which keeps its parameters and ``state_dict`` keys), not the engine: the engine's Python loop (snapshot,
optimizer, filters, resets) stays eager.  A compiled graph does not run forward hooks added after it was
traced (torch's ``skip_nnmodule_hook_guards``: they are silently skipped).  The forwards that stop at a
features layer (the adaptation of TTT, TTT++, ActMAD, masked TTT) therefore run a compiled ``torch.fx``
copy of the model truncated after that layer (:func:`tttlab.torch_ttt.heads.compile_features`); the
forwards that hook the whole model (their train mode, IT3's adaptation, which changes the features
layer's output) or replace layers' forward (MEMO's and BN's prior-mixed BatchNorm) run the eager model
(:func:`eager`); which ones is an engine's ``compiled_adaptation`` / ``compiled_prediction`` /
``compiled_features``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tttlab.core.torch import AMP_MODES, COMPILE_MODES, autocast, check_amp, check_compile, compile_kwargs

__all__ = [
    "AMP_MODES",
    "COMPILE_MODES",
    "autocast",
    "check_amp",
    "check_compile",
    "compile_kwargs",
    "eager",
    "full_precision",
    "is_compiled",
]

#: ``AMP_MODES``, ``COMPILE_MODES``, ``check_amp``, ``check_compile``, ``compile_kwargs`` and ``autocast``
#: are core's (one rule for every torch subpackage), re-exported here for the engines.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def full_precision(*tensors: torch.Tensor):
    """``tensors`` with bfloat16/float16 ones cast to float32 (others returned as they are: float32 inputs
    are the same objects, so ``amp="none"`` computes exactly what it did without this call).  One tensor
    in, one tensor out."""
    out = tuple(t.float() if t.dtype in LOW_PRECISION else t for t in tensors)
    return out[0] if len(out) == 1 else out


def no_autocast(t: torch.Tensor):
    """A context with autocast off on ``t``'s device (matrix products in float32 for float32 inputs)."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def is_compiled(model: nn.Module) -> bool:
    """True when ``model.compile()`` was called (``nn.Module.compile``: a compiled ``_call_impl``)."""
    return getattr(model, "_compiled_call_impl", None) is not None


@contextlib.contextmanager
def eager(model: nn.Module, enabled: bool = True):
    """``model(...)`` runs its eager forward inside the context (hooks added now run), compiled outside."""
    compiled = getattr(model, "_compiled_call_impl", None)
    if not enabled or compiled is None:
        yield
        return
    model._compiled_call_impl = None
    try:
        yield
    finally:
        model._compiled_call_impl = compiled
