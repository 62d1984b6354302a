"""The outer optimizer and the pieces of train.py whose numbers no end-to-end test pins down: the
big_vision schedule (warm-up from 0, cosine/linear to 0), the optimizer chain (global-norm clip ->
Adam -> * lr -> + wd * mult * param on the masked kernels -> * schedule), frozen W0 with
``train_init=false`` (also against weight decay), mixup's sorted coefficients and the sincos-2d position
embedding.  Each is checked against numbers written out here (added by a mutation audit: the resume and
2-device tests compare a run with another run of the same code, so a wrong schedule or a dropped clip
passed them)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tttlab.mttt_jax import train as T
from tttlab.mttt_jax.model import posemb_sincos_2d


def _cos(p: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * p))


def test_schedule_warmup_then_cosine_or_linear_to_zero():
    total, warm = 10, 4
    got = [float(T.schedule_fn(total, warm)(s)) for s in range(12)]
    want = [s / warm for s in range(warm)] + [_cos((s - warm) / (total - warm)) for s in range(warm, 12)]
    want[10:] = [0.0, 0.0]  # clipped after the last step
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got[0] == 0.0  # the first step has lr 0, as upstream
    lin = [float(T.schedule_fn(total, warm, "linear")(s)) for s in range(11)]
    want_lin = [s / warm for s in range(warm)] + [1.0 - (s - warm) / (total - warm) for s in range(warm, 11)]
    np.testing.assert_allclose(lin, want_lin, rtol=1e-6, atol=1e-7)
    # no warm-up: full lr at step 0, cosine over all steps
    none = [float(T.schedule_fn(8, 0)(s)) for s in range(9)]
    np.testing.assert_allclose(none, [_cos(s / 8) for s in range(9)], rtol=1e-6, atol=1e-7)
    # a warm-up longer than the run is cut to total - 1 steps (the last step still decays to 0)
    short = [float(T.schedule_fn(3, 10)(s)) for s in range(4)]
    np.testing.assert_allclose(short, [0.0, 0.5, 1.0, 0.0], atol=1e-7)


def _adam_direction(grads: list[np.ndarray], b1=0.9, b2=0.999, eps=1e-8) -> np.ndarray:
    m = v = 0.0
    for g in grads:
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
    t = len(grads)
    return (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)


def test_optimizer_is_clip_adam_lr_decoupled_wd_schedule():
    """Two updates, written out in numpy: the first gradient (norm 5) is clipped to norm 1, the second
    (norm 0.1, on the same coordinates: Adam's second step sees the clipping) is not; kernels get
    ``wd * mult * param``, biases none; everything times the schedule."""
    c = {"inner": {"layer_type": "self_attention"}, "grad_clip_norm": 1.0, "optax": {}, "lr": 0.1,
         "wd": 0.01, "wd_mults": [[".*kernel$", 2.0]], "warmup_steps": 0, "decay_type": "cosine"}  # fmt: skip
    p0 = {
        "blk": {
            "kernel": np.array([[1.0, -2.0], [0.5, 3.0]], np.float32),
            "bias": np.array([0.5, -0.5], np.float32),
        }
    }
    g1 = {
        "blk": {
            "kernel": np.array([[3.0, 0.0], [0.0, 0.0]], np.float32),
            "bias": np.array([0.0, 4.0], np.float32),
        }
    }
    g2 = {
        "blk": {
            "kernel": np.array([[0.06, 0.0], [0.0, 0.0]], np.float32),
            "bias": np.array([0.0, -0.08], np.float32),
        }
    }
    total = 4
    tx = T.make_optimizer(c, p0, total)
    params = jax.tree_util.tree_map(jnp.asarray, p0)
    state = tx.init(params)
    got = []
    for g in (g1, g2):
        upd, state = tx.update(jax.tree_util.tree_map(jnp.asarray, g), state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, upd)
        got.append(jax.tree_util.tree_map(np.asarray, params))

    sched = [_cos(0 / total), _cos(1 / total)]
    clipped = [{k: v / 5.0 for k, v in g1["blk"].items()}, g2["blk"]]  # global norm 5 -> 1; 0.1 kept
    p = {k: v.astype(np.float64) for k, v in p0["blk"].items()}
    for t in range(2):
        for k in p:
            d = _adam_direction([clipped[s][k].astype(np.float64) for s in range(t + 1)])
            wd = 0.01 * 2.0 * p[k] if k == "kernel" else 0.0
            p[k] = p[k] - sched[t] * (0.1 * d + wd)
        for k in p:
            np.testing.assert_allclose(got[t]["blk"][k], p[k], rtol=1e-5, atol=1e-6, err_msg=f"step {t}, {k}")


@pytest.mark.parametrize("train_init", [False, True])
def test_frozen_w0_gets_no_update_not_even_weight_decay(train_init):
    """``train_init=false``: W0 (here non-zero, xavier-like) stays exactly as it is, although the default
    ``wd_mults`` pattern matches its ``kernel_0`` and its gradient is zero (a decayed W0 would drift)."""
    c = {"inner": {"layer_type": "TTT", "TTT": {"train_init": train_init}}, "grad_clip_norm": 1.0,
         "optax": {}, "lr": 0.1, "wd": 0.5, "wd_mults": [[".*kernel(_[0-9]+)?$", 1.0]], "warmup_steps": 0}  # fmt: skip
    w0 = np.array([[0.3, -0.7], [1.1, 0.2]], np.float32)
    params = {"encoderblock_0": {"mixer": {"inner": {"kernel_0": jnp.asarray(w0)},
                                           "phi_kernel": jnp.ones((2, 2))}}}  # fmt: skip
    grads = {"encoderblock_0": {"mixer": {"inner": {"kernel_0": jnp.zeros((2, 2))},
                                          "phi_kernel": jnp.full((2, 2), 0.1)}}}  # fmt: skip
    tx = T.make_optimizer(c, params, 10)
    upd, _ = tx.update(grads, tx.init(params), params)
    new = jax.tree_util.tree_map(lambda p, u: p + u, params, upd)
    w_new = np.asarray(new["encoderblock_0"]["mixer"]["inner"]["kernel_0"])
    if train_init:  # trained: decoupled weight decay moves it (lr-free: wd * param * schedule)
        np.testing.assert_allclose(w_new, w0 - 0.5 * w0, rtol=1e-6)
    else:
        assert np.array_equal(w_new, w0)
    assert not np.allclose(new["encoderblock_0"]["mixer"]["phi_kernel"], 1.0)


def test_mixup_keeps_the_larger_weight_on_the_image_itself():
    """big_vision mixup: one Dirichlet pair per batch, sorted so that each image (and its label) keeps the
    larger share; the partner is the previous image of the batch (``roll`` by 1)."""
    images = jnp.arange(4 * 3, dtype=jnp.float32).reshape(4, 3) ** 2
    onehot = jax.nn.one_hot(jnp.arange(4), 4)
    for seed in range(8):
        mi, ml = T.mixup(jax.random.PRNGKey(seed), images, onehot, 0.2)
        a = float(ml[0, 0])  # own label's weight
        assert a >= 0.5
        np.testing.assert_allclose(ml, a * onehot + (1 - a) * jnp.roll(onehot, 1, axis=0), atol=1e-6)
        np.testing.assert_allclose(
            mi, a * images + (1 - a) * jnp.roll(images, 1, axis=0), rtol=1e-4, atol=1e-4
        )


def test_sincos2d_position_embedding_values():
    """big_vision's posemb_sincos_2d: omega_k = 10000^-(k / (D/4 - 1)); per token (y, x) in row-major
    order the features [sin(x w), cos(x w), sin(y w), cos(y w)]."""
    pe = np.asarray(posemb_sincos_2d(2, 3, 8))
    assert pe.shape == (1, 6, 8)
    w = np.array([1.0, 1e-4])
    for m in range(6):
        y, x = divmod(m, 3)
        want = np.concatenate([np.sin(x * w), np.cos(x * w), np.sin(y * w), np.cos(y * w)])
        np.testing.assert_allclose(pe[0, m], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("elu", [True, False])
@pytest.mark.parametrize("normalizer", ["adaptive", "constant"])
def test_linear_attention_matches_its_formula(elu, normalizer):
    """Per head h: ``y_i = phi(q_i) (sum_j phi(k_j)^T v_j) / den_i`` with ``phi = elu + 1`` (or identity) and
    ``den_i = phi(q_i) . sum_j phi(k_j)`` (adaptive, Katharopoulos et al.) or ``N d_h`` (constant), then the
    output projection; written out in numpy (float64) on random inputs."""
    from tttlab.mttt_jax.inner_loop import LinearAttention, LinearAttentionConfig

    b, n, d, h = 2, 5, 8, 2
    dh = d // h
    layer = LinearAttention(d, h, LinearAttentionConfig(elu=elu, normalizer=normalizer))
    x = jax.random.normal(jax.random.PRNGKey(0), (b, n, d))
    params = layer.init(jax.random.PRNGKey(1), x)["params"]
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    for k, name in zip(keys, ("query", "key", "value", "proj")):  # non-zero biases too
        params[name]["bias"] = 0.3 * jax.random.normal(k, (d,))
    out, losses = layer.apply({"params": params}, x)
    P = {k: {kk: np.asarray(vv, np.float64) for kk, vv in v.items()} for k, v in params.items()}
    xn = np.asarray(x, np.float64)

    def dense(name, a):
        return a @ P[name]["kernel"] + P[name]["bias"]

    def phi(a):
        return np.where(a > 0, a + 1.0, np.exp(a)) if elu else a

    q, k, v = (dense(nm, xn).reshape(b, n, h, dh) for nm in ("query", "key", "value"))
    q, k = phi(q), phi(k)
    y = np.zeros((b, n, h, dh))
    for bi in range(b):
        for hi in range(h):
            kv = k[bi, :, hi].T @ v[bi, :, hi]  # (dh, dh)
            num = q[bi, :, hi] @ kv
            den = (q[bi, :, hi] @ k[bi, :, hi].sum(0))[:, None] if normalizer == "adaptive" else n * dh
            y[bi, :, hi] = num / den
    want = dense("proj", y.reshape(b, n, d))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5)
    assert np.all(np.isinf(np.asarray(losses)))


def test_decoder_layer_norm_is_flax_layernorm():
    """The decoder LayerNorm of the inner loss (closed form, both the expanded and the direct path) equals
    ``flax.linen.LayerNorm`` with its default epsilon (upstream's module), on outputs of small variance
    where the epsilon matters."""
    import flax.linen as nn

    from tttlab.mttt_jax.inner_loop import Decoder

    b, h, n, dh, d = 1, 2, 6, 3, 8
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    g = 2e-3 * jax.random.normal(ks[0], (h, dh, d))  # o = z g + b has variance ~1e-5
    gb = 1e-3 * jax.random.normal(ks[1], (d,))
    s = 1.0 + 0.3 * jax.random.normal(ks[2], (h, d))
    beta = 0.3 * jax.random.normal(ks[3], (h, d))
    z = jax.random.normal(ks[4], (b, h, n, dh))
    x = jax.random.normal(jax.random.PRNGKey(9), (b, n, d))
    ln = nn.LayerNorm()
    want = []
    for hi in range(h):
        o = z[0, hi] @ g[hi] + gb
        y = ln.apply({"params": {"scale": s[hi], "bias": beta[hi]}}, o)
        want.append(0.5 * (h / (n * d)) * jnp.sum((y - x[0]) ** 2))
    for expand in (True, False):
        dec = Decoder(g, gb, s, beta, h, expand)
        loss, _ = dec.loss_and_grad(z, dec.targets(x), dec.gram())
        np.testing.assert_allclose(
            np.asarray(loss[0]), np.asarray(want), rtol=2e-4, err_msg=f"expand={expand}"
        )


def test_epochs_are_reshuffled_and_a_resume_sees_the_remaining_batches():
    from tttlab.mttt_jax import data as mdata

    orders = [mdata.epoch_order(40, 3, e) for e in range(3)]
    for o in orders:
        assert sorted(o.tolist()) == list(range(40))
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert np.array_equal(mdata.epoch_order(40, 3, 1), orders[1])  # a function of (seed, epoch)
    assert not np.array_equal(mdata.epoch_order(40, 4, 1), orders[1])

    class Src:  # the image of example i is the constant i
        workers, per_image, train, augment = 1, False, True, {}

        def __len__(self):
            return 40

        def load(self, idx, seeds, pool):
            return np.asarray(idx, np.float32)[:, None], np.asarray(idx, np.int32)

    full = [lab.tolist() for _, lab in mdata.train_batches(Src(), 8, 3, 1)]
    assert [i for batch in full for i in batch] == orders[1].tolist()
    rest = [lab.tolist() for _, lab in mdata.train_batches(Src(), 8, 3, 1, start_step=3)]
    assert rest == full[3:]


def test_gradient_accumulation_averages_the_micro_batch_gradients():
    """``accum_time=2`` gives the same update as one full batch under plain SGD (scale-sensitive, unlike
    Adam, whose first step is invariant to a constant factor: the 2-device test cannot see a missing
    ``1/accum``), and the same reported loss and inner losses."""
    import optax

    from tttlab.core.jax import data_mesh

    from .test_train import TINY, compose

    # the accumulation does not depend on the mixer: linear attention compiles fastest
    c = T.to_dict(
        compose([*TINY, "warmup_steps=0", "input.batch_size=8", "inner.layer_type=linear_attention"])
    )
    model = T.model_from_config(c)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (8, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(np.arange(8) % 10, jnp.int32)
    params = jax.jit(model.init)({"params": jax.random.PRNGKey(0), "idx": jax.random.PRNGKey(0)}, x[:1])[
        "params"
    ]
    tx = optax.sgd(0.5)
    out = []
    for accum in (1, 2):
        c["input"]["accum_time"] = accum
        step = T.make_train_step(model, tx, c, data_mesh(), jax.random.PRNGKey(1))
        state = {"params": jax.tree_util.tree_map(jnp.copy, params), "opt_state": tx.init(params)}
        new, m = step(state, x, y, jnp.asarray(1))
        out.append((new["params"], float(m["loss"]), np.asarray(m["inner"])))
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(out[0][0]),
                                                            jax.tree_util.tree_leaves(params)))  # fmt: skip
    assert moved > 1e-3
    for a, b in zip(jax.tree_util.tree_leaves(out[0][0]), jax.tree_util.tree_leaves(out[1][0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert out[0][1] == pytest.approx(out[1][1], rel=1e-5)
    np.testing.assert_allclose(out[0][2], out[1][2], rtol=1e-5)


@pytest.mark.parametrize(
    ("override", "refused"),
    [("seed=1", True), ("lr=0.01", True), ("inner.TTT.inner_lr=[0.5]", True), ("input.batch_size=8", True),
     ("total_epochs=3", True), ("warmup_steps=1", True), ("max_steps=2", False), ("logging.progress=true", False),
     ("checkpoint_every_steps=1", False), ("input.workers=3", False), ("name=_x", False)],
)  # fmt: skip
def test_resume_check_refuses_exactly_the_keys_that_change_the_numbers(override, refused):
    """A checkpoint resumes only into the same training config: a different seed, lr, schedule, batch ...
    is refused; bookkeeping keys (``max_steps``, logging, checkpoint cadence, workers, name) are not."""
    from tttlab.core.errors import CheckpointError

    from .test_train import TINY, compose

    old = T.to_dict(compose(TINY))
    new = T.to_dict(compose([*TINY, override]))

    class Manager:  # what check_resume_config reads of an orbax CheckpointManager
        directory = "ckpt"

        def restore(self, step, args=None):
            return {"meta": {"config": T.json_roundtrip(T.training_config(old))}}

    if refused:
        with pytest.raises(CheckpointError, match=override.split("=")[0].replace(".", r"\.")):
            T.check_resume_config(Manager(), 4, new)
    else:
        T.check_resume_config(Manager(), 4, new)


def test_vit_forward_is_the_pre_ln_composition():
    """Model(images) written out with numpy and flax's own LayerNorm: patch embedding (a strided conv) +
    learned position embedding, one block ``x + mixer(LN(x))``, ``x + MLP(LN(x))`` (Dense, tanh-GELU,
    Dense), final LayerNorm, mean over tokens, ``tanh`` pre-logits, head."""
    import flax.linen as nn

    from tttlab.mttt_jax.inner_loop import LinearAttention, LinearAttentionConfig
    from tttlab.mttt_jax.model import build_model

    model = build_model(model="smoke", tokens="patch", inner={"layer_type": "linear_attention"}, num_classes=3,
                        image_size=8, patch_size=4, posemb="learn", arch={"depth": 1, "width": 8})  # fmt: skip
    model = model.clone(head_zeroinit=False)
    img = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1), minval=-1, maxval=1)
    p = jax.jit(model.init)(jax.random.PRNGKey(1), img)["params"]
    p = jax.tree_util.tree_map(  # biases and LayerNorm parameters away from their 0/1 initialisation
        lambda a: a + 0.2 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), p
    )
    logits, _ = jax.jit(model.apply)({"params": p}, img)

    def ln(params, a):
        return nn.LayerNorm().apply({"params": params}, a)

    def dense(params, a):
        return a @ params["kernel"] + params["bias"]

    patches = img.reshape(2, 2, 4, 2, 4, 1).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 16)
    x = patches @ p["embedding"]["kernel"].reshape(16, 8) + p["embedding"]["bias"] + p["pos_embedding"]
    blk = p["encoderblock_0"]
    la = LinearAttention(8, 2, LinearAttentionConfig())
    x = x + la.apply({"params": blk["mixer"]}, ln(blk["LayerNorm_0"], x))[0]
    mlp = blk["MlpBlock_0"]
    x = x + dense(
        mlp["Dense_1"], jax.nn.gelu(dense(mlp["Dense_0"], ln(blk["LayerNorm_1"], x)), approximate=True)
    )
    x = ln(p["encoder_norm"], x).mean(1)
    want = dense(p["head"], jnp.tanh(dense(p["pre_logits"], x)))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sgd", [True])  # (False: the same inner losses at both steps; 1 s more)
def test_each_step_draws_its_own_token_order(sgd):
    """The model's random stream (SGD token order) is folded with the step number: the same batch at two
    different steps gives two different inner losses with ``SGD=true`` (T minibatches in another order).
    The step runs with ``dtype=bfloat16`` (the stream does not depend on the dtype; this makes it the
    bf16 training-step test too: the parameters stay float32, the losses finite)."""
    from tttlab.core.jax import data_mesh

    from .test_train import TINY, compose

    c = T.to_dict(
        compose(
            [
                *TINY,
                "warmup_steps=0",
                "inner.TTT.inner_itr=2",
                f"inner.TTT.SGD={str(sgd).lower()}",
                "dtype=bfloat16",
            ]
        )  # fmt: skip
    )
    model = T.model_from_config(c)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 28, 28, 1)), jnp.float32)
    y = jnp.arange(4, dtype=jnp.int32)
    params = jax.jit(model.init)({"params": jax.random.PRNGKey(0), "idx": jax.random.PRNGKey(0)}, x[:1])[
        "params"
    ]
    tx = T.make_optimizer(c, params, 10)
    step = T.make_train_step(model, tx, c, data_mesh(), jax.random.PRNGKey(1))
    losses = []
    for s in (1, 2):
        state = {"params": jax.tree_util.tree_map(jnp.copy, params), "opt_state": tx.init(params)}
        new, m = step(state, x, y, jnp.asarray(s, jnp.int32))
        losses.append(np.asarray(m["inner"]))
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(new["params"])} == {jnp.dtype("float32")}
        assert np.isfinite(float(m["loss"])) and np.isfinite(losses[-1]).all()
    assert model.dtype == jnp.bfloat16
    assert np.array_equal(losses[0], losses[1]) is (not sgd)


def test_seed_sets_the_initialisation_and_the_training_stream(tmp_path, monkeypatch):
    """``seed`` reaches the parameter initialisation and the training key (not only the data order):
    two seeds give different initial parameters and keys, the same seed the same ones."""
    from .test_train import TINY, compose

    class Stop(Exception):
        pass

    seen = []
    make_optimizer = T.make_optimizer

    def spy_opt(c, params, total_steps):
        seen.append({"params": params})
        return make_optimizer(c, params, total_steps)

    def spy_step(model, tx, c, mesh, base_key):
        seen[-1]["key"] = np.asarray(jax.random.key_data(base_key))
        raise Stop

    monkeypatch.setattr(T, "make_optimizer", spy_opt)
    monkeypatch.setattr(T, "make_train_step", spy_step)
    for i, seed in enumerate((0, 1, 0)):
        with pytest.raises(Stop):
            T.train(compose([*TINY, f"seed={seed}", f"out_dir={tmp_path / str(i)}",
                             "inner.layer_type=linear_attention"]))  # fmt: skip

    def same(a, b):
        leaves = zip(jax.tree_util.tree_leaves(a["params"]), jax.tree_util.tree_leaves(b["params"]))
        return all(np.array_equal(x, y) for x, y in leaves), np.array_equal(a["key"], b["key"])

    assert same(seen[0], seen[2]) == (True, True)
    assert same(seen[0], seen[1]) == (False, False)


def test_validation_metrics_average_over_real_images_only():
    """evaluate_split: loss, prec@1 and the inner losses are sums over the real (mask 1) images (the eval
    step's sums) divided by their number, over all batches (the last one is padded)."""
    from tttlab.core.jax import data_mesh

    class Src:  # 10 images of 1 pixel, value = index
        workers, per_image, train, augment = 1, False, False, {}

        def __len__(self):
            return 10

        def load(self, idx, seeds, pool):
            return np.asarray(idx, np.float32)[:, None, None, None], np.asarray(idx, np.int32)

    def eval_step(params, images, labels, mask):
        n = jnp.sum(mask)
        big = jnp.max(images) >= 8  # the last, padded batch (images 8, 9 and two pads)
        return {"loss": jnp.sum(images[:, 0, 0, 0] * mask), "correct": n / 2, "n": n,
                "inner_sum": n * jnp.where(big, 4.0, 1.0) * jnp.ones((1, 2))}  # fmt: skip

    out = T.evaluate_split(eval_step, None, Src(), 4, data_mesh())
    assert out["val/loss"] == pytest.approx(sum(range(10)) / 10)
    assert out["val/prec@1"] == pytest.approx(0.5)
    np.testing.assert_allclose(out["val/inner_loss"], [[(8 * 1.0 + 2 * 4.0) / 10] * 2])


def test_validation_inner_losses_do_not_depend_on_the_padding():
    """The real eval step on 6 images: in batches of 4 (the last one padded with 2 copies of image 0) every
    statistic -- inner losses included -- equals the one in a single batch of 6, which is the mean over
    the 6 images of the model's per-image inner losses.  (The layer used to return batch means, so the
    padded batch's mean counted image 0 three times.)"""
    from tttlab.core.jax import data_mesh

    from .test_train import TINY, compose

    c = T.to_dict(compose([*TINY, "inner.TTT.inner_itr=2", "inner.TTT.SGD=true"]))
    model = T.model_from_config(c)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (6, 28, 28, 1)).astype(np.float32)
    images[3:] *= 0.2  # images of two contrasts: per-image inner losses far apart
    labels = np.array([3, 1, 4, 1, 5, 9], np.int32)

    class Src:
        workers, per_image = 1, False

        def __len__(self):
            return len(images)

        def load(self, idx, seeds, pool):
            return images[idx], labels[idx]

    # random parameters of the model's shapes (traced, not compiled: jax.jit(model.init) compiles the forward)
    shapes = jax.eval_shape(model.init, {"params": jax.random.PRNGKey(0), "idx": jax.random.PRNGKey(0)},
                            jnp.zeros((1, 28, 28, 1)))["params"]  # fmt: skip
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)
    mesh = data_mesh()
    eval_step = T.make_eval_step(model, c, mesh, jax.random.PRNGKey(1))
    padded = T.evaluate_split(eval_step, params, Src(), 4, mesh)
    whole = T.evaluate_split(eval_step, params, Src(), 6, mesh)
    per_image = model.clone(per_example_inner=True).apply({"params": params}, jnp.asarray(images),
                                                          rngs={"idx": jax.random.PRNGKey(1)})[1]  # fmt: skip
    assert per_image.shape == (6, 1, 3)  # (images, layers, T+1)
    assert float(np.ptp(np.asarray(per_image)[:, 0, -1])) > 0.1 * float(np.abs(per_image).max())
    np.testing.assert_allclose(whole["val/inner_loss"], np.asarray(per_image).mean(0), rtol=1e-5)
    np.testing.assert_allclose(padded["val/inner_loss"], whole["val/inner_loss"], rtol=1e-5)
    assert padded["val/prec@1"] == whole["val/prec@1"]
    assert padded["val/loss"] == pytest.approx(whole["val/loss"], rel=1e-6)


def test_a_refused_resume_suggests_a_run_directory_that_is_not_the_given_one(tmp_path, monkeypatch):
    """The refused resume said "use another out_dir (e.g. name=_T4)" whatever the run was given: to a run
    given ``name=_T4`` (whose folder held the other config's checkpoint) it suggested the same folder, and to
    one given ``out_dir=`` (upstream's ``--workdir``) a ``name`` that does not change its folder.  The example
    is now a folder that is neither the given one nor an existing one."""
    from tttlab.core.errors import CheckpointError

    from .test_train import TINY, compose

    monkeypatch.chdir(tmp_path)
    old = T.to_dict(compose(TINY))

    class Manager:  # what check_resume_config reads of an orbax CheckpointManager
        directory = "ckpt"

        def restore(self, step, args=None):
            return {"meta": {"config": T.json_roundtrip(T.training_config(old))}}

    def example(*overrides):
        with pytest.raises(CheckpointError) as info:
            T.check_resume_config(Manager(), 4, T.to_dict(compose([*TINY, "lr=0.5", *overrides])))
        assert str(info.value).endswith(") or resume=false to start over"), info.value
        return str(info.value).rpartition("(e.g. ")[2].partition(")")[0]

    assert example("name=_T4") == "name=_T4_2"
    (tmp_path / "runs" / "mttt" / "smoke_T4_2").mkdir(parents=True)
    assert example("name=_T4") == "name=_T4_3"
    assert example() == "name=_2"
    assert example("out_dir=exp/x") == "out_dir=exp/x_2"  # name does not change a given out_dir
    assert example("out_dir=exp/x/", "name=_T4") == "out_dir=exp/x_2"
