"""train.py: the real Hydra config, one step of the paper config on a TFDS fixture, resume after a kill,
frozen W0, and data parallelism (2 host devices equal 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tttlab.mttt_jax import train as T

# a one-block ViT of width 8 on 16 MNIST images: compiles in seconds
TINY = [
    "experiment=smoke", "model=smoke", "arch.depth=1", "arch.width=8", "arch.mlp_dim=16", "arch.num_heads=2",
    "input.batch_size=4", "input.num_examples=16", "evals.batch_size=8", "evals.num_examples=8",
    "logging.progress=false",
]  # fmt: skip


def compose(overrides):
    from hydra import compose as hcompose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="tttlab.mttt_jax.conf", version_base=None):
        return hcompose("config", overrides=list(overrides), return_hydra_config=False)


def test_paper_patch_config_and_one_step_on_tfds_fixture(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from tttlab.core.testing import make_tfds

    cfg = compose(["experiment=paper_patch"])
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=False)
    # upstream config_patch.py, value by value
    assert (c["model"], c["tokens"], c["total_epochs"], c["lr"], c["wd"]) == (
        "small",
        "patch",
        90,
        0.001,
        0.0001,
    )
    assert (
        c["grad_clip_norm"] == 1.0 and c["optax"] == {"mu_dtype": "bfloat16"} and c["warmup_steps"] == 10000
    )
    assert c["input"]["batch_size"] == 1024 and c["input"]["accum_time"] == 1 and c["mixup"]["p"] == 0.2
    assert c["input"]["augment"]["randaug"] == [2, 10] and c["input"]["augment"]["flip"] is True
    assert c["inner"]["TTT"] == dict(inner_encoder="mlp_2", inner_itr=1, inner_lr=[1.0], train_init=True,
                                     inner_encoder_init="xavier_uniform", inner_encoder_bias=True,
                                     decoder_LN=True, SGD=False)  # fmt: skip
    pix = OmegaConf.to_container(compose(["experiment=paper_pixel"]), resolve=False)
    assert (pix["model"], pix["tokens"], pix["input"]["accum_time"], pix["inner"]["TTT"]["SGD"]) == (
        "tiny",
        "pixel",
        2,
        True,
    )
    assert pix["mixup"]["p"] == 0.0 and pix["input"]["augment"]["randaug"] is None

    data_dir = make_tfds(tmp_path / "tfds", name="imagenet_fixture", n={"train": 8, "validation": 4},
                         image_shape=(20, 24, 3), num_classes=3)  # fmt: skip
    small = compose([
        "experiment=paper_patch", f"tfds_path={data_dir}", "input.dataset=tfds/imagenet_fixture", "image_size=16",
        "patch_size=4", "model=smoke", "arch.depth=1", "arch.width=8", "arch.num_heads=2", "arch.mlp_dim=16",
        "num_classes=3", "input.batch_size=4", "input.workers=2", "evals.resize_small=18", "total_epochs=1",
        "warmup_steps=1", f"out_dir={tmp_path / 'run'}", "logging.progress=false", "inner.TTT.inner_itr=2",
    ])  # fmt: skip
    stats = T.train(small)
    assert len(stats["val/prec@1"]) == 1 and 0.0 <= stats["val/prec@1"][0] <= 1.0
    assert np.asarray(stats["train/inner_loss"]).shape == (1, 1, 3)  # [epoch][layer][T+1]
    assert (tmp_path / "run" / "stats.json").exists() and (tmp_path / "run" / "records.jsonl").exists()


def test_a_missing_tfds_path_leaves_no_run_directory(tmp_path):
    """A mistyped ``tfds_path`` is a one-line error naming the path, and the ``out_dir`` of the failed
    command is not created (it used to hold a config.yaml, empty records and stats of a run that never
    started)."""
    from tttlab.core.errors import DatasetNotFoundError

    cfg = compose(
        ["experiment=paper_patch", f"tfds_path={tmp_path / 'no_tfds'}", f"out_dir={tmp_path / 'run'}"]
    )
    with pytest.raises(DatasetNotFoundError, match="no_tfds"):
        T.train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_bad_model_name_leaves_no_run_directory(tmp_path, monkeypatch):
    """``model=smal``: the one-line error naming the value, and no ``out_dir`` (it used to hold the
    config.yaml, env.json, empty records.jsonl and train.log of a run whose model was never built)."""
    from tttlab.mttt_jax.errors import MTTTConfigError

    monkeypatch.setattr(T.mdata, "open_source", lambda *a, **k: [None] * 64)  # the data opens; not read here
    cfg = compose(["experiment=smoke", "model=smal", f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(
        MTTTConfigError, match=r"model='smal'; expected one of \['mnist', 'small', 'smoke', 'tiny'\]"
    ):
        T.train(cfg)
    assert not (tmp_path / "run").exists()


def test_killed_run_resumes_to_the_same_metrics(tmp_path, trained_run):
    """Killed in its second epoch and started again, a run ends with the uninterrupted run's stats and
    records.  The restart changes only keys that change no number (``keep_checkpoints``, ``input.workers``,
    ``max_steps``: ``train.RESUMABLE_KEYS``), so it is also the resumable-keys contract of core's
    ``check_resumable_keys_rerun_the_same_run`` (here, not beside the display-keys test in test_commands.py:
    one kill and resume serves both).  Before, such a restart warned 'created with a different config' and
    left the first epoch's records under the old config_hash beside the new config.yaml."""
    from tttlab.core.records import read_jsonl
    from tttlab.core.testing import check_resumable_keys_rerun_the_same_run

    from .conftest import SHARED_RUN

    # SHARED_RUN: 2 epochs of 2 steps, an in-epoch checkpoint at step 3 (epoch ends always save), T=2 SGD;
    # the session's trained_run is the uninterrupted run of this config
    base = TINY + SHARED_RUN
    full = trained_run[1]
    killed_cfg = compose(base + [f"out_dir={tmp_path / 'killed'}"])

    def killed():
        with pytest.raises(T.SimulatedKill):
            T.train(killed_cfg, _kill_at_step=4)  # dies in epoch 2, after the in-epoch step-3 checkpoint
        assert len(json.loads((tmp_path / "killed" / "stats.json").read_text())["step"]) == 1

    resumed = {}
    changed = ["keep_checkpoints=3", "input.workers=2", "max_steps=100"]  # the smoke experiment has 1 worker
    check_resumable_keys_rerun_the_same_run(
        tmp_path / "killed",
        killed,
        lambda: resumed.update(T.train(compose([*base, f"out_dir={tmp_path / 'killed'}", *changed]))),
        reference=read_jsonl(trained_run[0] / "records.jsonl"),
        timing_metrics=("epoch_time_s",),
    )
    timing = ("epoch_time_s",)
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in full.items() if k not in timing
    }
    from tttlab.core.records import load_records

    df = load_records(tmp_path / "killed")
    assert sorted(df[df.metric == "val/prec@1"].step.tolist()) == [2, 4]


