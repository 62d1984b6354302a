"""Token mixers of MTTT: the TTT layer, linear attention and softmax self-attention (JAX / Flax linen).

Paper: Sun, Li, Dalal et al., "Learning to (Learn at Test Time)", 2023 (bibtex ``sun2023learning``).
Upstream: github.com/test-time-training/mttt (``inner_loop.py``).  Facts carried over, code rewritten.

TTT layer, per head h (``d_h = d / H``), tokens ``x_i`` (N x d):

* keys ``k_i = phi_h(x_i)``, queries ``q_j = psi_h(x_i)`` (d -> d_h, with bias);
* inner encoder ``f(.; W)``: ``mlp_1`` (one Dense d_h -> d_h) or ``mlp_2`` (d_h -> 4 d_h, GELU, 4 d_h -> d_h);
* decoder ``g_h`` (d_h -> d, no bias) plus a shared ``g_bias``, optionally a per-head LayerNorm over d;
* inner loss ``l(W) = 1/2 * H * mean_{i,c} (dec(f(k_i; W)) - x_i)_c^2`` (sum / (N d / H));
* T steps ``W <- W - eta_t grad_W l`` (full batch, or ``SGD``: tokens permuted per head, T minibatches);
* output ``z_j = sum_h h_h(f(q_j; W_T)) + h_bias``.

Checked against upstream and kept identical: the inner lr is a fixed config value per step (not a
learned parameter); the reconstruction target is the whole (pre-LN'd) token ``x_i`` decoded from the
``phi`` view by ``g`` (MTTT has no separate learned value view: ``g`` plays that role, ``psi`` is the
query/test view); the inner encoder has no residual connection and no LayerNorm of its own (the only
LayerNorm in the inner loss is the optional per-head decoder LN after ``g + g_bias``); W0 is one set of
per-head weights shared by every sequence, trained by the outer loop when ``train_init``; SGD permutes
tokens per head with the same order for every sequence of the batch; reported losses are the pre-step
(mini)batch losses plus the final full-sequence loss, summed over heads and averaged over the batch.

What differs from upstream (and why):

* Any number of inner steps (``lax.scan``; upstream unrolls by hand and silently stops at 4).
* Heads are batched into einsums instead of ``vmap``-ed Dense modules, and the inner gradient is written
  in closed form (hand-derived backward of Dense / GELU / LayerNorm / decoder) instead of a nested
  ``jax.grad``.  The outer gradient is still plain autodiff through the unrolled steps (second-order terms
  included): the closed form is made of ordinary differentiable ops.  Without the decoder LayerNorm the
  reconstruction residual is never formed: ``||z g + b - x||^2 = z (g g^T) z^T - 2 z.v + ||x - b||^2``
  with ``v = (x - b) g^T`` computed once, so each inner step costs O(N d_h^2) instead of O(N d d_h).
  A linear inner encoder without decoder LayerNorm (MTTT-Linear) goes further: the loss and gradient
  depend on the tokens only through ``K'^T [K', V]`` (``K' = [K, 1]``), computed once per minibatch, so
  every inner step and every reported inner loss costs O(d_h^3) whatever N (:func:`_linear_gram_loop`).
  Minor-axis sums are written as contractions (XLA:CPU runs those reductions far slower than dots).
* ``train_init=False`` stops the gradient into W0 inside the layer (upstream only masks the optimizer
  update); the training script also freezes it in the optimizer, so both behaviours coincide.
* Parameters are stored per head as stacked arrays (``psi_kernel`` is (H, d, d_h), ...); the names differ
  from upstream's, so upstream checkpoints do not load.
* The SGD token permutation is drawn per head (same for every sequence of the batch, as upstream) from
  the ``idx`` RNG stream; without that stream it falls back to a fixed key (deterministic evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .errors import MTTTConfigError

Array = jax.Array

LAYER_TYPES = ("TTT", "linear_attention", "self_attention")
INNER_ENCODERS = ("mlp_1", "mlp_2")
INNER_INITS = ("xavier_uniform", "zero")
NORMALIZERS = ("constant", "adaptive")
LN_EPS = 1e-6  # flax.linen.LayerNorm's default, as upstream

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class TTTConfig:
    """The ``inner.TTT`` options of upstream's configs (same names, same defaults: MTTT-MLP)."""

    inner_encoder: str = "mlp_2"
    inner_itr: int = 1
    inner_lr: Sequence[float] = (1.0,)
    train_init: bool = True
    inner_encoder_init: str = "xavier_uniform"
    inner_encoder_bias: bool = True
    decoder_LN: bool = True
    SGD: bool = False

    def __post_init__(self):
        if self.inner_encoder not in INNER_ENCODERS:
            raise MTTTConfigError(
                f"inner.TTT.inner_encoder={self.inner_encoder!r}; expected one of {INNER_ENCODERS}"
            )
        if self.inner_encoder_init not in INNER_INITS:
            raise MTTTConfigError(
                f"inner.TTT.inner_encoder_init={self.inner_encoder_init!r}; expected one of {INNER_INITS}"
            )
        if not isinstance(self.inner_itr, int) or isinstance(self.inner_itr, bool) or self.inner_itr < 1:
            raise MTTTConfigError(f"inner.TTT.inner_itr={self.inner_itr!r}; expected an integer >= 1")
        try:
            object.__setattr__(self, "inner_lr", tuple(float(v) for v in _as_tuple(self.inner_lr)))
        except (TypeError, ValueError):
            raise MTTTConfigError(
                f"inner.TTT.inner_lr={self.inner_lr!r}; expected a learning rate or a list of them"
            ) from None
        if not all(math.isfinite(v) for v in self.inner_lr):
            raise MTTTConfigError(f"inner.TTT.inner_lr={list(self.inner_lr)}; expected finite learning rates")
        if len(self.inner_lr) not in (1, self.inner_itr):
            raise MTTTConfigError(
                f"inner.TTT.inner_lr has {len(self.inner_lr)} entries for inner_itr={self.inner_itr}; "
                "give one learning rate per inner step, or one for all steps"
            )

    @property
    def lrs(self) -> tuple[float, ...]:
        """One inner learning rate per step (a single value is broadcast)."""
        return self.inner_lr * self.inner_itr if len(self.inner_lr) == 1 else self.inner_lr

    @classmethod
    def mttt_linear(cls, **kw) -> TTTConfig:
        """The paper's MTTT-Linear flags."""
        base = dict(inner_encoder="mlp_1", inner_encoder_init="zero", inner_encoder_bias=False,
                    decoder_LN=False, train_init=False)  # fmt: skip
        return cls(**{**base, **kw})


