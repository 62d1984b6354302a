"""Figures (matplotlib, Agg backend): learning curves, inner-loop losses, comparison heatmaps and bars.

Every function writes ``<out>.png`` and ``<out>.svg`` atomically and returns the PNG path.

* :func:`plot_learning_curves` is seed 000's ``plot_multi``: one line per run of a per-epoch statistic
  (``val/error`` = 1 - ``val/prec@1`` by default, as the upstream plot shows validation error).
* :func:`plot_inner_losses` is its ``plot_inner``: inner-loop loss against inner step 0..T, one line per
  TTT layer, one panel per chosen epoch.  ``inf`` (what attention baselines store) is not drawn.
* :func:`plot_heatmap` and :func:`plot_bars` draw a records table (``tttlab.core.records.load_records``)
  or any table with ``method``, ``corruption`` and ``value`` columns.

Runs are given as run directories (their ``stats.json``), ``stats.json`` paths, or stats dicts, instead
of lists edited in the source as upstream does.
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

#: Derived statistics: name -> (source key, function of its values).
DERIVED = {
    "val/error": ("val/prec@1", lambda v: 1.0 - v),
    "train/error": ("train/prec@1", lambda v: 1.0 - v),
}


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _integer_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def save(fig, out) -> Path:
    """Write ``fig`` as ``<out>.png`` and ``<out>.svg`` (atomically), close it, return the PNG path."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix.lower() in (".png", ".svg", ".pdf") else out
    try:
        for ext in ("png", "svg"):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, dpi=120, bbox_inches="tight")
            try:
                atomic_write_bytes(base.parent / f"{base.name}.{ext}", buf.getvalue())
            except OSError as exc:  # a parent that is a file, no permission, a full disk
                blocker = next((p for p in base.parents if p.exists()), None)
                reason = (
                    f"{blocker} is a file, not a directory"
                    if blocker is not None and not blocker.is_dir()
                    else exc.strerror or exc
                )  # mkdir below a file says "File exists" / "Not a directory": name the file instead
                raise InvalidInputError(
                    f"cannot write the plot {base.parent / f'{base.name}.{ext}'}: {reason}; "
                    "expected an output path in a writable directory"
                ) from exc
    finally:
        _plt().close(fig)
    return base.parent / f"{base.name}.png"


def _stats(source, i: int) -> tuple[str, Mapping[str, Any]]:
    if isinstance(source, Mapping):
        return str(source.get("name", f"run {i}")), source
    p = Path(source)
    f = p / "stats.json" if p.is_dir() else p
    if not f.is_file():
        raise InvalidInputError(f"{f} does not exist; expected a run directory with a stats.json")
    try:
        stats = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{f} is not valid JSON: {exc}") from None
    return (p.name if p.is_dir() else p.parent.name), stats


def _series(name: str, stats: Mapping[str, Any], metric: str) -> np.ndarray:
    if metric in stats:
        values = stats[metric]
        fn = None
    elif metric in DERIVED and DERIVED[metric][0] in stats:
        key, fn = DERIVED[metric]
        values = stats[key]
    else:
        have = sorted(k for k in stats if k != "name")
        raise InvalidInputError(f"run {name!r} has no {metric!r} in its stats; it has {have}")
    try:
        y = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f"run {name!r}: stats[{metric!r}] is not a list of numbers") from None
    if y.ndim != 1:
        raise InvalidInputError(
            f"run {name!r}: stats[{metric!r}] must be one number per epoch, got {y.shape}"
        )
    return fn(y) if fn else y


def plot_learning_curves(
    runs: Sequence, metric: str = "val/error", out="curves", labels: Sequence[str] | None = None,
    title: str | None = None, logy: bool = False,
) -> Path:  # fmt: skip
    """One line per run of ``stats[metric]`` (one value per epoch) against the epoch (1-based)."""
    if isinstance(runs, (str, Path, Mapping)):
        runs = [runs]
    if not runs:
        raise InvalidInputError("plot_learning_curves needs at least one run")
    if labels is not None and len(labels) != len(runs):
        raise InvalidInputError(f"{len(labels)} labels for {len(runs)} runs")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    try:
        for i, run in enumerate(runs):
            name, stats = _stats(run, i)
            y = _series(name, stats, metric)
            ax.plot(np.arange(1, len(y) + 1), y, marker="o", ms=3, label=labels[i] if labels else name)
    except BaseException:
        plt.close(fig)
        raise
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_ylabel(metric)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title or metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out)


