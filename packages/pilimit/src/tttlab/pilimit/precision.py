"""The ``amp`` and ``compile`` options of every pilimit train/evaluate loop (tttlab DESIGN "Scale out").

``amp``: ``none`` (default) | ``bf16`` -- core's :func:`tttlab.core.torch.autocast`,
``torch.autocast(device.type, dtype=torch.bfloat16)``, around the
forward and the loss of each training step, the test-set accuracy, MAML's inner loop and few-shot
evaluation, transfer features and the evaluate contract's prediction; the backward runs after the context
(as torch recommends), and the pi-layers' custom backward re-enters the forward's autocast itself (as
``torch.amp.custom_bwd`` does).  What autocast turns into bfloat16 (checked op by op in
``tests/test_precision.py``): every matrix product -- the input layer's ``x A``, every pi-layer's
``gbar B^T`` chunk product and its accumulating product ``phi A`` (backward: ``grad_out A^T`` and
``dgamma B``), the finite and muP nets' linear layers (with their relu and scaling, forward and backward)
and MAML's kernel ``f f'^T`` together with its V transform.  In the pi-layers the V transform, its
derivative and the accumulators stay float32 (the chunk code converts ``q`` to float32 before V; the
products' bfloat16 results are added into float32 accumulators), and so do the parameters, the
pi-layer rows of float32 storage (the appended rows are float32), the optimizer (PiSGD keeps no state)
and the loss (computed on the logits cast to float32).  ``model.dtype`` is a different knob: the *storage* of the pi-layers' A/B rows (memory, which
grows every step); with ``model.dtype=bfloat16`` the chunk products already run in bfloat16 without
autocast.  ``amp=bf16`` with ``model.dtype=float16`` is refused: autocast would recast the float16 rows
to bfloat16 in every product.

``compile``: ``false`` (default) | ``true`` (torch's default mode) | a ``torch.compile`` mode (``default``,
``reduce-overhead``, ``max-autotune``, ``max-autotune-no-cudagraphs``; core's
:func:`~tttlab.core.torch.compile_kwargs`: passed as ``mode=``; not measured on a GPU for this package) --
``torch.compile`` of what dominates the time:

* infinite pi-net: the per-chunk work of the chunked pi-layers (``gbar B_c^T``, V, the Amult and
  ``s`` factors; backward: ``grad_out A_c^T`` with the V' and sqrt(1-q^2) factors), compiled with
  ``dynamic=True`` because M grows by the batch size every step and the last chunk is shorter: one graph
  per function, dtype and autocast state, not one per M.  The loop over chunks, the accumulating matmuls
  and the row appends stay eager (the rows live in a buffer that grows in place; a compiled graph of the
  whole net would be re-traced at every step).  ``model.impl=reference`` (the uncompiled baseline) is
  refused.
* finite pi-net / muP: ``features`` and ``readout`` (forward and, through AOTAutograd, backward); Gproj
  and PiSGD stay eager.

Neither key is part of a checkpoint's identity except ``amp`` (it changes the numbers: a run resumed
with another ``amp`` is refused, and the evaluate contract caches one model per ``amp``); ``compile``
gives the eager numbers to float rounding, like ``model.chunk_size``, and may resume either way.
"""

from __future__ import annotations

from tttlab.core.errors import ConfigError
from tttlab.core.torch import AMP_MODES, autocast, check_amp, check_compile, compile_kwargs

__all__ = ["AMP_MODES", "autocast", "check", "compile_net"]


def check(amp, compile_, model_dtype: str | None = None, impl: str | None = None) -> tuple[str, bool | str]:
    """``(amp, compile)`` checked by core (:func:`tttlab.core.torch.check_amp` / ``check_compile``: a
    ConfigError naming the key and the allowed values; ``compile`` comes back as ``False``, ``True`` or a
    mode's name), plus pilimit's combinations: ``amp=bf16`` with float16 rows, ``compile`` with the
    reference pi-layers."""
    amp, compile_ = check_amp(amp), check_compile(compile_)
    if amp == "bf16" and model_dtype == "float16":
        raise ConfigError(
            "amp='bf16' with model.dtype='float16': autocast would recast the float16 rows to bfloat16 in "
            "every product; use model.dtype=bfloat16 (or float32) with amp=bf16"
        )
    if compile_ and impl == "reference":
        raise ConfigError(
            f"compile={str(compile_).lower()} with model.impl='reference': only the chunked pi-layers have "
            "compiled kernels (the reference path is the uncompiled baseline); use model.impl=chunked"
        )
    return amp, compile_


def compile_net(net, compile_=True) -> None:
    """Apply the ``compile`` option (``true``: torch's default mode, or a mode's name; ``false``: nothing) to
    an :class:`InfMLP` (chunk kernels) or :class:`FinPiMLP` (features/readout)."""
    from .nets import FinPiMLP, InfMLP

    kwargs = compile_kwargs(compile_)
    if kwargs is None:
        return
    if isinstance(net, InfMLP):
        net.compile_kernels(**kwargs)
    elif isinstance(net, FinPiMLP):
        net.compile_forward(**kwargs)
    else:  # pragma: no cover - build_model makes one of the two
        raise ConfigError(f"compile=true: no compile target for {type(net).__name__}")
