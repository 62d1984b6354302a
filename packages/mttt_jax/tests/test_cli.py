"""Specs, evaluate on a core benchmark, plot commands, and the no-torch rule."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tttlab.mttt_jax import train as T


@pytest.fixture(scope="module")
def run_dir(trained_run):
    """The session's shared training run (conftest.py: TINY, 2 epochs, T=2 SGD)."""
    return trained_run[0]


def test_specs_are_registered_and_import_no_framework_and_training_never_imports_torch():
    """In a fresh interpreter (one, for both checks): listing the registered methods imports neither jax nor
    flax, and importing train/evaluate/plots does not import torch."""
    code = (
        "import sys, json; from tttlab.core.registry import list_methods; "
        "m = [s.name for s in list_methods(package='mttt_jax')]; flax = 'flax' in sys.modules; "
        "import tttlab.mttt_jax.train, tttlab.mttt_jax.evaluate, tttlab.mttt_jax.plots; "
        "print(json.dumps({'m': m, 'flax': flax, 'torch': 'torch' in sys.modules}))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out["m"]) >= {"mttt_jax.mttt_mlp", "mttt_jax.mttt_linear", "mttt_jax.linear_attention",
                             "mttt_jax.linear_attention_katharopoulos", "mttt_jax.self_attention"}  # fmt: skip
    assert not out["flax"]
    assert out["torch"] is False


def test_evaluate_writes_core_records(run_dir, tmp_path):
    import numpy as np

    from tttlab.core.records import load_records
    from tttlab.mttt_jax.evaluate import run

    bench = {"name": "mnist_c", "corruptions": ["gaussian_noise", "fog"], "severities": [5], "seed": 0,
             "setting": "reset_each_shift", "batch_size": 8, "num_examples": 12, "include_clean": True}  # fmt: skip
    path = run({"run_dir": str(run_dir), "out_dir": str(tmp_path / "ev"), "benchmark": bench})
    df = load_records(path)
    acc = df[df.metric == "accuracy"]
    # the benchmark's order (clean, then its corruptions as listed), as the other packages write them: the
    # records and the printed table had the corruptions sorted by name (fog before gaussian_noise)
    assert acc.corruption.fillna("clean").tolist() == ["clean", "gaussian_noise", "fog", "mean"]
    assert (acc.method == "mttt_jax.mttt_mlp_T2_sgd").all()
    assert acc[acc.corruption == "gaussian_noise"].n.iloc[0] == 12
    assert acc[acc.corruption == "mean"].n.iloc[0] == 24, "the mean's n counts images of the corruptions"
    spi = df[df.metric == "s_per_image"]
    assert len(spi) == 3 and (spi.wall_time_s > 0).all()
    assert spi.value.tolist() == pytest.approx((spi.wall_time_s / spi.n).tolist())
    # kill audit: evaluate starts again from zero; run again (e.g. after a kill that came after its last
    # record) it appended a second copy of every record, now it replaces them
    again = load_records(run({"run_dir": str(run_dir), "out_dir": str(tmp_path / "ev"), "benchmark": bench}))
    assert len(again) == len(df)
    assert again[again.metric == "accuracy"].value.tolist() == acc.value.tolist()
    # a TTT layer adapts on each image's own tokens, so a domain's accuracy is the same whether its images
    # come alone (reset_each_shift) or shuffled with the other domains' (mixed batches): the per-domain
    # accounting of mixed batches is right (added by a mutation audit; was a test of its own)
    mixed_path = run({"run_dir": str(run_dir), "out_dir": str(tmp_path / "mixed"),
                      "benchmark": {**bench, "setting": "mixed"}})  # fmt: skip
    mixed = load_records(mixed_path)

    def accs(frame):
        a = frame[frame.metric == "accuracy"]
        return {(str(r.corruption), int(r.n)): float(r.value) for r in a.itertuples()}

    assert len(accs(mixed)) == 4 and accs(mixed) == pytest.approx(accs(df), abs=1e-9)
    assert list(accs(mixed)) == list(accs(df)), "a mixed stream's records in the benchmark's order too"
    # so is the domain's mean inner loss: a mean over its own images, whatever batches they came in (it was
    # the mean of batch means: the 4 zero images padding each domain's second batch of 8 counted, and a
    # mixed batch's mean went to every domain in it)
    from tttlab.core.records import read_jsonl

    def last_inner(records):
        return {str(r["corruption"]): r["extra"]["last_inner_loss"] for r in read_jsonl(records)
                if r["metric"] == "accuracy" and r["corruption"] != "mean"}  # fmt: skip

    alone = last_inner(path)
    assert len(alone) == 3 and all(np.isfinite(v) for v in alone.values())
    assert last_inner(mixed_path) == pytest.approx(alone, rel=1e-5)


