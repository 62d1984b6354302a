"""TTT-MAE per-image adaptation: the upstream-style reference path vs ours, same images and seeds, one run.

    python benchmarks/bench_ttt_mae.py --images 16 --steps 5 --copies 16 --group 8 [--model mae_vit_mnist_patch7]
        [--threads 1] [--ref-threads N] [--cuts both|on|off] [--no-compile] [--out benchmarks/ttt_mae_cpu.md]

Paths (all adapt each image from the same base weights, with the same per-image generator, so they see
the same views and masks):

- ``reference``: what upstream's ``engine_test_time.py`` does per image: a deep copy of the base state
  dict loaded into a clone model, a new ``torch.optim.SGD`` (``foreach=False``), explicit softmax
  attention, fp32 (``tttlab.ttt_mae.reference.ReferenceTTT``);
- ``ours (loop)``: snapshot restore of the trainable tensors, optimizer state cleared, SDPA attention,
  foreach SGD (``TTTAdapter``);
- ``ours (batched G)``: G images adapted at once, each with its own weights and momentum
  (``BatchedTTT``: ``vmap`` over ``functional_call``), in fp32 and under bf16 autocast (the bf16 path
  changes the numerics, so some per-step predictions may differ from the fp32 reference);
- ``... exact cuts`` (``--cuts both``, default: with and without, side by side): the same paths with
  ``TTTSettings.exact_cuts`` (the lean MAE loss, ``MaskedAutoencoderViT.mae_loss_lean``: the last decoder
  block and ``decoder_pred`` on the masked tokens only, the mask tokens' first decoder qkv once per
  position, single-crop copies as one image with the first encoder block's qkv once per patch); the
  rows without are the code before the cuts.  The header line gives the counted FLOP of a step; the
  compiled rows with the cuts also compile the per-step prediction (``TTTSettings.compile_predict``) and
  compute the attention over the encoder's few kept tokens in the qkv layout, as broadcast products
  without permutes (``TTTSettings.token_major_tokens``), and call the warm graphs with dynamo's guard
  evaluation skipped (``TTTSettings.skip_guards``);
- ``ours (batched G, compiled)`` (``--compile``, default on): the same with the whole step (per-image
  grads + SGD update) under ``torch.compile`` (inductor, ``--compile-mode``), single-crop copies passed
  as one image with ``copies`` masks (patch embedding and targets once per image), fp32 and bf16.  The
  first call compiles; its time is reported apart (``compile s``, a cold compile in a fresh inductor cache
  unless ``--warm-cache``), the images/s columns are after warm-up, and ``incl. compile`` charges the
  compile to the images of this run and to 10,000 images (one MNIST-C corruption: 15 x 10,000 in all).

Reported: images/s of each path, the speed-up over the reference (wall time, and CPU time of the process,
which other jobs on a loaded machine disturb less), the share of (image, step) predictions
equal to the reference's, and the largest per-step MAE-loss difference.  The paths are
interleaved image group by image group so that machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings

import numpy as np
import torch
from _sweep import names_subset

PATHS = ("loop", "batched", "bf16", "compiled", "compiled_bf16")  # our paths (--paths)

warnings.filterwarnings("ignore", message=".*batching rule.*")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mae_vit_mnist_patch7")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ref-threads", type=int, default=None,
                    help="torch threads for the reference path only (default: --threads); e.g. 1 next to "
                         "--threads 2 when the reference's small operations run slower on two threads")  # fmt: skip
    ap.add_argument("--single-crop", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: inductor default)")
    ap.add_argument(
        "--warm-cache", action="store_true", help="reuse the inductor cache (default: a fresh one)"
    )
    ap.add_argument("--profile", action="store_true",
                    help="also profile one group of the reference and of the fastest fp32 path: time in GEMMs "
                         "(mm/bmm/addmm/conv) vs the rest, and the speed-up bound that leaves")  # fmt: skip
    ap.add_argument("--cuts", choices=("both", "on", "off"), default="both",
                    help="our paths with the exact FLOP cuts (TTTSettings.exact_cuts, the lean MAE loss), without "
                         "them (the full loss, as before the cuts), or both side by side (default)")  # fmt: skip
    ap.add_argument("--paths", type=names_subset(PATHS, "path"), default=",".join(PATHS),
                    help="our paths to run next to the reference (comma-separated subset of the default)")  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.compile and not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ttt_mae_inductor_")

    from tttlab.core.benchmark import make_benchmark
    from tttlab.ttt_mae.model import build_model
    from tttlab.ttt_mae.reference import ReferenceTTT
    from tttlab.ttt_mae.ttt import BatchedTTT, TTTAdapter, TTTSettings, image_generator
    from tttlab.ttt_mae.views import Normalizer, to_unit

    torch.manual_seed(0)
    base = build_model(args.model)
    size, chans = base.cfg.img_size, base.cfg.in_chans
    if size == 28 and chans == 1:
        bench = make_benchmark("mnist_c", corruptions=["gaussian_noise"], num_examples=args.images)
        images, _ = bench.domain_dataset(bench.domains[0]).take(np.arange(args.images))
        raws = list(to_unit(images))
        norm = Normalizer((0.1307,), (0.3081,))
    else:
        g = torch.Generator().manual_seed(0)
        raws = [torch.rand(chans, size, size, generator=g) for _ in range(args.images)]
        norm = Normalizer((0.485, 0.456, 0.406)[:chans], (0.229, 0.224, 0.225)[:chans])
    s = TTTSettings(
        steps_per_example=args.steps, batch_size=args.copies, lr=1e-2, single_crop=args.single_crop
    )

    ref_model = build_model(args.model, fused_attn=False)
    ref_model.load_state_dict(base.state_dict())
    ref = ReferenceTTT(ref_model, TTTSettings(**{**s.__dict__, "foreach": False}))

    def gens(idx):
        return [image_generator(0, 0, i) for i in idx]

    def fresh():
        m = build_model(args.model)
        m.load_state_dict(base.state_dict())
        return m

    G = max(args.group, 1)
    variants = {"both": (False, True), "on": (True,), "off": (False,)}[args.cuts]
    ref_threads = args.ref_threads or args.threads

    def run_reference(idx):
        torch.set_num_threads(ref_threads)
        try:
            return [ref.adapt(raws[i], g, norm) for i, g in zip(idx, gens(idx))]
        finally:
            torch.set_num_threads(args.threads)

    paths = {"reference": run_reference}
    compile_s: dict[str, float] = {}
    kinds = [("loop", "none", False), ("batched", "none", False), ("bf16", "bf16", False)]
    if args.compile:
        kinds += [("compiled", "none", True), ("compiled_bf16", "bf16", True)]
    kinds = [k for k in kinds if k[0] in args.paths]
    for kind, amp, comp in kinds:
        for cuts in variants:
            key = kind + ("+cuts" if cuts else "")
            st = TTTSettings(**{**s.__dict__, "amp": amp, "compile": comp, "compile_mode": args.compile_mode,
                                "exact_cuts": cuts, "compile_predict": cuts,
                                "token_major_tokens": s.token_major_tokens if cuts else 0,
                                "skip_guards": s.skip_guards and cuts})  # fmt: skip
            if kind == "loop":
                a = TTTAdapter(fresh(), st)
                paths[key] = lambda idx, a=a: [a.adapt(raws[i], g, norm) for i, g in zip(idx, gens(idx))]
                continue
            a = BatchedTTT(fresh(), st)
            paths[key] = lambda idx, a=a: a.adapt([raws[i] for i in idx], gens(idx), norm)
            if comp:
                t0 = time.perf_counter()
                a.adapt(raws[:G], gens(range(G)), norm)  # compiles for groups of G (smaller ones are padded)
                compile_s[key] = time.perf_counter() - t0

    # warm-up (allocator, first-call overheads)
    for k in paths:
        if k == "reference" or k.startswith("loop"):
            paths[k]([0])
        elif k not in compile_s:
            paths[k](list(range(min(G, args.images))))

    times = {k: 0.0 for k in paths}
    cpu = {k: 0.0 for k in paths}  # CPU time of this process: less sensitive to other jobs than wall time
    results: dict[str, list] = {k: [] for k in times}
    for start in range(0, args.images, G):
        idx = list(range(start, min(start + G, args.images)))
        for k, fn in paths.items():
            t0, c0 = time.perf_counter(), time.process_time()
            results[k] += fn(idx)
            times[k] += time.perf_counter() - t0
            cpu[k] += time.process_time() - c0

    def agree(name):
        pairs = [
            (p, q)
            for a, b in zip(results["reference"], results[name])
            for p, q in zip(a.predictions, b.predictions)
        ]
        same = sum(p == q for p, q in pairs) / len(pairs)
        dl = max(
            (
                abs(x - y)
                for a, b in zip(results["reference"], results[name])
                for x, y in zip(a.losses, b.losses)
            ),
            default=0.0,
        )
        return same, dl

    n = args.images
    cfg = base.cfg
    header = (
        f"model `{args.model}` ({cfg.embed_dim}-d, {cfg.depth} blocks, {size}x{size}x{chans}, patch "
        f"{cfg.patch_size}; decoder {cfg.decoder_embed_dim}-d x {cfg.decoder_depth}), {n} images, "
        f"{args.steps} steps x {args.copies} copies, single_crop={args.single_crop}, {args.threads} thread(s)"
        + (f" (reference: {ref_threads})" if ref_threads != args.threads else "")
        + f", torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    rows = [
        "| path | images/s | s/image | speed-up | CPU s/image | speed-up by CPU time | per-step predictions equal to "
        "the reference | max loss diff | compile s | incl. compile: this run / 10k images |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    labels = {"reference": "reference (deepcopy, plain SGD, explicit attention)",
              "loop": "ours, loop (snapshot restore, foreach SGD, SDPA)",
              "batched": f"ours, batched G={G} (vmap, own weights per image)",
              "bf16": f"ours, batched G={G}, bf16 autocast",
              "compiled": f"ours, batched G={G}, torch.compile",
              "compiled_bf16": f"ours, batched G={G}, torch.compile, bf16 autocast"}  # fmt: skip
    labels.update({k + "+cuts": v + ", **exact cuts**" + (" + compiled prediction + token-major encoder attention"
                                                          " + guards skipped once warm"
                                                          if k.startswith("compiled") else "")
                   for k, v in labels.items()})  # fmt: skip
    ref_rate = n / times["reference"]
    for k in paths:
        same, dl = agree(k) if k != "reference" else (1.0, 0.0)
        comp = "-"
        if k in compile_s:
            c, per = compile_s[k], times[k] / n
            run_rate, big_rate = n / (n * per + c), 10_000 / (10_000 * per + c)
            comp = (f"{c:.0f} | {run_rate:.2f} ({run_rate / ref_rate:.2f}x) / {big_rate:.2f} "
                    f"({big_rate / ref_rate:.2f}x)")  # fmt: skip
        else:
            comp = "- | -"
        rows.append(
            f"| {labels[k]} | {n / times[k]:.2f} | {times[k] / n:.3f} | {times['reference'] / times[k]:.2f}x "
            f"| {cpu[k] / n:.3f} | {cpu['reference'] / cpu[k]:.2f}x | {100 * same:.1f} % | {dl:.1e} | {comp} |"
        )
    text = header + "\n\n" + flop_line(base, s) + "\n\n" + "\n".join(rows) + "\n"
    if args.profile:
        fast = [k for k in ("compiled+cuts", "compiled", "batched+cuts", "batched") if k in paths][0]
        text += "\n" + gemm_profile(paths, fast, G, args.images)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


def flop_line(base, s) -> str:
    """Counted FLOP (``torch.utils.flop_counter``: matrix products and convolutions) of one TTT step's MAE
    loss, forward + backward, with ``finetune_mode``'s trainable parameters: the reference's full loss on
    ``copies`` views vs the full loss on one image with ``copies`` masks (ours before the cuts, single crop)
    vs the lean loss (ours with the exact cuts)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from tttlab.ttt_mae.ttt import trainable_names

    m = copy.deepcopy(base).train().set_fused_attn(False)  # counted as the reference computes attention
    names = set(trainable_names(m, s.finetune_mode))
    for n, p in m.named_parameters():
        p.requires_grad_(n in names)
    c, size = m.cfg.in_chans, m.cfg.img_size
    x = torch.rand(1, c, size, size, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(s.batch_size, m.num_patches, generator=torch.Generator().manual_seed(1))
    views = x.expand(s.batch_size, -1, -1, -1)
    one = x if s.single_crop else views.contiguous()

    def count(fn, imgs):
        fc = FlopCounterMode(display=False)
        with fc:
            fn(imgs, s.mask_ratio, noise).backward()
        return fc.get_total_flops()

    ref, full, lean = count(m.mae_loss, views), count(m.mae_loss, one), count(m.mae_loss_lean, one)
    return (
        f"Counted FLOP per TTT step (MAE loss forward + backward, {s.batch_size} copies, finetune_mode "
        f"{s.finetune_mode}): reference {ref / 1e6:.1f} M; ours without cuts {full / 1e6:.1f} M "
        f"({full / ref:.3f}); ours with the exact cuts {lean / 1e6:.1f} M ({lean / ref:.3f})."
    )


GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::mkldnn_convolution",
            "aten::convolution_backward")  # fmt: skip


