"""Train a ViT with TTT layers (or attention baselines): ``tttlab-mttt-train experiment=<name> [overrides]``.

Upstream: ``train.py --config config_patch.py --config.inner.TTT.inner_itr=4 --workdir ./exp/x``; here
``tttlab-mttt-train experiment=paper_patch inner.TTT.inner_itr=4 'inner.TTT.inner_lr=[1.,1.,1.,1.]' name=_x``.

Per epoch the run directory (``out_dir``) gets ``stats.json`` (upstream's ``all_stat_dict``: ``train/loss``,
``val/loss``, ``val/prec@1`` as a fraction, ``train/inner_loss`` and ``val/inner_loss`` indexed
[epoch][layer][inner step] -- upstream indexes [layer][step][epoch] --, plus ``epoch_time_s``), one
record per metric in ``records.jsonl`` and an orbax checkpoint (``checkpoints/<step>``) holding
parameters, optimizer state and the partial-epoch accumulators, so a killed run resumes where the last
checkpoint left off and ends with the same numbers as an uninterrupted one (bitwise on CPU).

Data parallelism: one ``jax.sharding.Mesh`` over all devices (``data`` axis); batches are sharded along
it, parameters replicated; XLA inserts the gradient all-reduce.  Gradient accumulation (``accum_time``)
scans over micro-batches that are each split evenly over the devices.  ``distributed=true`` calls
``jax.distributed.initialize()`` first (one process per host; each reads its slice of every batch).
The model's random stream (SGD token order) does not depend on the device count, so a step on 2
devices equals a step on 1 up to float reassociation.

Optimizer (big_vision, as upstream): global-norm clipping, Adam (first moment in ``optax.mu_dtype``),
* lr, + wd * param on kernels (decoupled; ``wd_mults``), * schedule (linear warm-up then cosine to 0;
the first step has lr 0 as upstream), frozen inner W0 when ``train_init=false``.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from tttlab.core.errors import RunDirConflictError
from tttlab.core.jax import DATA_AXIS, data_mesh
from tttlab.core.records import RunDir, check_run_dir, config_hash

from . import data as mdata
from .errors import CheckpointError, MTTTConfigError
from .inner_loop import InnerConfig
from .model import build_model

log = logging.getLogger("tttlab.mttt_jax.train")


class SimulatedKill(RuntimeError):
    """Raised by ``_kill_at_step`` (tests): the run stops as if killed, without a final checkpoint."""


# --------------------------------------------------------------------------------------------------
# Config helpers
# --------------------------------------------------------------------------------------------------


def to_dict(cfg) -> dict:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def method_name(inner: InnerConfig) -> str:
    """``mttt_mlp`` / ``mttt_linear`` / ``linear_attention[_elu]`` / ``self_attention`` (+ T and SGD)."""
    if inner.layer_type == "self_attention":
        return "self_attention"
    if inner.layer_type == "linear_attention":
        la = inner.linear_attention
        return (
            "linear_attention"
            + ("_katharopoulos" if la.elu and la.normalizer == "adaptive" else "")
            + (
                ""
                if (la.elu, la.normalizer) in ((True, "adaptive"), (False, "constant"))
                else f"_{la.normalizer}"
            )
        )
    t = inner.TTT
    base = "mttt_linear" if t.inner_encoder == "mlp_1" else "mttt_mlp"
    return (
        base + (f"_T{t.inner_itr}" if t.inner_itr > 1 else "") + ("_sgd" if t.SGD and t.inner_itr > 1 else "")
    )


def model_from_config(c: dict):
    model = build_model(
        model=c["model"], tokens=c["tokens"], inner=c["inner"], num_classes=c["num_classes"],
        image_size=c["image_size"], patch_size=c.get("patch_size"), posemb=c.get("posemb"),
        remat=c.get("remat", False), dtype=c.get("dtype", "float32"), arch=c.get("arch"),
    )  # fmt: skip
    zero_head = c.get("head_zeroinit", True)
    return model if zero_head else model.clone(head_zeroinit=False)


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)


def param_mask(params, pattern: str):
    rx = re.compile(pattern)
    return jax.tree_util.tree_map_with_path(lambda p, _: bool(rx.fullmatch(_path(p))), params)


def schedule_fn(total_steps: int, warmup_steps: int, decay_type: str = "cosine"):
    """big_vision's schedule with base 1: linear warm-up (0 at step 0), then cosine (or linear) to 0."""
    warmup_steps = min(int(warmup_steps), max(total_steps - 1, 0))

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        if decay_type == "cosine":
            lr = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif decay_type == "linear":
            lr = 1.0 - progress
        else:
            raise MTTTConfigError(f"decay_type={decay_type!r}; expected 'cosine' or 'linear'")
        if warmup_steps:
            lr = lr * jnp.minimum(1.0, step / warmup_steps)
        return lr

    return fn