@dataclass(frozen=True)
class LinearAttentionConfig:
    """The ``inner.linear_attention`` options (upstream defaults: Katharopoulos et al.)."""

    elu: bool = True
    normalizer: str = "adaptive"

    def __post_init__(self):
        if self.normalizer not in NORMALIZERS:
            raise MTTTConfigError(
                f"inner.linear_attention.normalizer={self.normalizer!r}; expected one of {NORMALIZERS}"
            )


@dataclass(frozen=True)
class InnerConfig:
    """``inner``: which token mixer, and its options."""

    layer_type: str = "TTT"
    TTT: TTTConfig = field(default_factory=TTTConfig)
    linear_attention: LinearAttentionConfig = field(default_factory=LinearAttentionConfig)

    def __post_init__(self):
        if self.layer_type not in LAYER_TYPES:
            raise MTTTConfigError(f"inner.layer_type={self.layer_type!r}; expected one of {LAYER_TYPES}")

    @property
    def num_inner_losses(self) -> int:
        """Length of the inner-loss vector a block reports (T+1 for TTT, 2 ``inf`` for the baselines)."""
        return self.TTT.inner_itr + 1 if self.layer_type == "TTT" else 2

    @classmethod
    def from_dict(cls, d: Any) -> InnerConfig:
        if isinstance(d, InnerConfig):
            return d
        d = dict(d or {})
        ttt = d.pop("TTT", {}) or {}
        la = d.pop("linear_attention", {}) or {}
        ttt = ttt if isinstance(ttt, TTTConfig) else TTTConfig(**dict(ttt))
        la = la if isinstance(la, LinearAttentionConfig) else LinearAttentionConfig(**dict(la))
        return cls(TTT=ttt, linear_attention=la, **d)


def _as_tuple(v) -> tuple:
    if isinstance(v, (int, float)):
        return (v,)
    return tuple(v)


# --------------------------------------------------------------------------------------------------
# Closed-form pieces of the inner loop (pure functions, batched over (B, H))
# --------------------------------------------------------------------------------------------------


def gelu(x: Array) -> Array:
    """Tanh-approximate GELU (``flax.linen.gelu``'s default)."""
    return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


def gelu_grad(x: Array) -> Array:
    u = _SQRT_2_OVER_PI * (x + 0.044715 * x**3)
    t = jnp.tanh(u)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)


def encoder_apply(w: dict, z: Array, kind: str) -> tuple[Array, tuple]:
    """Inner encoder f(z; W) for every (batch, head): z (..., n, d_h) -> (..., n, d_h), plus a cache.

    ``w`` leaves carry the same leading dims as ``z`` minus the token/feature axes (kernels
    (..., in, out), biases (..., out)); missing biases mean ``inner_encoder_bias=False``.
    """
    y = jnp.einsum("...ni,...io->...no", z, w["kernel_0"])
    if "bias_0" in w:
        y = y + w["bias_0"][..., None, :]
    if kind == "mlp_1":
        return y, (z,)
    a = gelu(y)
    out = jnp.einsum("...ni,...io->...no", a, w["kernel_1"])
    if "bias_1" in w:
        out = out + w["bias_1"][..., None, :]
    return out, (z, y, a)


