"""Plots write readable, non-empty PNG and SVG files; bad input is named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tttlab.core import plots
from tttlab.core.errors import InvalidInputError
from tttlab.core.records import RunDir, load_records


def _png_ok(path):
    from PIL import Image

    assert path.suffix == ".png" and path.stat().st_size > 1000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100
        assert np.asarray(im.convert("L")).std() > 0  # not a blank canvas
    svg = path.with_suffix(".svg")
    assert svg.stat().st_size > 1000 and b"<svg" in svg.read_bytes()[:2000]


@pytest.fixture
def runs(tmp_path):
    out = []
    for name, acc in (("mlp", [0.5, 0.7, 0.8]), ("linear", [0.4, 0.6, 0.65])):
        run = RunDir(tmp_path / name)
        for epoch, a in enumerate(acc):
            inner = [[3.0 - epoch, 2.0, 1.5], [2.0, 1.8, 1.7]]
            run.append_stats({"val/prec@1": a, "train/loss": 2.0 - a, "val/inner_loss": inner})
        out.append(run.path)
    return out


def test_learning_curves(tmp_path, runs):
    _png_ok(plots.plot_learning_curves(runs, out=tmp_path / "curves"))  # val/error = 1 - val/prec@1
    stats = {"name": "dict run", "train/loss": [3.0, 2.0, 1.0]}
    p = plots.plot_learning_curves([runs[0], stats], metric="train/loss", out=tmp_path / "loss.png")
    _png_ok(p)
    assert p == tmp_path / "loss.png"
    with pytest.raises(InvalidInputError, match="'val/loss'.*train/loss"):
        plots.plot_learning_curves(runs, metric="val/loss", out=tmp_path / "x")
    with pytest.raises(InvalidInputError, match="stats.json"):
        plots.plot_learning_curves([tmp_path / "nope"], out=tmp_path / "x")
    assert not (tmp_path / "x.png").exists()


def test_inner_losses(tmp_path, runs):
    _png_ok(plots.plot_inner_losses(runs[0], out=tmp_path / "inner"))
    _png_ok(plots.plot_inner_losses(runs[0], out=tmp_path / "inner_all", epochs="all"))
    attention = {"val/inner_loss": [[[float("inf")] * 3] * 2]}  # what attention baselines store
    _png_ok(plots.plot_inner_losses(attention, out=tmp_path / "inf"))
    # the message gives the 1-based number too (tttlab-mttt-plot-inner --epochs counts from 1)
    # ... and the range both ways (it gave only the 0-based indices, which that command does not take)
    with pytest.raises(
        InvalidInputError, match=r"epoch index 5 \(epoch 6 counting from 1\).*; epochs 1\.\.\d+ counting"
    ):
        plots.plot_inner_losses(runs[0], out=tmp_path / "x", epochs=[5])
    (tmp_path / "a_file").write_text("x")  # an output below a file: not FileExistsError from mkdir
    with pytest.raises(InvalidInputError, match=r"a_file/inner.png: .*a_file is a file, not a directory"):
        plots.plot_inner_losses(runs[0], out=tmp_path / "a_file" / "inner")


def test_heatmap_and_bars_from_records(tmp_path):
    run = RunDir(tmp_path / "cmp")
    rng = np.random.default_rng(0)
    with run.writer(metric="accuracy") as w:
        for method, t in (("source", 0.001), ("tent", 0.01), ("memo", 0.5)):
            for c in ("fog", "snow", "gaussian_noise"):
                w.write(method=method, corruption=c, severity=5, value=float(rng.uniform(0.2, 0.9)), n=100,
                        wall_time_s=t * 100)  # fmt: skip
            w.write(method=method, value=0.95, n=100, wall_time_s=t * 100)  # clean
    df = load_records(run.path)
    _png_ok(plots.plot_heatmap(df, out=tmp_path / "heat"))
    _png_ok(plots.plot_bars(df, out=tmp_path / "bars"))  # cost from wall_time_s / n
    wide = pd.DataFrame({"method": ["a", "a", "b", "b"], "corruption": ["fog", "snow"] * 2,
                         "value": [0.5, 0.6, 0.7, 0.2], "s_per_image": [0.01, 0.01, 0.1, 0.1]})  # fmt: skip
    _png_ok(plots.plot_heatmap(wide, out=tmp_path / "heat2", metric=None))
    _png_ok(plots.plot_bars(wide, out=tmp_path / "bars2", metric=None))
    with pytest.raises(InvalidInputError, match="'ece'"):
        plots.plot_heatmap(df, metric="ece", out=tmp_path / "x")
    with pytest.raises(InvalidInputError, match="empty"):
        plots.plot_bars(df.iloc[:0], out=tmp_path / "x")
    # the README's "from run directories": a run directory (or its records path) is read with load_records;
    # anything else that is not a table is a one-line error, not an AttributeError from inside pandas
    _png_ok(plots.plot_heatmap(run.path, out=tmp_path / "heat3"))
    _png_ok(plots.plot_bars(str(run.records_path), out=tmp_path / "bars3"))
    with pytest.raises(InvalidInputError, match=r"got a list; expected a records table \(pandas DataFrame"):
        plots.plot_heatmap([1, 2], out=tmp_path / "x")
    with pytest.raises(InvalidInputError, match=r"nowhere does not exist"):
        plots.plot_bars(tmp_path / "nowhere", out=tmp_path / "x")
    assert not (tmp_path / "x.png").exists()


def test_plots_of_a_run_directory_leave_the_evaluates_mean_record_out(tmp_path, monkeypatch):
    """An evaluate's run holds per-domain records and ``write_domain_summary``'s mean over them
    (``corruption="mean"``, here over fog-3, fog-5 and snow-5: 53.3 %).  The heatmap's mean column is the
    mean of its corruption columns, (40 + 80) / 2 = 60.0 (it was 57.8: the record joined the average as a
    column); the bar's spread is the std over the three domains, 25.2 (it was 20.5: the record was a
    fourth "domain")."""
    from tttlab.core.benchmark import Domain
    from tttlab.core.records import write_domain_summary

    run = RunDir(tmp_path / "run")
    with run.writer(method="tent", seed=0) as w:
        write_domain_summary(w, {Domain("fog", 3): (50, 100, 1.0), Domain("fog", 5): (30, 100, 1.0),
                                 Domain("snow", 5): (80, 100, 1.0)})  # fmt: skip
    figs = []
    monkeypatch.setattr(plots, "save", lambda fig, out: figs.append(fig) or out)
    plots.plot_heatmap(run.path, out=tmp_path / "heat")
    ax = figs[0].axes[0]
    columns = [t.get_text() for t in ax.get_xticklabels()]
    cells = dict(zip(columns, (t.get_text() for t in ax.texts)))
    assert cells == {"fog": "40.0", "snow": "80.0", "mean": "60.0"}
    plots.plot_bars(run.path, out=tmp_path / "bars")
    ax = figs[1].axes[0]
    assert ax.patches[0].get_width() == pytest.approx(100 * (0.5 + 0.3 + 0.8) / 3)
    errorbar = next(c for c in ax.containers if hasattr(c, "has_xerr"))
    (segment,) = errorbar.lines[2][0].get_segments()
    assert segment[1, 0] - segment[0, 0] == pytest.approx(2 * 100 * np.std([0.5, 0.3, 0.8], ddof=1))


def test_bars_leave_clean_rows_out_of_the_mean_over_domains(tmp_path, monkeypatch):
    """A records table with a clean row (corruption None, 100 %) and two corrupted domains (50 %, 30 %):
    the bar is the mean over the domains, 40.0 with spread std(50, 30) = 14.1, as the heatmap's mean
    column; averaging the clean row in gave 60.0.  A table of clean rows only still plots them."""
    import pandas as pd

    rows = [dict(method="tent", metric="accuracy", corruption=c, severity=s, value=v)
            for c, s, v in ((None, None, 1.0), ("fog", 5, 0.5), ("snow", 5, 0.3))]  # fmt: skip
    figs = []
    monkeypatch.setattr(plots, "save", lambda fig, out: figs.append(fig) or out)
    plots.plot_bars(pd.DataFrame(rows), out=tmp_path / "bars", cost=None)
    ax = figs[0].axes[0]
    assert ax.patches[0].get_width() == pytest.approx(40.0)
    errorbar = next(c for c in ax.containers if hasattr(c, "has_xerr"))
    (segment,) = errorbar.lines[2][0].get_segments()
    assert segment[1, 0] - segment[0, 0] == pytest.approx(2 * 100 * np.std([0.5, 0.3], ddof=1))
    plots.plot_bars(pd.DataFrame(rows[:1]), out=tmp_path / "clean", cost=None)
    assert figs[1].axes[0].patches[0].get_width() == pytest.approx(100.0)