def make_optimizer(c: dict, params, total_steps: int):
    inner = InnerConfig.from_dict(c["inner"])
    frozen = (
        param_mask(params, r".*/inner/.*")
        if (inner.layer_type == "TTT" and not inner.TTT.train_init)
        else None
    )
    txs = []
    if c.get("grad_clip_norm"):
        txs.append(optax.clip_by_global_norm(float(c["grad_clip_norm"])))
    opt_kw = dict(c.get("optax") or {})
    if c.get("optax_name", "scale_by_adam") != "scale_by_adam":
        raise MTTTConfigError(f"optax_name={c['optax_name']!r}; only scale_by_adam (upstream's) is supported")
    txs.append(optax.scale_by_adam(**opt_kw))
    txs.append(optax.scale(float(c["lr"])))
    if c.get("wd"):
        for pattern, mult in c.get("wd_mults") or []:
            txs.append(optax.add_decayed_weights(float(c["wd"]) * float(mult), param_mask(params, pattern)))
    txs.append(
        optax.scale_by_schedule(schedule_fn(total_steps, c["warmup_steps"], c.get("decay_type", "cosine")))
    )
    if frozen is not None:
        txs.append(optax.masked(optax.set_to_zero(), frozen))
    txs.append(optax.scale(-1.0))
    return optax.chain(*txs)


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------


def mixup(rng, images, labels_onehot, p: float):
    """big_vision mixup (n=2, one coefficient per batch, sorted so the image itself dominates)."""
    alpha = jax.random.dirichlet(rng, jnp.array([p, p]), (1,))
    alpha = -jnp.sort(-alpha, axis=-1)
    mix = lambda x: alpha[0, 0] * x + alpha[0, 1] * jnp.roll(x, 1, axis=0)  # noqa: E731
    return mix(images), mix(labels_onehot)


def softmax_xent(logits, labels_onehot):
    return -jnp.mean(jnp.sum(labels_onehot * jax.nn.log_softmax(logits), axis=-1))


def make_train_step(model, tx, c: dict, mesh, base_key):
    num_classes = int(c["num_classes"])
    accum = int(c["input"].get("accum_time", 1))
    mix_p = float((c.get("mixup") or {}).get("p", 0.0) or 0.0)
    repl = NamedSharding(mesh, PartitionSpec())
    micro = NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))

    def loss_fn(params, images, onehot, key):
        logits, inner = model.apply({"params": params}, images, rngs={"idx": key})
        return softmax_xent(logits, onehot), inner

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step_fn(state, images, labels, step):
        params, opt_state = state["params"], state["opt_state"]
        key = jax.random.fold_in(base_key, step)
        k_mix, k_model = jax.random.split(key)
        onehot = jax.nn.one_hot(labels, num_classes)
        if mix_p > 0:
            images, onehot = mixup(k_mix, images, onehot, mix_p)
        if accum == 1:
            (loss, inner), grads = grad_fn(params, images, onehot, k_model)
        else:
            # micro-batch a = rows a, a+accum, ...: every micro-batch is spread evenly over the devices
            def split(x):
                x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(x, micro)

            xs = (split(images), split(onehot), jax.random.split(k_model, accum))

            def body(g_sum, inp):
                (l_, inner_), g = grad_fn(params, *inp)
                return jax.tree_util.tree_map(jnp.add, g_sum, g), (l_, inner_)

            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            grads, (losses, inners) = jax.lax.scan(body, zeros, xs)
            grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
            loss, inner = losses.mean(), inners.mean(0)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return {"params": params, "opt_state": opt_state}, {"loss": loss, "inner": inner}

    return (
        jax.jit(step_fn, out_shardings=(repl, repl), donate_argnums=(0,)) if c.get("jit", True) else step_fn
    )