def encoder_grad(w: dict, cache: tuple, dout: Array, kind: str) -> dict:
    """d loss / d W of the inner encoder from ``dout`` = d loss / d f(z) (closed form)."""
    if kind == "mlp_1":
        (z,) = cache
        grads = {"kernel_0": jnp.einsum("...ni,...no->...io", z, dout)}
        if "bias_0" in w:
            grads["bias_0"] = dout.sum(-2)
        return grads
    z, y, a = cache
    grads = {"kernel_1": jnp.einsum("...ni,...no->...io", a, dout)}
    if "bias_1" in w:
        grads["bias_1"] = dout.sum(-2)
    dy = jnp.einsum("...no,...io->...ni", dout, w["kernel_1"]) * gelu_grad(y)
    grads["kernel_0"] = jnp.einsum("...ni,...no->...io", z, dy)
    if "bias_0" in w:
        grads["bias_0"] = dy.sum(-2)
    return grads


def _dot_last(a: Array, b: Array) -> Array:
    """``(a * b).sum(-1)`` as a contraction: XLA:CPU runs a reduction over the minor axis of a large array
    as a slow reduce fusion (15 ms instead of 0.4 ms at (6, 3136, 64)), a dot_general it runs well."""
    return jnp.einsum("...e,...e->...", a, jnp.broadcast_to(b, a.shape) if b.shape != a.shape else b)


def _sum_last(a: Array) -> Array:
    """``a.sum(-1)`` as a matrix-vector product (see :func:`_dot_last`)."""
    return a @ jnp.ones(a.shape[-1], a.dtype)


def layer_norm_fwd(o: Array, scale: Array, bias: Array) -> tuple[Array, tuple]:
    mu = o.mean(-1, keepdims=True)
    xc = o - mu
    var = (xc * xc).mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(var + LN_EPS)
    xhat = xc * rstd
    return xhat * scale + bias, (xhat, rstd)


def layer_norm_bwd(dy: Array, scale: Array, cache: tuple) -> Array:
    xhat, rstd = cache
    g = dy * scale
    return rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))


