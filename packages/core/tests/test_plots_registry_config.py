"""Plots produce readable images; the registry lists specs without frameworks; configs reject typos."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tttlab.core import plots, registry
from tttlab.core.config import BenchmarkConfig, RunConfig, validate
from tttlab.core.errors import ConfigError, InvalidInputError, UnknownNameError
from tttlab.core.records import RunDir


def _png_ok(path):
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] > 50 and im.size[1] > 50
        assert np.asarray(im.convert("L")).std() > 0
    assert path.with_suffix(".svg").stat().st_size > 0


def test_plots(tmp_path):
    runs = []
    for name, acc in (("mlp", [0.5, 0.7, 0.8]), ("linear", [0.4, 0.6, 0.65])):
        run = RunDir(tmp_path / name)
        run.write_stats({"val/prec@1": acc, "val/inner_loss": [[[3.0, 2.0, 1.5], [2.0, 1.8, 1.7]]] * 3})
        runs.append(run.path)
    _png_ok(plots.plot_learning_curves(runs, out=tmp_path / "curves"))
    _png_ok(plots.plot_inner_losses(runs[0], out=tmp_path / "inner"))
    df = pd.DataFrame(
        {
            "method": ["a", "a", "b", "b"],
            "corruption": ["fog", "snow"] * 2,
            "value": [0.5, 0.6, 0.7, 0.2],
            "s_per_image": [0.01, 0.01, 0.1, 0.1],
        }  # fmt: skip
    )
    _png_ok(plots.plot_heatmap(df, out=tmp_path / "heat"))
    _png_ok(plots.plot_bars(df, out=tmp_path / "bars"))
    with pytest.raises(InvalidInputError, match="val/loss"):
        plots.plot_learning_curves(runs, metric="val/loss", out=tmp_path / "x")


def test_registry_register_list_get():
    spec = registry.MethodSpec(name="demo.noop", package="demo", framework="torch", evaluate="demo.eval:main")
    registry.register(spec)
    try:
        assert registry.get_method("demo.noop") is spec
        assert spec in registry.list_methods(package="demo")
        with pytest.raises(UnknownNameError, match="demo.noop"):
            registry.get_method("demo.nop")
    finally:
        registry.unregister("demo.noop")
    with pytest.raises(InvalidInputError, match="module:function"):
        registry.MethodSpec(name="x", package="x", framework="torch", evaluate="nocolon")


def test_registry_missing_package_message():
    installed = {s.package for s in registry.list_methods()}
    if "pilimit" in installed:
        pytest.skip("pilimit is installed here")
    with pytest.raises(UnknownNameError, match="pip install -c constraints.txt -e packages/pilimit"):
        registry.get_method("pilimit.inf_mlp")


def test_registry_listing_in_subprocess_imports_no_framework():
    code = (
        "import sys\nfrom tttlab.core import registry\nnames = [s.name for s in registry.list_methods()]\n"
        "print(','.join(m for m in ('torch', 'jax') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""


def test_config_unknown_key_and_types():
    cfg = validate({"seed": 3, "benchmark": {"severities": [3, 5]}})
    assert cfg.seed == 3 and list(cfg.benchmark.severities) == [3, 5] and cfg.benchmark.name == "mnist_c"
    with pytest.raises(ConfigError, match="batch_sise.*batch_size"):
        validate({"benchmark": {"batch_sise": 8}})
    with pytest.raises(ConfigError, match="seeed"):
        validate({"seeed": 1})
    with pytest.raises(ConfigError):
        validate({"seed": "not a number"})
    assert isinstance(RunConfig().benchmark, BenchmarkConfig)


def test_benchmark_from_config():
    pytest.importorskip("mnist")
    from tttlab.core.benchmark import from_config

    cfg = validate({"benchmark": {"corruptions": ["fog"], "num_examples": 16, "batch_size": 8}})
    b = from_config(cfg.benchmark)
    batches = list(b)
    assert len(batches) == 2 and batches[0].images.shape == (8, 28, 28, 1)
