"""A literal, slow reference of the TTT layer: nested ``jax.grad`` per (sequence, head), steps unrolled.

It follows the paper's definition step by step (the structure of upstream's ``TTTLayer``: ``vmap`` over
sequences and heads, ``value_and_grad`` of the inner loss, one Python-level update per step) and takes
the parameters of :class:`tttlab.mttt_jax.inner_loop.TTTLayer`.  The tests check the fast layer
against it, and ``benchmarks/bench_mttt.py`` times it as the "nested autodiff" baseline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .inner_loop import LN_EPS, TTTConfig


def _encoder(w, z, kind):
    y = z @ w["kernel_0"] + (w["bias_0"] if "bias_0" in w else 0.0)
    if kind == "mlp_1":
        return y
    y = jax.nn.gelu(y, approximate=True)
    return y @ w["kernel_1"] + (w["bias_1"] if "bias_1" in w else 0.0)


def _ln(o, scale, bias):
    mu = o.mean(-1, keepdims=True)
    var = ((o - mu) ** 2).mean(-1, keepdims=True)
    return (o - mu) / jnp.sqrt(var + LN_EPS) * scale + bias


def head_params(params: dict, head: int) -> dict:
    """The parameters of one head (the shared biases are kept whole)."""
    out = {k: v[head] for k, v in params.items() if k not in ("g_bias", "h_bias", "inner")}
    out["inner"] = {k: v[head] for k, v in params["inner"].items()}
    return out


def inner_loss(w, p, tokens, targets, cfg: TTTConfig, num_heads: int):
    """l(W) = 1/2 * H * mean over tokens and features of (dec(f(phi x)) - x)^2 for one head."""
    k = tokens @ p["phi_kernel"] + p["phi_bias"]
    o = _encoder(w, k, cfg.inner_encoder) @ p["g_kernel"] + p["g_bias"]
    if cfg.decoder_LN:
        o = _ln(o, p["decoder_LN_scale"], p["decoder_LN_bias"])
    return 0.5 * jnp.mean((o - targets) ** 2) * num_heads


def ttt_reference(params: dict, x: jax.Array, cfg: TTTConfig, perm_key=None):
    """Output (B, N, d) and inner losses (B, T+1) (summed over heads) of the TTT layer, literally."""
    num_heads = params["phi_kernel"].shape[0]
    b, n, _ = x.shape
    steps, lrs = cfg.inner_itr, cfg.lrs
    if cfg.SGD and steps > 1:
        key = jax.random.PRNGKey(0) if perm_key is None else perm_key
        order = jnp.argsort(jax.random.uniform(key, (num_heads, n)), axis=-1)
    else:
        order = None
    grad_fn = jax.value_and_grad(inner_loss)

    def one(seq, head):
        p = {**head_params(params, head), "g_bias": params["g_bias"]}
        w = p["inner"]
        if not cfg.train_init:
            w = jax.tree_util.tree_map(jax.lax.stop_gradient, w)
        losses = []
        if order is not None:
            batches = seq[order[head]].reshape(steps, n // steps, -1)
        for t in range(steps):
            mb = batches[t] if order is not None else seq
            loss, g = grad_fn(w, p, mb, mb, cfg, num_heads)
            w = jax.tree_util.tree_map(lambda a, ga, lr=lrs[t]: a - lr * ga, w, g)
            losses.append(loss)
        losses.append(inner_loss(w, p, seq, seq, cfg, num_heads))
        q = seq @ p["psi_kernel"] + p["psi_bias"]
        out = _encoder(w, q, cfg.inner_encoder) @ p["h_kernel"]
        return out, jnp.stack(losses)

    outs, losses = [], []
    for head in range(num_heads):
        o, l_ = jax.vmap(lambda s, head=head: one(s, head))(x)
        outs.append(o)
        losses.append(l_)
    out = sum(outs) + params["h_bias"]
    return out, sum(losses)