def make_eval_step(model, c: dict, mesh, key):
    """``eval_fn(params, images, labels, mask)`` -> sums over the real (mask 1) images of the batch: ``loss``
    (NLL), ``correct``, ``n`` and ``inner_sum`` (the inner losses, (depth, T+1)); the rows that pad the last
    batch count nowhere (the model reports its inner losses per image here, not as a batch mean)."""
    repl = NamedSharding(mesh, PartitionSpec())
    per_image = model.clone(per_example_inner=True)

    def eval_fn(params, images, labels, mask):
        logits, inner = per_image.apply({"params": params}, images, rngs={"idx": key})
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        real = (mask > 0)[:, None, None]  # a select, not a product: inf * 0 (attention baselines) is nan
        return {
            "loss": jnp.sum(nll * mask),
            "correct": jnp.sum(correct * mask),
            "n": jnp.sum(mask),
            "inner_sum": jnp.sum(jnp.where(real, inner, 0.0), axis=0),
        }

    return jax.jit(eval_fn, out_shardings=repl) if c.get("jit", True) else eval_fn


def shard_batch(mesh, *arrays):
    from tttlab.core.jax import shard

    return shard(tuple(arrays), mesh)


def evaluate_split(eval_step, params, src, batch_size: int, mesh) -> dict:
    """Means over the real images of ``src`` (every image once; the padded rows of the last batch left
    out) of the NLL, the top-1 accuracy and the inner losses ([layer][step])."""
    tot = {"loss": 0.0, "correct": 0.0, "n": 0.0}
    inner_sum = 0.0
    for images, labels, mask in mdata.eval_batches(src, batch_size, jax.process_index(), jax.process_count()):
        out = jax.device_get(eval_step(params, *shard_batch(mesh, images, labels, mask)))
        for k in tot:
            tot[k] += float(out[k])
        inner_sum = inner_sum + np.asarray(out["inner_sum"], np.float64)
    n = max(tot["n"], 1.0)
    return {"val/loss": tot["loss"] / n, "val/prec@1": tot["correct"] / n,
            "val/inner_loss": (np.asarray(inner_sum) / n).tolist()}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Checkpoints (orbax)
# --------------------------------------------------------------------------------------------------


def checkpoint_manager(directory: Path, keep: int):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).absolute(), options=opts, item_names=("state", "meta"))


def save_checkpoint(mngr, step: int, state, meta: dict) -> None:
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)  # fmt: skip
    mngr.wait_until_finished()


def restore_checkpoint(mngr, step: int, abstract_state):
    import orbax.checkpoint as ocp

    try:
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
    except Exception as exc:  # noqa: BLE001 - orbax raises many types; the user needs the path
        raise CheckpointError(
            f"cannot restore checkpoint {mngr.directory}/{step}: {exc}. It was written by a different "
            "configuration (model/inner flags) or is damaged; start a fresh out_dir or set resume=false"
        ) from exc
    return out["state"], out["meta"]


#: keys that change no number a run computes (core ``RunDir(resumable_keys=...)``): where its folder is, its
#: checkpoint cadence and count, where it stops, whether it resumes, how many threads decode images (the
#: batches are the same whatever the number).  A run that differs from its folder's config only in them (and
#: ``logging``) is the same run: no warning, its records re-tagged with the new config_hash.
RESUMABLE_KEYS = ("out_dir", "name", "resume", "max_steps", "checkpoint_every_steps", "keep_checkpoints",
                  "input.workers")  # fmt: skip
#: keys a checkpoint is also resumed across, though they may change numbers or data: ``jit`` (op by op rounds
#: differently: a 1-epoch TINY run's validation loss moved in the 7th digit), ``distributed`` (the process layout), ``tfds_path`` (the data's folder: it may
#: hold other data).  They stay in the records' identity: a resumed run warns, each part keeps its hash.
RESUMED_ACROSS_KEYS = ("distributed", "tfds_path", "jit")


def training_config(c: dict) -> dict:
    """``c`` without ``logging``, :data:`RESUMABLE_KEYS` and :data:`RESUMED_ACROSS_KEYS` (what a checkpoint
    must agree with to be resumed)."""
    left_out = ("logging", *RESUMABLE_KEYS, *RESUMED_ACROSS_KEYS)
    out = {k: v for k, v in c.items() if k not in left_out}
    out["input"] = {k: v for k, v in (c.get("input") or {}).items() if f"input.{k}" not in left_out}
    return out