@dataclass(frozen=True)
class Decoder:
    """The reconstruction part of the inner loss, for per-head tokens of one step.

    The loss ``1/2 c sum_i |dec(z_i) - x_i|^2`` (``c = H / (n d)``) and its gradient with respect to the
    encoder output ``z`` (n x d_h per head) are computed without forming the n x d reconstruction:

    * without LayerNorm, ``|z g + b - x|^2 = z G z^T - 2 z.v + |x - b|^2`` with ``G = g g^T`` and
      ``v = (x - b) g^T`` precomputed once per layer;
    * with the per-head LayerNorm (scale s, bias beta), its mean and variance over the d features are
      ``z.(g 1)/d + mean(b)`` and ``(z G z^T + 2 z.(g b) + |b|^2)/d - mu^2``, and
      ``|LN(o) - x|^2 = rstd^2 |z g_s + (b - mu) s|^2 + 2 rstd (z.w + (b s).(beta - x) - mu s.(beta - x))
      + |beta - x|^2`` with ``g_s = g diag(s)`` and ``w = (beta - x) g_s^T`` precomputed;

    so an inner step costs O(n d_h^2) per head instead of O(n d d_h).  The gradient with respect to z of
    this per-token expression is written out (:meth:`_ln_token_losses_and_grad`); the gradient
    with respect to the inner weights is the closed form of :func:`encoder_grad`.  ``expand=False`` forms
    the residual directly (O(n d d_h); the tests check both forms against each other).
    """

    g_kernel: Array  # (H, d_h, d)
    g_bias: Array  # (d,)
    ln_scale: Array | None  # (H, d) or None
    ln_bias: Array | None
    num_heads: int
    expand: bool = True

    @property
    def use_ln(self) -> bool:
        return self.ln_scale is not None

    def gram(self) -> dict:
        """Per-head constants of the expanded loss (computed once per layer call)."""
        g, b = self.g_kernel, self.g_bias
        if not (self.use_ln and self.expand):
            return {"G": jnp.einsum("hed,hfd->hef", g, g)}
        s = self.ln_scale
        s2 = s * s
        bs = b * s
        d = g.shape[-1]
        # every per-token product of z the expansion needs comes out of one matmul z M per step:
        # M = g [g^T | (g s^2)^T | 1/d | b | s^2 | s^2 b] = [G | Gs | u | gb | q | p]  (H, d_h, 2 d_h + 4)
        cols = jnp.stack([jnp.full_like(s, 1.0 / d), jnp.broadcast_to(b, s.shape), s2, s2 * b], 1)
        out = {"M": jnp.einsum("hed,hfd->hef", g, jnp.concatenate([g, g * s2[:, None, :], cols], 1))}
        out.update(
            bbar=_dot_last(b, jnp.full_like(b, 1.0 / d)), bsq=_dot_last(b, b), bs2=_dot_last(bs, bs),
            bss=_dot_last(bs, s), ss=_dot_last(s, s),
        )  # fmt: skip
        return out

    def target_kernel(self) -> Array | None:
        """Per-head columns ``K`` (H, d, k) such that the targets need ``x`` only through ``x K``.

        Without LayerNorm ``K = g^T`` (k = d_h); with it ``K = [g_s^T | b s | s | beta]`` (k = d_h + 3).
        """
        if self.use_ln and not self.expand:
            return None
        if not self.use_ln:
            return jnp.swapaxes(self.g_kernel, 1, 2)
        s, beta, b = self.ln_scale, self.ln_bias, self.g_bias
        gs = self.g_kernel * s[:, None, :]
        vecs = jnp.stack([b * s, s, beta], -1)  # (H, d, 3)
        return jnp.concatenate([jnp.swapaxes(gs, 1, 2), vecs], -1)

    def targets(self, x: Array, xk: Array | None = None) -> dict:
        """Per-token targets of the inner loss from the block input ``x`` (B, N, d).

        ``xk``: ``x @ target_kernel()`` (B, H, N, k) when the caller computed it already.  Returned arrays
        are indexed (B, H, N, ...) or broadcastable to it, ready to be permuted/split.
        """
        if self.use_ln and not self.expand:
            return {"x": x[:, None]}  # (B, 1, N, d)
        if xk is None:
            xk = jnp.einsum("bnd,hdk->bhnk", x, self.target_kernel())
        dh = self.g_kernel.shape[1]
        if self.use_ln:
            s, beta, b = self.ln_scale, self.ln_bias, self.g_bias
            gs = self.g_kernel * s[:, None, :]
            # x.(b s), x.s, x.beta per head, and the constants (b s).beta, s.beta, |beta|^2
            xv = [xk[..., dh + i] for i in range(3)]
            const = jnp.einsum("hdk,hd->kh", jnp.stack([b * s, s, beta], -1), beta)
            sq = _dot_last(x, x)[:, None]  # (B, 1, N)
            return {
                "w": jnp.einsum("hd,hed->he", beta, gs)[None, :, None, :] - xk[..., :dh],
                "e": const[0][None, :, None] - xv[0],
                "f": const[1][None, :, None] - xv[1],
                "h": const[2][None, :, None] - 2.0 * xv[2] + sq,
            }
        b = self.g_bias
        xc = x - b
        return {
            "v": xk - jnp.einsum("d,hed->he", b, self.g_kernel)[None, :, None, :],  # (x - b) g^T
            "sq": _dot_last(xc, xc)[:, None],  # (B, 1, N)
        }

    def _ln_token_losses_and_grad(self, z: Array, tgt: dict, k: dict) -> tuple[Array, Array]:
        """|LN(z g + b) - x|^2 per token, (B, H, n), from the expansion, and its gradient with respect to z.

        The gradient is written out (not a nested ``jax.grad``), so that the outer autodiff differentiates
        one matmul ``z [G | Gs]`` and elementwise ops only.  Per token, with ``mu = z.u + mean(b)``,
        ``var = (z G z + 2 z.gb + |b|^2)/d - mu^2``, ``r = (var + eps)^-1/2``,
        ``a = z Gs z + 2 z.p - 2 mu z.q + |b s|^2 - 2 mu (b s).s + mu^2 |s|^2``, ``c = z.w + e - mu f``:
        ``L = r^2 a + 2 r c + h`` and
        ``dL/dz = r^2 (2 z Gs + 2 p - 2 mu q) + 2 r w + dL/dmu u + dL/dvar (2 (z G + gb)/d - 2 mu u)``
        with ``dL/dmu = r^2 (2 mu |s|^2 - 2 z.q - 2 (b s).s) - 2 r f`` and ``dL/dvar = -r^3 (r a + c)``.
        """
        d = self.g_kernel.shape[-1]
        dh = z.shape[-1]
        hs = lambda a: a[None, :, None]  # noqa: E731  (H,) -> (1, H, 1)
        m = k["M"]
        zm = jnp.einsum("bhne,hef->bhnf", z, m)
        zG, zGs = zm[..., :dh], zm[..., dh : 2 * dh]
        zu, zgb, zq, zp = (zm[..., 2 * dh + i] for i in range(4))
        zGz, zGsz, zw = _dot_last(z, zG), _dot_last(z, zGs), _dot_last(z, tgt["w"])
        mu = zu + k["bbar"]
        eo2 = (zGz + 2.0 * zgb + k["bsq"]) / d
        var_raw = eo2 - mu * mu
        rstd = jax.lax.rsqrt(jnp.maximum(var_raw, 0.0) + LN_EPS)
        r2 = rstd * rstd
        a = zGsz + 2.0 * zp - 2.0 * mu * zq
        a = a + hs(k["bs2"]) - 2.0 * mu * hs(k["bss"]) + mu * mu * hs(k["ss"])
        cross = zw + tgt["e"] - mu * tgt["f"]
        loss = r2 * a + 2.0 * rstd * cross + jnp.broadcast_to(tgt["h"], mu.shape)
        dvar = jnp.where(var_raw > 0.0, -r2 * rstd * (rstd * a + cross), 0.0)
        dmu = r2 * (2.0 * mu * hs(k["ss"]) - 2.0 * zq - 2.0 * hs(k["bss"])) - 2.0 * rstd * tgt["f"]
        # dz = per-token scalars times vectors, written as einsums so that their transposes (the outer
        # backward) are contractions rather than minor-axis reductions (see _dot_last)
        per_tok = lambda c, v: jnp.einsum("bhn,bhne->bhne", c, v)  # noqa: E731
        coef = jnp.stack([2.0 * r2, -2.0 * r2 * mu, dmu - 2.0 * mu * dvar, 2.0 * dvar / d], -1)
        vecs = jnp.swapaxes(m[:, :, 2 * dh :], 1, 2)[:, (3, 2, 0, 1)]  # (H, 4, d_h): p, q, u, gb
        dz = (
            per_tok(2.0 * r2, zGs)
            + per_tok(2.0 * dvar / d, zG)
            + per_tok(2.0 * rstd, jnp.broadcast_to(tgt["w"], z.shape))
            + jnp.einsum("bhnk,hke->bhne", coef, vecs)
        )
        return loss, dz

    def loss_and_grad(self, z: Array, tgt: dict, k: dict) -> tuple[Array, Array]:
        """Inner loss per (B, H) and its gradient with respect to the encoder output ``z``."""
        n, d = z.shape[-2], self.g_kernel.shape[-1]
        c = self.num_heads / (n * d)  # 1 / (n d / H): upstream's normalizer
        if z.dtype != self.g_kernel.dtype:  # low-precision compute: the loss and dz in the decoder's dtype
            loss, dz = self.loss_and_grad(z.astype(self.g_kernel.dtype), tgt, k)
            return loss, dz.astype(z.dtype)
        if self.use_ln and self.expand:
            per, dper = self._ln_token_losses_and_grad(z, tgt, k)
            return 0.5 * c * _sum_last(per), (0.5 * c) * dper
        if self.use_ln:
            o = jnp.einsum("bhne,hed->bhnd", z, self.g_kernel) + self.g_bias
            y, cache = layer_norm_fwd(o, self.ln_scale[:, None, :], self.ln_bias[:, None, :])
            r = y - tgt["x"]
            loss = 0.5 * c * (r * r).sum((-2, -1))
            do = layer_norm_bwd(c * r, self.ln_scale[:, None, :], cache)
            return loss, jnp.einsum("bhnd,hed->bhne", do, self.g_kernel)
        zg = jnp.einsum("bhne,hef->bhnf", z, k["G"])
        v = tgt["v"]
        sq = _sum_last(jnp.broadcast_to(tgt["sq"], z.shape[:-1]))
        loss = 0.5 * c * (_sum_last(_dot_last(z, zg) - 2.0 * _dot_last(z, v)) + sq)
        return loss, c * (zg - v)