def test_mttt_linear_keeps_w0_zero_and_trains_the_rest():
    """MTTT-Linear's flags name the method, and on the real model's parameter tree the optimizer leaves W0
    (zero-initialised) exactly zero -- even with a non-zero gradient and the weight decay its ``kernel_0``
    name matches -- while every other parameter moves.  W0's gradient is zero as well
    (test_inner_loop.py::test_train_init_false_gives_w0_no_gradient); this test used to compile a whole
    training step of the ViT to see both at once (test-time budget)."""
    cfg = T.to_dict(compose(TINY + [
        "inner.TTT.inner_encoder=mlp_1", "inner.TTT.inner_encoder_init=zero", "inner.TTT.inner_encoder_bias=false",
        "inner.TTT.decoder_LN=false", "inner.TTT.train_init=false", "warmup_steps=0",
    ]))  # fmt: skip
    assert T.method_name(T.InnerConfig.from_dict(cfg["inner"])) == "mttt_linear"
    model = T.model_from_config(cfg)
    x = jnp.zeros((1, 28, 28, 1), jnp.float32)
    params = jax.jit(model.init)({"params": jax.random.PRNGKey(0), "idx": jax.random.PRNGKey(0)}, x)["params"]
    assert list(params["encoderblock_0"]["mixer"]["inner"]) == ["kernel_0"]
    tx = T.make_optimizer(cfg, params, 10)
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.1), params)
    upd, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new = jax.tree_util.tree_map(jnp.add, params, upd)
    w0 = new["encoderblock_0"]["mixer"]["inner"]["kernel_0"]
    assert float(jnp.abs(w0).max()) == 0.0
    moved = {T._path(k) for k, u in jax.tree_util.tree_leaves_with_path(upd) if float(jnp.abs(u).max()) > 0}
    every = {T._path(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)}
    assert moved == every - {"encoderblock_0/mixer/inner/kernel_0"}


