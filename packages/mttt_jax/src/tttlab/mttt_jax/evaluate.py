"""Evaluate a trained run on a core corruption benchmark: ``tttlab-mttt-evaluate run_dir=<dir> [benchmark.*]``.

MTTT's test-time training happens inside every forward pass (each TTT layer runs its inner loop on the
tokens of each image), so there are no weights to adapt or reset between batches: every setting of
``tttlab.core.benchmark`` gives the same numbers, and one record per domain is written (``accuracy``,
``error`` and the mean inner loss of the last layer at its last step as ``extra``) plus a ``mean``
summary, in ``<out_dir>/records.jsonl`` (default ``<run_dir>/eval``).

``run(cfg)`` is the ``evaluate`` target of the ``tttlab.methods`` specs (a mapping with the keys of
``conf/evaluate.yaml``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tttlab.core.errors import CheckpointError, DatasetNotFoundError
from tttlab.core.jax import data_mesh, replicate, shard
from tttlab.core.records import RunDir, config_hash

from . import data as mdata
from . import train as T
from .inner_loop import InnerConfig

log = logging.getLogger("tttlab.mttt_jax.evaluate")


def load_run(run_dir, step: int | None = None):
    """``(config dict, model, params)`` of a training run directory (newest checkpoint by default)."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise DatasetNotFoundError(
            f"{cfg_path} does not exist; expected a run directory of tttlab-mttt-train"
        )
    c = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
    model = T.model_from_config(c)
    channels = 1 if c["input"]["dataset"] in ("mnist", "digits") else 3
    dummy = jnp.zeros((1, *model.image_size, channels), jnp.float32)
    params = jax.jit(model.init)({"params": jax.random.PRNGKey(0), "idx": jax.random.PRNGKey(0)}, dummy)[
        "params"
    ]
    tx = T.make_optimizer(c, params, 1)
    state = {"params": params, "opt_state": tx.init(params)}
    mngr = T.checkpoint_manager(run_dir / "checkpoints", c.get("keep_checkpoints", 2))
    try:
        step = mngr.latest_step() if step is None else int(step)
        if step is None:
            raise CheckpointError(
                f"{run_dir / 'checkpoints'} holds no checkpoint; train first (tttlab-mttt-train)"
            )
        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        state, _ = T.restore_checkpoint(mngr, step, abstract)
    finally:
        mngr.close()
    return c, model, state["params"]


def run(cfg: Mapping | None = None, **overrides) -> Path:
    """Evaluate ``cfg['run_dir']`` on ``cfg['benchmark']``; returns the records file."""
    from tttlab.core.benchmark import from_config

    c = {**T.to_dict(cfg or {}), **overrides}
    T.quiet_absl()
    if not c.get("run_dir"):
        raise CheckpointError("evaluate needs run_dir=<directory of a tttlab-mttt-train run>")
    tc, model, params = load_run(c["run_dir"], c.get("checkpoint_step"))
    inner = InnerConfig.from_dict(tc["inner"])
    out = RunDir(c.get("out_dir") or Path(c["run_dir"]) / "eval", c)
    bcfg = dict(c.get("benchmark") or {})
    bench = from_config(bcfg)
    if bcfg.get("include_clean"):
        from tttlab.core.benchmark import make_benchmark

        bench = make_benchmark(bench.name, root=bcfg.get("root"), corruptions=bcfg.get("corruptions", "common"),
                               severities=list(bcfg.get("severities", [5])), setting=bcfg.get("setting", "reset_each_shift"),
                               batch_size=int(bcfg.get("batch_size", 64)), num_examples=bcfg.get("num_examples"),
                               seed=int(bcfg.get("seed", 0)), include_clean=True)  # fmt: skip
    mesh = data_mesh()
    n_dev = mesh.devices.size
    params = replicate(params, mesh)
    key = jax.random.fold_in(jax.random.PRNGKey(int(tc.get("seed", 0))), 7)

    @jax.jit
    def predict(params, images):
        logits, inner_losses = model.apply({"params": params}, images, rngs={"idx": key})
        return jnp.argmax(logits, -1), inner_losses

    lo, hi = (tc["input"].get("augment") or {}).get("value_range", (-1.0, 1.0))
    per_domain: dict = {}
    for batch in bench:
        images = mdata.downsample(batch.images, model.image_size[0])
        x = mdata.value_range(images, lo, hi)
        n = x.shape[0]
        pad = (-n) % n_dev
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        pred, inner_losses = predict(params, shard(x, mesh))
        pred = np.asarray(pred)[:n]
        ids = batch.domain_ids if batch.domain is None else np.zeros(n, np.int64)
        for i in np.unique(ids):
            dom = bench.domains[int(i)] if batch.domain is None else batch.domain
            sel = ids == i
            acc = per_domain.setdefault(dom, {"correct": 0, "n": 0, "inner": []})
            acc["correct"] += int((pred[sel] == batch.labels[sel]).sum())
            acc["n"] += int(sel.sum())
            acc["inner"].append(float(np.asarray(inner_losses)[-1, -1]))
    method = f"mttt_jax.{T.method_name(inner)}"
    writer = out.writer(method=method, package="mttt_jax", framework="jax", model=f"vit-{tc['model']}-{tc['tokens']}",
                        dataset=bench.name, setting=bench.setting if hasattr(bench, "setting") else None,
                        seed=int(tc.get("seed", 0)), config_hash=config_hash(tc))  # fmt: skip
    accs = []
    with writer:
        for dom, a in sorted(per_domain.items(), key=lambda kv: str(kv[0])):
            acc = a["correct"] / max(a["n"], 1)
            corr = dom.corruption or "clean"
            extra = {"last_inner_loss": float(np.mean(a["inner"])) if inner.layer_type == "TTT" else None}
            for metric, v in (("accuracy", acc), ("error", 1 - acc)):
                writer.write(
                    metric=metric, value=v, corruption=corr, severity=dom.severity, n=a["n"], extra=extra
                )
            if dom.corruption is not None:
                accs.append(acc)
            log.info("%s: accuracy %.4f (n=%d)", dom, acc, a["n"])
        if accs:
            writer.write(metric="accuracy", value=float(np.mean(accs)), corruption="mean", n=len(accs))
            writer.write(metric="error", value=float(1 - np.mean(accs)), corruption="mean", n=len(accs))
    return out.records_path


def main() -> None:
    import hydra

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    @hydra.main(config_path="conf", config_name="evaluate", version_base=None)
    def _main(cfg) -> None:
        print(run(cfg))

    _main()


if __name__ == "__main__":
    main()