def init_encoder_weights(key, kind: str, init: str, bias: bool, num_heads: int, d_h: int, dtype=jnp.float32):
    """Per-head W0: kernels (H, in, out) xavier-uniform (fans per head) or zero, biases zero."""
    dims = [(d_h, d_h)] if kind == "mlp_1" else [(d_h, 4 * d_h), (4 * d_h, d_h)]
    w = {}
    keys = jax.random.split(key, len(dims))
    for i, ((fi, fo), k) in enumerate(zip(dims, keys)):
        if init == "zero":
            w[f"kernel_{i}"] = jnp.zeros((num_heads, fi, fo), dtype)
        else:
            w[f"kernel_{i}"] = nn.initializers.xavier_uniform(batch_axis=(0,))(k, (num_heads, fi, fo), dtype)
        if bias:
            w[f"bias_{i}"] = jnp.zeros((num_heads, fo), dtype)
    return w


def ttt_inner_loop(
    x: Array,
    *,
    phi_kernel: Array,
    phi_bias: Array,
    psi_kernel: Array,
    psi_bias: Array,
    w0: dict,
    decoder: Decoder,
    cfg: TTTConfig,
    perm_key: Array | None = None,
    linear_gram: bool = True,
) -> tuple[Array, Array, dict]:
    """Run the inner loop for a batch of sequences.

    Args:
        x: block input after the pre-LN, (B, N, d).
        w0: per-head initial inner-encoder weights (kernels (H, in, out), biases (H, out)).
        perm_key: PRNG key for the SGD token permutation (per head).
        linear_gram: for a linear inner encoder (``mlp_1``) without decoder LayerNorm, run the inner loop
            on the token statistics (:func:`_linear_gram_loop`); ``False`` takes the general per-token
            path (the tests check that both agree).

    Returns:
        ``(f_q, losses, w_T)``: the encoder applied to the queries with the final weights (B, H, N, d_h),
        the T+1 inner losses (each summed over heads, per sequence: (B, T+1)), and the final weights.
    """
    b, n, _ = x.shape
    h = phi_kernel.shape[0]
    steps = cfg.inner_itr
    kind = cfg.inner_encoder
    if not cfg.train_init:
        w0 = jax.tree_util.tree_map(jax.lax.stop_gradient, w0)
    keys = jnp.einsum("bnd,hde->bhne", x, phi_kernel) + phi_bias[None, :, None, :]
    queries = jnp.einsum("bnd,hde->bhne", x, psi_kernel) + psi_bias[None, :, None, :]
    # (fusing these two and the targets' projection into one matmul measured slower on XLA:CPU)
    tgt = decoder.targets(x.astype(decoder.g_kernel.dtype))
    gram = decoder.gram()
    w = jax.tree_util.tree_map(lambda p: jnp.broadcast_to(p, (b, *p.shape)), w0)
    lrs = jnp.asarray(cfg.lrs, dtype=x.dtype)

    def step(w, k_t, tgt_t, lr):
        z, cache = encoder_apply(w, k_t, kind)
        loss, dz = decoder.loss_and_grad(z, tgt_t, gram)
        grads = encoder_grad(w, cache, dz, kind)
        w = jax.tree_util.tree_map(lambda p, g: p - lr * g, w, grads)
        return w, loss

    if cfg.SGD and steps > 1 and n % steps:
        raise MTTTConfigError(
            f"inner.TTT.SGD splits the N={n} tokens into inner_itr={steps} minibatches; "
            "N must be divisible by inner_itr"
        )
    if cfg.SGD and steps > 1:
        if perm_key is None:
            perm_key = jax.random.PRNGKey(0)
        order = jnp.argsort(jax.random.uniform(perm_key, (h, n)), axis=-1)  # (H, N)

        def split(a):  # (B, H or 1, N, ...) -> (T, B, H, N/T, ...)
            a = jnp.broadcast_to(a, (b, h, *a.shape[2:]))
            idx = order.reshape(1, h, n, *([1] * (a.ndim - 3)))
            a = jnp.take_along_axis(a, idx, axis=2)
            a = a.reshape(b, h, steps, n // steps, *a.shape[3:])
            return jnp.moveaxis(a, 2, 0)

    else:
        split = None

    if kind == "mlp_1" and not decoder.use_ln and linear_gram:
        w, losses = _linear_gram_loop(keys, tgt, gram, w, lrs, split, h, decoder.g_kernel.shape[-1])
        w = jax.tree_util.tree_map(lambda a, ref: a.astype(ref.dtype), w, w0)
        f_q, _ = encoder_apply(w, queries, kind)
        return f_q, losses.sum(-1).T, w

    if split is not None:
        xs = (split(keys), jax.tree_util.tree_map(split, tgt), lrs)
    elif cfg.SGD or steps == 1:
        # one minibatch = the whole sequence
        xs = (keys[None], jax.tree_util.tree_map(lambda a: a[None], tgt), lrs)
    else:
        xs = None

    if xs is not None:

        def body(w, inp):
            k_t, tgt_t, lr = inp
            return step(w, k_t, tgt_t, lr)

        w, losses = jax.lax.scan(body, w, xs, unroll=steps <= 4)
    else:

        def body(w, lr):
            return step(w, keys, tgt, lr)

        w, losses = jax.lax.scan(body, w, lrs, unroll=steps <= 4)

    # final full-batch inner loss (reported only)
    z, _ = encoder_apply(w, keys, kind)
    final, _ = decoder.loss_and_grad(z, tgt, gram)
    losses = jnp.concatenate([losses, final[None]], axis=0)  # (T+1, B, H)

    f_q, _ = encoder_apply(w, queries, kind)
    return f_q, losses.sum(-1).T, w


def _linear_gram_loop(keys, tgt, gram, w, lrs, split, num_heads: int, d: int):
    """The inner loop of a linear encoder ``f(k) = k W + b`` without decoder LayerNorm, on statistics.

    With ``k' = [k, 1]`` and ``W' = [W; b]``, a minibatch's loss and gradient depend on its tokens only
    through ``A = K'^T K'``, ``C = K'^T V`` (``V = (x - g_bias) g^T``, the value-like targets) and
    ``S = sum |x - g_bias|^2``:  ``l = 1/2 c (<W', A W' G> - 2 <W', C> + S)``, ``grad = c (A W' G - C)``
    (``G = g g^T``, ``c = H / (n d)``).  These are computed once (one (d_h+1) x (2 d_h+1) Gram product per
    head and minibatch, the same matmul shape as linear attention's ``K^T V``), after which every inner
    step, including the reported losses, costs O(d_h^3) whatever N.  Same maths as the per-token path.

    Returns ``(w_T, losses (T+1, B, H))`` with ``w_T`` in the leading-dims format of ``w`` (float32+).
    """
    dt = tgt["v"].dtype
    keys = keys.astype(dt)
    has_bias = "bias_0" in w
    dh = keys.shape[-1]

    def stats(k, v, sq):  # k, v (..., n, d_h), sq (..., n) -> A', C', S, n
        n = k.shape[-2]
        m = jnp.einsum("...ni,...nj->...ij", k, jnp.concatenate([k, v], -1))
        a, c = m[..., :dh], m[..., dh:]
        if has_bias:
            sk = k.sum(-2)
            a = jnp.concatenate(
                [jnp.concatenate([a, sk[..., :, None]], -1),
                 jnp.concatenate([sk, jnp.full(sk.shape[:-1], n, dt)[..., None]], -1)[..., None, :]],
                -2,
            )  # fmt: skip
            c = jnp.concatenate([c, v.sum(-2)[..., None, :]], -2)
        return a, c, _sum_last(sq), n

    b, h = keys.shape[:2]
    sq = jnp.broadcast_to(tgt["sq"], (b, h, tgt["sq"].shape[-1]))
    if split is not None:
        a_t, c_t, s_t, n_t = stats(split(keys), split(tgt["v"]), split(sq))
        full = (a_t.sum(0), c_t.sum(0), s_t.sum(0), n_t * a_t.shape[0])
    else:
        full = stats(keys, tgt["v"], sq)
    g = gram["G"].astype(dt)  # (H, d_h, d_h)

    def loss_grad(wp, a, c, s, n):
        coef = num_heads / (n * d)
        r = a @ (wp @ g)  # (B, H, d_h(+1), d_h)
        loss = 0.5 * coef * ((wp * r).sum((-2, -1)) - 2.0 * (wp * c).sum((-2, -1)) + s)
        return loss, coef * (r - c)

    wp = w["kernel_0"].astype(dt)
    if has_bias:
        wp = jnp.concatenate([wp, w["bias_0"].astype(dt)[..., None, :]], -2)

    def body(wp, inp):
        (a, c, s), lr = inp
        loss, grad = loss_grad(wp, a, c, s, full[3] if split is None else n_t)
        return wp - lr.astype(dt) * grad, loss

    per_step = (a_t, c_t, s_t) if split is not None else jax.tree_util.tree_map(
        lambda z: jnp.broadcast_to(z, (lrs.shape[0], *z.shape)), full[:3]
    )  # fmt: skip
    wp, losses = jax.lax.scan(body, wp, (per_step, lrs), unroll=lrs.shape[0] <= 4)
    final, _ = loss_grad(wp, *full)
    out = {"kernel_0": wp[..., :dh, :]}
    if has_bias:
        out["bias_0"] = wp[..., dh, :]
    return out, jnp.concatenate([losses, final[None]], 0)


# --------------------------------------------------------------------------------------------------
# Flax modules
# --------------------------------------------------------------------------------------------------


def _vs(mode: str):
    return nn.initializers.variance_scaling(1.0, mode, "uniform", batch_axis=(0,))


class TTTLayer(nn.Module):
    """The TTT layer: returns ``(output (B, N, d), inner losses (T+1,) averaged over the batch)``, or with
    ``per_example=True`` the inner losses of every sequence, ``(B, T+1)`` (an evaluation averages them over
    its real images only, leaving out the rows that pad its last batch)."""

    width: int
    num_heads: int
    config: TTTConfig = field(default_factory=TTTConfig)
    dtype: Any = jnp.float32
    per_example: bool = False

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        cfg = self.config
        d, h = self.width, self.num_heads
        if d % h:
            raise MTTTConfigError(f"width {d} is not divisible by num_heads {h}")
        dh = d // h
        p = self.param
        psi_k = p("psi_kernel", _vs("fan_in"), (h, d, dh))
        psi_b = p("psi_bias", nn.initializers.zeros, (h, dh))
        phi_k = p("phi_kernel", _vs("fan_in"), (h, d, dh))
        phi_b = p("phi_bias", nn.initializers.zeros, (h, dh))
        g_k = p("g_kernel", _vs("fan_out"), (h, dh, d))
        g_b = p("g_bias", nn.initializers.zeros, (d,))
        h_k = p("h_kernel", _vs("fan_out"), (h, dh, d))
        h_b = p("h_bias", nn.initializers.zeros, (d,))
        w0 = p(
            "inner",
            lambda key: init_encoder_weights(
                key, cfg.inner_encoder, cfg.inner_encoder_init, cfg.inner_encoder_bias, h, dh
            ),
        )
        if cfg.decoder_LN:
            ln_s = p("decoder_LN_scale", nn.initializers.ones, (h, d))
            ln_b = p("decoder_LN_bias", nn.initializers.zeros, (h, d))
        else:
            ln_s = ln_b = None
        cast = lambda a: None if a is None else jnp.asarray(a, self.dtype)  # noqa: E731
        # the reconstruction loss (expanded, with cancellations) is computed in at least float32
        f32 = jnp.promote_types(self.dtype, jnp.float32)
        up = lambda a: None if a is None else jnp.asarray(a, f32)  # noqa: E731
        decoder = Decoder(up(g_k), up(g_b), up(ln_s), up(ln_b), h)
        perm_key = self.make_rng("idx") if (cfg.SGD and self.has_rng("idx")) else None
        f_q, losses, _ = ttt_inner_loop(
            jnp.asarray(x, self.dtype),
            phi_kernel=cast(phi_k), phi_bias=cast(phi_b), psi_kernel=cast(psi_k), psi_bias=cast(psi_b),
            w0=jax.tree_util.tree_map(cast, w0), decoder=decoder, cfg=cfg, perm_key=perm_key,
        )  # fmt: skip
        out = jnp.einsum("bhne,hed->bnd", f_q, cast(h_k)) + cast(h_b)
        if self.per_example:
            return out, losses.astype(jnp.float32)
        return out, losses.mean(0).astype(jnp.float32)


class LinearAttention(nn.Module):
    """Linear attention: ``elu`` feature map (Katharopoulos et al.) or identity; normalizer
    ``adaptive`` (q . sum_k k) or ``constant`` (N d / H).  Q/K/V/out projections xavier-uniform with bias."""

    width: int
    num_heads: int
    config: LinearAttentionConfig = field(default_factory=LinearAttentionConfig)
    dtype: Any = jnp.float32
    per_example: bool = False  # inner losses (all inf) per sequence, (B, 2), as TTTLayer's

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        d, h = self.width, self.num_heads
        dense = lambda name: nn.Dense(  # noqa: E731
            d, kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype, name=name
        )
        b, n, _ = x.shape
        split = lambda a: a.reshape(b, n, h, d // h)  # noqa: E731
        v, q, k = split(dense("value")(x)), split(dense("query")(x)), split(dense("key")(x))
        if self.config.elu:
            q = jax.nn.elu(q) + 1.0
            k = jax.nn.elu(k) + 1.0
        kv = jnp.einsum("bnhk,bnhv->bhkv", k, v)
        num = jnp.einsum("bnhk,bhkv->bnhv", q, kv)
        if self.config.normalizer == "adaptive":
            den = jnp.einsum("bnhk,bhk->bnh", q, k.sum(1))[..., None]
        else:
            den = n * (d // h)
        y = (num / den).reshape(b, n, d)
        return dense("proj")(y), _no_inner_losses(b, self.per_example)


class SelfAttention(nn.Module):
    """Softmax multi-head self-attention (``flax.linen.MultiHeadDotProductAttention``, xavier-uniform)."""

    width: int
    num_heads: int
    dtype: Any = jnp.float32
    per_example: bool = False

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(), deterministic=True,
            dtype=self.dtype, name="MultiHeadDotProductAttention_0",
        )(x, x)  # fmt: skip
        return y, _no_inner_losses(x.shape[0], self.per_example)


def _no_inner_losses(batch: int, per_example: bool) -> Array:
    """The attention baselines' inner losses: ``inf`` (as upstream), (2,) or per sequence (B, 2)."""
    return jnp.full((batch, 2) if per_example else (2,), jnp.inf, jnp.float32)


def make_mixer(config: InnerConfig, width: int, num_heads: int, dtype=jnp.float32, name: str | None = None,
               per_example: bool = False):  # fmt: skip
    """The token mixer chosen by ``config.layer_type`` (``per_example``: inner losses per sequence)."""
    if config.layer_type == "TTT":
        return TTTLayer(width, num_heads, config.TTT, dtype, per_example, name=name)
    if config.layer_type == "linear_attention":
        return LinearAttention(width, num_heads, config.linear_attention, dtype, per_example, name=name)
    return SelfAttention(width, num_heads, dtype, per_example, name=name)