_TWO_DEVICES = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from tttlab.core.jax import data_mesh, shard
    from tttlab.mttt_jax import train as T
    from hydra import compose, initialize_config_module
    assert jax.device_count() == 2, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32)
    y = (np.arange(8) % 10).astype(np.int32)
    def diff(a, b):
        return max(float(np.max(np.abs(np.asarray(p) - np.asarray(q)))) for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    results = []
    for overrides in json.loads(sys.argv[1]):
        with initialize_config_module(config_module="tttlab.mttt_jax.conf", version_base=None):
            cfg = T.to_dict(compose("config", overrides=overrides))
        model = T.model_from_config(cfg)
        params = jax.jit(model.init)({"params": jax.random.PRNGKey(0), "idx": jax.random.PRNGKey(0)}, jnp.asarray(x[:1]))["params"]
        out = {}
        for name, devs, accum in (("one", jax.devices()[:1], 1), ("two", jax.devices(), 1), ("two_accum", jax.devices(), 2)):
            cfg["input"]["accum_time"] = accum
            mesh = data_mesh(devs)
            tx = T.make_optimizer(cfg, params, 10)
            step = T.make_train_step(model, tx, cfg, mesh, jax.random.PRNGKey(1))
            state = jax.device_put(jax.tree_util.tree_map(np.array, {"params": params, "opt_state": tx.init(params)}), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
            xs, ys = shard((x, y), mesh)
            assert len(xs.sharding.device_set) == len(devs)
            new, m = step(state, xs, ys, jnp.asarray(1))
            out[name] = (jax.tree_util.tree_map(np.asarray, new["params"]), float(m["loss"]))
        results.append({"two": diff(out["one"][0], out["two"][0]), "accum": diff(out["one"][0], out["two_accum"][0]),
                        "moved": diff(out["one"][0], params), "loss": [out[k][1] for k in out]})
    print(json.dumps(results))
    """
)


def test_step_on_two_devices_equals_one():
    """One training step on a 2-device mesh (and with 2 accumulation steps) equals the step on 1 device, for
    a TTT ViT.  Data parallelism does not depend on the mixer (batch sharded, parameters replicated), so one
    mixer is enough: a linear-attention ViT here as well cost a second set of three compiles (test-time
    budget).  (GD inner loop: with SGD each accumulated micro-batch draws its own token order.)"""
    # conftest.py's XLA flags too
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    runs = [TINY + ["warmup_steps=0", "input.batch_size=8"]]
    res = subprocess.run([sys.executable, "-c", _TWO_DEVICES, json.dumps(runs)], capture_output=True, text=True,
                         env=env, timeout=240)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(results) == len(runs)
    for r in results:
        assert r["moved"] > 1e-4
        assert r["two"] < 1e-6 and r["accum"] < 1e-6, r
        np.testing.assert_allclose(r["loss"], r["loss"][0], rtol=1e-6)


def test_paper_recipes_untouched_and_mnist_recipe_differs_only_where_documented():
    """paper_patch / paper_pixel keep upstream's recipe (zero head, sincos2d for patches, Adam 1e-3,
    10k warm-up, batch 1024, bf16 first moment); the MNIST proxies use their own (learned pos-emb,
    non-zero head, lr 3e-3, batch 64), and the model honours ``head_zeroinit``."""
    from omegaconf import OmegaConf

    for name, posemb in (("paper_patch", None), ("paper_pixel", None)):
        c = OmegaConf.to_container(compose([f"experiment={name}"]), resolve=True)
        assert c["head_zeroinit"] is True and c["posemb"] == posemb
        assert (c["lr"], c["wd"], c["warmup_steps"], c["grad_clip_norm"]) == (0.001, 0.0001, 10000, 1.0)
        assert c["input"]["batch_size"] == 1024 and c["optax"] == {"mu_dtype": "bfloat16"}
        assert c["total_epochs"] == 90
    for name in ("mnist_patch", "mnist_pixel"):
        c = OmegaConf.to_container(compose([f"experiment={name}"]), resolve=True)
        assert c["head_zeroinit"] is False and c["posemb"] == "learn"
        assert (c["lr"], c["warmup_steps"], c["input"]["batch_size"]) == (0.003, 20, 64)
    c = OmegaConf.to_container(compose(["experiment=mnist_patch"]), resolve=True)
    assert c["patch_size"] == 7 and T.model_from_config(c).num_tokens == 16
    x = jnp.zeros((1, 28, 28, 1))
    # the head's initialisation does not depend on the trunk: a one-block linear-attention ViT is enough
    tiny = {
        "arch": {"depth": 1, "width": 8, "mlp_dim": 16, "num_heads": 2},
        "inner": {"layer_type": "linear_attention"},
    }
    for zero in (True, False):
        m = T.model_from_config({**c, "head_zeroinit": zero, **tiny})
        p = jax.jit(m.init)({"params": jax.random.PRNGKey(0), "idx": jax.random.PRNGKey(0)}, x)["params"]
        assert bool(jnp.all(p["head"]["kernel"] == 0)) is zero


def test_a_kill_between_the_records_of_an_epoch_loses_none(tmp_path):
    """Kill audit: a resume rewrote an epoch's records only when its val/prec@1 was missing, so a kill after
    val/prec@1 and before val/loss / train/loss / epoch_time_s lost those for good.  The run directory as
    such a kill leaves it (checkpoint stats of 2 epochs, epoch 2 recorded up to val/prec@1), then the
    resume's repair."""
    from tttlab.core.records import RunDir, read_jsonl

    stats = {"step": [4, 8], "val/prec@1": [0.25, 0.5], "val/loss": [2.0, 1.5], "train/loss": [2.1, 1.7],
             "epoch_time_s": [1.0, 1.0]}  # fmt: skip
    run = RunDir(tmp_path)
    with run.writer(method="mttt_jax.x") as writer:
        T._write_epoch_records(writer, stats, 0)
        writer.write(metric="val/prec@1", value=0.5, step=8, extra={"epoch": 2})
    with run.writer(method="mttt_jax.x") as writer:
        T._rewrite_missing_records(run, writer, stats)
    got = [(r["metric"], r["step"], r["value"]) for r in read_jsonl(run.records_path)]
    assert sorted(got) == sorted(
        (m, s, stats[m][e]) for e, s in enumerate(stats["step"]) for m in stats if m != "step"
    )