def test_evaluate_passes_the_benchmark_order_keys_to_core(run_dir, tmp_path, monkeypatch):
    """``benchmark.shuffle``, ``benchmark.dirichlet_delta`` (compare passes it) and ``benchmark.stream_order``
    reach core's benchmark (mutation audit: keeping only the usual benchmark keys passed every test: a TTT
    layer adapts on each image's own tokens, so any order gives the same accuracy).

    The records follow the benchmark's order of its domains (each corruption's severities together, as the
    other packages write them), also for a stream that visits them in another (mixed, mariodoebler's order:
    one pool per severity, severity 3's domains before any of severity 5's); they followed the stream."""
    import tttlab.core.benchmark as B
    from tttlab.core.records import read_jsonl
    from tttlab.mttt_jax.evaluate import run

    built, real = [], B.make_benchmark

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(B, "make_benchmark", spy)
    bench = {"name": "mnist_c", "corruptions": ["snow", "fog"], "severities": [3, 5], "setting": "mixed",
             "stream_order": "mariodoebler", "num_examples": 4, "batch_size": 8, "include_clean": False,
             "shuffle": False, "dirichlet_delta": 0.25}  # fmt: skip
    path = run({"run_dir": str(run_dir), "out_dir": str(tmp_path / "ev"), "benchmark": bench})
    assert [(b.shuffle, b.dirichlet_delta, b.stream_order) for b in built] == [(False, 0.25, "mariodoebler")]
    order = [(r["corruption"], r["severity"]) for r in read_jsonl(path) if r["metric"] == "accuracy"]
    assert order == [("snow", 3), ("snow", 5), ("fog", 3), ("fog", 5), ("mean", None)]


def test_evaluate_checks_the_benchmark_before_writing_or_training(run_dir, tmp_path):
    """A bad benchmark (here a missing CIFAR-10-C root) is refused before evaluate writes its run directory
    (a typo used to rewrite the config.yaml of the previous evaluation there, next to its records) and, in
    the compare path, before it trains the profile's model."""
    from tttlab.core.errors import DatasetNotFoundError
    from tttlab.mttt_jax.evaluate import run

    bad = {"name": "cifar10_c", "root": str(tmp_path / "no_cifar")}
    with pytest.raises(DatasetNotFoundError, match="no_cifar"):
        run({"run_dir": str(run_dir), "out_dir": str(tmp_path / "ev"), "benchmark": bad})
    assert not (tmp_path / "ev").exists()
    with pytest.raises(DatasetNotFoundError, match="no_cifar"):
        run({"method": "mttt_jax.mttt_mlp", "profile": "smoke", "cache_dir": str(tmp_path / "cache"),
             "out_dir": str(tmp_path / "ev2"), "benchmark": bad})  # fmt: skip
    assert not (tmp_path / "cache").exists() and not (tmp_path / "ev2").exists()


def test_a_checkpoint_step_that_is_not_there_names_the_steps_there_are(run_dir):
    """``checkpoint_step=999`` said the checkpoint "was written by a different configuration or is damaged"
    and advised ``resume=false``; ``checkpoint_step=abc`` ended in a ValueError."""
    from tttlab.core.errors import CheckpointError
    from tttlab.mttt_jax.evaluate import load_run

    for step in (999, "abc"):
        with pytest.raises(
            CheckpointError, match=rf"checkpoint_step={step!r}: .* expected one of \[\d+, \d+\]"
        ):
            load_run(run_dir, step)


@pytest.mark.parametrize(
    "config_text, needle",
    [("model:\n  name: tutorial_net\ntrain: {engine: ttt}\n", "lacks"), ("a: [\n", "not a readable config")],
)
def test_evaluate_refuses_the_run_directory_of_another_package(tmp_path, config_text, needle):
    """Bad-input audit: another package's run directory (a torch_ttt run here) ended in KeyError: 'tokens'."""
    from tttlab.core.errors import CheckpointError
    from tttlab.mttt_jax.evaluate import load_run

    (tmp_path / "config.yaml").write_text(config_text)
    with pytest.raises(CheckpointError, match=needle):
        load_run(tmp_path)
    with pytest.raises(CheckpointError, match="nope/config.yaml does not exist"):  # was DatasetNotFoundError
        load_run(tmp_path / "nope")


