"""memo_tpt's speed and accuracy in fp32 vs bf16 autocast vs torch.compile on the MNIST proxies (CPU, one
thread), side by side in one process.

The command of BENCHMARKS.md (tables: benchmarks/memo_tpt_amp.md; ``--cache``: the trained proxies, made on
the first run)::

    nice -n 10 .venv/bin/python benchmarks/bench_memo_tpt_amp.py --cache /tmp/mt_bench_cache --out /tmp/memo_tpt_amp.md

1. The evaluate contract (profile ``quick``: 32 views, 24 images per corruption, ``--corruptions``) for
   MEMO, TPT, the view-ensemble and zero-shot CLIP, each with amp=none (fp32, what ``auto`` is on the CPU),
   amp=bf16 and compile=true, the modes interleaved over 2 rounds per method (order rotated): mean
   accuracy, s/image over all images of round 1 (a compiled mode's first domain includes its compiles) and
   the median over the rounds of s/image over the domains after the first.
2. The tiny trainers (``train_clip`` / ``train_cnn`` of the quick profile, batch 128, 45 steps): the median
   time per step after the first 5 (compiles excluded), the modes interleaved over 2 rounds (median of the
   rounds), and the clean MNIST test accuracy (1000 images; CLIP zero-shot with "a photo of a {digit}.")
   of each mode's 45-step model.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _sweep import names_subset

MODES = {"fp32": ("none", False), "bf16": ("bf16", False), "compile": ("none", True)}
METHODS = ("memo_tpt.memo", "memo_tpt.tpt", "memo_tpt.tpt_ensemble", "memo_tpt.clip_zeroshot")


def evaluate_rows(cache: Path, corruptions: list[str], num: int, modes: list[str], methods, rounds: int = 2):
    """Per method and mode: mean accuracy, s/image (all of round 1; the later domains, median of the
    rounds), the modes interleaved (:func:`_sweep.evaluate_modes`)."""
    from _sweep import evaluate_modes

    from tttlab.memo_tpt.evaluate import run

    mode_config = {name: {"amp": amp, "compile": comp} for name, (amp, comp) in MODES.items()}
    config = {"profile": "quick", "cache_dir": str(cache), "progress": False,
              "benchmark": {"corruptions": corruptions, "num_examples": num}}  # fmt: skip
    return evaluate_modes(run, methods, modes, mode_config, config, corruptions[0], rounds, echo=print)


class _StepClock:
    """Stands for the trainers' progress bar: the time of every ``update`` (one per optimizer step)."""

    def __init__(self, *a, **k):
        self.stamps = [time.perf_counter()]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.stamps.append(time.perf_counter())


def trainer_rows(modes: list[str], rounds: int = 2, steps: int = 45, skip: int = 5):
    from tttlab.memo_tpt import tiny_clip as T
    from tttlab.memo_tpt.tpt import TPT

    x, y = T.mnist_rgb("test", 1000)
    mean = torch.tensor(T.MNIST_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(T.MNIST_STD).view(1, 3, 1, 1)
    clocks = []

    def clock(*a, **k):
        clocks.append(_StepClock())
        return clocks[-1]

    real = T._progress
    T._progress = clock
    rows = []
    try:
        for kind in ("clip", "cnn"):
            train = T.train_clip if kind == "clip" else T.train_cnn
            p = {**(T.PROFILES if kind == "clip" else T.CNN_PROFILES)["quick"], "steps": steps}
            per_step: dict[str, list[float]] = {m: [] for m in modes}
            models = {}
            for _ in range(rounds):
                for name in modes:
                    amp, comp = MODES[name]
                    models[name] = train(p, seed=0, amp=amp, compile=comp)
                    st = clocks[-1].stamps
                    per_step[name].append(statistics.median(b - a for a, b in zip(st[skip:], st[skip + 1 :])))
            for name in modes:
                with torch.no_grad():
                    if kind == "clip":
                        tpt = TPT(
                            models[name], list(T.DIGIT_WORDS), tts=0, mean=T.MNIST_MEAN, std=T.MNIST_STD
                        )
                        pred = tpt.zero_shot(x).argmax(1).numpy()
                    else:
                        pred = models[name]((x - mean) / std).argmax(1).numpy()
                rows.append(dict(kind=kind, mode=name, ms=1000 * statistics.median(per_step[name]),
                                 acc=float((pred == y).mean())))  # fmt: skip
                print(rows[-1], flush=True)
    finally:
        T._progress = real
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="runs/memo_tpt/models")
    ap.add_argument("--out", default=None)
    ap.add_argument("--modes", type=names_subset(MODES, "mode"), default="fp32,bf16,compile")
    ap.add_argument("--methods", type=names_subset(METHODS, "method"), default=",".join(METHODS))
    ap.add_argument("--corruptions", default="gaussian_noise,shot_noise,fog,contrast")
    ap.add_argument("--num", type=int, default=24)
    ap.add_argument("--skip-trainers", action="store_true")
    ap.add_argument("--skip-evaluate", action="store_true")
    args = ap.parse_args()
    modes = args.modes
    torch.set_num_threads(1)
    lines = ["| method | mode | mean accuracy | s / image, all of round 1 (first domain: compiles) | "
             "s / image, later domains (median of rounds) |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    rows = []
    if not args.skip_evaluate:
        rows = evaluate_rows(Path(args.cache), args.corruptions.split(","), args.num, modes, args.methods)
    base = {r["method"]: r["warm"] for r in rows if r["mode"] == modes[0]}
    for r in rows:
        later = (
            "- (one domain)"
            if r["warm"] != r["warm"]
            else f"{r['warm']:.4f} ({base[r['method']] / r['warm']:.2f}x)"
        )
        lines.append(f"| {r['method']} | {r['mode']} | {100 * r['acc']:.2f} % | {r['spi']:.4f} | {later} |")
    if not args.skip_trainers:
        lines += ["", "| trainer (quick profile, batch 128) | mode | ms / step | clean test accuracy after 45 steps |",
                  "| --- | --- | --- | --- |"]  # fmt: skip
        rows = trainer_rows(modes)
        base = {r["kind"]: r["ms"] for r in rows if r["mode"] == modes[0]}
        for r in rows:
            lines.append(f"| tiny {'CLIP' if r['kind'] == 'clip' else 'CNN'} | {r['mode']} | {r['ms']:.1f} "
                         f"({base[r['kind']] / r['ms']:.2f}x) | {100 * r['acc']:.1f} % |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
