"""Batched on-device test-time views vs the per-view PIL reference, and end-to-end TPT / MEMO images/s.

    .venv/bin/python benchmarks/bench_memo_tpt.py --threads 1 --repeats 3 --e2e-repeats 1 \
        --out benchmarks/memo_tpt.md                                                       # CPU, ~4 min
    python benchmarks/bench_memo_tpt.py --device cuda --tpt-arch ViT-B-16 --classes 200   # GPU shapes

Views: 64 views at 224 px of scikit-image photos (astronaut 512x512, chelsea 300x451), two pipelines:
``tpt`` (original + 63 random resized crops with flips: TPT on ImageNet variants) and ``memo`` (64 crops +
flips + AugMix severity 1, width 3, depth 1-3: MEMO), each ready for the model (normalised).  Reference:
``tttlab.memo_tpt.augment.pil_views`` (torchvision PIL crop/flip, PIL AugMix operations, ToTensor +
Normalize per chain, as upstream's loops).  Batched: ``make_views(..., mean=, std=)`` (8-bit crops and AugMix,
one fused conversion + normalisation per view), on ``--device``.
Timing: the two alternate, ``--repeats`` times; medians.  Threads: ``torch.set_num_threads(--threads)``
for both (PIL runs single-threaded, as upstream).

End to end (seconds per image, median): TPT on an open_clip model with random weights (``--tpt-arch``;
default a small custom CLIP ViT at 224 px on CPU) with ``--classes`` ImageNet class names, 64 views, 1 step,
and MEMO (torchvision MobileNetV2, 64 AugMix views, BN prior 16, 1 SGD step), each with batched views and
with PIL-reference views.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tttlab.memo_tpt import augment as A  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL_CLIP = dict(
    embed_dim=256,
    vision_cfg=dict(image_size=224, layers=4, width=256, patch_size=32, head_width=64),
    text_cfg=dict(context_length=77, vocab_size=49408, width=256, heads=4, layers=4),
)


def photos():
    try:
        import skimage.data

        return {"astronaut": skimage.data.astronaut(), "chelsea": skimage.data.chelsea()}
    except ImportError:  # a bare GPU machine: random photos of the same sizes
        import numpy as np

        rng = np.random.default_rng(0)
        return {"astronaut": rng.integers(0, 256, (512, 512, 3), dtype=np.uint8),
                "chelsea": rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)}  # fmt: skip


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MEMO_FILL = (128, 0, 0)  # MEMO's AugMix fill: upstream's PIL fillcolor=128 on RGB images


def timed(fn, device, *args, **kwargs):
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return time.perf_counter() - t0, out


def batched_views(img, n_views, kw, g, device):
    kw = {**kw, "fill": MEMO_FILL} if kw.get("augmix_views") else kw
    return A.make_views(img, n_views, 224, generator=g, device=device, mean=MEAN, std=STD, **kw)


def reference_views(img, n_views, kw, seed, device):
    kw = {**kw, "fillcolor": 128} if kw.get("augmix_views") else kw  # upstream MEMO's PIL argument
    return A.pil_views(img, n_views, 224, seed=seed, normalize=(MEAN, STD), **kw).to(device)


def bench_views(device, repeats, n_views):
    rows = []
    for pipeline, aug, orig in (("tpt (crop+flip)", False, True), ("memo (crop+flip+AugMix)", True, False)):
        batched, pil = [], []
        g = torch.Generator().manual_seed(0)
        for r in range(repeats + 1):
            for img in photos().values():
                kw = dict(include_original=orig, augmix_views=aug)
                tb, _ = timed(batched_views, device, img, n_views, kw, g, device)
                tp, _ = timed(reference_views, device, img, n_views, kw, r, device)
                if r:  # the first round warms up
                    batched.append(tb)
                    pil.append(tp)
        b, p = statistics.median(batched), statistics.median(pil)
        rows.append((pipeline, n_views / p, n_views / b, p / b))
    return rows


def bench_end_to_end(device, repeats, tpt_arch, classes, n_views):
    from tttlab.core.data.imagenet import imagenet_class_names
    from tttlab.memo_tpt.memo import Memo
    from tttlab.memo_tpt.models import build_classifier, build_clip
    from tttlab.memo_tpt.tpt import TPT

    torch.manual_seed(0)
    names = list(imagenet_class_names())[:classes]
    if tpt_arch == "small":
        clip = build_clip("small-vit-32", config=SMALL_CLIP, device=device)
    else:
        clip = build_clip(tpt_arch, device=device)
    tpt = TPT(clip, names, n_views=n_views, tts=1)
    net = build_classifier("mobilenet_v2").to(device)
    memo = Memo(net, arch="mobilenet_v2", n_augmentations=n_views)
    imgs = list(photos().values())

    def tpt_pil(img, seed):
        tpt.reset()
        views = A.pil_views(img, n_views, tpt.size, include_original=True, seed=seed).to(device)
        tpt.adapt(views)
        return tpt.predict(views)

    def memo_pil(img, seed):
        memo.reset()
        memo.views = lambda image, seed=seed: A.pil_views(image, n_views, 224, include_original=False,
                                                          augmix_views=True, seed=seed,
                                                          fillcolor=128).to(device)  # fmt: skip
        out = memo.adapt(img), memo.predict(img)
        del memo.views
        return out

    rows = []
    for label, ours, ref in (
        (f"TPT {tpt_arch} ({classes} classes)", lambda img, s: tpt(img), tpt_pil),
        ("MEMO mobilenet_v2", lambda img, s: memo(img), memo_pil),
    ):
        t_ours, t_ref = [], []
        for r in range(repeats + 1):
            for img in imgs:
                a, _ = timed(ours, device, img, r)
                b, _ = timed(ref, device, img, r)
                if r:
                    t_ours.append(a)
                    t_ref.append(b)
        rows.append((label, 1 / statistics.median(t_ref), 1 / statistics.median(t_ours)))
    return rows


def bench_ops(repeats: int = 5):
    """CPU time (``time.thread_time``) per view of each stage on 64 different 224 px crops of the astronaut:
    the batched kernels on uint8 (H, W, C) views vs PIL on the same views (medians of ``repeats``)."""
    from PIL import Image
    from torchvision.transforms.functional import normalize, to_tensor

    img = torch.from_numpy(photos()["astronaut"]).permute(2, 0, 1)
    boxes = A.random_resized_crop_boxes(
        64, img.shape[1], img.shape[2], generator=torch.Generator().manual_seed(0)
    )
    views = list(A.crop_resize(img, boxes, 224).permute(0, 2, 3, 1).contiguous())
    pils = [Image.fromarray(v.numpy()) for v in views]
    big = Image.fromarray(photos()["astronaut"])

    def per_view(fn, items):
        ts = []
        for _ in range(repeats):
            t = time.thread_time()
            for it in items:
                fn(it)
            ts.append(time.thread_time() - t)
        return statistics.median(ts) / len(items) * 1e6

    rows = []
    for op in A.AUGMIX_OPS:
        ours = per_view(lambda v, op=op: A._OPS[op](v, 0.7, 1.0), views)
        ref = per_view(lambda p, op=op: A._pil_op(op, p, 0.7, 1.0), pils)
        rows.append((op, ref, ours))
    src = torch.from_numpy(photos()["astronaut"])
    regions = [src[t : t + h, left : left + w] for left, t, w, h in boxes.tolist()]
    ours = per_view(lambda r: A._resize_hwc(r, (224, 224), "bilinear"), regions)
    ref = per_view(lambda b: big.crop((b[0], b[1], b[0] + b[2], b[1] + b[3])).resize((224, 224), Image.BILINEAR),
                   boxes.tolist())  # fmt: skip
    rows.append(("crop + resize", ref, ours))
    out = torch.empty(1, 224, 224, 3)
    write = A._Writer(out, MEAN, STD)
    ours = per_view(lambda v: write(0, [v]), views)
    ref = per_view(lambda p: normalize(to_tensor(p), MEAN, STD), pils)
    rows.append(("to float + normalise", ref, ours))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--e2e-repeats", type=int, default=2)
    ap.add_argument("--views", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tpt-arch", default="small", help="open_clip name (random weights) or 'small'")
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--skip-views", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--ops", action="store_true", help="also: CPU time per view of each stage vs PIL")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not args.skip_e2e and args.tpt_arch != "small":  # checked now, not after the views benchmark
        from tttlab.memo_tpt.models import clip_names

        if args.tpt_arch.replace("/", "-") not in clip_names():
            ap.error(f"--tpt-arch {args.tpt_arch!r}: not an open_clip model name (see open_clip.list_models()) "
                     "or 'small'")  # fmt: skip
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lines = [
        f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}),"
        f" torch {torch.__version__}, threads {args.threads}, {args.views} views at 224 px"
        + (", numba look-up kernels" if device.type == "cpu" and A._numba_kernels() is not None else ""),
        "",
    ]
    if not args.skip_views:
        lines += ["| pipeline | PIL reference views/s | batched views/s | ratio |", "|---|---:|---:|---:|"]
        for name, p, b, ratio in bench_views(device, args.repeats, args.views):
            lines.append(f"| {name} | {p:.1f} | {b:.1f} | {ratio:.1f}x |")
            print(lines[-1], flush=True)
        lines.append("")
    if not args.skip_e2e:
        lines += [f"| end to end (1 step, {args.views} views) | images/s with PIL views | images/s batched | ratio |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for name, p, b in bench_end_to_end(device, args.e2e_repeats, args.tpt_arch, args.classes, args.views):
            lines.append(f"| {name} | {p:.3f} | {b:.3f} | {b / p:.1f}x |")
            print(lines[-1], flush=True)
    if args.ops and device.type == "cpu":
        lines += [
            "",
            "| stage (CPU time per 224 px view) | PIL us | batched us | ratio |",
            "|---|---:|---:|---:|",
        ]
        for name, p, b in bench_ops():
            lines.append(f"| {name} | {p:.0f} | {b:.0f} | {p / b:.1f}x |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
