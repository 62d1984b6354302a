"""Every torch_ttt engine on MNIST-C severity 5, episodic and continual, through `tttlab-torch-ttt-evaluate`.

    python benchmarks/sweep_torch_ttt_mnist_c.py --out-dir runs/torch_ttt_sweep --num-examples 1000 \
        --jobs 8 --device cuda --table benchmarks/torch_ttt_mnist_c.md

The models are the `mnist_bn` experiment (BatchNorm CNN, one epoch on the 50,000 embedded training
images) trained jointly with each engine that has a head (ttt, ttt_pp, ittt, masked_ttt; the others use
the TTT-trained one), cached in `<out-dir>/models`; the corrupted test images are cached in
`<out-dir>/data`.  The models are trained first (one process per headed engine), then all evaluations run
`--jobs` at a time.  Records: `<out-dir>/<engine>-<setting>/records.jsonl`; the table is read from them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _sweep import run_until

ENGINES = ["source", "bn", "tent", "eata", "memo", "actmad", "deyo", "sar", "ttt", "ttt_pp", "ittt",
           "masked_ttt"]  # fmt: skip
HEADED = ["ttt", "ttt_pp", "ittt", "masked_ttt"]
SETTINGS = ["episodic", "continual"]
#: every ``benchmark.setting`` evaluate knows (``tttlab.torch_ttt.evaluate.RESET_FOR_SETTING``; not imported
#: here, so that a bad argument is rejected before torch loads); ENGINES is every ``conf/engine`` entry.
ALL_SETTINGS = ["episodic", "reset_each_shift", "continual", "mixed", "gradual"]


#: torch threads of every evaluation: the trained models, and so the table, depend on the thread count (float
#: summation order; IT3's episodic mean was 72.5 with one thread, 75.4 with two), and the published tables
#: ran with two.  They depend on the CPU type too (its kernels set the order as well): the README's tables are
#: of the CI machine type (Intel Xeon with AVX-512; source 82.27), an earlier machine's gave source 79.4
THREADS = 2


def child_env() -> dict[str, str]:
    """The environment of one evaluation: the caller's, with torch's thread count pinned to ``THREADS``.
    ``MKL_NUM_THREADS`` too: torch takes its thread count from it when it is set (an ``MKL_NUM_THREADS=1``
    in the caller's shell made every evaluation single-threaded beside ``OMP_NUM_THREADS=2``)."""
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="runs/torch_ttt_sweep")
    ap.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES, metavar="ENGINE")
    ap.add_argument("--settings", nargs="+", default=SETTINGS, choices=ALL_SETTINGS, metavar="SETTING")
    ap.add_argument("--num-examples", type=int, default=1000, help="per corruption")
    ap.add_argument("--severity", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds from now after which unfinished runs are killed (the table shows them)",
    )
    ap.add_argument("--table", default=None)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every evaluation (after --)")
    a = ap.parse_args()
    stop_at = None if a.deadline is None else time.monotonic() + a.deadline
    root = Path(a.out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)

    def one(item):
        engine, setting = item
        out = root / f"{engine}-{setting}"
        if (out / "records.jsonl").exists():
            return item, 0
        cmd = [sys.executable, "-m", "tttlab.torch_ttt.evaluate", f"engine={engine}", f"out_dir={out}",
               f"benchmark.setting={setting}", f"benchmark.num_examples={a.num_examples}",
               f"benchmark.severities=[{a.severity}]", f"benchmark.cache_dir={root / 'data'}",
               f"cache_dir={root / 'models'}", f"device={a.device}", "logging.progress=false",
               *a.overrides]  # fmt: skip
        res = run_until(cmd, stop_at, env=child_env())
        (root / f"{engine}-{setting}.log").write_text(res.stdout[-20000:] + res.stderr[-20000:])
        print(f"{engine:11s} {setting:10s} rc={res.returncode}", flush=True)
        return item, res.returncode

    todo = [(e, s) for e in a.engines for s in a.settings]
    first = [(e, a.settings[0]) for e in a.engines if e in HEADED or e == "source"]
    first = [item for item in first if item[0] != "source" or "ttt" not in a.engines]
    with ThreadPoolExecutor(max(1, a.jobs)) as ex:
        status = dict(ex.map(one, first))  # trains the cached models, one process per model
        status.update(ex.map(one, [t for t in todo if t not in status]))
    table = render(root, a.engines, a.settings, status)
    print(table)
    if a.table:
        Path(a.table).write_text(table)


def render(root: Path, engines, settings, status) -> str:
    from tttlab.core.records import load_records

    lines = []
    for setting in settings:
        rows, corruptions = {}, None
        for engine in engines:
            path = root / f"{engine}-{setting}" / "records.jsonl"
            if not path.exists():
                rows[engine] = None
                continue
            df = load_records(path, metric="accuracy")
            per = {str(r.corruption): float(r.value) for r in df.itertuples()}
            spi = load_records(path, metric="s_per_image")
            per["_s"] = float(spi["wall_time_s"].sum() / spi["n"].sum()) if len(spi) else float("nan")
            rows[engine] = per
            corruptions = corruptions or [c for c in per if c not in ("mean", "_s")]
        if corruptions is None:
            continue
        short = [
            c.replace("_noise", "").replace("_blur", "").replace("_transform", "")[:8] for c in corruptions
        ]
        lines += [f"\n**{setting}** (accuracy %, severity 5)\n",
                  "| engine | " + " | ".join(short) + " | mean | ms/image |",
                  "| --- |" + " ---: |" * (len(short) + 2)]  # fmt: skip
        for engine, per in rows.items():
            if per is None:
                lines.append(f"| {engine} | failed (rc={status.get((engine, setting))}) |")
                continue
            cells = [f"{100 * per[c]:.1f}" for c in corruptions]
            lines.append(f"| {engine} | " + " | ".join(cells) + f" | **{100 * per['mean']:.1f}** | "
                         f"{1000 * per['_s']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