def gemm_profile(paths, fast: str, G: int, n_images: int) -> str:
    """Self CPU time in GEMM kernels vs everything else for one group of images (torch.profiler), for the
    reference and ``fast``; the reference's total over ``fast``'s GEMM time bounds the speed-up of any
    path that does the same matrix products at the same efficiency (the rest taken to zero)."""
    from torch.profiler import ProfilerActivity, profile

    idx = list(range(min(G, n_images)))
    out = {}
    for k in ("reference", fast):
        paths[k](idx)  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            paths[k](idx)
        ka = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ka) / 1e6 / len(idx)
        gemm = sum(e.self_cpu_time_total for e in ka if e.key in GEMM_OPS) / 1e6 / len(idx)
        out[k] = (total, gemm)
    (rt, rg), (ft, fg) = out["reference"], out[fast]
    return (
        f"Profile ({len(idx)} images, torch.profiler self CPU time per image; the profiler slows small ops):\n\n"
        "| path | s/image | in GEMMs (mm/bmm/addmm/conv) | rest |\n| --- | --- | --- | --- |\n"
        f"| reference | {rt:.3f} | {rg:.3f} ({100 * rg / rt:.0f} %) | {rt - rg:.3f} |\n"
        f"| {fast} | {ft:.3f} | {fg:.3f} ({100 * fg / ft:.0f} %) | {ft - fg:.3f} |\n\n"
        f"Speed-up under the profiler {rt / ft:.2f}x; bound with the rest of `{fast}` at zero: reference total / "
        f"{fast} GEMM = {rt / fg:.2f}x.\n"
    )


if __name__ == "__main__":
    main()
