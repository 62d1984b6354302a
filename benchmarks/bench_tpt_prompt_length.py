"""TPT's text encoder on the prompts cut after their longest end-of-text token vs on all 77 positions.

    .venv/bin/python benchmarks/bench_tpt_prompt_length.py --out benchmarks/tpt_prompt_length.md  # CPU, ~3 min
    python benchmarks/bench_tpt_prompt_length.py --device cuda --arch ViT-B-16 --images 8 --amp auto  # GPU

TPT tunes a prompt whose text features come from CLIP's text encoder over every class name: on ImageNet,
1,000 prompts per tuning step (forward + backward) and per prediction (forward), the larger part of TPT's
work per image.  CLIP's text encoder reads its feature at the end-of-text token through a causal mask, so
the positions after the longest prompt's end token change nothing; ``tttlab.memo_tpt.tpt.prompt_length``
cuts them (TPT's "a photo of a {class}." with CLIP's ImageNet names: 18 of 77 positions).  Both paths
here are the same TPT (1 step, 64 views, AdamW on the context), on the same images, views and seed; "all
77" is the same code with ``prompt_length`` returning the context length (the code before the cut).

Columns: seconds per image (median over ``--images`` images after one warm-up image, the two paths
alternating), the speed-up, the counted FLOP of one image (``torch.utils.flop_counter``: the views'
image features, one tuning step's forward + backward, the prediction), and the agreement: the same class for
every image, the largest logit difference.  Random weights (the speed does not depend on them); the
``--arch small`` default is a 4-layer 256-wide CLIP (text and image) that fits a CPU; ``ViT-B-16`` is TPT's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL_CLIP = dict(
    embed_dim=256,
    vision_cfg=dict(image_size=224, layers=4, width=256, patch_size=32, head_width=64),
    text_cfg=dict(context_length=77, vocab_size=49408, width=256, heads=4, layers=4),
)


@contextlib.contextmanager
def all_positions():
    """TPTs made inside run their text encoder on every position (the path before ``prompt_length``)."""
    from tttlab.memo_tpt import tpt as T

    real = T.prompt_length
    T.prompt_length = lambda model, tokens: int(tokens.shape[1])
    try:
        yield
    finally:
        T.prompt_length = real


def image_flop(tpt, image) -> int:
    """Counted FLOP (``torch.utils.flop_counter``: matrix products, forward and backward) of one TPT image."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        tpt(image)
    return fc.get_total_flops()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="small", help="open_clip architecture (random weights) or 'small'")
    ap.add_argument("--classes", type=int, default=1000, help="the first N of CLIP's ImageNet class names")
    ap.add_argument("--views", type=int, default=64)
    ap.add_argument("--images", type=int, default=3, help="timed images (after one warm-up image)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--amp",
        default="none",
        choices=["none", "auto", "bf16", "fp16"],
        help="TPT's precision (auto: upstream's fp16 + GradScaler on CUDA, float32 on CPU)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not 1 <= args.classes <= 1000:
        ap.error(f"--classes {args.classes}: expected 1..1000 (CLIP's ImageNet class names)")
    if args.images < 1 or args.views < 1 or args.threads < 1:
        ap.error("--images, --views and --threads must be >= 1")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    from tttlab.core.errors import TTTLabError
    from tttlab.memo_tpt.data import clip_imagenet_class_names
    from tttlab.memo_tpt.models import build_clip
    from tttlab.memo_tpt.tpt import TPT

    torch.manual_seed(0)
    try:
        if args.arch == "small":
            clip = build_clip("small-vit-32", config=SMALL_CLIP, device=device)
        else:
            clip = build_clip(args.arch, device=device)
    except TTTLabError as exc:  # an unknown --arch: the package's message lists the known ones
        ap.error(f"--arch: {exc}")
    names = clip_imagenet_class_names()[: args.classes]
    kw = dict(n_views=args.views, tts=1, seed=0, amp=args.amp)
    cut = TPT(clip, names, **kw)
    with all_positions():
        full = TPT(clip, names, **kw)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (300, 400, 3), dtype=np.uint8) for _ in range(args.images + 1)]

    times = {"cut": [], "full": []}
    same, diff = 0, 0.0
    for i, img in enumerate(images):
        outs = {}
        for name, tpt in (("cut", cut), ("full", full)) if i % 2 == 0 else (("full", full), ("cut", cut)):
            sync(device)
            t0 = time.perf_counter()
            outs[name] = tpt(img)
            sync(device)
            if i:
                times[name].append(time.perf_counter() - t0)
        same += int(outs["cut"].argmax() == outs["full"].argmax())
        diff = max(diff, float((outs["cut"] - outs["full"]).abs().max()))
    flop_cut, flop_full = image_flop(cut, images[0]), image_flop(full, images[0])
    t_cut, t_full = statistics.median(times["cut"]), statistics.median(times["full"])

    where = (
        f"{torch.cuda.get_device_name(device)}"
        if device.type == "cuda"
        else f"{platform.processor() or 'CPU'}"
    )
    lines = [
        f"TPT per image, {args.arch} (random weights), {len(names)} CLIP ImageNet class names, {args.views} views, "
        f"1 step, amp={args.amp} ({cut.precision}), {where}, {args.threads} thread(s), torch {torch.__version__}; median of {args.images} "
        f"image(s) after 1 warm-up, the two paths alternating.",
        "",
        "| text positions | s/image | speed-up | GFLOP/image | same class | max logit diff |",
        "|---|---:|---:|---:|---:|---:|",
        f"| all {full.prompts.length} (before) | {t_full:.3f} | 1.00x | {flop_full / 1e9:.1f} | | |",
        f"| {cut.prompts.length} (to the longest end token) | {t_cut:.3f} | {t_full / t_cut:.2f}x | "
        f"{flop_cut / 1e9:.1f} | {same}/{len(images)} | {diff:.1e} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from tttlab.core._io import atomic_write_text

        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
