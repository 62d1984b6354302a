"""float32 vs bfloat16 compute vs no jit on the ``mnist_patch`` proxy: time per training step and accuracy.

The commands of BENCHMARKS.md and benchmarks/mttt_amp.md (``--out FILE`` writes the table alone; the .md
file adds the text around it)::

    nice -n 10 .venv-jax/bin/python benchmarks/bench_mttt_dtype.py --examples 6400 --block 10 --test 1000 --nojit-steps 3
    nice -n 10 .venv-jax/bin/python benchmarks/bench_mttt_dtype.py --examples 3200 --block 10 --test 1000 --nojit-steps 3

Each variant trains its own copy of the same model (``experiment=mnist_patch``: MTTT-MLP T=1, 7x7 patches,
width-64 ViT, batch 64, same seed, data order and optimizer) with ``train.make_train_step``, the step of
``tttlab-mttt-train``: ``dtype=float32`` and ``dtype=bfloat16`` under ``jax.jit`` (JAX's compiler, always
on in train and evaluate), and ``float32`` with ``jit=false`` (the same step run op by op: what the jit
buys; only its first ``--nojit-steps`` steps are run, one per round: the first includes JAX's per-op
compiles, the median is over the others).  The variants advance in
lockstep, ``--block`` steps each in turn (same load for all).  Reported: median time per step (ms) over the
blocks after the first (the first holds the compile, reported separately) and accuracy on ``--test``
MNIST test images with the variant's dtype.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tttlab.core.jax import data_mesh
from tttlab.mttt_jax import data as mdata
from tttlab.mttt_jax import train as T


def compose(overrides):
    from hydra import compose as hcompose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="tttlab.mttt_jax.conf", version_base=None):
        return T.to_dict(hcompose("config", overrides=list(overrides)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=3200)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--nojit-steps", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    T.quiet_absl()
    mesh = data_mesh()
    variants = {"float32 (jit)": ("float32", True), "bfloat16 (jit)": ("bfloat16", True),
                "float32, jit=false": ("float32", False)}  # fmt: skip
    runs = {}
    for name, (dtype, jit) in variants.items():
        c = compose(["experiment=mnist_patch", f"input.num_examples={a.examples}", f"dtype={dtype}",
                     f"jit={str(jit).lower()}", "logging.progress=false"])  # fmt: skip
        src = mdata.open_source("mnist", "train", train=True, image_size=28, augment=dict(c["input"]["augment"]),
                                num_examples=a.examples, workers=1)  # fmt: skip
        bs = int(c["input"]["batch_size"])
        steps = len(src) // bs
        model = T.model_from_config(c)
        k_init, k_train, k_eval = jax.random.split(jax.random.PRNGKey(0), 3)
        params = jax.jit(model.init)({"params": k_init, "idx": k_init}, jnp.zeros((1, 28, 28, 1)))["params"]
        tx = T.make_optimizer(c, params, steps)
        runs[name] = dict(c=c, model=model, state={"params": params, "opt_state": tx.init(params)}, times=[],
                          step=T.make_train_step(model, tx, c, mesh, k_train), jit=jit, loss=[],
                          eval=T.make_eval_step(model, {**c, "jit": True}, mesh, k_eval))  # fmt: skip
    batches = [T.shard_batch(mesh, x, y) for x, y in mdata.train_batches(src, bs, 0, 0)]
    for k, lo in enumerate(range(0, steps, a.block)):
        for r in runs.values():
            if not r["jit"]:  # one step per round, the first --nojit-steps rounds only
                lo, hi = k, k + 1
                if k >= a.nojit_steps:
                    continue
            else:
                hi = min(lo + a.block, steps)
            t0 = time.perf_counter()
            for s in range(lo, hi):
                r["state"], m = r["step"](r["state"], *batches[s], jnp.asarray(s, jnp.int32))
                r["loss"].append(float(m["loss"]))
            r["times"].append((time.perf_counter() - t0) / (hi - lo))
    val = mdata.open_source("mnist", "test", train=False, image_size=28, augment={"value_range": (-1.0, 1.0)},
                            num_examples=a.test, workers=1)  # fmt: skip
    rows = []
    for name, r in runs.items():
        ev = T.evaluate_split(r["eval"], r["state"]["params"], val, 250, mesh) if r["jit"] else None
        rows.append(dict(name=name, first=r["times"][0], step=statistics.median(r["times"][1:] or r["times"]),
                         steps=len(r["loss"]), loss=float(np.mean(r["loss"][-10:])),
                         acc=ev["val/prec@1"] if ev else None))  # fmt: skip
        print(rows[-1], flush=True)
    base = rows[0]["step"]
    lines = ["| variant | time/step (median) | vs float32 | first block time/step (compile) | steps | loss (last 10 steps) | test accuracy % |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        acc = f"{100 * r['acc']:.2f}" if r["acc"] is not None else "not trained to the end"
        ratio = round(base / r["step"], 2 if base / r["step"] >= 0.1 else 4)
        lines.append(f"| {r['name']} | {r['step'] * 1e3:.1f} ms | {ratio}x | {r['first'] * 1e3:.0f} ms | "
                     f"{r['steps']} | {r['loss']:.4f} | {acc} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
