"""Per-step time and peak working memory of an infinite pi-net training step: reference path vs chunked.

    .venv/bin/python benchmarks/bench_pilimit.py                       # M = 10k, 100k; r = 400; CPU
    .venv/bin/python benchmarks/bench_pilimit.py --rows 10000 100000 1000000 --device cuda --dtype bfloat16

One step = forward + backward + PiSGD step (lr mults, per-parameter clipping, weight decay: the paper's
CIFAR-10 recipe) of an InfMLP(3072 -> r -> r -> 10, depth 2) on a batch of 8, with every pi-layer grown to
M rows beforehand.  Paths:

* ``reference``: the straightforward transcription (as upstream): whole batch x M matrices, ``q`` kept for
  the backward, ``A^T * Amult`` materialised, rows appended with ``torch.cat`` (a copy of A, B, Amult);
* ``chunked``: the package default: the forward/backward loop over row chunks of ``--chunk-size``, the
  forward keeps up to ``cache_mb=64`` MB of q-derived chunks for the backward (the rest is recomputed),
  rows appended in place into reserved capacity;
* ``chunked0``: the same with ``cache_mb=0`` (everything recomputed: working memory O(batch x chunk)).

Each (path, M) runs in a fresh subprocess.  Working memory = peak resident memory (CPU: sampled every
0.5 ms from /proc; CUDA: ``max_memory_allocated``) during the timed steps minus the memory held before
them (the net's A/B/Amult, which are O(M) for any path).  Outputs and input gradients of the two paths
are compared on the same state (max abs difference).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    def __init__(self, period=0.0005):
        self.period, self.peak, self._stop = period, _rss_bytes(), False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self.thread.join()
        self.peak = max(self.peak, _rss_bytes())


def build(path: str, rows: int, r: int, chunk: int, dtype: str, device, seed: int = 0):
    import torch

    from tttlab.pilimit import InfMLP

    torch.manual_seed(seed)
    impl, cs = ("reference", None) if path == "reference" else ("chunked", chunk)
    cache_mb = 0.0 if path == "chunked0" else 64.0
    net = InfMLP(3072, 10, r=r, depth=2, first_layer_alpha=1.0, last_layer_alpha=0.5, bias_alpha=0.5,
                 chunk_size=cs, impl=impl, dtype=dtype, device=device, cache_mb=cache_mb)  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    for layer in net.pi_layers:
        layer.grow_random_(rows - layer.M, scale=1e-2, generator=gen)
    return net


def worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    from tttlab.pilimit import PiSGD

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    net = build(args.path, args.m, args.r, args.chunk_size, args.dtype, dev)
    if args.path != "reference":
        net.reserve(net.M + args.batch * (args.steps + 2))
    opt = PiSGD(net, lr=1.0, weight_decay=1e-5, first_layer_lr_mult=0.1, last_layer_lr_mult=4.0, bias_lr_mult=0.5,
                apply_lr_mult_to_wd=False, gclip=0.4, gclip_per_param=True)  # fmt: skip
    g = torch.Generator(device="cpu").manual_seed(0)
    xs = torch.randn(args.steps + 2, args.batch, 3072, generator=g).to(dev)
    ys = torch.randint(0, 10, (args.steps + 2, args.batch), generator=g).to(dev)
    # outputs / input gradient on the initial state, for the equality check
    x0 = xs[0].clone().requires_grad_(True)
    out0 = net(x0)
    (gx0,) = torch.autograd.grad(out0.float().square().sum(), x0)
    net.zero_pi_grad()
    check = {"out": out0.detach().float().cpu().tolist(), "gx": gx0[:, :64].float().cpu().tolist()}

    def step(i):
        loss = F.cross_entropy(net(xs[i]).float(), ys[i])
        loss.backward()
        opt.step()
        opt.zero_grad()

    step(1)  # warm-up (twice: first-touch allocations and lazily loaded kernels are not working memory)
    step(1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    with PeakSampler() as sampler:
        for i in range(args.steps):
            t0 = time.perf_counter()
            step(2 + i % args.steps)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else sampler.peak) - base
    times.sort()
    return {"path": args.path, "M": args.m, "r": args.r, "step_s": times[len(times) // 2], "min_step_s": times[0],
            "work_mem_mb": peak / 2**20, "rows_after": net.M, "check": check}  # fmt: skip


LABELS = {
    "reference": "reference",
    "chunked": "chunked (cache_mb=64, default)",
    "chunked0": "chunked (cache_mb=0)",
}


def _rel(a, b) -> float:
    import numpy as np

    a, b = np.array(a), np.array(b)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--r", type=int, default=400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--paths", nargs="+", default=["reference", "chunked", "chunked0"],
                   choices=["reference", "chunked", "chunked0"])  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                   help="storage of A/B (tttlab.pilimit.layers.DTYPES)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--m", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    results = {}
    for m in args.rows:
        for path in args.paths:
            cmd = [sys.executable, __file__, "--worker", "--path", path, "--m", str(m), "--r", str(args.r),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--chunk-size", str(args.chunk_size),
                   "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{path} M={m}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                results[path, m] = None
                continue
            results[path, m] = json.loads(line[0][7:])
            res = results[path, m]
            print(f"{path:9s} M={m:>8d}: {res['step_s'] * 1e3:9.1f} ms/step, working memory {res['work_mem_mb']:8.1f} MB",
                  file=sys.stderr, flush=True)  # fmt: skip

    lines = [
        f"device {args.device}, dtype {args.dtype}, r={args.r}, depth 2, batch {args.batch}, chunk_size "
        f"{args.chunk_size}, threads {args.threads}, median of {args.steps} steps",
        "",
        "| M rows | path | ms/step | steps/s | speed-up vs reference | working MB | rel. diff out / grad vs reference |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in args.rows:
        ref = results.get(("reference", m))
        for path in args.paths:
            res = results.get((path, m))
            if res is None:
                lines.append(f"| {m:,} | {LABELS.get(path, path)} | failed | | | | |")
                continue
            speed = f"{ref['step_s'] / res['step_s']:.2f}x" if ref else ""
            diff = ""
            if ref and path != "reference":
                diff = f"{_rel(ref['check']['out'], res['check']['out']):.1e} / {_rel(ref['check']['gx'], res['check']['gx']):.1e}"
            lines.append(
                f"| {m:,} | {LABELS.get(path, path)} | {res['step_s'] * 1e3:.1f} | {1 / res['step_s']:.2f} | {speed} | "
                f"{res['work_mem_mb']:.1f} | {diff} |"
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