def plot_inner_losses(
    run, out="inner", key: str = "val/inner_loss", epochs: Sequence[int] | str | int | None = None,
) -> Path:  # fmt: skip
    """Inner-loop loss vs inner step, one line per layer, one panel per epoch in ``epochs``.

    ``stats[key]`` is indexed [epoch][layer][step] (the keys of seed 000's ``all_stat_dict``, epoch first;
    upstream nests the same values [layer][step][epoch]; or [layer][step] for a single epoch).  ``epochs``: None = the last, ``"all"``, an index, or a list of indices (negative ok).
    """
    name, stats = _stats(run, 0)
    if key not in stats:
        raise InvalidInputError(f"run {name!r} has no {key!r} in its stats; it has {sorted(stats)}")
    try:
        arr = np.asarray(stats[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"run {name!r}: stats[{key!r}] must be a rectangular [epoch][layer][step] list of numbers"
        ) from None
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise InvalidInputError(f"{key} must be [epoch][layer][step] or [layer][step], got shape {arr.shape}")
    n = arr.shape[0]
    if epochs is None:
        idx = [n - 1]
    elif epochs == "all":
        idx = list(range(n))
    else:
        idx = [epochs] if isinstance(epochs, (int, np.integer)) else list(epochs)
        for e in idx:
            if not -n <= e < n:
                first = f" (epoch {e + 1} counting from 1)" if e >= 0 else ""
                raise InvalidInputError(
                    f"epoch index {e}{first} out of range: {key} has {n} epochs (indices {-n}..{n - 1}; "
                    f"epochs 1..{n} counting from 1, -1 the last)"
                )
        idx = [e % n for e in idx]
    plt = _plt()
    cols = min(len(idx), 4)
    rows = -(-len(idx) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, e in zip(axes.flat, idx):
        layers = arr[e]
        finite = np.isfinite(layers)
        for layer, losses in enumerate(layers):
            if finite[layer].any():
                color = cmap(layer / max(1, len(layers) - 1))
                ax.plot(np.arange(len(losses)), losses, marker="o", ms=3, color=color, label=f"layer {layer}")
        if not finite.any():
            ax.text(0.5, 0.5, "no inner loss\n(inf: not a TTT layer)", ha="center", va="center",
                    transform=ax.transAxes)  # fmt: skip
        ax.set_xlabel("inner step")
        ax.xaxis.set_major_locator(_integer_locator())
        ax.set_title(f"{name}, epoch {e + 1}")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(idx) :]:
        ax.axis("off")
    axes[0, 0].set_ylabel("inner loss")
    if np.isfinite(arr[idx]).any():
        axes[0, 0].legend(fontsize=7, ncol=2)
    return save(fig, out)


def _as_table(df):
    """``df`` itself (a table), or the records of a run directory / records ``.jsonl`` / folder of runs."""
    import os

    if isinstance(df, (str, os.PathLike)):
        from .records import load_records

        return load_records(df)
    if not hasattr(df, "columns"):
        raise InvalidInputError(
            f"got a {type(df).__name__}; expected a records table (pandas DataFrame, e.g. "
            "tttlab.core.records.load_records(run_dir)) or a run directory / records .jsonl path"
        )
    return df


def _metric_table(df, metric: str | None):
    """The rows of ``metric``, without the evaluates' summary records (``corruption="mean"``, a mean over
    the other rows: in a heatmap it was one more column inside the mean column, in the bars one more
    "domain" inside the mean and its spread)."""
    from .records import SUMMARY_CORRUPTION

    if len(df) == 0:
        raise InvalidInputError("nothing to plot: the table is empty")
    if "corruption" in df.columns:
        df = df[df["corruption"].astype(object) != SUMMARY_CORRUPTION]
        if len(df) == 0:
            raise InvalidInputError("nothing to plot: the table holds only summary (corruption='mean') rows")
    if "metric" in df.columns and metric is not None:
        rows = df[df["metric"] == metric]
        if len(rows) == 0:
            raise InvalidInputError(
                f"no rows with metric {metric!r}; the table has {sorted(df['metric'].dropna().unique())}"
            )
        return rows
    return df


def _scale(metric: str | None, scale: float | None) -> float:
    if scale is not None:
        return scale
    return 100.0 if metric in (None, "accuracy", "error", "top5_accuracy") else 1.0


def plot_heatmap(
    df, out="heatmap", metric: str | None = "accuracy", value: str = "value", row: str = "method",
    col: str = "corruption", title: str | None = None, scale: float | None = None, mean_column: bool = True,
) -> Path:  # fmt: skip
    """Mean ``value`` per (row, col), annotated; rows = methods, columns = corruptions (+ their mean).

    ``df`` is a records table (rows of ``metric`` are used; a run directory, records ``.jsonl`` or folder
    of runs is read with ``load_records``) or any table with the three columns.  Clean
    rows (no corruption) appear as the column ``clean``.  Accuracy and error are shown in %.
    """
    data = _metric_table(_as_table(df), metric)
    for c in (row, col, value):
        if c not in data.columns:
            raise InvalidInputError(f"the table has no {c!r} column; it has {list(data.columns)}")
    data = data.assign(**{col: data[col].astype(object).where(data[col].notna(), "clean")})
    data = data.assign(**{value: data[value].astype("float64")})
    k = _scale(metric, scale)
    table = data.pivot_table(index=row, columns=col, values=value, aggfunc="mean", sort=False) * k
    if mean_column and table.shape[1] > 1:
        corrupted = [c for c in table.columns if c != "clean"]
        table["mean"] = table[corrupted].mean(axis=1)
    values = table.to_numpy(dtype=np.float64)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2.0 + 0.75 * table.shape[1], 1.2 + 0.45 * table.shape[0]))
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=45, ha="right")
    ax.set_yticks(range(table.shape[0]), [str(r) for r in table.index])
    finite = values[np.isfinite(values)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w" if v < mid else "k")
    label = title or (f"{metric} (%)" if k == 100.0 else (metric or value))
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(label)
    return save(fig, out)


def plot_bars(
    df, out="bars", metric: str | None = "accuracy", value: str = "value", group: str = "method",
    cost: str | None = "s_per_image", scale: float | None = None,
) -> Path:  # fmt: skip
    """Mean ``metric`` per method (bars with the spread over domains), adaptation cost on a second panel.

    Clean rows (no corruption) are left out of the mean when the table has corrupted rows, as in
    :func:`plot_heatmap`'s mean column; a table of clean rows only is plotted as it is.

    The cost (seconds per image) is the ``cost`` column of a wide table, or the mean value of the rows
    whose ``metric`` is ``cost`` in a records table, or else sum(``wall_time_s``) / sum(``n``) of the
    metric's rows when those are recorded.  Without any, only the first panel is drawn.  ``df`` may also
    be a run directory, records ``.jsonl`` or folder of runs (read with ``load_records``).
    """
    df = _as_table(df)
    data = _metric_table(df, metric)
    if "corruption" in data.columns and data["corruption"].notna().any():
        # clean rows (no corruption) stay out of the mean over domains, as in plot_heatmap's mean column
        data = data[data["corruption"].notna()]
    for c in (group, value):
        if c not in data.columns:
            raise InvalidInputError(f"the table has no {c!r} column; it has {list(data.columns)}")
    k = _scale(metric, scale)
    vals = data[value].astype("float64")
    means = vals.groupby(data[group]).mean() * k
    spread = (vals.groupby(data[group]).std() * k).fillna(0.0)
    costs = _costs(df, data, metric, group, cost)
    panels = 2 if costs is not None else 1
    plt = _plt()
    fig, axes = plt.subplots(1, panels, figsize=(5.0 * panels, 0.9 + 0.4 * len(means)), squeeze=False)
    ax = axes[0, 0]
    names = [str(m) for m in means.index]
    ax.barh(names, means.to_numpy(), xerr=spread.to_numpy(), color="tab:blue", capsize=2)
    for y, v in enumerate(means.to_numpy()):
        ax.text(0, y, f" {v:.1f}", va="center", ha="left", fontsize=7, color="w")
    ax.set_xlabel(f"mean {metric or value}" + (" (%)" if k == 100.0 else ""))
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    if costs is not None:
        c = costs.reindex(means.index).to_numpy(dtype=np.float64)
        axc = axes[0, 1]
        axc.barh(names, np.nan_to_num(c), color="tab:orange")
        axc.set_xlabel("adaptation cost (s / image)")
        if np.nanmax(c) > 0 and np.nanmax(c) / max(np.nanmin(c[c > 0]), 1e-12) > 100:
            axc.set_xscale("log")
        axc.invert_yaxis()
        axc.set_yticks(range(len(names)), [""] * len(names))
        axc.grid(axis="x", alpha=0.3)
    return save(fig, out)


def _costs(df, data, metric, group, cost):
    if cost is None:
        return None
    if cost in df.columns and df[cost].notna().any():
        return df.groupby(group)[cost].mean()
    if "metric" in df.columns and (df["metric"] == cost).any():
        rows = df[df["metric"] == cost]
        return rows.groupby(group)["value"].mean()
    if {"wall_time_s", "n"} <= set(data.columns):
        rows = data[data["wall_time_s"].notna() & data["n"].notna()]
        if len(rows):
            t = rows["wall_time_s"].astype("float64").groupby(rows[group]).sum()
            n = rows["n"].astype("float64").groupby(rows[group]).sum()
            return t / n.where(n > 0)
    return None
