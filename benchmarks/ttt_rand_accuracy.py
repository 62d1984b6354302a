"""Is TTT with one random rotation per image as accurate as TTT with all four?  (issue 3's speed decision)

``bench_torch_ttt.py --ttt-rand`` measured our TTT with ``rotation_type="rand"`` at 0.34x upstream's time
per batch, at 67.08 vs 67.60 % on 960 images of one seed: too few images to call the accuracies equal or
different.  This script measures only accuracy, on all 10,000 noisy MNIST test images (x + 2 N(0, 1), the
seed 004 tutorial's stream, batch 32), for several trained models and noise draws, ours only (our
``"expand"`` TTT gives upstream torch-ttt 0.0.2's accuracy to the digit in every ``bench_torch_ttt`` row).
Everything else is ``bench_torch_ttt``'s setting: seed 004's BatchNorm-free network trained jointly with
its rotation head, Adam lr 1e-3, 1 step, reset every batch.

    .venv/bin/python benchmarks/ttt_rand_accuracy.py --models 3 --noise 3 --out benchmarks/ttt_rand_accuracy.md

Prints (and writes) one row per (model, noise) pair: accuracy without TTT, with ``"expand"``, with
``"rand"``, the difference rand - expand, and the paired mean and 95 % interval of the difference over
all pairs (a normal interval over the pairs' differences).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_torch_ttt import mnist_tensors, train  # noqa: E402

sys.path.pop(0)


def accuracy(engine, batches, labels) -> float:
    right = 0
    for xb, yb in zip(batches, labels, strict=True):
        out = engine(xb)
        out = out[0] if isinstance(out, tuple) else out
        right += int((out.argmax(1) == yb).sum())
    return 100.0 * right / sum(len(yb) for yb in labels)


def main(argv=None) -> int:
    from tttlab.torch_ttt import get_engine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=3, help="trained models (seeds 7, 8, ...)")
    p.add_argument("--noise", type=int, default=3, help="noise draws per model (seeds 7, 8, ...)")
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if min(args.models, args.noise, args.images) < 1:
        p.error(
            f"--models {args.models} --noise {args.noise} --images {args.images}: each must be at least 1"
        )
    torch.set_num_threads(args.threads)
    x, y = mnist_tensors("test", args.images)
    settings = {"num_steps": 1, "lr": 1e-3, "optimizer_name": "adam"}
    rows, t0 = [], time.time()
    for m in range(args.models):
        net, head = train(False, args.train_steps, seed=7 + m)  # bench_torch_ttt's model, seed 7 + m
        for k in range(args.noise):
            noisy = x + 2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7 + k))
            batches, labels = list(noisy.split(32)), list(y.split(32))
            with torch.no_grad():
                plain = accuracy(net, batches, labels)
            acc = {}
            for rot in ("expand", "rand"):
                extra = {"generator": torch.Generator().manual_seed(100 * m + k)} if rot == "rand" else {}
                eng = get_engine("ttt")(copy.deepcopy(net), "fc2", angle_head=copy.deepcopy(head),
                                        optimization_parameters=dict(settings), rotation_type=rot, **extra)  # fmt: skip
                acc[rot] = accuracy(eng.eval(), batches, labels)
            rows.append((7 + m, 7 + k, plain, acc["expand"], acc["rand"], acc["rand"] - acc["expand"]))
            print(f"model {7 + m} noise {7 + k}: no TTT {plain:.2f}  expand {acc['expand']:.2f}  "
                  f"rand {acc['rand']:.2f}  ({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
    diffs = [r[-1] for r in rows]
    mean = statistics.mean(diffs)
    half = 1.96 * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    lines = [
        f"{args.images} noisy MNIST test images per pair, batch 32, 1 Adam step (lr 1e-3), reset every batch; "
        f"torch {torch.__version__}, {args.threads} thread(s), {time.time() - t0:.0f} s",
        "",
        "| model seed | noise seed | no TTT | TTT `expand` (4 rotations) | TTT `rand` (1 rotation) | rand - expand |",
        "|---:|---:|---:|---:|---:|---:|",
        *(f"| {a} | {b} | {c:.2f} | {d:.2f} | {e:.2f} | {f:+.2f} |" for a, b, c, d, e, f in rows),
        "",
        f"rand - expand over {len(rows)} pairs: mean {mean:+.2f} points, 95 % interval "
        f"[{mean - half:+.2f}, {mean + half:+.2f}]",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
