"""Forward+backward time and peak memory of one ViT block per token mixer, as ratios to linear attention.

    python benchmarks/bench_mttt.py --tokens 196 784 3136 --batch 1 --repeats 15 --out benchmarks/mttt.md
    python benchmarks/bench_mttt.py --tokens 196 784 3136 50176 --batch 8 --out benchmarks/mttt_gpu.md  # GPU

One block = ``x + mixer(LN(x))``, ``x + MLP(LN(x))`` (tttlab.mttt_jax.model.Encoder1DBlock), width/heads
of ViT-S by default.  Time: median over ``--repeats`` calls of a jitted ``value_and_grad`` of
``sum(block(x)^2)`` with respect to the block's parameters and ``x`` (after a warm-up call); at each N
all mixers are compiled first and then called round-robin (one call each per round, the order rotated),
so that a load change on a shared machine affects every mixer alike.  Peak
memory: XLA's compiled memory analysis (temporaries + arguments + outputs) of that program, so it is
the same on any backend and needs no allocator statistics.  ``mttt_mlp (nested autodiff)`` is the
literal reference (upstream's structure: per-head ``vmap`` + ``jax.grad`` inside), timed at the
smallest N only to show what the closed form gains.  The baseline of the ratios is linear attention
with identity features and a constant normalizer: MTTT-Linear with T=1 computes exactly that.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from tttlab.mttt_jax.inner_loop import InnerConfig, TTTConfig
from tttlab.mttt_jax.model import Encoder1DBlock

MIXERS = {
    "linear_attention": dict(
        layer_type="linear_attention", linear_attention=dict(elu=False, normalizer="constant")
    ),
    "linear_attention_katharopoulos": dict(layer_type="linear_attention"),
    "self_attention": dict(layer_type="self_attention"),
    "mttt_linear": dict(layer_type="TTT", TTT=TTTConfig.mttt_linear().__dict__),
    "mttt_mlp": dict(layer_type="TTT"),
    "mttt_mlp_T4": dict(layer_type="TTT", TTT=dict(inner_itr=4)),
    "mttt_mlp_T4_sgd": dict(layer_type="TTT", TTT=dict(inner_itr=4, SGD=True)),
}


def program(name, n, batch, width, heads, dtype):
    inner = InnerConfig.from_dict(MIXERS[name])
    block = Encoder1DBlock(width, 4 * width, heads, inner, dtype)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, n, width), dtype)
    params = block.init({"params": jax.random.PRNGKey(1), "idx": jax.random.PRNGKey(2)}, x)["params"]

    def loss(p, x):
        y, _ = block.apply({"params": p}, x, rngs={"idx": jax.random.PRNGKey(3)})
        return jnp.sum(y.astype(jnp.float32) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params, x


def reference_program(n, batch, width, heads, dtype):
    """The literal nested-autodiff TTT layer (MTTT-MLP, T=1) inside the same block."""
    from flax import linen as nn

    from tttlab.mttt_jax.inner_loop import TTTLayer
    from tttlab.mttt_jax.reference import ttt_reference

    cfg = TTTConfig()
    layer = TTTLayer(width, heads, cfg, dtype)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, n, width), dtype)
    params = {
        "ln1": nn.LayerNorm().init(jax.random.PRNGKey(0), x)["params"],
        "ttt": layer.init({"params": jax.random.PRNGKey(1)}, x)["params"],
        "ln2": nn.LayerNorm().init(jax.random.PRNGKey(0), x)["params"],
        "mlp": nn.Dense(4 * width).init(jax.random.PRNGKey(2), x)["params"],
        "mlp2": nn.Dense(width).init(jax.random.PRNGKey(3), jnp.zeros((1, 4 * width)))["params"],
    }

    def loss(p, x):
        y = nn.LayerNorm().apply({"params": p["ln1"]}, x)
        x = x + ttt_reference(p["ttt"], y, cfg)[0]
        y = nn.LayerNorm().apply({"params": p["ln2"]}, x)
        y = nn.Dense(width).apply(
            {"params": p["mlp2"]}, nn.gelu(nn.Dense(4 * width).apply({"params": p["mlp"]}, y))
        )
        return jnp.sum((x + y) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params, x


def compile_program(fn, params, x):
    """Compile, read XLA's memory analysis, run once (warm-up); returns ``(call, peak bytes)``."""
    compiled = fn.lower(params, x).compile()
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
                - getattr(mem, "alias_size_in_bytes", 0))  # fmt: skip
    jax.block_until_ready(compiled(params, x))
    return (lambda: compiled(params, x)), peak


