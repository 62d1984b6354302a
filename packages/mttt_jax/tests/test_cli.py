"""Specs, evaluate on a core benchmark, plot commands, and the no-torch rule."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tttlab.mttt_jax import train as T

from .test_train import TINY, compose


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    T.train(compose(TINY + ["total_epochs=1", f"out_dir={out}", "inner.TTT.inner_itr=2"]))
    return out


def test_specs_are_registered_and_import_no_framework():
    code = (
        "import sys, json; from tttlab.core.registry import list_methods; "
        "m = [s.name for s in list_methods(package='mttt_jax')]; "
        "print(json.dumps({'m': m, 'jax': 'jax' in sys.modules, 'flax': 'flax' in sys.modules}))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out["m"]) >= {"mttt_jax.mttt_mlp", "mttt_jax.mttt_linear", "mttt_jax.linear_attention",
                             "mttt_jax.linear_attention_katharopoulos", "mttt_jax.self_attention"}  # fmt: skip
    assert not out["flax"]


def test_training_never_imports_torch():
    code = (
        "import sys; import tttlab.mttt_jax.train, tttlab.mttt_jax.evaluate, tttlab.mttt_jax.plots; "
        "print('torch' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "False"


def test_evaluate_writes_core_records(trained_run, tmp_path):
    from tttlab.core.records import load_records
    from tttlab.mttt_jax.evaluate import run

    bench = {"name": "mnist_c", "corruptions": ["gaussian_noise"], "severities": [5], "setting": "continual",
             "batch_size": 10, "num_examples": 20, "seed": 0, "include_clean": True}  # fmt: skip
    path = run({"run_dir": str(trained_run), "out_dir": str(tmp_path / "ev"), "benchmark": bench})
    df = load_records(path)
    acc = df[df.metric == "accuracy"]
    assert set(acc.corruption.fillna("clean")) == {"clean", "gaussian_noise", "mean"}
    assert (acc.method == "mttt_jax.mttt_mlp_T2").all()
    assert acc[acc.corruption == "gaussian_noise"].n.iloc[0] == 20
    assert acc[acc.corruption == "mean"].n.iloc[0] == 20, "the mean's n counts images of the corruptions"
    spi = df[df.metric == "s_per_image"]
    assert len(spi) == 2 and (spi.wall_time_s > 0).all()
    assert spi.value.tolist() == pytest.approx((spi.wall_time_s / spi.n).tolist())


def test_compare_contract_trains_once_and_serves_each_method(tmp_path, monkeypatch):
    """``method`` + ``profile`` + ``cache_dir`` (tools/compare.py): the model is trained on first use,
    with the mixer the method names, and reused by the next call."""
    from tttlab.core.errors import ConfigError
    from tttlab.core.records import load_records
    from tttlab.mttt_jax import evaluate as E

    calls = []
    real_train = T.train
    monkeypatch.setattr(T, "train", lambda c, **kw: calls.append(c["inner"]["layer_type"]) or real_train(c, **kw))
    bench = {"name": "mnist_c", "corruptions": ["fog"], "severities": [5], "setting": "episodic",
             "batch_size": 16, "num_examples": 16}  # fmt: skip
    common = dict(profile="smoke", cache_dir=str(tmp_path / "cache"), benchmark=bench, seed=3)
    p1 = E.run(method="mttt_jax.linear_attention", out_dir=str(tmp_path / "a"), **common)
    p2 = E.run(method="mttt_jax.linear_attention", out_dir=str(tmp_path / "b"), **common)
    assert calls == ["linear_attention"], "trained once, then served from the cache"
    a, b = load_records(p1), load_records(p2)
    assert (a.method == "mttt_jax.linear_attention").all() and (a.seed == 3).all()
    assert a[a.metric == "accuracy"].value.tolist() == b[b.metric == "accuracy"].value.tolist()
    with pytest.raises(ConfigError, match="mttt_jax.<m>"):
        E.run(method="mttt_jax.nope", **common)


def test_plot_commands(trained_run, tmp_path):
    from tttlab.mttt_jax.plots import plot_inner_main, plot_multi_main

    plot_multi_main([str(trained_run), str(trained_run), "--labels", "a", "b", "--out", str(tmp_path / "c")])
    plot_inner_main([str(trained_run), "--epochs", "all", "--out", str(tmp_path / "i")])
    assert (tmp_path / "c.png").exists() and (tmp_path / "i.svg").exists()
