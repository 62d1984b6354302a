"""Zero-shot CLIP through memo_tpt's TPT (``tts=0``): the class prompts encoded once for all images (now)
against encoded again for every image (before 2026-12-01), side by side in one process, same images.

    .venv/bin/python benchmarks/bench_tpt_zero_shot.py --arch RN50 --classes 1000 --images 3 --threads 2

Random weights (no checkpoint here; the speed does not depend on them), 256 px random images, 1 warm-up image
per path (the cached path encodes its prompts there).  Prints a markdown table and whether the logits are equal.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tttlab.core.errors import TTTLabError
from tttlab.memo_tpt.models import build_clip
from tttlab.memo_tpt.tpt import TPT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="RN50")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    try:
        model = build_clip(a.arch, pretrained=None, device="cpu")
    except TTTLabError as exc:  # an unknown --arch: the package's message lists the known ones
        ap.error(f"--arch: {exc}")
    names = [f"class {i}" for i in range(a.classes)]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(a.images + 1)]
    rows = {}
    for label, cached in (("class prompts encoded per image (before)", False), ("encoded once (now)", True)):
        tpt = TPT(model, names, tts=0, amp="none")
        if not cached:  # the old behaviour: the text encoder over every class name for every image
            tpt.initial_text_features = torch.no_grad()(tpt.text_features)
        tpt(images[0])
        t0 = time.perf_counter()
        outs = [tpt(x) for x in images[1:]]
        rows[label] = ((time.perf_counter() - t0) / a.images, outs)
    (t_old, o_old), (t_new, o_new) = rows.values()
    same = all(torch.equal(x, y) for x, y in zip(o_old, o_new))
    print(f"TPT zero-shot (tts=0), {a.arch} random weights, {a.classes} classes, {a.images} images, "
          f"{a.threads} threads, torch {torch.__version__}\n")  # fmt: skip
    print("| path | s/image | speed-up |\n| --- | ---: | ---: |")
    for label, (t, _) in rows.items():
        print(f"| {label} | {t:.3f} | {t_old / t:.1f}x |")
    print(f"\nlogits equal: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
