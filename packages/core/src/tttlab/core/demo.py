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
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.3), squeeze=False)
    cmap = "gray" if image.shape[-1] == 1 else None
    for r, name in enumerate(C.ALL):
        panels = [image] + [C.corrupt(image, name, s, seed=seed, family=family) for s in C.SEVERITIES]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel.squeeze(-1) if panel.shape[-1] == 1 else panel, cmap=cmap, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("clean" if c == 0 else f"severity {c}", fontsize=7)
            if c == 0:
                ax.set_ylabel(name.replace("_", "\n"), fontsize=6, rotation=0, ha="right", va="center")
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