def test_a_misspelt_method_is_named_as_given_with_a_did_you_mean(tmp_path):
    """``+method=mttt_jax.mtt_mlp`` said ``method=mttt_jax.'mtt_mlp'`` (the prefix outside the quotes, no
    suggestion), and next to a ``run_dir`` any name was taken and written into the records."""
    from tttlab.core.errors import ConfigError
    from tttlab.mttt_jax import evaluate as E

    with pytest.raises(
        ConfigError,
        match=r"^method='mttt_jax.mtt_mlp': no such MTTT method \(did you mean 'mttt_jax.mttt_mlp'\?\); ",
    ):
        E.check_method("mttt_jax.mtt_mlp")
    with pytest.raises(
        ConfigError,
        match=r"^method='self_atention': no such MTTT method \(did you mean 'mttt_jax.self_attention'",
    ):
        E.cached_run("self_atention", "smoke", tmp_path)
    assert E.check_method("mttt_jax.mttt_linear") == E.check_method("mttt_linear") == "mttt_linear"
    bench = {"name": "mnist_c", "corruptions": ["fog"], "severities": [5], "num_examples": 8}
    with pytest.raises(
        ConfigError, match=r"^method='mttt_jax.nope': no such MTTT method; expected \+method=mttt_jax.<mixer>"
    ):
        E.run(
            run_dir=str(tmp_path / "a_run"),
            method="mttt_jax.nope",
            benchmark=bench,
            out_dir=str(tmp_path / "o"),
        )
    assert not (tmp_path / "o").exists()


def test_compare_contract_trains_once_and_serves_each_method(tmp_path, monkeypatch):
    """``method`` + ``profile`` + ``cache_dir`` (tools/compare.py): the model is trained on first use,
    with the mixer the method names, and reused by the next call."""
    import jax

    from tttlab.core.errors import ConfigError
    from tttlab.core.records import load_records
    from tttlab.mttt_jax import evaluate as E

    calls = []
    real_train = T.train
    monkeypatch.setattr(
        T, "train", lambda c, **kw: calls.append((c["inner"]["layer_type"], c["seed"])) or real_train(c, **kw)
    )
    bench = {"name": "mnist_c", "corruptions": ["fog"], "severities": [5], "setting": "episodic",
             "batch_size": 16, "num_examples": 16}  # fmt: skip
    common = dict(profile="smoke", cache_dir=str(tmp_path / "cache"), benchmark=bench, seed=3)
    # the smoke profile on 128 training images (4 steps): this test is about the cache, not the model
    small = [o for o in E.PROFILES["smoke"] if not o.startswith(("input.num_examples", "evals.num_examples"))]
    monkeypatch.setitem(E.PROFILES, "smoke", [*small, "input.num_examples=128", "evals.num_examples=32"])
    p1 = E.run(method="mttt_jax.linear_attention", out_dir=str(tmp_path / "a"), **common)
    p2 = E.run(method="mttt_jax.linear_attention", out_dir=str(tmp_path / "b"), **common)
    # trained once (with the contract's seed: bad-input audit, every seed got the seed-0 model), then reused
    assert calls == [("linear_attention", 3)], (
        "trained once with the requested seed, then served from the cache"
    )
    a, b = load_records(p1), load_records(p2)
    assert (a.method == "mttt_jax.linear_attention").all() and (a.seed == 3).all()
    # an attention baseline's inner losses are inf (upstream's convention), also in a validation whose batch
    # is padded (32 images in a batch of 64: the pad rows are selected away, inf * 0 would be nan)
    (stats,) = (tmp_path / "cache").glob("linear_attention-smoke-*/stats.json")
    assert json.loads(stats.read_text())["val/inner_loss"] == [[[float("inf")] * 2] * 2]  # [epoch][layer][2]
    assert a[a.metric == "accuracy"].value.tolist() == b[b.metric == "accuracy"].value.tolist()
    with pytest.raises(ConfigError, match="mttt_jax.<mixer>"):
        E.run(method="mttt_jax.nope", **common)

    # dtype and device reach the training of the cached model (a model of its own: dtype is in its key)
    class Stop(Exception):
        pass

    def spy_train(c, mesh=None, **kw):
        calls.append((c["dtype"], [d.platform for d in mesh.devices.flat]))
        raise Stop

    monkeypatch.setattr(T, "train", spy_train)
    with pytest.raises(Stop):
        E.run(method="mttt_jax.linear_attention", out_dir=str(tmp_path / "c"), dtype="bfloat16", device="cpu",
              **common)  # fmt: skip
    assert calls[-1] == ("bfloat16", ["cpu"] * len(jax.devices("cpu")))
    # keys and values that were ignored (a typo, device, a non-boolean progress) or a ValueError (seed 'a')
    for extra, needle in (({"benchmrk": {}}, "unknown evaluate keys"), ({"seed": "a"}, "seed='a'"),
                          ({"device": "foo"}, "device='foo'"), ({"progress": "maybe"}, "progress='maybe'")):  # fmt: skip
        with pytest.raises(ConfigError, match=needle):
            E.run(method="mttt_jax.linear_attention", **{**common, **extra})


