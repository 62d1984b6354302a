"""Core demo: every corruption at every severity on MNIST and on a photo, and the benchmark's size.

    python -m tttlab.core.demo [--out demo_out] [--seed 0]

Writes ``corruptions_mnist.png`` and ``corruptions_photo.png`` (19 corruptions x clean + 5 severities)
and prints the size of the default ``mnist_c`` benchmark.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from . import corruptions as C


def corruption_grid(
    image: np.ndarray, title: str, out: Path, seed: int = 0, family: str | None = None
) -> Path:
    """Render clean + severities 1..5 for all 19 corruptions of one uint8 HWC image to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Render all corruptions and print the mnist_c benchmark size.")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .benchmark import make_benchmark
    from .data import mnist, resize_center_crop

    t0 = time.perf_counter()
    digits = mnist("test")
    image, label = digits[0]
    paths = [
        corruption_grid(
            image, f"MNIST test[0] (label {label}), mnist constants", out / "corruptions_mnist.png", args.seed
        )
    ]
    try:
        from PIL import Image
        from skimage import data as skdata

        photo = np.asarray(resize_center_crop(256, 224)(Image.fromarray(skdata.chelsea())))
        paths.append(
            corruption_grid(
                photo, "scikit-image 'chelsea', ImageNet constants", out / "corruptions_photo.png", args.seed
            )
        )
    except ImportError:
        print("scikit-image is not installed: skipping the photo grid (pip install 'tttlab-core[datasets]')")
    bench = make_benchmark(
        "mnist_c", corruptions="common", severities=5, setting="reset_each_shift", batch_size=64
    )
    print(bench.describe())
    full = make_benchmark("mnist_c", corruptions="all", severities=[1, 2, 3, 4, 5], batch_size=64)
    print(f"all 19 corruptions x 5 severities: {len(full.domains)} domains, {full.num_images} images")
    for path in paths:
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
