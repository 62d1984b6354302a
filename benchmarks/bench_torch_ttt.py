"""Side-by-side: upstream torch-ttt 0.0.2 vs tttlab.torch_ttt, same model, data and steps, one run.

    .venv/bin/pip install --no-deps torch-ttt==0.0.2 einops     # bench-only (it declares no dependencies)
    .venv/bin/python benchmarks/bench_torch_ttt.py --batches 30 --repeats 5 --tent-before-update \
        --out benchmarks/torch_ttt.md        # add --threads 1 on a shared machine
    # on a GPU (models trained on the CPU first, then moved; every timed call synchronised):
    python benchmarks/bench_torch_ttt.py --device cuda --batches 30 --repeats 5 --tent-before-update --ttt-rand

Data: embedded MNIST test images with the tutorial's noise (x + 2 N(0, 1) after normalisation), batch 32.
Models: seed 004's network trained jointly with the rotation head (TTT, MEMO: BatchNorm-free, where
upstream MEMO works) and the same network with BatchNorm after each convolution (TENT), trained briefly
here (a few hundred steps) with our engine; upstream receives the same weights (and the same trained
rotation head).  Settings on both sides: Adam, the same lr and num_steps, reset every batch (upstream's
default copy_model).  Times are the median over repeats of the seconds per adapted batch; within a
repeat every batch goes through the plain model, ours and upstream one after another (rotating order),
so both sides see the same machine load.  The cost columns divide by the plain forward of one batch.

``--amp bf16`` / ``--compile [MODE]`` run *our* engines with ``engine.amp = "bf16"`` / ``engine.compile(mode=
MODE)`` (``default``, ``reduce-overhead`` = CUDA graphs on a GPU, ...) against upstream as it is; compiled
engines first adapt ``--warmup`` untimed batches (the compilation).  ``--variants none,bf16,compile,
bf16+compile`` instead times our engine in those settings against each other, batch by batch in rotating
order (no upstream): the precision / compilation table of ``benchmarks/torch_ttt_amp.md``:

    .venv/bin/python benchmarks/bench_torch_ttt.py --threads 1 --batches 30 --repeats 3 \
        --variants none,bf16,compile,bf16+compile --out benchmarks/torch_ttt_amp.md

``--train-variants`` times train.py's joint-training step (``mnist_bn``, batches of 64 training images,
Adam 1e-2, ``loss = task + 0.35 ssl``) the same way: TTT (``none``, ``bf16``; ``train.py`` refuses
``compile`` for it) and ``source`` (all four settings), every model from the same initialisation, one
step of each in rotating order per batch.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from _sweep import names_subset
from torch import nn

ENGINES = ("ttt", "tent", "memo")  # --engines
VARIANTS = ("none", "bf16", "compile", "bf16+compile")  # --variants: amp / compile settings


class Net(nn.Module):
    def __init__(self, bn: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.bn1 = nn.BatchNorm2d(10) if bn else nn.Identity()
        self.bn2 = nn.BatchNorm2d(20) if bn else nn.Identity()
        self.fc1, self.fc2, self.fc3 = nn.Linear(320, 50), nn.Linear(50, 50), nn.Linear(50, 10)
        self.activation = nn.LeakyReLU()

    def forward(self, x):
        x = self.activation(F.max_pool2d(self.bn1(self.conv1(x)), 2))
        x = self.activation(F.max_pool2d(self.bn2(self.conv2(x)), 2)).flatten(1)
        x = self.activation(self.fc2(self.activation(self.fc1(x))))
        return F.log_softmax(self.fc3(x), dim=-1)


def mnist_tensors(split, n=None):
    from tttlab.core import data

    ds = data.mnist(split)
    x, y = ds.take(np.arange(n or len(ds)))
    return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.1307) / 0.3081, torch.from_numpy(y)


def train(bn: bool, steps: int, seed: int = 7):
    from tttlab.torch_ttt.engine.ttt_engine import TTTEngine

    torch.manual_seed(seed)
    x, y = mnist_tensors("train", steps * 64)
    net = Net(bn)
    engine = TTTEngine(net, "fc2")
    opt = torch.optim.Adam(engine.parameters(), lr=0.01)
    engine.train()
    for i in range(0, len(x), 64):
        opt.zero_grad()
        out, ssl = engine(x[i : i + 64])
        (F.nll_loss(out, y[i : i + 64]) + 0.35 * ssl).backward()
        opt.step()
    return net.eval(), engine.angle_head


def apply_options(engine, amp="none", compile_mode=None):
    """``engine.amp`` and ``engine.compile(mode=...)`` (``compile_mode`` None: not compiled)."""
    engine.amp = amp
    if compile_mode is not None:
        engine.compile(**({} if compile_mode == "default" else {"mode": compile_mode}))
    return engine


def warm_up(engine, batches):
    """Adapt ``batches`` untimed (a compiled engine compiles here), then put the engine's generator and
    torch's global RNG back, so the timed run draws the same rotations / augmentations as an engine
    without warm-up (every engine here resets per batch)."""
    gen = getattr(engine, "generator", None)
    saved = (torch.get_rng_state(), gen.get_state() if gen is not None else None)
    for x in batches:
        engine(x)
    torch.set_rng_state(saved[0])
    if gen is not None:
        gen.set_state(saved[1])


def make_ours(name, net, head, settings, device="cpu"):
    """Our engine of ``name`` (ttt, ttt_rand, tent, tent_before_update, memo) around a copy of ``net``."""
    from tttlab.torch_ttt import get_engine

    ours_net = copy.deepcopy(net).to(device)
    if name.startswith("ttt"):
        rand = (
            dict(rotation_type="rand", generator=torch.Generator().manual_seed(0))
            if name == "ttt_rand"
            else {}
        )
        return get_engine("ttt")(
            ours_net,
            "fc2",
            angle_head=copy.deepcopy(head).to(device),
            optimization_parameters=settings,
            **rand,
        ).eval()
    if name.startswith("tent"):
        return get_engine("tent")(
            ours_net, settings, predict_before_update=name == "tent_before_update"
        ).eval()
    return get_engine("memo")(ours_net, settings, n_augmentations=8, per_sample=False, seed=0).eval()


def run_variants(net, variants, batches, labels, device="cpu"):
    """Each batch through every variant (an engine), in an order that rotates from batch to batch.
    Returns ``{variant: (seconds per batch, accuracy, predictions)}``."""
    names = list(variants)
    t = dict.fromkeys(names, 0.0)
    preds = {v: [] for v in names}
    for i, x in enumerate(batches):
        for v in names[i % len(names) :] + names[: i % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            out, _ = variants[v](x)
            sync(device)
            t[v] += time.perf_counter() - t0
            preds[v].append(out.argmax(1))
    y = torch.cat(labels)
    return {v: (t[v] / len(batches), (torch.cat(preds[v]) == y).float().mean().item(), torch.cat(preds[v]))
            for v in names}  # fmt: skip


def make_engines(name, net, head, settings, device="cpu"):
    import torch_ttt.engine.memo_engine as up_memo
    import torch_ttt.engine.tent_engine as up_tent
    import torch_ttt.engine.ttt_engine as up_ttt

    from tttlab.torch_ttt import get_engine

    ours_net, up_net = copy.deepcopy(net).to(device), copy.deepcopy(net).to(device)
    head = copy.deepcopy(head).to(device)
    if name.startswith("ttt"):
        # "ttt_rand": one random rotation per image (Sun et al.'s rotate_batch(..., "rand")), upstream as "ttt"
        rand = (
            dict(rotation_type="rand", generator=torch.Generator().manual_seed(0))
            if name == "ttt_rand"
            else {}
        )
        ours = get_engine("ttt")(
            ours_net, "fc2", angle_head=copy.deepcopy(head), optimization_parameters=settings, **rand
        )
        up = up_ttt.TTTEngine(
            up_net, "fc2", angle_head=copy.deepcopy(head), optimization_parameters=dict(settings)
        )
    elif name.startswith("tent"):
        # the official Tent code returns the logits of the adaptation forward
        before = name == "tent_before_update"
        ours = get_engine("tent")(ours_net, settings, predict_before_update=before)
        up = up_tent.TentEngine(up_net, dict(settings))
    else:
        ours = get_engine("memo")(ours_net, settings, n_augmentations=8, per_sample=False, seed=0)
        up = up_memo.MemoEngine(up_net, dict(settings), n_augmentations=8)
    return ours.eval(), up.eval()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_interleaved(net, ours, up, batches, labels, device="cpu"):
    """Each batch through the plain model, ours and upstream, the three timed one after another in an
    order that rotates from batch to batch, so every side sees the same machine load (shared machines).

    Returns seconds per batch (forward, ours, upstream) and accuracies (ours, upstream or its failure).
    """
    t = {"fwd": 0.0, "ours": 0.0, "up": 0.0}
    correct = {"ours": 0, "up": 0}
    up_error = None
    sides = ["fwd", "ours", "up"]
    for i, (x, y) in enumerate(zip(batches, labels)):
        for side in sides[i % 3 :] + sides[: i % 3]:
            if side == "up" and up_error is not None:
                continue
            sync(device)
            t0 = time.perf_counter()
            try:
                if side == "fwd":
                    with torch.no_grad():
                        net(x)
                elif side == "ours":
                    out, _ = ours(x)
                else:
                    with contextlib.redirect_stdout(io.StringIO()):  # upstream prints in forward
                        out, _ = up(x)
            except Exception as exc:  # noqa: BLE001 - report upstream's failure in the table
                if side != "up":
                    raise
                up_error = f"fails: {type(exc).__name__}"
                continue
            sync(device)
            t[side] += time.perf_counter() - t0
            if side != "fwd":
                correct[side] += (out.argmax(1) == y).sum().item()
    n, total = len(batches), sum(len(y) for y in labels)
    acc_up = up_error if up_error is not None else correct["up"] / total
    return (
        t["fwd"] / n,
        t["ours"] / n,
        (t["up"] / n if up_error is None else None),
        correct["ours"] / total,
        acc_up,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument(
        "--tent-before-update",
        action="store_true",
        help="add a row: TENT predicting from its adaptation forward (the official Tent code's output)",
    )
    p.add_argument(
        "--ttt-rand",
        action="store_true",
        help='add a row: our TTT with rotation_type="rand" (one rotated copy per image) against upstream\'s TTT',
    )
    p.add_argument("--engines", type=names_subset(ENGINES, "engine"), default=",".join(ENGINES),
                   help=f"comma-separated subset of {','.join(ENGINES)}")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (models trained on the CPU, then moved)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per adapted batch (32: the tutorial's); small batches show the per-batch "
                        "overheads that dominate a GPU's launch-bound regime")  # fmt: skip
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="our engines' engine.amp")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="engine.compile() our engines (torch.compile mode: default, reduce-overhead, ...)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=3, help="untimed batches of compiled engines first")
    p.add_argument("--variants", type=names_subset(VARIANTS, "variant"), default=None,
                   help="comma-separated subset of none,bf16,compile,bf16+compile: our engine in these "
                        "settings against each other (no upstream)")  # fmt: skip
    p.add_argument("--train-variants", action="store_true",
                   help="time train.py's joint-training step in the amp/compile settings instead")  # fmt: skip
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    # argument errors first, before the models train (tens of seconds)
    if not (args.variants or args.train_variants) and importlib.util.find_spec("torch_ttt") is None:
        # checked now: the script trained its models first and then stopped in an import traceback
        p.error("upstream torch-ttt 0.0.2 is not installed (the comparison runs it): pip install --no-deps "
                "torch-ttt==0.0.2 einops; --variants / --train-variants time our engines only")  # fmt: skip
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads()))
    if args.train_variants:
        return main_train_variants(args)
    bs = args.batch_size
    x, y = mnist_tensors("test", args.batches * bs)
    noisy = x + 2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    batches, labels = list(noisy.to(args.device).split(bs)), list(y.to(args.device).split(bs))
    models = {False: train(False, args.train_steps), True: train(True, args.train_steps)}
    settings = {"num_steps": 1, "lr": 1e-3, "optimizer_name": "adam"}
    rows = []
    engines = [("ttt", False), ("tent", True), ("memo", False)]
    if args.tent_before_update:
        engines.insert(2, ("tent_before_update", True))
    if args.ttt_rand:
        engines.insert(1, ("ttt_rand", False))
    wanted = set(args.engines)
    engines = [(n, bn) for n, bn in engines if n.split("_")[0] in wanted]
    if args.variants:
        return main_variants(args, engines, models, settings, batches, labels)
    for name, bn in engines:
        net, head = models[bn]
        t_ours, t_up, t_fwd = [], [], []
        for _ in range(args.repeats):
            ours, up = make_engines(name, net, head, settings, args.device)
            apply_options(ours, args.amp, args.compile)
            if args.compile is not None:
                warm_up(ours, batches[: args.warmup])
            plain = copy.deepcopy(net).to(args.device)
            fwd, t, t_u, acc_ours, acc_up = run_interleaved(plain, ours, up, batches, labels, args.device)
            t_fwd.append(fwd)
            t_ours.append(t)
            if t_u is not None:
                t_up.append(t_u)
        ours_s, t_forward = statistics.median(t_ours), statistics.median(t_fwd)
        up_s = statistics.median(t_up) if t_up else float("nan")
        rows.append(
            (name, "BN" if bn else "no BN", up_s, ours_s, ours_s / up_s, acc_up, acc_ours,
             up_s / t_forward, ours_s / t_forward)
        )  # fmt: skip
        print(rows[-1], flush=True)
    lines = [
        "| engine | model | torch-ttt 0.0.2 (s/batch) | tttlab (s/batch) | time ratio ours/upstream "
        "| accuracy torch-ttt | accuracy tttlab | torch-ttt cost in plain forwards | tttlab cost in plain forwards |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, model, up_s, ours_s, ratio, acc_up, acc_ours, up_fwd, fwd in rows:
        acc_up_s = f"{100 * acc_up:.2f}" if isinstance(acc_up, float) else acc_up
        label = {"tent_before_update": "tent (`predict_before_update=True`)",
                 "ttt_rand": 'ttt (`rotation_type="rand"`; upstream: its 4 rotations)'}.get(name, name)  # fmt: skip
        lines.append(
            f"| {label} | {model} | {up_s:.4f} | {ours_s:.4f} | {ratio:.2f} | {acc_up_s} | {100 * acc_ours:.2f} "
            f"| {up_fwd:.1f} | {fwd:.1f} |"
        )
    lines.append("")
    lines.append(
        f"torch {torch.__version__}, device {args.device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}, "
        f"{torch.get_num_threads()} thread(s), {args.batches} batches of {bs}, "
        f"{args.repeats} repeats (median), plain forward of one batch: see the cost columns."
        f"{' Ours with amp=' + args.amp if args.amp != 'none' else ''}"
        f"{' Ours compiled (' + args.compile + ').' if args.compile else ''}"
    )
    table = "\n".join(lines)
    print(table)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(table + "\n")


def main_train_variants(args):
    """train.py's step (``tttlab.torch_ttt.train``'s model, engine and loss) in several settings, interleaved."""
    from tttlab.torch_ttt.train import build_engine, build_model

    setups = [("ttt", "none"), ("ttt", "bf16"), ("source", "none"), ("source", "bf16"), ("source", "compile"),
              ("source", "bf16+compile")]  # fmt: skip
    n_steps, bs = args.batches, 64
    x, y = mnist_tensors("train", (n_steps + args.warmup) * bs)
    xs, ys = list(x.to(args.device).split(bs)), list(y.to(args.device).split(bs))
    runs = {}
    for name, v in setups:
        opts = set(v.split("+"))
        torch.manual_seed(0)
        model = build_model("mnist_bn").to(args.device)
        engine = build_engine(name, model, "mnist_bn", example_input=xs[0][:2]).to(args.device)
        mode = (args.compile or "default") if "compile" in opts else None
        apply_options(engine, "bf16" if "bf16" in opts else "none", mode)
        runs[(name, v)] = [engine.train(), torch.optim.Adam(engine.parameters(), lr=0.01), 0.0, 0.0]

    def step(run, xb, yb):
        engine, opt = run[0], run[1]
        opt.zero_grad(set_to_none=True)
        out, ssl = engine(xb)
        loss = F.cross_entropy(out, yb) + 0.35 * ssl
        loss.backward()
        opt.step()
        return float(loss.detach())

    keys = list(runs)
    for i, (xb, yb) in enumerate(zip(xs, ys)):
        for k in keys[i % len(keys) :] + keys[: i % len(keys)]:
            sync(args.device)
            t0 = time.perf_counter()
            loss = step(runs[k], xb, yb)
            sync(args.device)
            if i >= args.warmup:  # the first steps compile (all settings skip them alike)
                runs[k][2] += time.perf_counter() - t0
                runs[k][3] += loss
    lines = ["| train engine | setting | ms/step | time / none | mean loss over the timed steps |",
             "|---|---|---:|---:|---:|"]  # fmt: skip
    for name, v in keys:
        base = runs[(name, "none")][2]
        secs, loss = runs[(name, v)][2], runs[(name, v)][3]
        lines.append(
            f"| {name} | {v} | {1000 * secs / n_steps:.1f} | {secs / base:.2f} | {loss / n_steps:.4f} |"
        )
    lines.append("")
    lines.append(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} thread(s), mnist_bn, "
        f"{n_steps} timed steps of {bs} training images after {args.warmup} untimed ones, one step of each "
        f"setting per batch in rotating order, compile mode {args.compile or 'default'}."
    )
    table = "\n".join(lines)
    print(table)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(table + "\n")


def main_variants(args, engines, models, settings, batches, labels):
    """Our engines in several amp / compile settings, interleaved; one table row per engine and setting."""
    variants = args.variants  # a checked list (names_subset)
    rows = []
    for name, bn in engines:
        net, head = models[bn]
        times = {v: [] for v in variants}
        result = {}
        for _ in range(args.repeats):
            built = {}
            for v in variants:
                opts = set(v.split("+"))
                mode = (args.compile or "default") if "compile" in opts else None
                built[v] = apply_options(make_ours(name, net, head, settings, args.device),
                                         "bf16" if "bf16" in opts else "none", mode)  # fmt: skip
                if mode is not None:  # the compilation, untimed
                    warm_up(built[v], batches[: args.warmup])
            result = run_variants(net, built, batches, labels, args.device)
            for v in variants:
                times[v].append(result[v][0])
        base = statistics.median(times[variants[0]])
        for v in variants:
            s = statistics.median(times[v])
            agree = (result[v][2] == result[variants[0]][2]).float().mean().item()
            rows.append((name, "BN" if bn else "no BN", v, s, s / base, result[v][1], agree))
            print(rows[-1], flush=True)
    lines = [
        f"| engine | model | setting | s/batch | time / {variants[0]} | accuracy | predictions equal to "
        f"{variants[0]}'s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, model, v, s, ratio, acc, agree in rows:
        lines.append(
            f"| {name} | {model} | {v} | {s:.4f} | {ratio:.2f} | {100 * acc:.2f} | {100 * agree:.1f} % |"
        )
    lines.append("")
    lines.append(
        f"torch {torch.__version__}, device {args.device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}, "
        f"{torch.get_num_threads()} thread(s), {args.batches} batches of {args.batch_size}, {args.repeats} "
        f"repeats (median), compile mode {args.compile or 'default'}, {args.warmup} untimed warm-up batches "
        "per compiled engine; accuracy and agreement from the last repeat."
    )
    table = "\n".join(lines)
    print(table)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
