"""The maths of the TTT layer: equivalences, inner-loop behaviour, gradients."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tttlab.mttt_jax.errors import MTTTConfigError
from tttlab.mttt_jax.inner_loop import (
    Decoder,
    LinearAttention,
    LinearAttentionConfig,
    TTTConfig,
    TTTLayer,
    encoder_apply,
    encoder_grad,
    init_encoder_weights,
)
from tttlab.mttt_jax.reference import inner_loss, ttt_reference

B, N, D, H = 2, 8, 8, 2


def _randomize(params, seed: int, scale=0.3):
    """Every parameter (biases included) random, so that no term vanishes by initialisation.  numpy draws
    them: per-leaf ``jax.random.normal`` compiled a threefry program for every leaf shape (test time)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), params
    )


def _layer(cfg, key=0, x=None, randomize=True):
    layer = TTTLayer(D, H, cfg)
    x = jax.random.normal(jax.random.PRNGKey(100 + key), (B, N, D)) if x is None else x
    rngs = {"params": jax.random.PRNGKey(key)}
    if randomize:  # the initial values are replaced: only the tree is needed (traced, not compiled)
        params = _randomize(jax.eval_shape(layer.init, rngs, x)["params"], 200 + key)
        if cfg.decoder_LN:
            params["decoder_LN_scale"] = params["decoder_LN_scale"] + 1.0
    else:
        params = jax.jit(layer.init)(rngs, x)["params"]
    return layer, params, x


CONFIGS = {
    "mlp_2_ln": TTTConfig(),
    "mlp_2_nobias_noln": TTTConfig(inner_encoder_bias=False, decoder_LN=False),
    "mlp_1_ln": TTTConfig(inner_encoder="mlp_1"),
    "mlp_1_bias_noln": TTTConfig(inner_encoder="mlp_1", decoder_LN=False),
    "linear": TTTConfig.mttt_linear(),
}


def test_mttt_linear_one_step_equals_constant_normalizer_linear_attention():
    cfg = TTTConfig.mttt_linear(inner_itr=1, inner_lr=(1.0,))
    layer, p, x = _layer(cfg)
    # W0 stays zero (MTTT-Linear): only the outer parameters are random, biases included
    p["inner"] = jax.tree_util.tree_map(jnp.zeros_like, p["inner"])
    out, losses = jax.jit(layer.apply)({"params": p}, x)

    la = LinearAttention(D, H, LinearAttentionConfig(elu=False, normalizer="constant"))
    lp = jax.jit(la.init)(jax.random.PRNGKey(0), x)["params"]
    cat = lambda a: jnp.concatenate(list(a), axis=-1)  # noqa: E731  (H, d, dh) -> (d, H*dh)
    g_t = jnp.transpose(p["g_kernel"], (0, 2, 1))  # value_h = (x - g_bias) g_h^T
    lp = {
        "query": {"kernel": cat(p["psi_kernel"]), "bias": p["psi_bias"].reshape(-1)},
        "key": {"kernel": cat(p["phi_kernel"]), "bias": p["phi_bias"].reshape(-1)},
        "value": {"kernel": cat(g_t), "bias": -(p["g_bias"] @ cat(g_t))},
        "proj": {"kernel": p["h_kernel"].reshape(H * (D // H), D), "bias": p["h_bias"]},
    }
    expected, _ = jax.jit(la.apply)({"params": lp}, x)
    assert float(jnp.abs(p["g_bias"]).min()) > 0 and float(jnp.abs(p["phi_bias"]).min()) > 0
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=1e-5)
    assert losses.shape == (2,)


@pytest.mark.parametrize(
    "name,expand", [(n, True) for n in sorted(CONFIGS)] + [("mlp_2_ln", False), ("mlp_1_ln", False)]
)
def test_closed_form_inner_gradient_equals_autodiff(name, expand):
    cfg = CONFIGS[name]
    layer, p, x = _layer(cfg, key=3)
    d_h = D // H
    keys = jnp.einsum("bnd,hde->bhne", x, p["phi_kernel"]) + p["phi_bias"][None, :, None]
    w = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (B, *a.shape)), p["inner"])
    dec = Decoder(p["g_kernel"], p["g_bias"], p.get("decoder_LN_scale"), p.get("decoder_LN_bias"), H, expand)
    z, cache = encoder_apply(w, keys, cfg.inner_encoder)
    loss, dz = dec.loss_and_grad(z, dec.targets(x), dec.gram())
    grads = encoder_grad(w, cache, dz, cfg.inner_encoder)
    value_and_grad = jax.jit(lambda wh, ph, xb: jax.value_and_grad(inner_loss)(wh, ph, xb, xb, cfg, H))
    for b in range(B):
        for h in range(H):
            ph = {k: (v[h] if k not in ("g_bias",) else v) for k, v in p.items() if k != "inner"}
            wh = {k: v[h] for k, v in p["inner"].items()}
            ref_loss, ref_grad = value_and_grad(wh, ph, x[b])
            np.testing.assert_allclose(loss[b, h], ref_loss, rtol=1e-5, atol=1e-6)
            for k in ref_grad:
                np.testing.assert_allclose(grads[k][b, h], ref_grad[k], rtol=1e-4, atol=1e-5)
    assert z.shape == (B, H, N, d_h)


