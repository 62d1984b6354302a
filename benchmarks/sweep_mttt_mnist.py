"""MTTT MNIST proxies: every token mixer from patches and from pixels, trained with `tttlab-mttt-train`.

    python benchmarks/sweep_mttt_mnist.py --out-dir runs/mttt_sweep --jobs 14 --table benchmarks/mttt_mnist.md

Each configuration is one `python -m tttlab.mttt_jax.train experiment=mnist_<tokens> ...` subprocess (runs
resume, so a second call only fills in what is missing); `--jobs` run at once (on a GPU they share it; set
XLA_PYTHON_CLIENT_PREALLOCATE=false).  SGD needs N % T == 0: `--sgd-t pixel=7` for `image_size=7`.  The table reports the final val prec@1 on the 10,000 MNIST test
images and the median wall time per epoch (the first epoch includes compilation; the median of 3 does not
when epochs >= 3).  Extra Hydra overrides for every run go after `--`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _sweep import run_until

TTT_LINEAR = [
    "inner.layer_type=TTT", "inner.TTT.inner_encoder=mlp_1", "inner.TTT.inner_encoder_init=zero",
    "inner.TTT.inner_encoder_bias=false", "inner.TTT.decoder_LN=false", "inner.TTT.train_init=false",
]  # fmt: skip
MIXERS = {
    "self_attention": ["inner.layer_type=self_attention"],
    "linear_attention": ["inner.layer_type=linear_attention", "inner.linear_attention.elu=false",
                         "inner.linear_attention.normalizer=constant"],
    "linear_attention_katharopoulos": ["inner.layer_type=linear_attention", "inner.linear_attention.elu=true",
                                       "inner.linear_attention.normalizer=adaptive"],
    "mttt_linear": TTT_LINEAR,
    "mttt_mlp_T1": ["inner.layer_type=TTT", "inner.TTT.inner_itr=1"],
    "mttt_mlp_T4": ["inner.layer_type=TTT", "inner.TTT.inner_itr=4"],
    "mttt_mlp_T4_sgd": ["inner.layer_type=TTT", "inner.TTT.inner_itr=4", "inner.TTT.SGD=true"],
}  # fmt: skip
#: SGD splits the N tokens into T minibatches (N % T == 0): 16 patch tokens (7x7 patches) and 196 or 784
#: pixel tokens all take T=4 (49 tokens of the old 4x4-patch proxy took T=7).
SGD_T = {"patch": 4, "pixel": 4}


def runs(tokens: list[str], sgd_t: dict[str, int] | None = None) -> list[tuple[str, str, list[str]]]:
    sgd_t = {**SGD_T, **(sgd_t or {})}
    out = []
    for tok in tokens:
        for name, flags in MIXERS.items():
            flags = list(flags)
            label = name
            if name.endswith("_sgd") and sgd_t[tok] != 4:
                flags = [f if not f.startswith("inner.TTT.inner_itr") else f"inner.TTT.inner_itr={sgd_t[tok]}"
                         for f in flags]  # fmt: skip
                label = f"mttt_mlp_T{sgd_t[tok]}_sgd"
            out.append((tok, label, flags))
    return out


def _tokens_t(text: str) -> tuple[str, int]:
    """``--sgd-t`` item ``TOKENS=T`` (e.g. ``pixel=7``) -> ``("pixel", 7)``; argparse reports a bad one."""
    tok, sep, t = text.partition("=")
    if not sep or tok not in SGD_T or not t.isdigit() or int(t) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected TOKENS=T with TOKENS one of {', '.join(SGD_T)} and T a positive integer"
        )
    return tok, int(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="runs/mttt_sweep")
    ap.add_argument("--tokens", nargs="+", default=list(SGD_T), choices=list(SGD_T))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds from now after which unfinished runs are killed (the table shows them)",
    )
    ap.add_argument("--table", default=None, help="write the markdown table here")
    ap.add_argument("--only", nargs="*", default=None, help="mixer labels to run")
    ap.add_argument(
        "--sgd-t",
        nargs="*",
        default=[],
        type=_tokens_t,
        metavar="TOKENS=T",
        help="SGD inner steps per token kind, e.g. pixel=7 for 7x7 pixels (49 tokens)",
    )
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    a = ap.parse_args()
    stop_at = None if a.deadline is None else time.monotonic() + a.deadline
    sgd_t = dict(a.sgd_t)
    labels = sorted({r[1] for r in runs(a.tokens, sgd_t)})
    unknown = [x for x in a.only or [] if x not in labels]
    if unknown:
        ap.error(f"--only {' '.join(unknown)}: not a mixer label of this sweep (labels: {', '.join(labels)})")
    todo = [r for r in runs(a.tokens, sgd_t) if not a.only or r[1] in a.only]
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    out_root = Path(a.out_dir)
    out_root.mkdir(parents=True, exist_ok=True)

    def one(item):
        tok, label, flags = item
        out = out_root / f"{tok}-{label}"
        cmd = [sys.executable, "-m", "tttlab.mttt_jax.train", f"experiment=mnist_{tok}", f"out_dir={out}",
               "logging.progress=false", *flags, *a.overrides]  # fmt: skip
        t0 = time.perf_counter()
        res = run_until(cmd, stop_at, env=env)
        (out_root / f"{tok}-{label}.log").write_text(res.stdout[-20000:] + res.stderr[-20000:])
        print(f"{tok:6s} {label:32s} rc={res.returncode} {time.perf_counter() - t0:7.1f}s", flush=True)
        return item, out, res.returncode

    with ThreadPoolExecutor(max(1, a.jobs)) as ex:
        results = list(ex.map(one, todo))
    rows = ["| tokens | mixer | val prec@1 (%) | epochs | median s/epoch | status |",
            "| --- | --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for (tok, label, _), out, rc in results:
        try:
            stats = json.loads((out / "stats.json").read_text())
            acc = 100 * stats["val/prec@1"][-1]
            times = sorted(stats["epoch_time_s"])
            rows.append(f"| {tok} | {label} | {acc:.2f} | {len(stats['val/prec@1'])} | "
                        f"{times[len(times) // 2]:.1f} | {'ok' if rc == 0 else f'rc={rc}'} |")  # fmt: skip
        except (OSError, KeyError, IndexError, ValueError) as exc:
            rows.append(f"| {tok} | {label} | - | - | - | failed (rc={rc}, {type(exc).__name__}) |")
    table = "\n".join(rows)
    print(table)
    if a.table:
        Path(a.table).write_text(table + "\n")


if __name__ == "__main__":
    main()
