"""ttt_mae's speed and accuracy in fp32 vs bf16 autocast vs torch.compile on the MNIST proxy (CPU), side by
side in one process.

The command of BENCHMARKS.md (tables: benchmarks/ttt_mae_amp.md; ``--cache``: the trained proxy models,
made on the first run)::

    nice -n 10 .venv/bin/python benchmarks/bench_ttt_mae_amp.py --cache /tmp/mae_bench_cache --out /tmp/ttt_mae_amp.md

1. pretrain and probe steps of the ``quick`` profile's model (``mae_vit_mnist_patch7``, batch 128, one
   thread): every mode trains its own copy from the same weights on the same batches and masks, one epoch
   of the quick profile (47 steps: 2 warm-up steps, which include the compile, then 3 rounds x 15 timed
   steps, the modes interleaved round by round).  Reported: median ms per step over the rounds, the mean
   loss over the timed steps and, for the probe, the clean MNIST test accuracy (2000 images) of the head
   each mode trained, measured under that mode's amp.
2. TTT (``ttt_mae.ttt``, quick profile: 3 steps x 16 copies, group 8) and the baseline through the evaluate
   contract on mnist_c severity 5 (``--corruptions``, 16 images each): accuracy and s/image per mode, over
   all images of the first round (its first domain includes a compiled mode's compiles) and over the later
   domains (median of 2 rounds, the modes interleaved, their order rotated).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _sweep import names_subset

MODES = {"fp32": ("none", False), "bf16": ("bf16", False), "compile": ("none", True)}


def _batches(ds, n_steps, bs, seed=0):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(ds))
    return [perm[i * bs : (i + 1) * bs] for i in range(n_steps)]


def train_steps(kind: str, cache: Path, modes: list[str], rounds: int, per_round: int, warm: int):
    from tttlab.core.torch import autocast
    from tttlab.ttt_mae import evaluate as E
    from tttlab.ttt_mae import train as T
    from tttlab.ttt_mae.common import compose, normalization
    from tttlab.ttt_mae.views import Normalizer, to_unit

    pre_ckpt, _ = E.trained_model("quick", cache, 0, "cpu", False)
    extra = {"finetune": str(pre_ckpt)} if kind == "probe" else {}
    c = compose(kind, f"quick_{kind}", {"out_dir": str(cache / "unused"), **extra})
    ds = T.load_dataset(c)
    norm = Normalizer(*normalization(c, "mnist"))
    bs = int(c["batch_size"])
    n = warm + rounds * per_round
    batches = _batches(ds, n, bs)
    lr = float(c["blr"]) * bs / 256
    betas = (0.9, 0.95) if kind == "pretrain" else (0.9, 0.999)
    runs = {}
    for name in modes:
        torch.manual_seed(0)
        model = T.build(c, kind)
        opt = torch.optim.AdamW(T.param_groups(model, float(c["weight_decay"]), kind), lr=lr, betas=betas)
        net = torch.compile(model) if MODES[name][1] else model
        runs[name] = dict(
            model=model, opt=opt, net=net, g=torch.Generator().manual_seed(1), times=[], losses=[]
        )

    def step(r, i):
        images, labels = ds.take(batches[i])
        x = norm(to_unit(images))
        model, net, opt = r["model"], r["net"], r["opt"]
        model.train()
        t0 = time.perf_counter()
        with autocast("cpu", MODES[r["name"]][0]):
            if kind == "pretrain":
                noise = model.mask_noise(len(x), r["g"])
                loss = net(x, mask_ratio=float(c["mask_ratio"]), noise=noise, mode="mae")
            else:
                y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
                loss = F.cross_entropy(
                    net(x, mode="classify").float(), y, label_smoothing=float(c["smoothing"])
                )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, float(loss.detach())

    for name, r in runs.items():
        r["name"] = name
        t0 = time.perf_counter()
        for i in range(warm):
            step(r, i)
        r["warm_s"] = time.perf_counter() - t0
    for k in range(rounds):
        for r in runs.values():
            secs = 0.0
            for i in range(warm + k * per_round, warm + (k + 1) * per_round):
                dt, loss = step(r, i)
                secs += dt
                r["losses"].append(loss)
            r["times"].append(secs / per_round)
    rows = []
    for name, r in runs.items():
        row = dict(mode=name, ms=1000 * statistics.median(r["times"]), warm_s=r["warm_s"],
                   loss=float(np.mean(r["losses"])))  # fmt: skip
        if kind == "probe":
            acc, _ = T.clean_accuracy(r["model"], {**c, "amp": MODES[name][0]}, torch.device("cpu"), norm)
            row["acc"] = acc
        rows.append(row)
    return rows


def ttt_rows(cache: Path, corruptions: list[str], num: int, modes: list[str], rounds: int = 2):
    """Per method and mode: mean accuracy, s/image (all of round 1; the later domains, median of the
    rounds), the modes interleaved (:func:`_sweep.evaluate_modes`)."""
    from _sweep import evaluate_modes

    from tttlab.ttt_mae import evaluate as E

    mode_config = {name: {"amp": amp, "compile": comp} for name, (amp, comp) in MODES.items()}
    config = {"profile": "quick", "cache_dir": str(cache), "progress": False,
              "benchmark": {"corruptions": corruptions, "num_examples": num}}  # fmt: skip
    return evaluate_modes(E.run, ("ttt_mae.baseline", "ttt_mae.ttt"), modes, mode_config, config, corruptions[0],
                          rounds)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="runs/ttt_mae/models")
    ap.add_argument("--out", default=None)
    ap.add_argument("--modes", type=names_subset(MODES, "mode"), default="fp32,bf16,compile")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=15)
    ap.add_argument("--corruptions", default="gaussian_noise,fog,contrast")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--skip-ttt", action="store_true")
    args = ap.parse_args()
    modes = args.modes
    torch.set_num_threads(1)
    cache = Path(args.cache)
    lines = ["| entry | mode | ms / step (median of rounds) | warm-up 2 steps (s) | mean loss | probe test acc |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for kind in ("pretrain", "probe"):
        rows = train_steps(kind, cache, modes, args.rounds, args.per_round, 2)
        base = rows[0]["ms"]
        for r in rows:
            acc = f"{100 * r['acc']:.2f} %" if "acc" in r else ""
            lines.append(f"| {kind} | {r['mode']} | {r['ms']:.1f} ({base / r['ms']:.2f}x) | {r['warm_s']:.1f} | "
                         f"{r['loss']:.4f} | {acc} |")  # fmt: skip
        print("\n".join(lines), flush=True)
    if not args.skip_ttt:
        lines += ["", "| method | mode | mean accuracy | s / image, all of round 1 (first domain: compiles) | "
                  "s / image, later domains (median of rounds) |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
        rows = ttt_rows(cache, args.corruptions.split(","), args.num, modes)
        base = {r["method"]: r["warm"] for r in rows if r["mode"] == modes[0]}
        for r in rows:
            later = (
                "- (one domain)"
                if r["warm"] != r["warm"]
                else f"{r['warm']:.4f} ({base[r['method']] / r['warm']:.2f}x)"
            )
            lines.append(
                f"| {r['method']} | {r['mode']} | {100 * r['acc']:.2f} % | {r['spi']:.4f} | {later} |"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
