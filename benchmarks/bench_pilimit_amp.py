"""fp32 vs bf16 autocast vs torch.compile on pilimit's MNIST proxy: time per training step and accuracy.

The commands of BENCHMARKS.md and benchmarks/pilimit_amp.md (``--out FILE`` writes the table alone; the
.md file adds the text around it)::

    nice -n 10 .venv/bin/python benchmarks/bench_pilimit_amp.py --examples 10000 --test 10000 --block 25
    nice -n 10 .venv/bin/python benchmarks/bench_pilimit_amp.py --examples 3200 --test 2000 --block 20

Every variant trains its own copy of the same net (same seed, data order and recipe: ``+experiment=mnist``
with ``data.num_examples`` = ``--examples``) through the code path of ``tttlab-pilimit-train`` (``amp``:
autocast around forward + loss; ``compile``: ``precision.compile_net``), one torch thread.  The variants
advance in lockstep, ``--block`` steps each in turn, so an infinite net's M (which grows every step) and
the machine's load are the same for all of them at any time.  Reported: median time per step (ms) over the
blocks after the first (the first holds the compile, reported separately: seconds with a cold inductor
cache, milliseconds when ``/tmp/torchinductor_<user>`` already holds the kernels), and test accuracy on
``--test`` MNIST test images (evaluated with the variant's amp/compile).  ``--examples 10000 --test 10000``
is ``+experiment=mnist`` (625 steps, M = 10,128 rows per pi-layer at the end).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from _sweep import names_subset

from tttlab.core.errors import TTTLabError
from tttlab.pilimit import precision
from tttlab.pilimit import train as T
from tttlab.pilimit.data import load_flat

VARIANTS = {"fp32": ("none", False), "bf16": ("bf16", False), "compile": ("none", True),
            "bf16+compile": ("bf16", True)}  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=3200)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--kinds", default="inf,finite")
    ap.add_argument("--variants", type=names_subset(VARIANTS, "variant"), default=",".join(VARIANTS))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    for kind in a.kinds.split(","):  # the package's own check of model.kind, before any training
        try:
            T.train_config("mnist", [f"model.kind={kind}"])
        except TTTLabError as exc:
            ap.error(f"--kinds: {exc}")
    torch.set_num_threads(1)
    rows = []
    for kind in a.kinds.split(","):
        c = T.train_config("mnist", [f"model.kind={kind}", f"data.num_examples={a.examples}", "threads=1"])
        x, y = load_flat("mnist", "train", num_examples=a.examples)
        xt, yt = load_flat("mnist", "test", num_examples=a.test)
        bs = int(c["data"]["batch_size"])
        steps = len(x) // bs
        perm = torch.from_numpy(np.random.default_rng((0, 0)).permutation(len(x)))
        runs = {}
        for name in a.variants:
            amp, comp = VARIANTS[name]
            net = T.build_model(c, x.shape[1], 10, torch.device("cpu"))
            opt, sched = T.build_optimizer(c, net, steps, steps)
            if isinstance(net, T.InfMLP):
                net.reserve(net.r + steps * bs)
            if comp:
                precision.compile_net(net)
            runs[name] = dict(net=net, opt=opt, sched=sched, amp=amp, times=[], loss=0.0)
        for lo in range(0, steps, a.block):
            for r in runs.values():
                t0 = time.perf_counter()
                for s in range(lo, min(lo + a.block, steps)):
                    idx = perm[s * bs : (s + 1) * bs]
                    with precision.autocast("cpu", r["amp"]):
                        loss = F.cross_entropy(r["net"](x[idx]).float(), y[idx])
                    loss.backward()
                    r["opt"].step()
                    r["opt"].zero_grad()
                    if r["sched"] is not None:
                        r["sched"].step()
                    r["loss"] += float(loss.detach())
                r["times"].append((time.perf_counter() - t0) / (min(lo + a.block, steps) - lo))
        for name, r in runs.items():
            t0 = time.perf_counter()
            acc, _ = T.accuracy(r["net"], xt, yt, 500, "cpu", r["amp"])
            rows.append(dict(kind=kind, variant=name, first=r["times"][0], step=statistics.median(r["times"][1:]),
                             acc=acc, loss=r["loss"] / steps, eval_s=time.perf_counter() - t0))  # fmt: skip
            print(rows[-1], flush=True)
    base = {r["kind"]: r["step"] for r in rows if r["variant"] == "fp32"}
    lines = ["| net | variant | time/step (median) | vs fp32 | first block time/step (compile) | mean train loss | test accuracy % |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['kind']} | {r['variant']} | {r['step'] * 1e3:.1f} ms | {base[r['kind']] / r['step']:.2f}x | "
                     f"{r['first'] * 1e3:.0f} ms | {r['loss']:.4f} | {100 * r['acc']:.2f} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
