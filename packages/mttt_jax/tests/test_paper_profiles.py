"""paper_patch / paper_pixel as the code runs them: composed through Hydra, then the model, optimizer and
schedule that ``train`` builds from them, checked against upstream's ``config_patch.py`` /
``config_pixel.py`` / ``train.py`` (PAPERS.md section 1): ViT-S/16 with sincos-2d on 196 patches and
ViT-Ti on 50,176 pixels with a learned embedding; Adam (bf16 first moment), clip 1.0, lr 1e-3, decoupled
weight decay 1e-4 on kernels, 10k warm-up then cosine to 0; the MTTT-Linear flags freeze W0."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tttlab.mttt_jax import train as T

IMAGENET_TRAIN = 1_281_167  # tfds imagenet2012 "train"


def compose(overrides):
    from hydra import compose as hcompose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="tttlab.mttt_jax.conf", version_base=None):
        return OmegaConf.to_container(hcompose("config", overrides=list(overrides)), resolve=True)


PAPER = {
    # width, depth, mlp, heads, tokens N, patch, posemb, SGD, accum, mixup, augment
    "paper_patch": (384, 12, 1536, 6, 196, (16, 16), "sincos2d", False, 1, 0.2,
                    {"inception_crop": True, "flip": True, "randaug": [2, 10]}),
    "paper_pixel": (192, 12, 768, 3, 50_176, (1, 1), "learn", True, 2, 0.0,
                    {"inception_crop": True, "flip": False, "randaug": None}),
}  # fmt: skip


@pytest.mark.parametrize("experiment", sorted(PAPER))
def test_paper_profile_builds_upstreams_model_and_optimizer(experiment):
    width, depth, mlp, heads, n_tokens, patch, posemb, sgd, accum, mix, aug = PAPER[experiment]
    c = compose([f"experiment={experiment}", "tfds_path=/data"])
    model = T.model_from_config(c)
    assert (model.width, model.depth, model.mlp_dim, model.num_heads) == (width, depth, mlp, heads)
    assert (model.num_tokens, tuple(model.patch_size), model.posemb) == (n_tokens, patch, posemb)
    assert tuple(model.image_size) == (224, 224) and model.num_classes == 1000 and model.head_zeroinit
    t = model.inner.TTT
    assert (model.inner.layer_type, t.inner_encoder, t.inner_itr) == ("TTT", "mlp_2", 1)
    assert tuple(t.inner_lr) == (1.0,)
    assert (t.train_init, t.inner_encoder_init, t.inner_encoder_bias, t.decoder_LN, t.SGD) == (
        True, "xavier_uniform", True, True, sgd,
    )  # fmt: skip
    assert (c["input"]["batch_size"], c["input"]["accum_time"], c["mixup"]["p"]) == (1024, accum, mix)
    assert {k: c["input"]["augment"][k] for k in aug} == aug
    assert c["input"]["augment"]["value_range"] == [-1, 1]
    assert (c["input"]["dataset"], c["input"]["split"], c["evals"]["split"]) == (
        "tfds/imagenet2012", "train", "validation",
    )  # fmt: skip
    assert c["evals"]["resize_small"] == 256 and c["dtype"] == "float32"  # eval: resize 256, central crop 224
    # the optimizer on this model's parameter tree (shapes only; no arrays of the real size are made)
    shapes = jax.eval_shape(
        model.init,
        {"params": jax.random.PRNGKey(0), "idx": jax.random.PRNGKey(0)},
        jnp.zeros((1, 224, 224, 3)),
    )["params"]
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(shapes))
    # MTTT-MLP ViT-S: 24.6M in the paper's table (ours 24,560,104); ViT-Ti on pixels: 16.4M, 9.6M of them
    # the learned 50,176 x 192 position embedding
    assert n_params == {"paper_patch": 24_560_104, "paper_pixel": 16_408_360}[experiment]
    decayed = T.param_mask(shapes, c["wd_mults"][0][0])
    flat = {T._path(k): v for k, v in jax.tree_util.tree_flatten_with_path(decayed)[0]}
    assert flat["head/kernel"] and flat["pre_logits/kernel"] and flat["embedding/kernel"]
    assert flat["encoderblock_0/mixer/inner/kernel_0"] and flat["encoderblock_0/mixer/phi_kernel"]
    assert not any(v for k, v in flat.items() if k.endswith(("bias", "scale", "pos_embedding")))
    # upstream: total_steps = int(90 * N / 1024), steps_per_epoch = total // 90; ours: N // 1024 per epoch
    steps_per_epoch = IMAGENET_TRAIN // 1024
    assert steps_per_epoch == int(90 * IMAGENET_TRAIN / 1024) // 90 == 1251
    total = steps_per_epoch * c["total_epochs"]
    sched = T.schedule_fn(total, c["warmup_steps"], c["decay_type"])
    assert float(sched(0)) == 0.0 and float(sched(5000)) == pytest.approx(0.5)
    assert float(sched(10_000)) == pytest.approx(1.0) and float(sched(total)) == pytest.approx(0.0, abs=1e-7)
    assert float(sched((10_000 + total) / 2)) == pytest.approx(0.5, abs=1e-6)  # cosine half-way


def test_paper_optimizer_update_is_big_vision_adam_with_decoupled_decay():
    """One update of the composed optimizer on a toy tree: -sched * (lr * clip(adam) + wd * kernel)."""
    c = compose(["experiment=paper_patch", "tfds_path=/data", "warmup_steps=0"])
    params = {"layer": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}}
    grads = {"layer": {"kernel": jnp.full((2, 2), 10.0), "bias": jnp.full((2,), 10.0)}}
    tx = T.make_optimizer(c, params, total_steps=100)
    state = tx.init(params)
    mu = jax.tree_util.tree_leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
    adam = [s for s in mu if isinstance(s, optax.ScaleByAdamState)][0]
    assert adam.mu["layer"]["kernel"].dtype == jnp.bfloat16  # first moment in bf16
    upd, _ = tx.update(grads, state, params)
    # step 0 of a warm-up-free cosine: schedule 1; clipped grads keep their sign, Adam's first step is sign(g)
    np.testing.assert_allclose(upd["layer"]["kernel"], -(1e-3 * 1.0 + 1e-4 * 2.0), rtol=1e-3)
    np.testing.assert_allclose(upd["layer"]["bias"], -(1e-3 * 1.0), rtol=1e-3)


def test_mttt_linear_flags_freeze_w0():
    c = compose(["experiment=paper_patch", "tfds_path=/data", "inner.TTT.inner_encoder=mlp_1",
                 "inner.TTT.inner_encoder_init=zero", "inner.TTT.inner_encoder_bias=false",
                 "inner.TTT.decoder_LN=false", "inner.TTT.train_init=false", "warmup_steps=0"])  # fmt: skip
    params = {"blk": {"mixer": {"inner": {"kernel_0": jnp.zeros((2, 2))}, "phi_kernel": jnp.ones((2, 2))}}}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    tx = T.make_optimizer(c, params, total_steps=10)
    upd, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(upd["blk"]["mixer"]["inner"]["kernel_0"]).max()) == 0.0
    assert float(jnp.abs(upd["blk"]["mixer"]["phi_kernel"]).max()) > 0
