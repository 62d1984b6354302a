"""Side-by-side speed of tttlab.core.corruptions vs imagecorruptions-imaug on the same 224 px images.

Both run in this one process on the same machine, interleaved per corruption, so the ratio is robust to
machine noise.  Ours corrupts the whole batch in one call (its design); the reference, which takes one
image at a time, is called per image.  Severity cycles 1..5 over repeats.

    python benchmarks/bench_corruptions.py --images 16 --repeats 3 [--corruptions fog,frost] [--out BENCH.md]

Ours is timed twice in the same run: on one thread, and on all CPUs (its default: the batch is split into
chunks corrupted on parallel threads; the bytes do not depend on the thread count).  The reference has
no batch API and runs on one thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def load_photos(n: int) -> np.ndarray:
    from PIL import Image
    from skimage import data as skdata

    from tttlab.core.data import resize_center_crop

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
             "retina", "colorwheel", "cat", "logo"]  # fmt: skip
    transform = resize_center_crop(256, 224)
    photos = []
    for name in names:
        try:
            img = getattr(skdata, name)()
        except Exception:  # noqa: BLE001 - a photo missing from this skimage version
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        photos.append(np.asarray(transform(Image.fromarray(img[..., :3]).convert("RGB"))))
    return np.stack([photos[i % len(photos)] for i in range(n)])


def reference(ref, images, name, severity, seed):
    out = []
    for i, img in enumerate(images):
        np.random.seed(seed + i)  # noqa: NPY002 - the reference draws from the global generator
        kwargs = {"seed": seed + i} if name in ("impulse_noise", "glass_blur") else {}
        out.append(ref.corrupt(img, corruption_name=name, severity=severity, **kwargs))
    return np.stack(out)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--corruptions", default="all")
    p.add_argument("--out", default=None, help="write the markdown table here too")
    args = p.parse_args(argv)
    try:  # the reference is an optional extra: stop before any work, with the command that installs it
        import imagecorruptions as ref
    except ImportError:
        p.error("the reference imagecorruptions-imaug is not installed: pip install imagecorruptions-imaug==1.1.5 "
                "(core's 'reference' extra)")  # fmt: skip

    from tttlab.core import corruptions as C
    from tttlab.core.errors import TTTLabError

    if args.images < 1 or args.repeats < 1:
        p.error(f"--images {args.images} --repeats {args.repeats}: both must be at least 1")
    try:
        names = C.resolve(args.corruptions.split(",") if "," in args.corruptions else args.corruptions)
    except TTTLabError as exc:
        p.error(f"--corruptions: {exc}")
    images = load_photos(args.images)
    rows = []
    # warm-up (numba compilation in the reference, lazy caches in ours)
    for name in names:
        reference(ref, images[:1], name, 1, 0)
        C.corrupt(images[:4], name, 1, seed=0)
    for name in names:
        t_one, t_all, t_ref = [], [], []
        for r in range(args.repeats):
            sev = 1 + r % 5
            t0 = time.perf_counter()
            C.corrupt(images, name, sev, seed=r, family="imagenet", threads=1)
            t1 = time.perf_counter()
            C.corrupt(images, name, sev, seed=r, family="imagenet")
            t2 = time.perf_counter()
            reference(ref, images, name, sev, r)
            t3 = time.perf_counter()
            t_one.append(t1 - t0)
            t_all.append(t2 - t1)
            t_ref.append(t3 - t2)
        one, ours = (len(images) / statistics.median(t) for t in (t_one, t_all))
        theirs = len(images) / statistics.median(t_ref)
        rows.append({"corruption": name, "one": one, "ours_img_s": ours, "ref_img_s": theirs,
                     "speedup_one": one / theirs, "speedup": ours / theirs})  # fmt: skip
        print(
            f"{name:18s} ours {one:8.1f} / {ours:8.1f} img/s   ref {theirs:8.1f} img/s   x{ours / theirs:6.2f}"
        )
    threads = C.default_threads()

    def summary(key):
        vals = [r[key] for r in rows]
        return statistics.mean(vals), float(np.exp(np.mean(np.log(vals)))), min(vals)

    s1, s_all = summary("speedup_one"), summary("speedup")
    lines = [
        f"| corruption | ours, 1 thread (img/s) | ours, {threads} threads (img/s) | imagecorruptions-imaug (img/s) "
        f"| speed-up 1 thread | speed-up {threads} threads |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['corruption']} | {r['one']:.1f} | {r['ours_img_s']:.1f} | {r['ref_img_s']:.1f} "
        f"| {r['speedup_one']:.2f}x | {r['speedup']:.2f}x |"
        for r in rows
    ]
    lines.append(f"| **mean (arithmetic / geometric)** | | | | **{s1[0]:.2f}x / {s1[1]:.2f}x** "
                 f"| **{s_all[0]:.2f}x / {s_all[1]:.2f}x** |")  # fmt: skip
    lines.append(f"| slowest ratio | | | | {s1[2]:.2f}x | {s_all[2]:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
