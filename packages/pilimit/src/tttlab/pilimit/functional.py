"""The maths of an infinite-width pi-layer: the ReLU V transform and the layer's forward/backward.

Paper: Yang, Santacroce, Hu, "Efficient Computation of Deep Nonlinear Infinite-Width Neural Networks that
Learn Features", ICLR 2022 (bibtex key ``yang2022pinets``); upstream ``pilimit_lib/inf/{math,functional}.py``
of github.com/santacml/pilim (facts only; this is our own code).

A pi-layer maps an r-dimensional Gaussian "representation" ``g`` (batch x r) of the previous layer's
pre-activations to the next one::

    s = |g|,  gbar = g / s,  q = gbar B^T  (batch x M),  out = [V(q) * s * Amult] A        (batch x r_out)
    V(c) = (sqrt(1 - c^2) + c * acos(-c)) / (2 pi)        E[relu(u) relu(v)] for unit Gaussians, corr c

``B`` (M x r) has unit rows, ``A`` (M x r_out), ``Amult`` (M).  Its derivative with respect to ``g``:
``d out / d g = sum_m Amult_m A_m (F11(q_m) B_m + F02(q_m) gbar)`` with ``F11 = V' = acos(-c)/(2 pi)`` and
``F02 = V - c V' = sqrt(1 - c^2)/(2 pi)`` (the ``s`` factors cancel).

Two paths compute the same numbers:

* :class:`PiLinearChunked` (default) loops over the M rows in chunks of ``chunk_size``: the batch x M
  matrices never exist whole; the backward takes ``sqrt(1-q^2)``/``acos(-q)`` of the first chunks from a
  cache of at most ``cache_bytes`` filled by the forward and recomputes the rest, so the working memory
  is O(batch x chunk_size) + ``cache_bytes`` whatever M is (``cache_bytes=0``: O(batch x chunk_size));
* :class:`PiLinearReference` is the straightforward transcription (full ``q`` kept for the backward,
  ``A^T * Amult`` materialised), the baseline of ``benchmarks/bench_pilimit.py``.

Both hand the layer its "pi gradient" in the backward: the rows an SGD step appends (``grad_out * s`` to
A, ``gbar`` to B), through the ``sink`` callable.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

TWO_PI = 2.0 * math.pi
_TINY = 1e-30


def _v(c: torch.Tensor) -> torch.Tensor:
    c = c.clamp(-1.0, 1.0)
    return (torch.sqrt((1.0 - c * c).clamp_min(0.0)) + c * torch.acos(-c)) / TWO_PI


class _VTransform(torch.autograd.Function):
    """V with the stable derivative ``V'(c) = acos(-c)/2pi`` (autograd of the closed form is inf - inf
    at ``|c| = 1``); twice differentiable through :func:`v_prime`."""

    @staticmethod
    def forward(ctx, c):
        ctx.save_for_backward(c)
        return _v(c)

    @staticmethod
    def backward(ctx, grad):
        (c,) = ctx.saved_tensors
        return grad * v_prime(c)


def v_transform(c: torch.Tensor) -> torch.Tensor:
    """``V(c) = (sqrt(1-c^2) + c acos(-c)) / 2pi``: E[relu(u) relu(v)] for standard Gaussians of
    correlation ``c`` (the arc-cosine kernel of degree 1, halved); differentiable (``V' = acos(-c)/2pi``,
    finite at ``|c| = 1``)."""
    return _VTransform.apply(c)


def v_prime(c: torch.Tensor) -> torch.Tensor:
    """``F11(c) = V'(c) = acos(-c) / 2pi`` (E[relu'(u) relu'(v)])."""
    return torch.acos((-c).clamp(-1.0, 1.0)) / TWO_PI


def f02(c: torch.Tensor) -> torch.Tensor:
    """``F02(c) = V(c) - c V'(c) = sqrt(1-c^2) / 2pi``."""
    return torch.sqrt((1.0 - c * c).clamp_min(0.0)) / TWO_PI


def pi_layer_closed_form(
    g: torch.Tensor, A: torch.Tensor, Amult: torch.Tensor, B: torch.Tensor
) -> torch.Tensor:
    """The layer in plain autograd ops (for tests and tiny MAML kernels): ``[V(gbar B^T) s Amult] A``."""
    s = g.norm(dim=1, keepdim=True).clamp_min(_TINY)
    q = (g / s) @ B.T
    return (v_transform(q) * s * Amult) @ A


