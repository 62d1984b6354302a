"""Mixed precision and ``torch.compile`` options shared by TPT, MEMO, the ensemble and the tiny trainers.

``amp`` (one key for every entry point, as ttt_mae's ``amp: none | bf16``, plus the two values TPT's
upstream behaviour needs):

- ``auto`` (default): each method's upstream precision. TPT: fp16 autocast + ``GradScaler(init_scale=1000)``
  on CUDA, float32 on CPU (upstream TPT's ``torch.cuda.amp`` use); MEMO and the tiny trainers: float32
  (upstream MEMO has no mixed precision);
- ``none``: float32 everywhere (TPT on CUDA too);
- ``bf16``: ``torch.autocast(device.type, dtype=torch.bfloat16)`` on any device (CPU too), no GradScaler
  (bf16 has float32's exponent range); parameters, gradients and optimizer state stay float32;
- ``fp16``: TPT's upstream mode requested explicitly (fp16 autocast + GradScaler): CUDA and TPT only; a
  ConfigError elsewhere (MEMO and the ensemble have no GradScaler step; fp16 autocast on CPU is not what
  upstream ran).

``compile`` (``false`` | ``true`` | a ``torch.compile`` mode: ``default``, ``reduce-overhead``,
``max-autotune``, ``max-autotune-no-cudagraphs``; core's :func:`~tttlab.core.torch.compile_kwargs`):
``torch.compile`` (static shapes) of the part that runs per step, ``true`` in torch's default mode, a mode's
name in that mode (``reduce-overhead``: CUDA graphs; not measured on a GPU for this package); what that is
per method is in its module docstring (TPT: the image encoder and the prompt -> text-feature
path; MEMO: the classifier under the BN prior; the tiny trainers: the training loss).
"""

from __future__ import annotations

import contextlib

import torch

from tttlab.core.errors import ConfigError

# core's rules, re-exported
from tttlab.core.torch import COMPILE_MODES, check_compile, compile_kwargs  # noqa: F401

AMP_MODES = ("auto", "none", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(amp, device: torch.device, method: str) -> str:
    """``none`` | ``bf16`` | ``fp16``: what ``amp`` means for ``method`` (``tpt`` | ``memo`` | ``ensemble`` |
    ``train``) on ``device``.  ``True`` / ``False`` (TPT's earlier boolean) read as ``auto`` / ``none``."""
    if amp is True:
        amp = "auto"
    elif amp is False:
        amp = "none"
    if not isinstance(amp, str) or amp not in AMP_MODES:
        raise ConfigError(f"amp={amp!r}; expected one of {', '.join(AMP_MODES)} (auto: the method's upstream "
                          "precision; bf16: bfloat16 autocast on any device; fp16: TPT's CUDA fp16 + GradScaler)")  # fmt: skip
    if amp == "auto":
        return "fp16" if method == "tpt" and device.type == "cuda" else "none"
    if amp == "fp16":
        if method != "tpt":
            raise ConfigError(
                f"amp='fp16' for {method}: fp16 with a GradScaler is TPT's upstream CUDA mode only; expected "
                "auto, none or bf16"
            )
        if device.type != "cuda":
            raise ConfigError(
                f"amp='fp16' on device {device.type!r}: TPT's fp16 autocast + GradScaler runs on CUDA only; "
                "expected bf16 (or none) on the CPU"
            )
    return amp


def autocast(mode: str, device: torch.device):
    """The autocast context of a resolved ``mode`` (``none``: no context)."""
    if mode == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[mode])


def compile_fn(fn, compile=True):
    """``torch.compile`` with static shapes (one graph per view count; no dynamic-shape recompiles), in the
    mode the ``compile`` option names (``true``: torch's default mode); ``fn`` itself for ``false``."""
    kwargs = compile_kwargs(compile)
    if kwargs is None:
        return fn
    return torch.compile(fn, dynamic=False, **kwargs)
