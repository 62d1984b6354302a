"""``tttlab-mttt-plot-multi`` and ``tttlab-mttt-plot-inner``: upstream's ``plot_multi.py`` / ``plot_inner.py``
on run directories (their ``stats.json``) instead of folder lists edited in the source.

    tttlab-mttt-plot-multi runs/mttt/a runs/mttt/b --metric val/prec@1 --out curves
    tttlab-mttt-plot-inner runs/mttt/a --key val/inner_loss --epochs all --out inner
"""

from __future__ import annotations

import argparse

from tttlab.core.plots import plot_inner_losses, plot_learning_curves


def plot_multi_main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="tttlab-mttt-plot-multi", description="learning curves of several runs")
    ap.add_argument("runs", nargs="+", help="run directories (with stats.json)")
    ap.add_argument("--metric", default="val/prec@1", help="stats key, e.g. val/prec@1, val/loss, train/loss")
    ap.add_argument("--labels", nargs="*", default=None)
    ap.add_argument("--out", default="curves", help="output path without extension (.png and .svg)")
    a = ap.parse_args(argv)
    print(plot_learning_curves(a.runs, metric=a.metric, out=a.out, labels=a.labels or None))


def plot_inner_main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="tttlab-mttt-plot-inner", description="inner-loop loss per layer of one run"
    )
    ap.add_argument("run", help="run directory (with stats.json)")
    ap.add_argument("--key", default="val/inner_loss", help="train/inner_loss or val/inner_loss")
    ap.add_argument("--epochs", nargs="*", default=None, help="'all', or epoch indices (default: the last)")
    ap.add_argument("--out", default="inner")
    a = ap.parse_args(argv)
    epochs = None if not a.epochs else ("all" if a.epochs == ["all"] else [int(e) for e in a.epochs])
    print(plot_inner_losses(a.run, key=a.key, epochs=epochs, out=a.out))
