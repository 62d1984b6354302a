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
    with pytest.raises(InvalidInputError, match=r"epoch index 5 \(epoch 6 counting from 1\)"):
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
