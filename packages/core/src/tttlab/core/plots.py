"""Figures (matplotlib, Agg): learning curves, inner-loop losses, comparison heatmaps and bars.

Every function writes ``<out>.png`` and ``<out>.svg`` atomically and returns the PNG path.
``plot_learning_curves`` is seed 000's ``plot_multi`` (one line per run), ``plot_inner_losses`` its
``plot_inner`` (inner-loop loss against inner step, one line per layer) — both take run directories
(their ``stats.json``) or stats dicts instead of lists edited in the source.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write_bytes
from .errors import InvalidInputError


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save(fig, out) -> Path:
    out = Path(out)
    base = out.with_suffix("") if out.suffix in (".png", ".svg") else out
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=120, bbox_inches="tight")
        atomic_write_bytes(base.with_suffix(f".{ext}"), buf.getvalue())
    _plt().close(fig)
    return base.with_suffix(".png")


def _stats(source) -> tuple[str, Mapping[str, Any]]:
    if isinstance(source, Mapping):
        return str(source.get("name", "run")), source
    p = Path(source)
    f = p / "stats.json" if p.is_dir() else p
    if not f.exists():
        raise InvalidInputError(f"{f} does not exist; expected a run directory with stats.json")
    return p.name, json.loads(f.read_text())


def plot_learning_curves(runs: Sequence, metric: str = "val/prec@1", out="curves", labels=None) -> Path:
    """One line per run: ``stats[metric]`` (a list over epochs)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, run in enumerate(runs):
        name, stats = _stats(run)
        if metric not in stats:
            raise InvalidInputError(f"run {name!r} has no {metric!r} in its stats; has {sorted(stats)}")
        y = np.asarray(stats[metric], dtype=float)
        ax.plot(np.arange(1, len(y) + 1), y, marker="o", ms=3, label=labels[i] if labels else name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out)


def plot_inner_losses(run, key: str = "val/inner_loss", epoch: int = -1, out="inner") -> Path:
    """Inner-loop loss vs inner step (0..T), one line per layer, for one epoch of ``stats[key]``.

    ``stats[key]`` is indexed [epoch][layer][step] (or [layer][step] for a single epoch).
    """
    plt = _plt()
    name, stats = _stats(run)
    if key not in stats:
        raise InvalidInputError(f"run {name!r} has no {key!r} in its stats; has {sorted(stats)}")
    arr = np.asarray(stats[key], dtype=float)
    if arr.ndim == 3:
        arr = arr[epoch]
    if arr.ndim != 2:
        raise InvalidInputError(f"{key} must be [epoch][layer][step] or [layer][step], got shape {arr.shape}")
    fig, ax = plt.subplots(figsize=(6, 4))
    for layer, losses in enumerate(arr):
        ax.plot(np.arange(len(losses)), losses, marker="o", ms=3, label=f"layer {layer}")
    ax.set_xlabel("inner step")
    ax.set_ylabel("inner loss")
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save(fig, out)


def plot_heatmap(df, out="heatmap", value: str = "value", row: str = "method", col: str = "corruption",
                 title: str = "accuracy (%)", scale: float = 100.0) -> Path:  # fmt: skip
    """Mean ``value`` per (row, col) as an annotated heatmap."""
    plt = _plt()
    if len(df) == 0:
        raise InvalidInputError("nothing to plot: the table is empty")
    table = df.pivot_table(index=row, columns=col, values=value, aggfunc="mean") * scale
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * table.shape[1], 1.0 + 0.45 * table.shape[0]))
    im = ax.imshow(table.to_numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=45, ha="right")
    ax.set_yticks(range(table.shape[0]), table.index)
    for (i, j), v in np.ndenumerate(table.to_numpy()):
        if np.isfinite(v):
            ax.text(
                j,
                i,
                f"{v:.1f}",
                ha="center",
                va="center",
                fontsize=7,
                color="w" if v < table.to_numpy()[np.isfinite(table.to_numpy())].mean() else "k",
            )
    fig.colorbar(im, ax=ax, label=title)
    ax.set_title(title)
    return save(fig, out)


def plot_bars(df, out="bars", value: str = "value", cost: str | None = "s_per_image", group: str = "method",
              scale: float = 100.0) -> Path:  # fmt: skip
    """Mean ``value`` per method, with the adaptation cost (seconds per image) on a second panel.

    ``df`` has one row per (method, ...) with ``value`` and, optionally, a ``cost`` column.
    """
    plt = _plt()
    if len(df) == 0:
        raise InvalidInputError("nothing to plot: the table is empty")
    means = df.groupby(group)[value].mean() * scale
    spread = df.groupby(group)[value].std().fillna(0) * scale
    panels = 2 if cost and cost in df.columns and df[cost].notna().any() else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 0.5 + 0.35 * len(means)), squeeze=False)
    ax = axes[0, 0]
    ax.barh(means.index, means.to_numpy(), xerr=spread.to_numpy(), color="tab:blue")
    ax.set_xlabel("mean accuracy (%)")
    ax.invert_yaxis()
    if panels == 2:
        c = df.groupby(group)[cost].mean().reindex(means.index)
        axes[0, 1].barh(c.index, c.to_numpy(), color="tab:orange")
        axes[0, 1].set_xlabel("adaptation cost (s / image)")
        axes[0, 1].invert_yaxis()
        axes[0, 1].set_yticks([])
    return save(fig, out)
