"""``tttlab-mttt-plot-multi`` and ``tttlab-mttt-plot-inner``: upstream's ``plot_multi.py`` / ``plot_inner.py``
on run directories (their ``stats.json``) instead of folder lists edited in the source.

    tttlab-mttt-plot-multi runs/mttt/a runs/mttt/b --out curves          # validation error per epoch
    tttlab-mttt-plot-inner runs/mttt/a --key val/inner_loss --epochs all --out inner

``plot-multi`` draws the validation error (1 - ``val/prec@1``) by default, the curve upstream's
``plot_multi.py`` draws (there in percent, here as a fraction); ``--metric`` picks any other per-epoch
statistic.  ``plot-inner`` draws the same numbers as upstream's ``plot_inner.py`` in another layout: one
panel per epoch, inner loss against inner step, one line per layer (upstream: one panel per layer, inner
loss against epoch, one line per inner step).
"""

from __future__ import annotations

import argparse

from tttlab.core.plots import plot_inner_losses, plot_learning_curves

from .cli import user_errors
from .errors import InvalidInputError


def plot_multi_main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="tttlab-mttt-plot-multi", description="learning curves of several runs")
    ap.add_argument("runs", nargs="+", help="run directories (with stats.json)")
    ap.add_argument(
        "--metric",
        default="val/error",
        help="stats key, e.g. val/error (1 - val/prec@1, upstream's curve), val/prec@1, val/loss",
    )
    ap.add_argument("--labels", nargs="*", default=None)
    ap.add_argument("--out", default="curves", help="output path without extension (.png and .svg)")
    a = ap.parse_args(argv)
    with user_errors(ap.prog):
        print(plot_learning_curves(a.runs, metric=a.metric, out=a.out, labels=a.labels or None))


def epoch_indices(epochs: list[str] | None):
    """``--epochs`` of ``tttlab-mttt-plot-inner`` -> the core's 0-based indices.  Epochs are numbered
    from 1 as in the training log and the panel titles (``-1`` = the last); ``all``; none = the last."""
    if not epochs:
        return None
    if epochs == ["all"]:
        return "all"
    out = []
    for e in epochs:
        try:
            k = int(e)
        except ValueError:
            raise InvalidInputError(
                f"--epochs {e!r}: expected 'all' or epoch numbers (1 = first, -1 = last)"
            ) from None
        if k == 0:
            raise InvalidInputError(
                "--epochs 0: epochs are numbered from 1 (as in the training log); -1 = last"
            )
        out.append(k - 1 if k > 0 else k)
    return out


def plot_inner_main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="tttlab-mttt-plot-inner", description="inner-loop loss per layer of one run"
    )
    ap.add_argument("run", help="run directory (with stats.json)")
    ap.add_argument("--key", default="val/inner_loss", help="train/inner_loss or val/inner_loss")
    ap.add_argument(
        "--epochs",
        nargs="*",
        default=None,
        help="'all', or epoch numbers as in the training log (1 = first, -1 = last; default: last)",
    )
    ap.add_argument("--out", default="inner")
    a = ap.parse_args(argv)
    with user_errors(ap.prog):
        print(plot_inner_losses(a.run, key=a.key, epochs=epoch_indices(a.epochs), out=a.out))