def test_plot_commands(run_dir, tmp_path):
    from tttlab.mttt_jax.plots import plot_inner_main, plot_multi_main

    plot_multi_main([str(run_dir), str(run_dir), "--labels", "a", "b", "--out", str(tmp_path / "c")])
    plot_inner_main([str(run_dir), "--epochs", "all", "--out", str(tmp_path / "i")])
    assert (tmp_path / "c.png").exists() and (tmp_path / "i.svg").exists()


def _old_records(writer, per_domain, ttt, train_run):
    """evaluate.py's own record writing before the move to ``core.records.write_domain_summary`` (verbatim
    logic), the reference the new records must equal."""
    import numpy as np

    accs, n_all, t_all = [], 0, 0.0
    for dom, a in sorted(per_domain.items(), key=lambda kv: str(kv[0])):
        acc = a["correct"] / max(a["n"], 1)
        extra = {"last_inner_loss": float(np.mean(a["inner"])) if ttt else None, "correct": a["correct"],
                 "train_run": train_run}  # fmt: skip
        fields = dict(
            corruption=dom.corruption, severity=dom.severity, n=a["n"], wall_time_s=a["secs"], extra=extra
        )
        for metric, v in (("accuracy", acc), ("error", 1 - acc), ("s_per_image", a["secs"] / max(a["n"], 1))):
            writer.write(metric=metric, value=v, **fields)
        if dom.corruption is not None:
            accs.append(acc)
            n_all, t_all = n_all + a["n"], t_all + a["secs"]
    if accs:
        sev = {d.severity for d in per_domain if d.corruption is not None}
        mean = dict(corruption="mean", severity=sev.pop() if len(sev) == 1 else None, n=n_all, wall_time_s=t_all,
                    extra={"domains": len(accs)})  # fmt: skip
        writer.write(metric="accuracy", value=float(np.mean(accs)), **mean)
        writer.write(metric="error", value=float(1 - np.mean(accs)), **mean)


@pytest.mark.parametrize("ttt", [True, False])
@pytest.mark.parametrize("with_clean", [True, False])
def test_records_via_core_summary_equal_the_old_ones(tmp_path, ttt, with_clean):
    """write_records (core's write_domain_summary + error twins) writes exactly the records (as a set:
    same fields and values) that evaluate wrote itself before."""
    from tttlab.core.benchmark import Domain
    from tttlab.core.records import RunDir, read_jsonl
    from tttlab.mttt_jax.evaluate import write_records

    per_domain = {
        Domain("gaussian_noise", 5): {"correct": 7, "n": 20, "secs": 0.25, "inner": [0.5, 0.7]},
        Domain("fog", 5): {"correct": 13, "n": 20, "secs": 0.5, "inner": [0.25]},
        Domain("impulse_noise", 3): {"correct": 3, "n": 9, "secs": 0.125, "inner": [1.0, 2.0, 4.0]},
    }
    if with_clean:
        per_domain[Domain(None, None)] = {"correct": 19, "n": 20, "secs": 0.375, "inner": [0.125]}
    kw = dict(method="mttt_jax.mttt_mlp", package="mttt_jax", framework="jax", model="vit", dataset="mnist_c",
              setting="episodic", seed=0)  # fmt: skip
    paths = []
    for name, fn in (("old", _old_records), ("new", write_records)):
        run = RunDir(tmp_path / name, {"x": 1})
        with run.writer(**kw) as w:
            fn(w, per_domain, ttt=ttt, train_run="runs/x")
        paths.append(run.records_path)

    def canon(path):
        drop = {"time", "timestamp", "created", "wall_clock", "run_id", "host", "pid"}
        rows = [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(path)]
        return sorted(json.dumps(r, sort_keys=True) for r in rows)

    old, new = canon(paths[0]), canon(paths[1])
    assert len(old) == 3 * len(per_domain) + 2
    assert old == new