def check_resume_config(mngr, step: int, c: dict) -> None:
    """Refuse to resume a checkpoint written with another training config (e.g. ``inner.TTT.inner_itr=4``
    into the out_dir of a T=1 run, whose parameters have the same shapes: it would silently continue, or
    report, the T=1 run).  Checkpoints written before the config was stored are not checked."""
    import orbax.checkpoint as ocp

    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception:  # noqa: BLE001 - damaged checkpoints are reported by restore_checkpoint
        return
    old = meta.get("config") if isinstance(meta, dict) else None
    if old is None:
        return
    from tttlab.core.config import config_diff

    diff = config_diff(old, json_roundtrip(training_config(c)))
    if diff:
        raise CheckpointError(
            f"{mngr.directory}/{step} was written by a run with another training config ({'; '.join(diff)}); "
            f"use another out_dir (e.g. {another_run_dir(c)}) or resume=false to start over"
        )


def _remove_checkpoints(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete the checkpoints of a previous run in ``ckpt_dir`` (a run that starts over: its steps would
    collide with the new ones, orbax refuses to overwrite a step, and evaluate would pick a stale newer
    checkpoint); return what went, for the start over's warning (``[]``: nothing)."""
    if not ckpt_dir.is_dir():
        return []
    mngr = checkpoint_manager(ckpt_dir, keep)
    try:
        steps = sorted(mngr.all_steps())
        for old_step in steps:
            mngr.delete(old_step)
    finally:
        mngr.close()
    if not steps:
        return []
    which = f"checkpoint (step {steps[0]})" if len(steps) == 1 else f"{len(steps)} checkpoints (steps "
    which += "" if len(steps) == 1 else ", ".join(map(str, steps)) + ")"
    return [f"the previous run's {which} in {ckpt_dir.name}/"]


def another_run_dir(c: dict) -> str:
    """The override for a run directory other than ``c``'s that does not exist yet, for the message of a
    refused resume: ``name=<name>_2`` (``_3``, ...) when ``out_dir`` is config.yaml's
    ``runs/mttt/<experiment_name><name>``, else ``out_dir=<out_dir>_2`` (an ``out_dir`` given, as upstream's
    ``--workdir`` gives one, does not change with ``name``).  Never the value the run was given (the hint was
    always ``name=_T4``, also to a run given ``name=_T4``)."""
    import itertools

    out, name = str(c["out_dir"]).rstrip("/"), str(c.get("name") or "")
    from_name = out == f"runs/mttt/{c.get('experiment_name', '')}{name}"
    for k in itertools.count(2):
        folder = f"{out[: len(out) - len(name)]}{name}_{k}" if from_name else f"{out}_{k}"
        if not Path(folder).exists():
            return f"name={name}_{k}" if from_name else f"out_dir={folder}"
    raise AssertionError  # pragma: no cover - itertools.count does not end


def json_roundtrip(x):
    import json

    return json.loads(json.dumps(x))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _empty_stats() -> dict:
    keys = (
        "train/loss",
        "train/inner_loss",
        "val/loss",
        "val/prec@1",
        "val/inner_loss",
        "epoch_time_s",
        "step",
    )
    return {k: [] for k in keys}


def quiet_absl() -> None:
    """orbax logs every checkpoint step at INFO through absl, and jax says at INFO that it found no TPU;
    keep warnings only."""
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:  # pragma: no cover
        pass


def _is_int(v, low: int, none_ok: bool = False) -> bool:
    if v is None:
        return none_ok
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_rate(v, none_ok: bool = False) -> bool:
    if v is None:
        return none_ok
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf


def check_values(c: dict) -> None:
    """Values the schema's types cannot rule out (sizes, counts, rates, dtypes, regexes): an
    :class:`MTTTConfigError` naming the key, before any data is read or any directory written."""
    inp, ev = c.get("input") or {}, c.get("evals") or {}
    checks = [
        ("seed", c.get("seed", 0), _is_int(c.get("seed", 0), 0), "an integer >= 0"),
        ("total_epochs", c.get("total_epochs"), _is_int(c.get("total_epochs"), 1), "an integer >= 1"),
        ("steps_per_epoch", c.get("steps_per_epoch"), _is_int(c.get("steps_per_epoch"), 1, True),
         "null or an integer >= 1"),
        ("max_steps", c.get("max_steps"), _is_int(c.get("max_steps"), 1, True), "null or an integer >= 1"),
        ("image_size", c.get("image_size"), _is_int(c.get("image_size"), 1), "an integer >= 1"),
        ("patch_size", c.get("patch_size"), _is_int(c.get("patch_size"), 1, True), "null or an integer >= 1"),
        ("num_classes", c.get("num_classes"), _is_int(c.get("num_classes"), 1), "an integer >= 1"),
        ("dtype", c.get("dtype", "float32"), c.get("dtype", "float32") in DTYPES, f"one of {DTYPES}"),
        ("lr", c.get("lr"), _is_rate(c.get("lr")), "a finite number >= 0"),
        ("wd", c.get("wd"), _is_rate(c.get("wd"), True), "a finite number >= 0"),
        ("grad_clip_norm", c.get("grad_clip_norm"), _is_rate(c.get("grad_clip_norm"), True),
         "null, 0 (off) or a finite number > 0"),
        ("warmup_steps", c.get("warmup_steps"), _is_int(c.get("warmup_steps"), 0), "an integer >= 0"),
        ("mixup.p", (c.get("mixup") or {}).get("p", 0.0), _is_rate((c.get("mixup") or {}).get("p", 0.0)),
         "a finite Dirichlet concentration >= 0 (0: off)"),
        ("input.batch_size", inp.get("batch_size"), _is_int(inp.get("batch_size"), 1), "an integer >= 1"),
        ("input.accum_time", inp.get("accum_time", 1), _is_int(inp.get("accum_time", 1), 1), "an integer >= 1"),
        ("evals.batch_size", ev.get("batch_size"), _is_int(ev.get("batch_size"), 1, True), "null or an integer >= 1"),
        ("checkpoint_every_steps", c.get("checkpoint_every_steps"), _is_int(c.get("checkpoint_every_steps"), 1, True),
         "null (epoch ends only) or an integer >= 1"),
        ("keep_checkpoints", c.get("keep_checkpoints", 2), _is_int(c.get("keep_checkpoints", 2), 1),
         "an integer >= 1"),
    ]  # fmt: skip
    for key, value, ok, expected in checks:
        if not ok:
            raise MTTTConfigError(f"{key}={value!r}; expected {expected}")
    for pattern, mult in c.get("wd_mults") or []:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise MTTTConfigError(
                f"wd_mults pattern {pattern!r} is not a regular expression: {exc}"
            ) from None
        if not _is_rate(mult):
            raise MTTTConfigError(
                f"wd_mults multiplier {mult!r} for {pattern!r}; expected a finite number >= 0"
            )


#: nodes of the base config whose keys are free: ``optax`` holds ``optax.scale_by_adam``'s keyword arguments
#: (upstream's ``config.optax``), which that function checks itself
FREE_NODES = ("optax",)


def check_known_keys(c: Mapping) -> None:
    """Refuse a key the base config (``conf/config.yaml``, which every experiment only overrides) does not
    have: the config is plain YAML, so Hydra's ``+key=value`` added any key, and a misspelt
    ``+inner.TTT.inner_iter=4`` trained T=1 with no word (Hydra's own message for ``inner_iter=4`` advises
    the ``+``).  One :class:`MTTTConfigError` naming the key, a close key and the keys of its node."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    from tttlab.core.config import closest_key

    base = OmegaConf.to_container(
        OmegaConf.load(files("tttlab.mttt_jax.conf") / "config.yaml"), resolve=False
    )
    base.pop("defaults", None)
    base.pop("hydra", None)

    def walk(given: Mapping, known: Mapping, prefix: str) -> None:
        for key, value in given.items():
            path = f"{prefix}{key}"
            if key not in known:
                close = closest_key(base, path)  # a key next to it, or the one anywhere (logging.progress)
                hint = f"; did you mean {close!r}?" if close else ""
                where = f" in {prefix[:-1]!r}" if prefix else ""
                raise MTTTConfigError(
                    f"unknown config key {path!r}{hint} (known keys{where}: {', '.join(map(str, known))})"
                )
            if isinstance(value, Mapping) and isinstance(known[key], Mapping) and path not in FREE_NODES:
                walk(value, known[key], path + ".")

    walk({k: v for k, v in c.items() if k != "hydra"}, base, "")


#: compute dtypes (``dtype=``); parameters stay float32
DTYPES = ("float32", "bfloat16", "float16")


def train(cfg, *, mesh=None, _kill_at_step: int | None = None) -> dict:
    """Run (or resume) a training run; returns the stats dict also written to ``stats.json``."""
    c = to_dict(cfg)
    check_values(c)
    quiet_absl()
    if c.get("distributed"):
        jax.distributed.initialize()
    mesh = mesh or data_mesh()
    n_dev = mesh.devices.size
    inner = InnerConfig.from_dict(c["inner"])
    c["inner"]["TTT"]["inner_lr"] = list(inner.TTT.inner_lr)
    bs, accum = int(c["input"]["batch_size"]), int(c["input"].get("accum_time", 1))
    if bs % (n_dev * accum):
        raise MTTTConfigError(
            f"input.batch_size={bs} must be divisible by devices x accum_time = {n_dev} x {accum}"
        )
    is_main = jax.process_index() == 0
    ckpt_dir = Path(c["out_dir"]) / "checkpoints"
    resuming = False
    if c.get("resume", True) and ckpt_dir.is_dir():  # before RunDir rewrites config.yaml
        probe = checkpoint_manager(ckpt_dir, c.get("keep_checkpoints", 2))
        try:
            if probe.latest_step() is not None:
                check_resume_config(probe, probe.latest_step(), c)
                resuming = True
        finally:
            probe.close()
    if c.get("resume", True) and not resuming:  # every process: read-only, so all ranks refuse together
        # no checkpoint to resume (deleted to save space, say): a folder holding another config's records is
        # refused as its checkpoint would be, instead of training next to them (two configs' epochs in one
        # folder); resume=false starts over there, removing them
        try:
            check_run_dir(
                c["out_dir"], c, resumable_keys=RESUMABLE_KEYS, append_env=False, start_over="resume=false"
            )
        except RunDirConflictError as e:  # the new folder's override, as a refused checkpoint names it
            raise RunDirConflictError(f"{e}; a new folder: {another_run_dir(c)}") from None
    aug = {**(c["input"].get("augment") or {})}
    train_src = mdata.open_source(
        c["input"]["dataset"], c["input"].get("split", "train"), data_dir=c.get("tfds_path") or None, train=True,
        image_size=c["image_size"], augment=aug, num_examples=c["input"].get("num_examples"),
        workers=int(c["input"].get("workers", 8)),
    )  # fmt: skip
    ev = c.get("evals") or {}
    val_src = mdata.open_source(
        ev.get("dataset", c["input"]["dataset"]), ev.get("split", "validation"), data_dir=c.get("tfds_path") or None,
        train=False, image_size=c["image_size"], augment={"value_range": aug.get("value_range", (-1.0, 1.0))},
        num_examples=ev.get("num_examples"), eval_resize=int(ev.get("resize_small", 256)),
        workers=int(c["input"].get("workers", 8)),
    )  # fmt: skip
    eval_bs = int(ev.get("batch_size") or bs)
    eval_bs = max(n_dev, eval_bs - eval_bs % n_dev)
    steps_per_epoch = int(c.get("steps_per_epoch") or len(train_src) // bs)
    if steps_per_epoch < 1:
        raise MTTTConfigError(f"{len(train_src)} training images give no full batch of {bs}")
    total_steps = steps_per_epoch * int(c["total_epochs"])
    model = model_from_config(c)  # a bad model=... is refused before the run directory exists
    # the run directory only once the data opened: a wrong tfds_path leaves no half-made run behind
    starting_over = not c.get("resume", True) and is_main
    removed = _remove_checkpoints(ckpt_dir, c.get("keep_checkpoints", 2)) if starting_over else []
    run = RunDir(
        c["out_dir"],
        c if is_main else None,
        rank=None if is_main else jax.process_index(),
        resumable_keys=RESUMABLE_KEYS,
        # start over: a clean folder, the checkpoints (above) and the records of every config removed, one
        # warning (evaluate writes to <out_dir>/eval, a folder of its own, which stays)
        start_over="resume=false" if starting_over else None,
        removed=removed,
    )

    seed = int(c.get("seed", 0))
    root = jax.random.PRNGKey(seed)
    k_init, k_train, k_eval = jax.random.split(root, 3)
    dummy = jnp.zeros((1, *model.image_size, train_src.dataset.take([0])[0].shape[-1]), jnp.float32)
    params = jax.jit(model.init)({"params": k_init, "idx": k_init}, dummy)["params"]
    tx = make_optimizer(c, params, total_steps)
    repl = NamedSharding(mesh, PartitionSpec())
    state = jax.device_put({"params": params, "opt_state": tx.init(params)}, repl)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))

    mngr = checkpoint_manager(run.checkpoints, c.get("keep_checkpoints", 2))
    stats, step = _empty_stats(), 0
    acc = {"loss": 0.0, "inner": None, "count": 0, "time": 0.0}
    latest = mngr.latest_step() if c.get("resume", True) else None
    if latest is None and is_main and not starting_over:
        # from step 0 without a checkpoint: this config's records in the folder (the same run's, re-tagged
        # when only RESUMABLE_KEYS changed) are replaced, not recorded twice; another config's were refused
        dropped = run.drop_records()
        if dropped:
            log.warning("%s: starting from step 0: removing the %d records of this config's previous run",
                        run.path, dropped)  # fmt: skip
    if latest is not None:
        abstract = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
        )
        state, meta = restore_checkpoint(mngr, latest, abstract)
        stats, step, acc = meta["stats"], int(meta["step"]), meta["acc"]
        log.info("resumed from %s at step %d", run.checkpoints / str(latest), step)

    method = method_name(inner)
    writer = run.writer(
        method=f"mttt_jax.{method}", package="mttt_jax", framework="jax", model=f"vit-{c['model']}-{c['tokens']}",
        dataset=c["input"]["dataset"], seed=seed, config_hash=config_hash(c),
    )  # fmt: skip
    _rewrite_missing_records(run, writer, stats)
    train_step = make_train_step(model, tx, c, mesh, k_train)
    eval_step = make_eval_step(model, c, mesh, k_eval)
    max_steps = c.get("max_steps")
    ckpt_every = c.get("checkpoint_every_steps")
    progress = bool((c.get("logging") or {}).get("progress", True)) and sys.stderr.isatty() and is_main
    if is_main:
        log.info("%s: %d params, %d devices, %d steps/epoch, %d epochs", method, n_params, n_dev, steps_per_epoch,
                 c["total_epochs"])  # fmt: skip

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=method, dynamic_ncols=True)
    try:
        while step < total_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            t0 = time.perf_counter()
            batches = mdata.train_batches(
                train_src, bs, seed, epoch, in_epoch, jax.process_index(), jax.process_count()
            )
            for images, labels in batches:
                images, labels = shard_batch(mesh, images, labels)
                state, m = train_step(state, images, labels, jnp.asarray(step, jnp.int32))
                m = jax.device_get(m)
                step += 1
                acc["loss"] += float(m["loss"])
                inner_m = np.asarray(m["inner"], np.float64)
                acc["inner"] = (
                    inner_m.tolist()
                    if acc["inner"] is None
                    else (np.asarray(acc["inner"]) + inner_m).tolist()
                )
                acc["count"] += 1
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(m['loss']):.4f}")
                if _kill_at_step is not None and step >= _kill_at_step:
                    raise SimulatedKill(f"killed at step {step}")
                end_of_epoch = step % steps_per_epoch == 0
                stop = max_steps is not None and step >= int(max_steps)
                if end_of_epoch:
                    acc["time"] += time.perf_counter() - t0
                    _finish_epoch(stats, acc, step, eval_step, state, val_src, eval_bs, mesh)
                    acc = {"loss": 0.0, "inner": None, "count": 0, "time": 0.0}
                if end_of_epoch or stop or (ckpt_every and step % int(ckpt_every) == 0):
                    if not end_of_epoch:
                        acc["time"] += time.perf_counter() - t0
                        t0 = time.perf_counter()
                    save_checkpoint(mngr, step, state, {"step": step, "stats": stats, "acc": acc,
                                                        "config": training_config(c)})  # fmt: skip
                if end_of_epoch and is_main:
                    run.write_stats(stats)
                    _write_epoch_records(writer, stats, len(stats["step"]) - 1)
                    log.info(
                        "epoch %d: %s",
                        len(stats["step"]),
                        {k: stats[k][-1] for k in ("train/loss", "val/loss", "val/prec@1")},
                    )
                if stop:
                    break
            if max_steps is not None and step >= int(max_steps):
                break
    finally:
        if bar:
            bar.close()
        writer.close()
        mngr.close()
    if step < total_steps and is_main:  # max_steps: say the run is not finished (it ended quietly, exit 0)
        log.warning("stopped at step %d of %d (max_steps=%s), checkpointed: run the command again without "
                    "max_steps to finish it", step, total_steps, max_steps)  # fmt: skip
    return stats


def _finish_epoch(stats, acc, step, eval_step, state, val_src, eval_bs, mesh):
    n = max(acc["count"], 1)
    stats["train/loss"].append(acc["loss"] / n)
    stats["train/inner_loss"].append((np.asarray(acc["inner"]) / n).tolist())
    stats["epoch_time_s"].append(acc["time"])
    stats["step"].append(step)
    for k, v in evaluate_split(eval_step, state["params"], val_src, eval_bs, mesh).items():
        stats[k].append(v)


def _write_epoch_records(writer, stats, e: int, have=frozenset()) -> None:
    """The records of epoch ``e`` from ``stats``, except the ``(metric, step)`` pairs in ``have``."""
    for metric in ("val/prec@1", "val/loss", "train/loss", "epoch_time_s"):
        v, step = float(stats[metric][e]), int(stats["step"][e])
        if math.isfinite(v) and (metric, step) not in have:
            writer.write(metric=metric, value=v, step=step, extra={"epoch": e + 1})


def _rewrite_missing_records(run, writer, stats) -> None:
    """After a resume: records of epochs that finished before the kill but whose lines were lost."""
    if not stats["step"] or jax.process_index() != 0:
        return
    have = set()
    if run.records_path.exists():
        from tttlab.core.records import read_jsonl

        have = {(r.get("metric"), r.get("step")) for r in read_jsonl(run.records_path)}
    for e in range(len(stats["step"])):  # per metric: a kill can fall between an epoch's records
        _write_epoch_records(writer, stats, e, have)
    run.write_stats(stats)


def _result_label(epochs_done: int, total_epochs: int) -> str:
    """The printed result's name: ``final`` only for a finished run (a ``max_steps`` stop printed its last
    epoch's number as the final one)."""
    if epochs_done >= total_epochs:
        return "final val/prec@1"
    return f"val/prec@1 after epoch {epochs_done} of {total_epochs} (stopped by max_steps)"


def main() -> None:
    """``tttlab-mttt-train``: Hydra overrides, or upstream's ``--config``/``--config.<key>``/``--workdir``
    flags (translated, see :mod:`tttlab.mttt_jax.cli`)."""
    import hydra

    from tttlab.core.cli import check_hydra_command

    from .cli import apply_upstream_translation, user_errors

    apply_upstream_translation("tttlab-mttt-train")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_absl()

    @hydra.main(config_path="conf", config_name="config", version_base=None)
    def _main(cfg) -> None:
        with user_errors("tttlab-mttt-train"):
            check_known_keys(to_dict(cfg))
            stats = train(cfg)
            if stats["val/prec@1"]:  # inside user_errors: `| head` ends it quietly, not in Hydra's report
                print(
                    f"{_result_label(len(stats['val/prec@1']), int(cfg.total_epochs))} = {stats['val/prec@1'][-1]:.4f}"
                )

    # the config is plain YAML and check_known_keys refuses a key it lacks: core names it (with a did-you-mean)
    # instead of Hydra's '+key=value', which led to that refusal; optax's keys stay Hydra's to add
    check_hydra_command("tttlab-mttt-train", "tttlab.mttt_jax.conf", "config", compile_key=False,
                        free_keys=[f"{node}.*" for node in FREE_NODES])  # fmt: skip
    _main()


if __name__ == "__main__":
    main()


__all__ = [
    "train",
    "check_known_keys",
    "check_resume_config",
    "training_config",
    "make_optimizer",
    "make_train_step",
    "method_name",
    "model_from_config",
    "schedule_fn",
]
