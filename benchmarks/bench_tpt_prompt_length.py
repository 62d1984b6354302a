"""TPT's text encoder on each prompt's used positions, with the shared start of every prompt once, vs
on all 77 positions.

    .venv/bin/python benchmarks/bench_tpt_prompt_length.py --out benchmarks/tpt_prompt_length.md  # CPU, ~9 min
    python benchmarks/bench_tpt_prompt_length.py --device cuda --arch ViT-B-16 --images 8 --amp auto  # GPU

TPT tunes a prompt whose text features come from CLIP's text encoder over every class name: on ImageNet,
1,000 prompts per tuning step (forward + backward) and per prediction (forward), the larger part of TPT's
work per image.  CLIP's text encoder reads its feature at the end-of-text token through a causal mask, so
the positions after a prompt's end token change nothing, and the first positions every prompt shares
(start token + context, "a photo of a") are the same in every prompt.  Four paths, the same TPT (1 step,
64 views, AdamW on the context) on the same images, views and seed, taking turns:

* all 77 positions (the code before: ``tpt.prompt_lengths`` returning the context length, no sharing);
* every prompt cut to the longest one's end token, one batch (``tpt.length_groups`` returning one group;
  CLIP's ImageNet names: 18 positions);
* each prompt in one of up to 4 groups of similar lengths, each cut to its longest (ImageNet: 9,536
  positions in all instead of 18,000 or 77,000);
* now: the same, with the 5 shared first positions encoded once and their keys/values shared by every
  prompt (``tpt.encode_shared_prefix``; ImageNet: 4,541 positions).

Columns: seconds per image (median over ``--images`` images after one warm-up image), the speed-up over
all 77, the counted FLOP of one image (``torch.utils.flop_counter``: the views' image features, one tuning
step's forward + backward, the prediction), and the agreement with all 77: the same class for every image,
the largest logit difference.  Random weights (the speed does not depend on them); the ``--arch small``
default is a 4-layer 256-wide CLIP (text and image) that fits a CPU; ``ViT-B-16`` is TPT's.
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
def patched(name, fn):
    """TPTs made inside use ``fn`` for ``tttlab.memo_tpt.tpt.<name>``."""
    from tttlab.memo_tpt import tpt as T

    real = getattr(T, name)
    setattr(T, name, fn)
    try:
        yield
    finally:
        setattr(T, name, real)


def all_positions():
    """TPTs made inside run their text encoder on every position (the path before ``prompt_lengths``)."""
    return patched("prompt_lengths", lambda model, tokens: torch.full((len(tokens),), tokens.shape[1]))


def no_shared_prefix():
    """TPTs made inside run every prompt's start token and context through the encoder themselves."""
    return patched("shared_prefix_ok", lambda model: False)


def one_group():
    """TPTs made inside encode every prompt in one batch cut to the longest prompt's end token."""
    return patched(
        "length_groups", lambda lengths, max_groups=4: [(torch.arange(len(lengths)), int(lengths.max()))]
    )


def group_positions(tpt) -> int:
    """Positions the text encoder runs per pass, over all prompts (each group on its longest length)."""
    return sum(
        len(i) * n
        for i, n in tpt.prompts.groups or [(range(len(tpt.prompts.classnames)), tpt.prompts.length)]
    )


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
    with all_positions(), no_shared_prefix():
        full = TPT(clip, names, **kw)
    with one_group(), no_shared_prefix():
        longest = TPT(clip, names, **kw)
    with no_shared_prefix():
        grouped = TPT(clip, names, **kw)
    shared = TPT(clip, names, **kw)
    paths = {"full": full, "longest": longest, "grouped": grouped, "shared": shared}
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (300, 400, 3), dtype=np.uint8) for _ in range(args.images + 1)]

    names_ = list(paths)
    times = {k: [] for k in paths}
    same = {k: 0 for k in paths}
    diff = {k: 0.0 for k in paths}
    for i, img in enumerate(images):
        outs = {}
        for k in names_[i % len(names_) :] + names_[: i % len(names_)]:  # each path first in turn
            sync(device)
            t0 = time.perf_counter()
            outs[k] = paths[k](img)
            sync(device)
            if i:
                times[k].append(time.perf_counter() - t0)
        for k in paths:
            same[k] += int(outs[k].argmax() == outs["full"].argmax())
            diff[k] = max(diff[k], float((outs[k] - outs["full"]).abs().max()))
    flop = {k: image_flop(t, images[0]) for k, t in paths.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    positions = {
        "full": len(names) * full.prompts.length,
        "longest": len(names) * longest.prompts.length,
        "grouped": group_positions(grouped),
        "shared": group_positions(shared) - (len(names) - 1) * (1 + shared.prompts.n_ctx),
    }
    label = {
        "full": f"all {full.prompts.length} (before)",
        "longest": f"cut to the longest end token ({longest.prompts.length}), one batch",
        "grouped": f"cut per prompt, {len(grouped.prompts.groups or [0])} length group(s)",
        "shared": "the same + start token and context once, shared by all prompts (now)",
    }

    where = (
        f"{torch.cuda.get_device_name(device)}"
        if device.type == "cuda"
        else f"{platform.processor() or 'CPU'}"
    )
    lines = [
        f"TPT per image, {args.arch} (random weights), {len(names)} CLIP ImageNet class names, {args.views} views, "
        f"1 step, amp={args.amp} ({grouped.precision}), {where}, {args.threads} thread(s), torch {torch.__version__}; "
        f"median of {args.images} image(s) after 1 warm-up, the paths taking turns.",
        "",
        "| text encoder on | positions (all prompts) | s/image | speed-up | GFLOP/image | same class | max logit diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k in paths:
        agree = ("", "") if k == "full" else (f"{same[k]}/{len(images)}", f"{diff[k]:.1e}")
        lines.append(
            f"| {label[k]} | {positions[k]} | {med[k]:.3f} | {med['full'] / med[k]:.2f}x | {flop[k] / 1e9:.1f} | "
            f"{agree[0]} | {agree[1]} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from tttlab.core._io import atomic_write_text

        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