def test_records_killed_midway_are_all_or_nothing(tmp_path, monkeypatch):
    """Kill audit: write_records appended line by line, so a run killed among its records left some of them
    and, started again, wrote them all once more.  They are one group now (an exception at the first
    ``error`` twin stands for the kill)."""
    from tttlab.core.benchmark import Domain
    from tttlab.core.records import RecordWriter, RunDir, read_jsonl
    from tttlab.mttt_jax.evaluate import write_records

    real = RecordWriter.write

    def killed_at_error(self, record=None, **fields):
        if fields.get("metric") == "error":
            raise KeyboardInterrupt
        return real(self, record, **fields)

    per_domain = {Domain("fog", 5): {"correct": 13, "n": 20, "secs": 0.5, "inner": [0.25]},
                  Domain("snow", 5): {"correct": 3, "n": 20, "secs": 0.5, "inner": [0.5]}}  # fmt: skip
    run = RunDir(tmp_path, {"x": 1})
    monkeypatch.setattr(RecordWriter, "write", killed_at_error)
    with run.writer(method="mttt_jax.mttt_mlp") as w, pytest.raises(KeyboardInterrupt):
        write_records(w, per_domain, ttt=True, train_run="runs/x")
    assert read_jsonl(run.records_path) == []
    monkeypatch.setattr(RecordWriter, "write", real)
    with run.writer(method="mttt_jax.mttt_mlp") as w:
        write_records(w, per_domain, ttt=True, train_run="runs/x")
    assert len(read_jsonl(run.records_path)) == 3 * 2 + 2


def test_evaluate_dtype_and_device_are_honoured(run_dir, tmp_path, monkeypatch):
    """``dtype`` is the compute dtype of the evaluation (bfloat16 here: close to float32, parameters
    float32) and ``device=cpu`` pins the mesh, the restored parameters and every jitted computation to
    the CPU (``jax.default_device``), whatever JAX's default backend is."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tttlab.core.errors import ConfigError
    from tttlab.core.records import load_records
    from tttlab.mttt_jax import evaluate as E

    seen = {}
    real_load, real_mesh = E.load_run, E.data_mesh

    def spy_load(*a, **kw):
        tc, model, params = real_load(*a, **kw)
        seen.update(dtype=model.dtype, default=jax.config.jax_default_device, params={
            leaf.dtype for leaf in jax.tree_util.tree_leaves(params)}, on={
            d.platform for leaf in jax.tree_util.tree_leaves(params) for d in leaf.devices()})  # fmt: skip
        return tc, model, params

    monkeypatch.setattr(E, "load_run", spy_load)
    monkeypatch.setattr(E, "data_mesh", lambda devices=None: seen.update(mesh=devices) or real_mesh(devices))
    bench = {
        "name": "mnist_c",
        "corruptions": ["fog"],
        "severities": [5],
        "batch_size": 10,
        "num_examples": 20,
    }
    recs = load_records(E.run({"run_dir": str(run_dir), "out_dir": str(tmp_path / "bf16"), "benchmark": bench,
                               "dtype": "bfloat16", "device": "cpu"}))  # fmt: skip
    assert jnp.dtype(seen["dtype"]) == jnp.bfloat16 and seen["params"] == {jnp.dtype("float32")}
    assert seen["mesh"] == jax.devices("cpu") and seen["on"] == {"cpu"}
    assert seen["default"] == jax.devices("cpu")[0]
    assert set(recs[recs.metric == "accuracy"].corruption) == {"fog", "mean"}
    # close to float32: >= 95 % equal predictions, logits within 10 % of their scale
    x = np.random.default_rng(0).uniform(-1, 1, (64, 28, 28, 1)).astype(np.float32)
    out = {}
    _, model, params = real_load(run_dir)
    for dt in ("float32", "bfloat16"):
        m = model.clone(dtype=jnp.dtype(dt))
        out[dt] = np.asarray(jax.jit(m.apply)({"params": params}, x, rngs={"idx": jax.random.PRNGKey(0)})[0])
    assert (out["float32"].argmax(1) == out["bfloat16"].argmax(1)).mean() >= 0.95
    # (the 4-step model's logits are ~1e-2, differences of larger activations: bf16 rounding is ~5 % of them)
    assert np.abs(out["float32"] - out["bfloat16"]).max() <= 0.1 * np.abs(out["float32"]).max()
    for key, value, needle in (("dtype", "float64", "dtype='float64'; expected null"),
                               ("device", "gpu", "device='gpu', but JAX finds no gpu device"),
                               ("device", "cuda:1", "device='cuda:1', but JAX finds no gpu device")):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(needle)):
            E.run({"run_dir": str(run_dir), "out_dir": str(tmp_path / "x"), "benchmark": bench, key: value})