def measure_interleaved(calls: dict, repeats: int) -> dict:
    """Median wall time and median process CPU time (all threads) of each call, the calls interleaved
    round-robin (the order rotated every round), so that load changes on a shared machine hit every
    mixer alike.  Returns ``{name: (wall s, cpu s)}``; CPU time is the steadier number under load."""
    names = list(calls)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(calls[name]())
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in names}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[196, 784, 3136])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=list(MIXERS), metavar="MIXER",
                    help=f"a subset of {', '.join(MIXERS)}")  # fmt: skip
    ap.add_argument("--no-reference", action="store_true", help="skip the nested-autodiff reference")
    ap.add_argument("--max-self-attention-tokens", type=int, default=4096,
                    help="skip self-attention above this N (quadratic memory)")  # fmt: skip
    ap.add_argument("--out", default=None, help="write the markdown table here")
    a = ap.parse_args(argv)
    try:
        dtype = jnp.dtype(a.dtype)
    except TypeError as exc:
        ap.error(f"--dtype {a.dtype!r}: {exc} (e.g. float32, bfloat16)")
    rows = []
    dev = jax.devices()[0]
    header = (
        f"Device: {dev.platform} ({getattr(dev, 'device_kind', '')}), {platform.processor() or platform.machine()}; "
        f"jax {jax.__version__}; block width {a.width}, {a.heads} heads, MLP {4 * a.width}, batch {a.batch}, "
        f"{a.dtype}; median of {a.repeats} fwd+bwd calls per mixer, interleaved round-robin "
        "(wall time; CPU = process CPU time of all threads).\n\n"
        "| N | mixer | fwd+bwd ms | CPU ms | peak MiB | time / linear attention | CPU time / linear attention "
        "| memory / linear attention |\n"
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )

    def table():
        return header + "".join(
            f"| {n} | {name} | {t * 1e3:.2f} | {c * 1e3:.2f} | {m / 2**20:.1f} | {rt:.2f}x | {rc:.2f}x | {rm:.2f}x |\n"
            for n, name, t, c, m, rt, rc, rm in rows
        )

    def write(done: bool):
        """The table so far, after every N (a run stopped by a time limit keeps the N it finished)."""
        if not a.out:
            return
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("# MTTT token mixers: one ViT block, forward + backward\n\n")
            f.write(
                "Command: `python benchmarks/bench_mttt.py "
                + " ".join(argv or __import__("sys").argv[1:])
                + "`\n\n"
            )
            if not done:
                f.write(
                    f"**Partial: N = {', '.join(str(n) for n in sorted({r[0] for r in rows}))} so far.**\n\n"
                )
            f.write(table())
        os.replace(tmp, a.out)

    for n in a.tokens:
        calls, peaks = {}, {}
        for name in a.mixers:
            if name == "self_attention" and n > a.max_self_attention_tokens:
                continue
            calls[name], peaks[name] = compile_program(*program(name, n, a.batch, a.width, a.heads, dtype))
        if not a.no_reference and n == min(a.tokens):
            ref = "mttt_mlp (nested autodiff)"
            calls[ref], peaks[ref] = compile_program(*reference_program(n, a.batch, a.width, a.heads, dtype))
        med = measure_interleaved(calls, a.repeats)
        for name, (t, c) in med.items():
            print(f"N={n:6d} {name:32s} {t * 1e3:9.2f} ms  cpu {c * 1e3:9.2f} ms  {peaks[name] / 2**20:9.1f} MiB",
                  flush=True)  # fmt: skip
        base_t, base_c = med["linear_attention"]
        base_m = peaks["linear_attention"]
        for name, (t, c) in med.items():
            m = peaks[name]
            rows.append((n, name, t, c, m, t / base_t, c / base_c, m / base_m if base_m else float("nan")))
        write(done=False)
    print("\n" + table())
    write(done=True)


if __name__ == "__main__":
    main()
