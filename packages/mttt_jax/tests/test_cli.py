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
    assert set(acc.corruption) == {"clean", "gaussian_noise", "mean"}
    assert (acc.method == "mttt_jax.mttt_mlp_T2").all()
    assert acc[acc.corruption == "gaussian_noise"].n.iloc[0] == 20


def test_plot_commands(trained_run, tmp_path):
    from tttlab.mttt_jax.plots import plot_inner_main, plot_multi_main

    plot_multi_main([str(trained_run), str(trained_run), "--labels", "a", "b", "--out", str(tmp_path / "c")])
    plot_inner_main([str(trained_run), "--epochs", "all", "--out", str(tmp_path / "i")])
    assert (tmp_path / "c.png").exists() and (tmp_path / "i.svg").exists()