def pi_update_norm(a_rows: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
    """Norm of the function an update adds (rows ``a_rows`` b x r_out, unit ``b_rows`` b x r):
    ``sqrt(tr(A^T V(B B^T) A))`` (the clip norm of upstream's per-parameter clipping)."""
    a, b = a_rows.float(), b_rows.float()
    k = v_transform(b @ b.T)
    return torch.sqrt(((a @ a.T) * k).sum().clamp_min(0.0))


def _normalise(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = g.norm(dim=1, keepdim=True).clamp_min(_TINY)
    return g / s, s


def _chunks(m: int, chunk: int | None):
    step = m if not chunk or chunk >= m else int(chunk)
    for lo in range(0, m, max(step, 1)):
        yield lo, min(lo + step, m)


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    """float64 if anything is float64, else float32 (the accumulators of low-precision storage)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _sqrt_acos(q: torch.Tensor, ct: torch.dtype):
    """``(q, sqrt(1-q^2), acos(-q))`` in ``ct`` with few temporaries."""
    q = q.to(ct).clamp_(-1.0, 1.0)
    sq = torch.mul(q, q).neg_().add_(1.0).clamp_min_(0.0).sqrt_()
    ac = torch.neg(q).acos_()
    return q, sq, ac


def _acc_matmul(acc: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """``acc += x @ w`` with ``acc``/``x`` in the compute dtype and ``w`` in its storage dtype.  Under
    autocast the product is the out-of-place ``x @ w`` (autocast casts it to bfloat16; an in-place
    ``addmm_`` is an op autocast leaves alone), accumulated in ``acc``'s dtype."""
    if w.dtype == acc.dtype and not torch.is_autocast_enabled(acc.device.type):
        acc.addmm_(x, w)
    else:
        acc.add_((x.to(w.dtype) @ w).to(acc.dtype))


# ----------------------------------------------------------------------------------------------------------
# torch.compile targets: one chunk's elementwise work written out of place (inductor fuses it into one loop
# over the batch x chunk block, next to the chunk's matmul).  The eager path keeps its in-place code above
# (bitwise unchanged); these are used only when a layer is given compiled kernels (``compile=true``).


def phi_chunk(gb: torch.Tensor, Bc: torch.Tensor, Am: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``V(gbar B_c^T) * Amult_c * s`` of one chunk in ``s``'s dtype."""
    q = (gb @ Bc.T).to(s.dtype).clamp(-1.0, 1.0)
    return (q * torch.acos(-q) + (1.0 - q * q).clamp_min(0.0).sqrt()) * (Am.to(s.dtype) / TWO_PI) * s


def phi_chunk_cached(gb, Bc, Am, s):
    """:func:`phi_chunk` and the chunk's ``(sqrt(1-q^2), acos(-q))`` for the backward's cache."""
    q = (gb @ Bc.T).to(s.dtype).clamp(-1.0, 1.0)
    sq, ac = (1.0 - q * q).clamp_min(0.0).sqrt(), torch.acos(-q)
    return (q * ac + sq) * (Am.to(s.dtype) / TWO_PI) * s, sq, ac


def grad_chunk(go, Ac, Am, sq, ac):
    """One chunk of the backward from cached ``sq``/``ac``: ``(dgamma * acos(-q), sum_m dgamma sqrt(1-q^2))``."""
    dgamma = (go @ Ac.T).to(sq.dtype) * (Am.to(sq.dtype) / TWO_PI)
    return dgamma * ac, (dgamma * sq).sum(1, keepdim=True)


def grad_chunk_recompute(go, Ac, Am, gb, Bc, like):
    """:func:`grad_chunk` with ``q`` recomputed from ``gbar`` and the chunk's B rows (``like``: the dtype)."""
    q = (gb @ Bc.T).to(like.dtype).clamp(-1.0, 1.0)
    dgamma = (go @ Ac.T).to(like.dtype) * (Am.to(like.dtype) / TWO_PI)
    return dgamma * torch.acos(-q), (dgamma * (1.0 - q * q).clamp_min(0.0).sqrt()).sum(1, keepdim=True)


class ChunkKernels:
    """The four chunk functions, each passed through ``torch.compile(..., dynamic=True)``: M grows by the
    batch size every step and the last chunk is shorter, so the row count is a symbolic size (one graph
    per function and dtype/autocast state, not one per M).  ``compile_kwargs``: more ``torch.compile``
    arguments (``mode``)."""

    def __init__(self, **compile_kwargs):
        self.phi = torch.compile(phi_chunk, dynamic=True, **compile_kwargs)
        self.phi_cached = torch.compile(phi_chunk_cached, dynamic=True, **compile_kwargs)
        self.grad = torch.compile(grad_chunk, dynamic=True, **compile_kwargs)
        self.grad_recompute = torch.compile(grad_chunk_recompute, dynamic=True, **compile_kwargs)


def chunked_forward(
    gbar, s, A, Amult, B, chunk_size: int | None, cache_bytes: int = 0, cache=None, kernels=None
) -> torch.Tensor:
    """``[V(gbar B^T) s Amult] A`` accumulated over row chunks (float32 accumulator).  With ``cache`` (a
    list), the chunks' ``(sqrt(1-q^2), acos(-q))`` are kept for the backward while they fit in
    ``cache_bytes``; the rest is recomputed there.  ``kernels``: a :class:`ChunkKernels` (compiled chunk
    functions) or None (eager)."""
    ct = _compute_dtype(gbar, A, B)
    out = torch.zeros(gbar.shape[0], A.shape[1], dtype=ct, device=gbar.device)
    gb = gbar.to(B.dtype)
    s32 = s.to(ct)
    used = 0
    for lo, hi in _chunks(A.shape[0], chunk_size):
        if kernels is not None:
            if cache is not None and used + 2 * gb.shape[0] * (hi - lo) * s32.element_size() <= cache_bytes:
                phi, sq, ac = kernels.phi_cached(gb, B[lo:hi], Amult[lo:hi], s32)
                cache.append((sq, ac))
                used += 2 * sq.numel() * sq.element_size()
            else:
                cache = None
                phi = kernels.phi(gb, B[lo:hi], Amult[lo:hi], s32)
            _acc_matmul(out, phi, A[lo:hi])
            continue
        q, sq, ac = _sqrt_acos(gb @ B[lo:hi].T, ct)
        if cache is not None:  # a prefix of the chunks, in order
            size = 2 * sq.numel() * sq.element_size()
            if used + size <= cache_bytes:
                cache.append((sq, ac))
                used += size
            else:
                cache = None
        phi = q.mul_(ac).add_(sq).mul_(Amult[lo:hi].to(ct) / TWO_PI).mul_(s32)  # V(q) Amult s
        _acc_matmul(out, phi, A[lo:hi])
    return out


def chunked_backward(
    grad_out, gbar, A, Amult, B, chunk_size: int | None, cache=(), kernels=None
) -> torch.Tensor:
    """``d out / d g`` contracted with ``grad_out``; ``q`` from ``cache`` or recomputed per chunk."""
    ct = _compute_dtype(gbar, A, B, grad_out)
    grad_g = torch.zeros(gbar.shape[0], B.shape[1], dtype=ct, device=gbar.device)
    coef = torch.zeros(gbar.shape[0], 1, dtype=ct, device=gbar.device)
    go = grad_out.to(A.dtype)
    gb = gbar.to(B.dtype)
    for i, (lo, hi) in enumerate(_chunks(A.shape[0], chunk_size)):
        if kernels is not None:
            if i < len(cache):
                x, c = kernels.grad(go, A[lo:hi], Amult[lo:hi], *cache[i])
            else:
                x, c = kernels.grad_recompute(go, A[lo:hi], Amult[lo:hi], gb, B[lo:hi], coef)
            coef.add_(c)
            _acc_matmul(grad_g, x, B[lo:hi])
            continue
        if i < len(cache):
            sq, ac = cache[i]
        else:
            _, sq, ac = _sqrt_acos(gb @ B[lo:hi].T, ct)
        dgamma = (go @ A[lo:hi].T).to(ct).mul_(Amult[lo:hi].to(ct) / TWO_PI)
        coef.add_((dgamma * sq).sum(1, keepdim=True))
        _acc_matmul(grad_g, dgamma.mul_(ac), B[lo:hi])
    return grad_g.add_(coef * gbar.to(ct))


def _chunking(chunking) -> tuple[int | None, int, ChunkKernels | None]:
    """``chunk_size``, ``(chunk_size, cache_bytes)`` or ``(chunk_size, cache_bytes, kernels)``."""
    if isinstance(chunking, tuple):
        return chunking[0], int(chunking[1]), (chunking[2] if len(chunking) > 2 else None)
    return chunking, 0, None


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type``, or None (the backward re-enters it, as
    ``torch.amp.custom_bwd`` does: the backward of these functions runs under the forward's autocast)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _autocast(device_type: str, dtype: torch.dtype | None):
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


Sink = Callable[[torch.Tensor, torch.Tensor], None]


class PiLinearChunked(torch.autograd.Function):
    """``out = [V(gbar B^T) s Amult] A``; backward to ``g`` in chunks, pi-gradient rows to ``sink``.

    Arguments: ``g`` (batch x r), ``anchor`` (a 0-element tensor requiring grad so that the backward runs
    even when ``g`` needs no gradient), ``A, Amult, B`` (the layer's rows, constants here),
    ``chunk_size`` (None: one chunk), ``sink`` (called with ``(grad_out * s, gbar)``; may be None).
    """

    @staticmethod
    def forward(ctx, g, anchor, A, Amult, B, chunking, sink):
        gbar, s = _normalise(g)
        chunk_size, cache_bytes, kernels = _chunking(chunking)
        cache = [] if (cache_bytes > 0 and sink is not None) else None  # a backward will follow
        out = chunked_forward(gbar, s, A, Amult, B, chunk_size, cache_bytes, cache, kernels).to(g.dtype)
        ctx.save_for_backward(gbar, s)
        ctx.rows = (A, Amult, B)
        ctx.chunk_size, ctx.sink, ctx.cache, ctx.kernels = chunk_size, sink, cache or (), kernels
        ctx.amp = _autocast_dtype(g.device.type)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gbar, s = ctx.saved_tensors
        A, Amult, B = ctx.rows
        grad_g = None
        if ctx.needs_input_grad[0]:
            with _autocast(gbar.device.type, ctx.amp):
                grad_g = chunked_backward(
                    grad_out, gbar, A, Amult, B, ctx.chunk_size, ctx.cache, ctx.kernels
                ).to(gbar.dtype)
        ctx.cache = ()
        if ctx.sink is not None:
            ctx.sink(grad_out.detach() * s, gbar.detach())
        return grad_g, None, None, None, None, None, None


class PiLinearReference(torch.autograd.Function):
    """The straightforward path: whole batch x M matrices, ``q`` stored for the backward (as upstream)."""

    @staticmethod
    def forward(ctx, g, anchor, A, Amult, B, chunking, sink):
        gbar, s = _normalise(g)
        ct = _compute_dtype(gbar, A, B)
        q = gbar.to(B.dtype) @ B.T
        qf = q.to(ct)
        v = (torch.sqrt((1 - qf**2).clamp_min(0)) + torch.acos((-qf).clamp(-1, 1)) * qf) / TWO_PI
        out = ((v * s.to(ct) * Amult.to(ct)).to(A.dtype) @ A).to(g.dtype)
        ctx.save_for_backward(gbar, s, q)
        ctx.rows = (A, Amult, B)
        ctx.sink = sink
        ctx.amp = _autocast_dtype(g.device.type)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with _autocast(grad_out.device.type, ctx.amp):
            return PiLinearReference._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        gbar, s, q = ctx.saved_tensors
        A, Amult, B = ctx.rows
        grad_g = None
        if ctx.needs_input_grad[0]:
            ct = _compute_dtype(gbar, A, B, grad_out)
            qf = q.to(ct)
            dgamma = (grad_out.to(A.dtype) @ (A.T * Amult.to(A.dtype))).to(ct)
            f11 = torch.acos((-qf).clamp(-1, 1)) / TWO_PI
            f02_ = torch.sqrt((1 - qf**2).clamp_min(0)) / TWO_PI
            grad_g = (dgamma * f11).to(B.dtype) @ B
            grad_g = (grad_g.to(ct) + torch.einsum("bm,bm,br->br", f02_, dgamma, gbar.to(ct))).to(gbar.dtype)
        if ctx.sink is not None:
            ctx.sink(grad_out.detach() * s, gbar.detach())
        return grad_g, None, None, None, None, None, None


IMPLS = {"chunked": PiLinearChunked, "reference": PiLinearReference}