LRS4 = (0.5, 0.4, 0.3, 0.2)


@pytest.mark.parametrize(
    "name,sgd,lrs",
    [
        ("mlp_2_ln", False, LRS4),
        ("mlp_2_nobias_noln", True, LRS4),
        # T=2, the smallest SGD that splits the tokens: a threshold sending it down the full-batch path fails
        ("mlp_1_bias_noln", True, (0.7, 0.4)),
        pytest.param("mlp_1_ln", True, LRS4, marks=pytest.mark.slow),
        pytest.param("linear", False, LRS4, marks=pytest.mark.slow),
    ],
)
def test_layer_matches_literal_reference(name, sgd, lrs):
    """Forward output and T+1 inner losses equal the nested-autodiff reference (GD and SGD, T=4 and SGD at
    T=2, a different inner lr per step: a reversed or shared lr schedule fails here); SGD's output differs
    from full-batch GD's."""
    cfg = TTTConfig(**{**CONFIGS[name].__dict__, "inner_itr": len(lrs), "inner_lr": lrs, "SGD": sgd})
    layer, p, x = _layer(cfg, key=5)
    key = jax.random.PRNGKey(7)
    out, losses = _apply(layer, p, x, key)
    ref_out, ref_losses = _reference(p, x, cfg, _layer_perm_key(layer, p, x, key))
    np.testing.assert_allclose(out, ref_out, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(losses, ref_losses.mean(0), rtol=2e-4, atol=2e-5)
    if sgd:
        gd = TTTConfig(**{**cfg.__dict__, "SGD": False})
        gd_out, _ = _apply(_layer(gd, key=5)[0], p, x)
        assert float(jnp.abs(gd_out - out).max()) > 1e-4


def _apply(layer, p, x, key=None):
    """``layer.apply`` under ``jax.jit`` (one program instead of per-op dispatch: test-time budget)."""
    if key is None:
        return jax.jit(lambda p, x: layer.apply({"params": p}, x))(p, x)
    return jax.jit(lambda p, x, k: layer.apply({"params": p}, x, rngs={"idx": k}))(p, x, key)


def _reference(p, x, cfg, perm_key):
    """The literal reference under ``jax.jit`` (same ops; eagerly its per-op dispatch took ~3x longer)."""
    return jax.jit(lambda p, x, k: ttt_reference(p, x, cfg, perm_key=k))(p, x, perm_key)


def _layer_perm_key(layer, p, x, key):
    """The key the layer's ``make_rng('idx')`` returns for this call."""
    import flax.linen as nn

    class Probe(nn.Module):
        @nn.compact
        def __call__(self):
            return self.make_rng("idx")

    # make_rng depends on the module path; the layer is the top-level module, like the probe
    return Probe().apply({}, rngs={"idx": key})


def test_sgd_equals_explicit_per_minibatch_loop():
    cfg = TTTConfig(inner_itr=4, inner_lr=(1.0,), SGD=True)
    layer, p, x = _layer(cfg, key=11)
    key = jax.random.PRNGKey(3)
    out, losses = _apply(layer, p, x, key)
    # explicit loop: same permutation, one minibatch of N/T tokens per step, plain autodiff
    order = jnp.argsort(jax.random.uniform(_layer_perm_key(layer, p, x, key), (H, N)), axis=-1)
    outs, step_losses = [], []
    value_and_grad = jax.jit(lambda w, ph, mb: jax.value_and_grad(inner_loss)(w, ph, mb, mb, cfg, H))
    for b in range(B):
        total = 0.0
        per_step = np.zeros(cfg.inner_itr + 1)
        for h in range(H):
            ph = {k: (v[h] if k not in ("g_bias", "h_bias") else v) for k, v in p.items() if k != "inner"}
            w = {k: v[h] for k, v in p["inner"].items()}
            toks = x[b][order[h]]
            for t in range(cfg.inner_itr):
                mb = toks[t * (N // 4) : (t + 1) * (N // 4)]
                loss, g = value_and_grad(w, ph, mb)
                per_step[t] += float(loss)
                w = {k: w[k] - 1.0 * g[k] for k in w}
            per_step[-1] += float(inner_loss(w, ph, x[b], x[b], cfg, H))
            q = x[b] @ ph["psi_kernel"] + ph["psi_bias"]
            z = jax.nn.gelu(q @ w["kernel_0"] + w["bias_0"], approximate=True) @ w["kernel_1"] + w["bias_1"]
            total = total + z @ ph["h_kernel"]
        outs.append(total + p["h_bias"])
        step_losses.append(per_step)
    np.testing.assert_allclose(out, jnp.stack(outs), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(losses, np.mean(step_losses, 0), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["mlp_2_ln", "linear"])
def test_inner_loss_falls_over_steps(name):
    cfg = TTTConfig(**{**CONFIGS[name].__dict__, "inner_itr": 5, "inner_lr": (0.5,)})
    layer, p, x = _layer(cfg, key=13, randomize=False)
    _, losses = _apply(layer, p, x)
    losses = np.asarray(losses)
    assert losses.shape == (6,)
    assert np.all(np.diff(losses) < 0), losses


def test_six_steps_report_seven_losses():
    cfg = TTTConfig(inner_itr=6, inner_lr=(0.5,))
    layer, p, x = _layer(cfg, key=17, randomize=False)
    out, losses = jax.jit(lambda p, x: layer.apply({"params": p}, x))(p, x)
    assert out.shape == (B, N, D) and losses.shape == (7,)
    assert np.all(np.isfinite(losses))
    sgd = TTTConfig(inner_itr=8, inner_lr=(0.5,), SGD=True)
    layer, p, x = _layer(sgd, key=17, randomize=False)
    assert layer.apply({"params": p}, x)[1].shape == (9,)


def test_inner_lr_per_step_and_validation():
    assert TTTConfig(inner_itr=3, inner_lr=(1.0,)).lrs == (1.0, 1.0, 1.0)
    assert TTTConfig(inner_itr=2, inner_lr=[0.5, 0.25]).lrs == (0.5, 0.25)
    with pytest.raises(MTTTConfigError, match="inner_lr"):
        TTTConfig(inner_itr=3, inner_lr=(1.0, 1.0))
    with pytest.raises(MTTTConfigError, match="inner_encoder"):
        TTTConfig(inner_encoder="mlp_3")
    with pytest.raises(MTTTConfigError, match="divisible"):
        _layer(TTTConfig(inner_itr=3, SGD=True), randomize=False)


@pytest.mark.parametrize("train_init", [False, True])
def test_train_init_false_gives_w0_no_gradient(train_init):
    cfg = TTTConfig(inner_itr=2, train_init=train_init)
    layer, p, x = _layer(cfg, key=19)
    g = jax.jit(jax.grad(lambda p: layer.apply({"params": p}, x)[0].sum()))(p)
    norms = [float(jnp.abs(v).max()) for v in jax.tree_util.tree_leaves(g["inner"])]
    assert (max(norms) == 0.0) == (not train_init), norms
    assert float(jnp.abs(g["phi_kernel"]).max()) > 0


def _fd_worst(kw) -> float:
    """Largest relative gap between the float64 outer gradient and central finite differences along one
    random direction per parameter (call inside ``jax.enable_x64(True)``)."""
    cfg = TTTConfig(**kw)
    layer = TTTLayer(4, 2, cfg, dtype=jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4), jnp.float64)
    p = jax.jit(layer.init)({"params": jax.random.PRNGKey(1)}, x)["params"]
    p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), p)
    f = jax.jit(
        lambda p: jnp.sum(jnp.sin(layer.apply({"params": p}, x, rngs={"idx": jax.random.PRNGKey(2)})[0]))
    )
    g = jax.grad(f)(p)
    leaves, tree = jax.tree_util.tree_flatten(p)
    gl = jax.tree_util.tree_leaves(g)
    worst, eps = 0.0, 1e-6
    key = jax.random.PRNGKey(3)
    for i, (a, ga) in enumerate(zip(leaves, gl)):
        key, sub = jax.random.split(key)
        v = jax.random.normal(sub, a.shape, jnp.float64)
        plus = leaves[:i] + [a + eps * v] + leaves[i + 1 :]
        minus = leaves[:i] + [a - eps * v] + leaves[i + 1 :]
        fd = (f(jax.tree_util.tree_unflatten(tree, plus)) - f(jax.tree_util.tree_unflatten(tree, minus))) / (
            2 * eps
        )
        an = jnp.sum(ga * v)
        worst = max(worst, float(abs(fd - an) / (abs(an) + 1e-8)))
    return worst


def test_outer_gradient_matches_finite_differences_float64():
    """Outer gradients through the unrolled inner loop (float64) against central finite differences, for
    GD with a per-step lr schedule (T=3, decoder LN, MLP) and SGD minibatches (T=2, linear, no LN).  x64 is
    switched on only inside ``jax.enable_x64`` (it must not leak into the other tests; this ran in a
    subprocess before, one JAX start-up more)."""
    cfgs = [
        dict(inner_itr=3, inner_lr=[0.5, 0.3, 0.2]),
        dict(inner_itr=2, SGD=True, inner_encoder="mlp_1", decoder_LN=False),
    ]
    with jax.enable_x64(True):
        worst = [_fd_worst(kw) for kw in cfgs]
    assert max(worst) < 1e-5, worst
    assert jnp.zeros(1).dtype == jnp.float32, "x64 leaked"


def test_bfloat16_compute_stays_close_to_float32():
    cfg = TTTConfig(inner_itr=2, inner_lr=(0.5,))
    layer, p, x = _layer(cfg, key=23, randomize=False)
    out32, l32 = layer.apply({"params": p}, x)
    out16, l16 = TTTLayer(D, H, cfg, dtype=jnp.bfloat16).apply({"params": p}, x)
    assert out16.dtype == jnp.bfloat16 and l16.dtype == jnp.float32
    scale = float(jnp.abs(out32).max())
    assert float(jnp.abs(out16.astype(jnp.float32) - out32).max()) < 0.05 * scale
    np.testing.assert_allclose(l16, l32, rtol=0.05)


@pytest.mark.parametrize(
    "cfg",
    [
        TTTConfig.mttt_linear(),
        TTTConfig.mttt_linear(
            inner_itr=3, inner_lr=(0.5, 0.3, 0.2), train_init=True, inner_encoder_init="xavier_uniform"
        ),
        TTTConfig(inner_encoder="mlp_1", decoder_LN=False, inner_itr=4, inner_lr=(0.5,), SGD=True),
    ],
    ids=["mttt_linear", "gd_T3_train_init", "bias_sgd_T4"],
)
def test_linear_encoder_statistics_path_equals_per_token_path_and_reference(cfg, monkeypatch):
    """mlp_1 without decoder LN runs on K'^T[K', V] statistics: same outputs, losses and outer gradients
    as the per-token path (``linear_gram=False``) and as the literal nested-autodiff reference."""
    import tttlab.mttt_jax.inner_loop as il

    layer, p, x = _layer(cfg, key=29)
    key = jax.random.PRNGKey(5)

    def run(p, x):
        return layer.apply({"params": p}, x, rngs={"idx": key})

    def obj(p, x):
        out, losses = run(p, x)
        return jnp.sum(jnp.sin(out)) + losses.sum()

    def measure():  # new jit wrappers each call: traced with the ttt_inner_loop in place at that time
        return (*jax.jit(run)(p, x), jax.jit(jax.grad(obj, argnums=(0, 1)))(p, x))

    fast_out, fast_losses, fast_grad = measure()
    orig = il.ttt_inner_loop
    monkeypatch.setattr(il, "ttt_inner_loop", lambda *a, **k: orig(*a, **k, linear_gram=False))
    slow_out, slow_losses, slow_grad = measure()
    np.testing.assert_allclose(fast_out, slow_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast_losses, slow_losses, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(fast_grad), jax.tree_util.tree_leaves(slow_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    ref_out, ref_losses = _reference(p, x, cfg, _layer_perm_key(layer, p, x, key))
    np.testing.assert_allclose(fast_out, ref_out, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(fast_losses, ref_losses.mean(0), rtol=2e-4, atol=2e-5)


def test_parameter_initialisation_is_upstreams():
    """Upstream's initialisers on a ViT with TTT blocks (d = 32, H = 4, d_h = 8, so fan-in and fan-out
    bounds differ): phi/psi kernels (H, d, d_h) uniform with bound sqrt(3 / d) (variance scaling 1,
    fan_in), g/h kernels (H, d_h, d) uniform with bound sqrt(3 / d) (fan_out; fan_in would be
    sqrt(3 / d_h)), W0 xavier-uniform per head (bound sqrt(6 / (fan_in + fan_out))), every TTT bias 0,
    decoder LN scale 1; the MLP block's kernels xavier-uniform and biases normal with std 1e-6; the
    learned position embedding normal with std 1 / sqrt(width); the head zero.  MTTT-Linear's W0 is zero, without bias or LN.
    Fixed keys, so the max-vs-bound checks are deterministic (1,024+ samples per kernel)."""
    from tttlab.mttt_jax.model import build_model

    d, dh = 32, 8
    model = build_model(model="smoke", tokens="patch", num_classes=3, image_size=8, patch_size=2, posemb="learn",
                        arch={"width": d, "depth": 1, "mlp_dim": 64, "num_heads": 4})  # fmt: skip
    img = jnp.zeros((1, 8, 8, 1))
    p = jax.jit(model.init)({"params": jax.random.PRNGKey(3), "idx": jax.random.PRNGKey(3)}, img)["params"]
    blk, t = p["encoderblock_0"], p["encoderblock_0"]["mixer"]

    def uniform_with_bound(a, bound):
        a = np.abs(np.asarray(a))
        assert a.max() <= bound * (1 + 1e-6) and a.max() > 0.95 * bound, (a.max(), bound)

    for name in ("phi_kernel", "psi_kernel"):
        assert t[name].shape == (4, d, dh)
        uniform_with_bound(t[name], math.sqrt(3 / d))
    for name in ("g_kernel", "h_kernel"):
        assert t[name].shape == (4, dh, d)
        uniform_with_bound(t[name], math.sqrt(3 / d))
    uniform_with_bound(t["inner"]["kernel_0"], math.sqrt(6 / (dh + 4 * dh)))  # (H, d_h, 4 d_h)
    uniform_with_bound(t["inner"]["kernel_1"], math.sqrt(6 / (4 * dh + dh)))
    biases = [t[k] for k in ("phi_bias", "psi_bias", "g_bias", "h_bias", "decoder_LN_bias")]
    assert all(float(jnp.abs(z).max()) == 0.0 for z in [*biases, t["inner"]["bias_0"], t["inner"]["bias_1"]])
    assert t["decoder_LN_scale"].shape == (4, d) and bool(jnp.all(t["decoder_LN_scale"] == 1.0))
    mlp = blk["MlpBlock_0"]
    uniform_with_bound(mlp["Dense_0"]["kernel"], math.sqrt(6 / (d + 64)))
    b = np.abs(np.asarray(mlp["Dense_0"]["bias"]))
    assert 0 < b.max() < 1e-5
    pe = np.asarray(p["pos_embedding"])
    assert pe.shape == (1, 16, d) and abs(pe.std() / (1 / math.sqrt(d)) - 1) < 0.15
    assert float(jnp.abs(p["head"]["kernel"]).max()) == 0.0

    # MTTT-Linear: the parameter tree by tracing only (no compile), W0 from the layer's initialiser
    lin = TTTLayer(d, 4, TTTConfig.mttt_linear())
    lp = jax.eval_shape(lin.init, jax.random.PRNGKey(4), jnp.zeros((1, 4, d)))["params"]
    assert {k: v.shape for k, v in lp["inner"].items()} == {"kernel_0": (4, dh, dh)}
    assert not any(k.startswith("decoder_LN") for k in lp)
    w0 = init_encoder_weights(jax.random.PRNGKey(4), "mlp_1", "zero", False, 4, dh)
    assert float(jnp.abs(w0["kernel_0"]).max()) == 0.0
