"""train.py / evaluate.py end to end on the real Hydra config, shrunk (lightning-hydra-template style).

One smoke training run (320 MNIST images, seconds) is shared by the module; on top of it: the run
directory and record schema, resume after a simulated kill (bitwise the same records and weights), an
evaluation on mnist_c, the same evaluation through ``torchrun --nproc_per_node=2`` (gloo, CPU) whose
merged records equal the single-process ones, the reset policy at domain boundaries, the method specs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tttlab.core.errors import CheckpointError, ConfigError
from tttlab.core.records import SCHEMA, config_hash, load_records, read_jsonl, read_stats
from tttlab.torch_ttt import evaluate as E
from tttlab.torch_ttt import train as T
from tttlab.torch_ttt.engine.base_engine import Reset

VOLATILE = ("wall_time_s", "config_hash", "git_sha")


def hydra_compose(config_name: str, overrides: list[str]) -> dict:
    """The config exactly as ``@hydra.main`` composes it."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    T.register_configs()
    E.register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("tttlab.torch_ttt.conf", version_base=None):
        cfg = compose(config_name=config_name, overrides=overrides)
    GlobalHydra.instance().clear()
    return T.to_dict(cfg)


def smoke_config(out_dir: Path, *extra: str) -> dict:
    return hydra_compose("config", ["+experiment=smoke", f"out_dir={out_dir}", *extra])


def stable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "smoke"
    return T.run(smoke_config(out))


def test_hydra_composes_the_experiments_and_rejects_unknown_keys(tmp_path):
    tutorial = hydra_compose("config", ["+experiment=mnist_tutorial"])
    assert tutorial["seed"] == 7 and tutorial["model"]["name"] == "tutorial_net"
    assert tutorial["train"]["engine_kwargs"] == {"features_layer_name": "fc2"}
    assert (tutorial["train"]["lr"], tutorial["train"]["ssl_weight"], tutorial["data"]["batch_size"]) == (
        0.01, 0.35, 64,
    )  # fmt: skip
    assert tutorial["eval"]["num_steps"] == [0, 1, 2, 3] and tutorial["eval"]["noise_std"] == 2.0
    # the loader evaluate.py uses inside a running Hydra app composes the same config
    assert T.train_config("mnist_tutorial") == T._validate(tutorial)
    with pytest.raises(Exception, match="lrr"):
        hydra_compose("config", ["+experiment=smoke", "train.lrr=1"])
    with pytest.raises(ConfigError, match="lrr"):
        T.train_config("smoke", ["train.lrr=1"])
    ev = hydra_compose("evaluate", ["engine=eata"])
    assert ev["engine"]["name"] == "eata" and ev["benchmark"]["name"] == "mnist_c"
    assert ev["benchmark"]["severities"] == [5]
    assert E.eval_config({"engine": "eata"})["engine"] == ev["engine"]
    assert ev["out_dir"] == "runs/torch_ttt/eval/eata-mnist_c-reset_each_shift"
    noisy = hydra_compose("evaluate", ["engine=ttt", "stream=noisy", "benchmark.setting=episodic"])
    assert noisy["out_dir"] == "runs/torch_ttt/eval/ttt-noisy-episodic", "the run directory names the stream"
    with pytest.raises(ConfigError, match="engine"):
        E.eval_config({"engine": "tentt"})


def test_train_writes_the_run_directory_in_the_core_schema(smoke_run):
    for name in ("config.yaml", "env.json", "records.jsonl", "stats.json", "checkpoints/last.ckpt"):
        assert (smoke_run / name).exists(), name
    records = read_jsonl(smoke_run / "records.jsonl")  # validates every record against the schema
    assert all(set(r) == set(SCHEMA) for r in records)
    got = {(r["method"], r["metric"], r["corruption"], r["step"]): r for r in records}
    assert set(got) == {
        ("torch_ttt.ttt", "train_accuracy", None, 1),
        ("torch_ttt.source", "accuracy", None, 0),
        ("torch_ttt.source", "accuracy", T.TUTORIAL_NOISE, 0),
        ("torch_ttt.ttt", "accuracy", T.TUTORIAL_NOISE, 0),
        ("torch_ttt.ttt", "accuracy", T.TUTORIAL_NOISE, 1),
    }
    # 0 TTT steps is the plain model on the same noisy images
    assert got[("torch_ttt.ttt", "accuracy", T.TUTORIAL_NOISE, 0)]["value"] == pytest.approx(
        got[("torch_ttt.source", "accuracy", T.TUTORIAL_NOISE, 0)]["value"], abs=0
    )
    assert all(r["n"] == 128 for r in records if r["metric"] == "accuracy")
    stats = read_stats(smoke_run)
    assert stats["train/steps"] == [10] and "eval" in stats
    ck = T.load_checkpoint(smoke_run / "checkpoints" / "last.ckpt")
    assert ck["done"] and ck["state"]["step"] == 10
    assert any(k.startswith("angle_head.") for k in ck["engine_state"]), "the rotation head is saved"


def test_killed_run_resumes_to_identical_records_and_weights(smoke_run, tmp_path, caplog):
    out = tmp_path / "killed"
    # checkpoints every 4 steps; "killed" after step 6: steps 5-6 are lost and redone on resume
    with caplog.at_level("WARNING", logger="tttlab.torch_ttt.train"):
        T.run(smoke_config(out, "train.stop_after_steps=6"))
    # was '..., no checkpoint', though the step-4 checkpoint was there and is resumed
    assert "stopping after 6 steps (train.stop_after_steps) as a kill would" in caplog.text
    assert "no checkpoint" not in caplog.text
    ck = T.load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert not ck["done"] and ck["state"]["step"] == 4
    assert read_jsonl(out / "records.jsonl") == []
    T.run(smoke_config(out))
    assert stable(read_jsonl(out / "records.jsonl")) == stable(read_jsonl(smoke_run / "records.jsonl"))
    a = T.load_checkpoint(out / "checkpoints" / "last.ckpt")["engine_state"]
    b = T.load_checkpoint(smoke_run / "checkpoints" / "last.ckpt")["engine_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished run started again writes nothing twice, and says so (not "resumed ... at epoch 1")
    with caplog.at_level("INFO", logger="tttlab.torch_ttt.train"):
        T.run(smoke_config(out))
    assert len(read_jsonl(out / "records.jsonl")) == 5
    assert "training already finished (1 epochs)" in caplog.text and "resumed from" not in caplog.text
    assert "after 1 steps: already in records.jsonl" in caplog.text


def test_a_checkpoint_of_another_config_is_not_resumed(smoke_run, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(smoke_run, out)
    with pytest.raises(CheckpointError, match="another model/training config"):
        T.run(smoke_config(out, "train.lr=0.5"))


def eval_overrides(run_dir: Path, out: Path) -> list[str]:
    return [
        "engine=ttt", f"train_run={run_dir}", f"out_dir={out}", "benchmark.setting=episodic",
        "benchmark.num_examples=48", "benchmark.batch_size=16", "benchmark.corruptions=[gaussian_noise,fog]",
        "engine.optimization.num_steps=1", "logging.progress=false", "calibration.num_examples=64",
    ]  # fmt: skip


def eval_records(path: Path) -> dict:
    return {
        (r["corruption"], r["metric"]): (r["value"], r["n"], r["extra"].get("correct"))
        for r in read_jsonl(path)
        if r["metric"] == "accuracy"
    }


def test_the_printout_names_reset_steps_and_sars_recoveries_per_domain(tmp_path):
    """What the command prints for SAR (core's domain_table with torch_ttt's note): the reset policy and
    step count in the title, per domain its recoveries (the fourth total), none on the mean's row (its
    extra holds the whole stream's count); records of a torchrun rank left out."""
    from tttlab.core.benchmark import CLEAN, Domain
    from tttlab.core.records import RecordWriter

    path = tmp_path / "records.jsonl"
    totals = {
        CLEAN: [4, 4, 0.004, 0],
        Domain("fog", 5): [3, 4, 0.008, 2],
        Domain("snow", 5): [1, 4, 0.002, 1],
    }
    extra = {"reset": "never", "sar_recoveries": 3, "labels": "dataset"}
    defaults = dict(method="torch_ttt.sar", dataset="mnist_c", setting="continual", step=1, config_hash="h")
    with RecordWriter(path, defaults) as w:
        E.write_summary(w, {CLEAN: [0, 4, 0.1, 9]}, {**extra, "shard": True, "rank": 1})
        E.write_summary(w, totals, extra)
    assert E.summary_lines(path) == [
        "torch_ttt.sar on mnist_c (continual, reset never, 1 step(s)): accuracy %, ms/image",
        "  clean                    100.0     1.000  SAR recoveries 0",
        "  fog-5                     75.0     2.000  SAR recoveries 2",
        "  snow-5                    25.0     0.500  SAR recoveries 1",
        "  mean                      50.0",
    ]


def test_evaluate_single_process_and_torchrun_agree(smoke_run, tmp_path):
    single = E.run(hydra_compose("evaluate", eval_overrides(smoke_run, tmp_path / "single")))
    # an evaluation writes no training curves and no checkpoints: no empty stats.json, no empty checkpoints/
    assert sorted(p.name for p in single.parent.iterdir()) == ["config.yaml", "env.json", "records.jsonl"]
    records = read_jsonl(single)
    assert {r["metric"] for r in records} == {"accuracy", "s_per_image"}
    assert {r["corruption"] for r in records} == {"gaussian_noise", "fog", "mean"}
    for r in records:
        assert r["method"] == "torch_ttt.ttt" and r["dataset"] == "mnist_c" and r["severity"] == 5
        assert r["setting"] == "episodic" and r["step"] == 1 and r["extra"]["reset"] == "per_batch"
        assert r["n"] == (96 if r["corruption"] == "mean" else 48) and r["wall_time_s"] > 0
    lines = E.summary_lines(single)  # what the command prints
    assert lines[0].startswith("torch_ttt.ttt on mnist_c (episodic, reset per_batch, 1 step(s))")
    by_name = {ln.split()[0]: ln.split()[1:] for ln in lines[1:]}
    assert set(by_name) == {"gaussian_noise-5", "fog-5", "mean"} and len(by_name["fog-5"]) == 2
    mean = next(r["value"] for r in records if r["corruption"] == "mean" and r["metric"] == "accuracy")
    assert by_name["mean"] == [f"{100 * mean:.1f}"]
    # an evaluation run again in the same out_dir appends: the printout is the latest run's only
    older = [{**r, "config_hash": "older", "value": 0.0} for r in records]
    both = tmp_path / "two-runs.jsonl"
    both.write_text("".join(json.dumps(r) + "\n" for r in older + records))
    assert E.summary_lines(both) == lines
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        "-m", "tttlab.torch_ttt.evaluate", *eval_overrides(smoke_run, tmp_path / "dist"),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    printed = {ln.split()[0]: ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("  ")}
    assert printed == {k: v[0] for k, v in by_name.items()}, "rank 0 prints the merged accuracies, once"
    assert res.stdout.count("  mean ") == 1
    merged = tmp_path / "dist" / "records.jsonl"
    assert eval_records(merged) == eval_records(single)
    assert {r["extra"]["world_size"] for r in read_jsonl(merged)} == {2}
    shards = load_records(tmp_path / "dist" / "shards", metric="accuracy")
    assert sorted(shards["extra"].map(lambda e: e["rank"]).unique()) == [0, 1]
    assert not list((tmp_path / "dist" / "shards").glob("records-rank*.jsonl")), "rank files were merged"
    for folder in (tmp_path / "dist", tmp_path / "dist" / "shards"):
        assert not (folder / "stats.json").exists() and not (folder / "checkpoints").exists(), folder


def test_reset_policy_follows_the_setting_and_domain_boundaries():
    def cfg(setting, reset=None):
        return {"benchmark": {"setting": setting}, "engine": {"optimization": {"reset": reset}}}

    assert E.reset_policy(cfg("episodic")) is Reset.PER_BATCH
    assert E.reset_policy(cfg("reset_each_shift")) is Reset.PER_DOMAIN
    for setting in ("continual", "mixed", "gradual"):
        assert E.reset_policy(cfg(setting)) is Reset.NEVER
    assert E.reset_policy(cfg("continual", "per_domain")) is Reset.PER_DOMAIN

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.resets = []

        def reset(self):
            self.resets.append(self.seen)

        def forward(self, x):
            self.seen += 1
            return torch.zeros(len(x), 3), torch.zeros(())

    from tttlab.core.benchmark import Domain

    a, b = Domain("fog", 5), Domain("snow", 5)
    # a sharded stream: the rank never sees the batch flagged reset of domain b
    stream = [(a, True), (a, False), (b, False), (b, False)]

    def batches():
        for dom, reset in stream:
            yield E.StreamBatch(dom, torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), reset,
                                np.full(2, [a, b].index(dom)))  # fmt: skip

    for policy, expected in ((Reset.PER_DOMAIN, [0, 2]), (Reset.NEVER, []), (Reset.PER_BATCH, [0])):
        engine = Counting()
        engine.seen = 0
        totals = E.adapt_stream(engine, batches(), [a, b], torch.device("cpu"), policy, False)
        assert engine.resets == expected, policy
        assert totals[a][:2] == [4, 4] and totals[b][:2] == [4, 4]


def test_reset_each_shift_under_the_mariodoebler_order_resets_per_corruption_on_every_rank():
    """stream_order=mariodoebler: one reset per corruption, none between its severities, also on a rank of a
    sharded stream that never gets the batch flagged reset (the default order resets per domain)."""
    from tttlab.core.benchmark import Benchmark
    from tttlab.core.data import ArrayDataset

    def files(c, s):
        return ArrayDataset(np.zeros((4, 4, 4, 1), np.uint8), np.arange(4) % 3)

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen, self.resets = [], []

        def reset(self):
            self.resets.append(len(self.seen))

        def forward(self, x):
            self.seen.append(None)
            return torch.zeros(len(x), 3), torch.zeros(())

    def resets(order, rank=0, world_size=1, shift=True):
        bench = Benchmark("t", None, corruptions=["fog", "snow"], severities=[4, 2], setting="reset_each_shift",
                          batch_size=2, domain_files=files, stream_order=order)  # fmt: skip
        stream = [E.StreamBatch(b.domain, torch.zeros(len(b), 1, 4, 4), torch.as_tensor(b.labels), b.reset,
                                b.domain_ids) for b in bench.batches(rank=rank, world_size=world_size)]  # fmt: skip
        engine = Counting()
        E.adapt_stream(engine, stream, bench.domains, torch.device("cpu"), Reset.PER_DOMAIN, False,
                       shift=bench.shift if shift else None)  # fmt: skip
        return engine.resets

    # 4 visits (fog-4, fog-2, snow-4, snow-2) of 2 batches: batches 0..7
    assert resets("tttlab") == [0, 2, 4, 6]
    assert resets("mariodoebler") == [0, 4]
    # rank 1 of 3 gets batches 1, 4, 7; batch 4 (snow-4's first) is flagged; rank 2 gets 2, 5 (no flag)
    assert resets("mariodoebler", 1, 3) == [0, 1]  # fog-2's batch 1 starts the rank; snow at batch 4
    assert resets("mariodoebler", 2, 3) == [
        0,
        1,
    ]  # batch 2 (fog-2), batch 5 (snow-4's second): a new corruption
    assert resets("tttlab", 2, 3) == [0, 1]
    # without the benchmark's shift, a rank resets at every domain (the default order's shifts)
    assert resets("mariodoebler", shift=False) == [0, 2, 4, 6]


def test_a_bad_device_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"device='tpu': expected cpu, cuda, cuda:N or auto"):
        E.run({"engine": "tent", "device": "tpu", "out_dir": str(tmp_path / "e")})
    with pytest.raises(ConfigError, match="device='tpu'"):
        T.run(smoke_config(tmp_path / "t", "device=tpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            T.resolve_device("cuda")
    assert T.resolve_device("auto").type in ("cpu", "cuda")


@pytest.mark.parametrize(
    "override, needle",
    [
        ("eval.num_steps=[0,-1]", "eval.num_steps=[0, -1]: expected a list of integers >= 0"),
        ("eval.lr=-0.01", "eval.lr=-0.01: expected null or a finite number >= 0"),
        (
            "eval.optimizer_name=adm",
            "eval.optimizer_name='adm': expected null or one of ['adam', 'sgd', 'adamw']",
        ),
    ],
)
def test_train_rejects_bad_eval_settings_before_training(tmp_path, override, needle):
    """The noisy evaluation's settings are checked with the others: they used to fail only after the
    whole training (minutes for the tutorial)."""
    with pytest.raises(ConfigError, match=re.escape(needle)):
        T.run(smoke_config(tmp_path / "t", override))
    assert not (tmp_path / "t").exists(), "nothing trained or written"


def test_cli_bad_input_is_one_line_and_exit_2_before_any_training(tmp_path, monkeypatch, capsys):
    """A bad benchmark setting fails before the model is trained (it used to train first, minutes), and
    the command prints the error's message, not Hydra's traceback.  In process, as ``python -m
    tttlab.torch_ttt.evaluate`` (a subprocess cost ~6 s of start-up; an exception that escaped the command's
    handler would be Hydra's report on this stderr and exit status 1 here too; the torchrun test runs the
    module form)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [E.__file__, "benchmark.setting=continuall", f"cache_dir={tmp_path / 'models'}",
                                      f"out_dir={tmp_path / 'e'}", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        E.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert "tttlab-torch-ttt-evaluate: error: UnknownNameError: unknown benchmark setting 'continuall'" in err
    assert "Traceback" not in err and not (tmp_path / "models").exists()
    with pytest.raises(SystemExit) as exit_info, T.user_errors("tttlab-torch-ttt-train"):
        raise ConfigError("train.lr=-1: expected >= 0")
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err == "tttlab-torch-ttt-train: error: ConfigError: train.lr=-1: expected >= 0\n"
    )


@pytest.mark.parametrize(
    "stream,setting", [("benchmark", "mixed"), ("benchmark", "gradual"), ("noisy", "episodic")]
)
def test_stream_length_is_the_progress_bar_total(stream, setting):
    from tttlab.core.torch import Dist

    c = E.eval_config({"stream": stream, "noisy": {"num_examples": 70, "batch_size": 16}, "benchmark": {
        "setting": setting, "corruptions": ["fog", "contrast"], "num_examples": 40, "batch_size": 16}})  # fmt: skip
    for rank in (0, 1):
        batches, _, _, total = E.make_stream(c, Dist(rank=rank, world_size=2))
        assert total == sum(1 for _ in batches)


def test_warm_up_changes_no_random_state():
    """evaluate.run pays torch's first-call costs before timing (they were ~2 s of the first domain's
    ms/image); the numbers must not move, so no random state may change."""
    import random

    torch.manual_seed(3)
    states = (torch.get_rng_state(), random.getstate())
    E.warm_up()
    assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()


@pytest.mark.parametrize(
    "engine, kwargs, needle",
    [
        ("tent", {}, "TentEngine needs normalisation layers"),  # the tutorial net has none
        ("ttt", {"features_layer_name": "fc9"}, "features layer 'fc9' not found"),
    ],
)
def test_an_engine_the_trained_model_cannot_take_fails_before_training(tmp_path, engine, kwargs, needle):
    """``engine=tent train_experiment=smoke`` (a model without normalisation layers): the evaluated engine is
    built around an untrained model of that architecture first, so the error comes before the model is
    trained and cached (it used to come after the training, minutes for ``mnist_tutorial``), and the
    preflight leaves torch's random state as it was."""
    from tttlab.core.errors import InvalidInputError

    torch.manual_seed(11)
    state = torch.get_rng_state()
    with pytest.raises(InvalidInputError, match=re.escape(needle)):
        E.run({"engine": {"name": engine, "kwargs": kwargs}, "train_experiment": "smoke",
               "cache_dir": str(tmp_path / "models"), "out_dir": str(tmp_path / "e"),
               "benchmark": {"corruptions": ["fog"], "num_examples": 8}})  # fmt: skip
    assert not (tmp_path / "models").exists(), "nothing was trained"
    assert torch.equal(state, torch.get_rng_state())


def test_a_benchmark_of_other_images_than_the_model_takes_fails_before_training(tmp_path):
    """``benchmark.name=cifar10_c`` (32 x 32 RGB) with the tutorial's MNIST model (28 x 28 grey): the model
    was trained and cached first, and the mismatch surfaced only once the stream ran (InvalidInputError, or
    torch's own error from inside a forward).  It is now a ConfigError naming the benchmark, its image shape
    and the model's, before any training and without a run folder; a benchmark of the model's images passes."""
    from tttlab.core import testing
    from tttlab.core.benchmark import Benchmark
    from tttlab.core.data import ArrayDataset

    testing.make_cifar10_c(tmp_path / "data", corruptions=("fog",), n_per_severity=4)
    bench = {"name": "cifar10_c", "root": str(tmp_path / "data"), "corruptions": ["fog"], "batch_size": 4}
    c = E.eval_config({"engine": "ttt", "train_experiment": "smoke", "benchmark": bench})
    info = E.evaluated_model(c)
    needle = ("benchmark 'cifar10_c' has images of shape (32, 32, 3) (height, width, channels), but model "
              "'tutorial_net' takes (28, 28, 1) (28 x 28 pixels, 1 channel); use a benchmark of the model's "
              "images or a model that takes them (model_checkpoint.name=wrn28_10 ")  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape(needle)):
        E.make_stream(c, E.init_distributed(), info)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        E.run({"engine": "ttt", "train_experiment": "smoke", "cache_dir": str(tmp_path / "models"),
               "out_dir": str(tmp_path / "e"), "benchmark": bench})  # fmt: skip
    assert not (tmp_path / "models").exists(), "nothing was trained"
    assert not (tmp_path / "e").exists()
    # the channels alone differ, on a generated benchmark (the clean source's image is read)
    rgb = ArrayDataset(np.zeros((2, 28, 28, 3), np.uint8), np.zeros(2, np.int64), name="rgb")
    with pytest.raises(ConfigError, match=r"shape \(28, 28, 3\).*none of the registered models"):
        E.check_benchmark_images(Benchmark("rgb_c", rgb, corruptions=["fog"]), info)
    mnist = E.eval_config({"engine": "ttt", "train_experiment": "smoke", "benchmark": {"corruptions": ["fog"],
                           "num_examples": 8}})  # fmt: skip
    assert len(list(E.make_stream(mnist, E.init_distributed(), info)[0])) == 1


def test_an_empty_train_engine_kwargs_override_means_the_engine_defaults(tmp_path, monkeypatch, capsys):
    """``train.engine_kwargs={}`` followed Hydra's (and OmegaConf's) merge: mnist_tutorial's
    ``features_layer_name: fc2`` stayed, on the training command line and in an evaluation's
    ``train_overrides``.  It now empties them, as ``engine.kwargs={}`` does the evaluation's (the same
    mechanism: the override is read from the overrides, ``clear_engine_kwargs`` from Python); other
    overrides keep the merge."""
    kwargs = lambda c: c["train"]["engine_kwargs"]  # noqa: E731
    assert kwargs(T.train_config("mnist_tutorial")) == {"features_layer_name": "fc2"}
    assert kwargs(T.train_config("mnist_tutorial", ["train.engine_kwargs={}"])) == {}
    assert kwargs(T.train_config("mnist_tutorial", ["train.engine_kwargs={ }"])) == {}
    assert kwargs(T.train_config("mnist_tutorial", clear_engine_kwargs=True)) == {}
    assert kwargs(T.train_config("mnist_tutorial", ["train.engine_kwargs.features_layer_name=fc1"])) == {
        "features_layer_name": "fc1"
    }
    # an evaluation's model trained without them (and so under its own cache key)
    c = E.eval_config({"engine": "ttt", "train_experiment": "mnist_tutorial",
                       "train_overrides": ["train.engine_kwargs={}"]})  # fmt: skip
    assert kwargs(E.cached_training_config(c)[0]) == {}
    assert kwargs(E.cached_training_config({**c, "train_overrides": []})[0]) == {"features_layer_name": "fc2"}

    # T.run(cfg, clear_engine_kwargs=True): the config it trains with (stopped before any training)
    class Stop(Exception):
        pass

    seen, validate = [], T._validate

    def spy(cfg):
        seen.append(kwargs(validate(cfg)))
        raise Stop

    monkeypatch.setattr(T, "_validate", spy)
    composed = hydra_compose("config", ["+experiment=mnist_tutorial", "train.engine_kwargs={}"])
    assert kwargs(composed) == {"features_layer_name": "fc2"}, "Hydra merged the empty mapping: unchanged"
    for clear in (True, False):
        with pytest.raises(Stop):
            T.run(composed, clear_engine_kwargs=clear)
    assert seen == [{}, {"features_layer_name": "fc2"}]
    monkeypatch.setattr(T, "_validate", validate)
    # the command: the composed config cannot tell the override from none; main reads it from Hydra
    from hydra.core.global_hydra import GlobalHydra

    calls = []
    monkeypatch.chdir(tmp_path)  # Hydra makes its run folder (runs/torch_ttt/...) in the working directory
    monkeypatch.setattr(T, "run", lambda cfg, clear_engine_kwargs=False, command_line=None: calls.append(
        clear_engine_kwargs))  # fmt: skip
    for extra in (["train.engine_kwargs={}"], []):
        GlobalHydra.instance().clear()
        monkeypatch.setattr(sys, "argv", ["tttlab-torch-ttt-train", "+experiment=mnist_tutorial", *extra,
                                          "hydra/job_logging=none", "hydra/hydra_logging=none"])  # fmt: skip
        T.main()
    assert calls == [True, False]


@pytest.mark.parametrize(
    "line",
    [
        ["train.engine_kwargs={}", "train.engine_kwargs.features_layer_name=fc1"],
        ["train.engine_kwargs.features_layer_name=fc1", "train.engine_kwargs={}"],
        ["++train.engine_kwargs.features_layer_name=fc1", "train.engine_kwargs={}"],
        ["train.engine_kwargs={}", "++train.engine_kwargs={features_layer_name: fc1}"],
    ],
)
def test_train_engine_kwargs_flags_next_to_an_empty_mapping_still_apply(tmp_path, monkeypatch, line):
    """``train.engine_kwargs={}`` dropped a ``train.engine_kwargs.<key>`` flag given on the same line (the
    whole mapping was emptied; through ``train_config``'s overrides OmegaConf replaced the mapping, losing a
    flag before the ``{}``, and refused Hydra's ``+``).  Now ``{}`` drops mnist_tutorial's
    ``features_layer_name: fc2`` and keeps the flags, in either order: on the training command line, in
    ``train_config`` and in an evaluation's ``train_overrides``."""
    kwargs = lambda c: c["train"]["engine_kwargs"]  # noqa: E731
    expected = {"features_layer_name": "fc1"}
    assert kwargs(T.train_config("mnist_tutorial", line)) == expected
    c = E.eval_config({"engine": "ttt", "train_experiment": "mnist_tutorial", "train_overrides": line})
    assert kwargs(E.cached_training_config(c)[0]) == expected

    class Stop(SystemExit):  # Hydra's main reports an Exception and exits; this passes through
        pass

    seen, validate = [], T._validate

    def spy(cfg):
        seen.append(kwargs(validate(cfg)))
        raise Stop

    monkeypatch.setattr(T, "_validate", spy)
    composed = hydra_compose("config", ["+experiment=mnist_tutorial", *line])
    with pytest.raises(Stop):
        T.run(composed, command_line=["+experiment=mnist_tutorial", *line])
    # the command (main hands Hydra's overrides to run)
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.chdir(tmp_path)
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["tttlab-torch-ttt-train", "+experiment=mnist_tutorial", *line,
                                      "hydra/job_logging=none", "hydra/hydra_logging=none"])  # fmt: skip
    with pytest.raises(Stop):
        T.main()
    assert seen == [expected, expected]


def test_evaluate_needs_a_finished_training_run(tmp_path):
    with pytest.raises(CheckpointError, match="train_run"):
        E.run({"engine": "ttt", "train_run": str(tmp_path), "out_dir": str(tmp_path / "e")})


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["train.lr=nan"], "train.lr=nan"),
        (["train.epochs=0"], "train.epochs=0"),
        (["train.ssl_weight=nan"], "train.ssl_weight=nan"),
        (["data.name=cifar10"], "data.name='cifar10'"),
        (["data.root=/data"], "data.root='/data'"),
        (["eval.batch_size=0"], "eval.batch_size=0"),
        (["eval.num_examples=-1"], "eval.num_examples=-1"),
        (["eval.noise_std=inf"], "eval.noise_std=inf"),
        # std * N(0, 1) with a negative std: the noise of |std|, recorded under the negative value
        (["eval.noise_std=-1"], "eval.noise_std=-1.0: expected a finite number >= 0"),
        (["noisy.noise_std=-0.5"], "noisy.noise_std=-0.5: expected a finite number >= 0"),
        (["noisy.batch_size=0"], "noisy.batch_size=0"),
        (["noisy.num_examples=-1"], "noisy.num_examples=-1"),
        (["noisy.noise_std=nan"], "noisy.noise_std=nan"),
        (["calibration.num_examples=0"], "calibration.num_examples=0"),
        (["calibration.batch_size=0"], "calibration.batch_size=0"),
    ],
)
def test_bad_config_values_are_config_errors_before_any_work(overrides, needle):
    """Values that used to train silently on NaN / nothing / the wrong data, or to end in a torch or
    ZeroDivisionError traceback, are named with what was expected (bad-input audit)."""
    with pytest.raises(ConfigError, match=re.escape(needle)):
        if overrides[0].split(".")[0] in ("train", "data", "eval"):
            T.train_config("smoke", overrides)
        else:
            E.eval_config({"engine": "ttt"}, overrides)


def test_a_path_given_as_none_is_named_with_the_null_hint(tmp_path, monkeypatch):
    """``train_run=None`` on the command line is the string 'None' (Hydra's null is ``null``): it was a
    ``CheckpointError`` "train_run=None: no checkpoints/last.ckpt" (and ``model_checkpoint.path=None`` one
    "without model_checkpoint.name"), not saying the value meant null.  Now the line says so and what to give,
    as core's check of ``out_dir=None`` does; a folder named None that holds a train run stays a path."""
    monkeypatch.chdir(tmp_path)
    for key, rest in (("train_run", "give train_run=null (a model trained with train_experiment=mnist_bn, "
                                    "cached) or train_run=<a tttlab-torch-ttt-train run>"),
                      ("model_checkpoint.path", "give model_checkpoint.path=null (a tttlab-torch-ttt-train model) "
                                                "or model_checkpoint.path=<the model's weights file>")):  # fmt: skip
        with pytest.raises(ConfigError) as info:
            E.eval_config({"engine": "tent"}, [f"{key}=None"])
        assert str(info.value).startswith(f"{key}=None: on Hydra's command line None is the string 'None' (null "
                                          "is null)"), info.value  # fmt: skip
        assert str(info.value).endswith(rest), info.value
    (tmp_path / "None" / "checkpoints").mkdir(parents=True)
    (tmp_path / "None" / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert E.eval_config({"engine": "tent"}, ["train_run=None"])["train_run"] == "None"


def test_bad_engine_arguments_and_foreign_checkpoints(smoke_run, tmp_path):
    model = T.build_model("mnist_bn")
    with pytest.raises(ConfigError, match=r"no argument\(s\) \['bogus'\]"):
        T.build_engine("tent", model, "mnist_bn", {"bogus": 1})
    with pytest.raises(ConfigError, match="fisher_alpha"):
        T.build_engine("eata", model, "mnist_bn", {"fisher_alpha": "a"})
    # a state dict saved by something else, and a checkpoint whose weights are of another model
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    ckpt = run / "checkpoints" / "last.ckpt"
    good = T.load_checkpoint(ckpt)
    torch.save(model.state_dict(), ckpt)
    with pytest.raises(CheckpointError, match="not a tttlab-torch-ttt checkpoint"):
        T.load_checkpoint(ckpt)
    torch.save({**good, "model_name": "mnist_bn"}, ckpt)
    with pytest.raises(CheckpointError, match="do not fit its model 'mnist_bn'"):
        E.load_engine(E.eval_config({"engine": "ttt"}), run, torch.device("cpu"), torch.zeros(2, 1, 28, 28))


def test_every_engine_is_a_registered_method():
    from tttlab.core.registry import get_method, list_methods
    from tttlab.torch_ttt import EngineRegistry

    specs = list_methods(package="torch_ttt")
    assert sorted(s.name for s in specs) == sorted(f"torch_ttt.{n}" for n in EngineRegistry.names())
    for s in specs:
        assert s.framework == "torch" and s.load_evaluate() is E.run
    assert get_method("torch_ttt.tent").evaluate == "tttlab.torch_ttt.evaluate:run"


def test_compare_contract_keys_map_onto_the_config():
    c = E.eval_config({"method": "torch_ttt.eata", "profile": "smoke", "progress": False,
                       "benchmark": {"num_examples": 10}})  # fmt: skip
    assert c["engine"]["name"] == "eata" and c["logging"]["progress"] is False
    assert c["benchmark"]["num_examples"] == 10, "the caller's keys win over the profile's"
    assert c["calibration"]["num_examples"] == E.PROFILES["smoke"]["calibration"]["num_examples"]
    assert c["train_overrides"] == E.PROFILES["smoke"]["train_overrides"]
    with pytest.raises(ConfigError, match="torch_ttt.<engine>"):
        E.eval_config({"method": "torch_ttt.nope"})
    with pytest.raises(ConfigError, match="profile='huge'"):
        E.eval_config({"profile": "huge"})
    with pytest.raises(ConfigError, match="progress='maybe'"):  # bool('maybe') was True
        E.eval_config({"progress": "maybe"})
    # the engine's optimisation settings are checked with the config, before any model is trained
    with pytest.raises(ConfigError, match=re.escape(
        "unknown optimization parameter 'engine.optimization.num_stepz' (did you mean "
        "'engine.optimization.num_steps'?)"
    )):  # fmt: skip
        E.eval_config({"engine": "tent"}, ["engine.optimization.num_stepz=3"])
    with pytest.raises(ConfigError, match="^engine.optimization.lr must be a number >= 0, got -1$"):
        E.eval_config({"engine": {"name": "eata", "optimization": {"lr": -1}}})
    # the command line's engine.optimization.lr=abc was "lr must be ...": which lr, of which node?
    with pytest.raises(ConfigError, match="^engine.optimization.lr must be a number >= 0, got 'abc'$"):
        E.eval_config({"engine": "tent"}, ["engine.optimization.lr=abc"])
    with pytest.raises(ConfigError, match=r"^engine.optimization.reset='x' is not a reset policy"):
        E.eval_config({"engine": "tent"}, ["engine.optimization.reset=x"])
    # Nesterov momentum (the official ActMAD step) needs SGD: refused with TENT's Adam before any training
    assert E.eval_config({"engine": {"name": "eata", "optimization": {"nesterov": True}}})
    with pytest.raises(ConfigError, match="nesterov=True needs optimizer_name='sgd'"):
        E.eval_config({"engine": {"name": "tent", "optimization": {"nesterov": True}}})


def test_default_out_dir_is_one_folder_per_profile(smoke_run, tmp_path, monkeypatch):
    """runs/torch_ttt/eval/<engine>-<benchmark>-<setting> was shared by the command's defaults and the
    compare profiles: their records went into one file and config.yaml was overwritten (with a warning)."""
    base = "runs/torch_ttt/eval/tent-mnist_c-reset_each_shift"
    dirs = {
        p: E.eval_config({"method": "torch_ttt.tent", "profile": p})["out_dir"] for p in (None, *E.PROFILES)
    }
    assert dirs == {None: base, "smoke": f"{base}-smoke", "quick": f"{base}-quick", "full": f"{base}-full"}
    assert dirs["quick"] == E.default_out_dir("quick", "tent-mnist_c-reset_each_shift")
    assert hydra_compose("evaluate", [])["out_dir"] == base == E.eval_config({})["out_dir"], (
        "the command's own"
    )
    # the folder follows the engine, the stream and the setting; the caller's out_dir (compare's) wins
    assert E.eval_config({"engine": "ttt", "stream": "noisy", "profile": "smoke"}, ["benchmark.setting=episodic"])[
        "out_dir"] == "runs/torch_ttt/eval/ttt-noisy-episodic-smoke"  # fmt: skip
    assert E.eval_config({"profile": "smoke", "out_dir": "mine"})["out_dir"] == "mine"
    assert E.eval_config({"profile": "smoke"}, ["out_dir=mine"])["out_dir"] == "mine"
    assert (
        E.eval_config({"profile": "quick", "experiment_name": "x"})["out_dir"]
        == "runs/torch_ttt/eval/x-quick"
    )
    monkeypatch.chdir(tmp_path)
    path = E.run({"engine": "ttt", "profile": "smoke", "train_run": str(smoke_run), "progress": False,
                  "benchmark": {"setting": "episodic", "corruptions": ["fog"], "num_examples": 16}})  # fmt: skip
    assert path == Path("runs/torch_ttt/eval/ttt-mnist_c-episodic-smoke/records.jsonl") and path.exists()
    assert [p.name for p in (tmp_path / "runs/torch_ttt/eval").iterdir()] == ["ttt-mnist_c-episodic-smoke"]
    assert {r["method"] for r in read_jsonl(path)} == {"torch_ttt.ttt"}


def test_mixed_batches_count_each_domain_by_its_own_images():
    """A ``mixed`` batch holds several domains: each gets its own images' hits and count, and a share of
    the batch's time proportional to its images (mutation audit: counting the whole batch for every domain
    went unnoticed)."""
    from tttlab.core.benchmark import Domain

    a, b = Domain("fog", 5), Domain("snow", 5)

    class Fixed(torch.nn.Module):
        def reset(self):
            pass

        def forward(self, x):  # predicts class 1 for every image
            return torch.tensor([[0.0, 1.0, 0.0]]).expand(len(x), 3), torch.zeros(())

    labels = torch.tensor([1, 0, 1, 1, 2])  # hits: 1, 0, 1, 1, 0
    ids = np.array([0, 0, 1, 0, 1])  # a: images 0, 1, 3 (2 hits); b: images 2, 4 (1 hit)
    batch = E.StreamBatch(None, torch.zeros(5, 1, 4, 4), labels, True, ids)
    totals = E.adapt_stream(Fixed(), [batch, batch], [a, b], torch.device("cpu"), Reset.NEVER, False)
    assert totals[a][:2] == [4, 6] and totals[b][:2] == [2, 4]
    assert totals[a][2] == pytest.approx(1.5 * totals[b][2], rel=1e-9)


@pytest.mark.parametrize("seed", [0, 7])
def test_the_config_seed_seeds_the_adaptation_stream(smoke_run, tmp_path, monkeypatch, seed):
    """The engines' random draws (MEMO's views, DeYO's shuffles, TTT++'s crops) come from the global torch
    RNG, seeded with ``seed`` (+ rank) just before the stream: a run's ``seed=`` must reach it."""
    seen = []

    def fake_adapt_stream(engine, batches, domains, *args, **kwargs):
        seen.append(torch.initial_seed())
        return {d: [0, 0, 0.0] for d in domains}

    monkeypatch.setattr(E, "adapt_stream", fake_adapt_stream)
    E.run(hydra_compose("evaluate", [*eval_overrides(smoke_run, tmp_path / "seeded"), f"seed={seed}"]))
    assert seen == [seed]


def test_evaluate_hands_the_benchmarks_shifts_to_the_stream_unless_the_reset_is_explicit(
    smoke_run, tmp_path, monkeypatch
):
    from tttlab.core.benchmark import Domain

    seen = []

    def fake_adapt_stream(engine, batches, domains, device, policy, progress, total=None, shift=None):
        seen.append((policy, None if shift is None else shift(Domain("fog", 2))))
        return {d: [0, 0, 0.0, 0] for d in domains}

    monkeypatch.setattr(E, "adapt_stream", fake_adapt_stream)

    def run(name, *extra):
        base = [*eval_overrides(smoke_run, tmp_path / name), "benchmark.setting=reset_each_shift",
                "benchmark.severities=[4,2]", "benchmark.num_examples=16"]  # fmt: skip
        E.run(hydra_compose("evaluate", [*base, *extra]))

    run("mariodoebler", "benchmark.stream_order=mariodoebler")
    run("default")
    run("explicit", "benchmark.stream_order=mariodoebler", "engine.optimization.reset=per_domain")
    assert seen == [(Reset.PER_DOMAIN, "fog"), (Reset.PER_DOMAIN, Domain("fog", 2)), (Reset.PER_DOMAIN, None)]


def test_evaluate_refuses_a_folder_with_another_configs_records_before_it_adapts(
    smoke_run, tmp_path, monkeypatch
):
    """Two configs' records in one run folder would read as one run's: the second evaluate fails before it
    builds a stream or adapts, naming both hashes and the differing key; appending is explicit."""
    from tttlab.core.errors import RunDirConflictError
    from tttlab.core.records import APPEND_ENV, load_records

    monkeypatch.delenv(APPEND_ENV, raising=False)
    out = tmp_path / "shared"
    first = E.run(hydra_compose("evaluate", eval_overrides(smoke_run, out)))
    before = first.read_bytes()
    first_hash = load_records(out)["config_hash"].iloc[0]

    def no_stream(*a, **k):
        raise AssertionError("adapted before the folder was checked")

    with monkeypatch.context() as m:
        m.setattr(E, "adapt_stream", no_stream)
        other = hydra_compose("evaluate", [*eval_overrides(smoke_run, out), "benchmark.severities=[3]"])
        with pytest.raises(RunDirConflictError) as err:
            E.run(other)
    msg = str(err.value)
    assert str(out) in msg and first_hash in msg and "benchmark.severities: [5] -> [3]" in msg
    assert first.read_bytes() == before
    monkeypatch.setenv(APPEND_ENV, "1")
    E.run(other)
    df = load_records(out)
    assert (
        set(df["config_hash"]) == {first_hash, df["config_hash"].iloc[-1]}
        and len(set(df["config_hash"])) == 2
    )
    assert (out / f"config-{first_hash}.yaml").exists()


class _Killed(Exception):
    """Stands for a SIGKILL at a chosen point (the process ends, the files stay as they are)."""


def test_a_kill_between_the_epoch_checkpoint_and_its_record_loses_nothing(smoke_run, tmp_path, monkeypatch):
    # kill audit: the epoch-end checkpoint was written before the epoch's train_accuracy record, so a kill
    # in between resumed past the epoch and never wrote its record
    out = tmp_path / "killed_at_epoch_end"

    def killed(self, stats):
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr(T.RunDir, "write_stats", killed)
        with pytest.raises(_Killed):
            T.run(smoke_config(out))
    T.run(smoke_config(out))
    assert stable(read_jsonl(out / "records.jsonl")) == stable(read_jsonl(smoke_run / "records.jsonl"))
    assert read_stats(out) == read_stats(smoke_run)


def test_a_kill_during_the_noisy_evaluation_keeps_the_stats_summary(smoke_run, tmp_path, monkeypatch):
    # kill audit: a resumed run skipped the TTT evaluations already recorded and left them out of
    # stats.json's "eval" summary
    out = tmp_path / "killed_in_eval"
    real, calls = T.evaluate_noisy, []

    def dies_on_the_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Killed
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(T, "evaluate_noisy", dies_on_the_second_call)
        with pytest.raises(_Killed):
            T.run(smoke_config(out))
    assert len(read_jsonl(out / "records.jsonl")) == 4, "killed after the 0-step TTT record"
    T.run(smoke_config(out))
    assert stable(read_jsonl(out / "records.jsonl")) == stable(read_jsonl(smoke_run / "records.jsonl"))
    assert read_stats(out)["eval"] == read_stats(smoke_run)["eval"]


def test_evaluate_run_again_replaces_its_records(smoke_run, tmp_path):
    """Kill audit: evaluate starts again from zero, and a run killed after its last record (or simply run
    again) appended a second copy of every record.  The same config now replaces its records."""
    overrides = [*eval_overrides(smoke_run, tmp_path / "again"), "benchmark.corruptions=[fog]"]
    first = stable(read_jsonl(E.run(hydra_compose("evaluate", overrides))))
    second = stable(read_jsonl(E.run(hydra_compose("evaluate", overrides))))
    assert [r["metric"] for r in second] == ["accuracy", "s_per_image"], "one copy"
    assert second[0] == first[0]


# ----------------------------------------------------------------------------------------------------------
# amp (none | bf16) and compile (false | true) in train.py and evaluate.py


@contextlib.contextmanager
def conv_output_dtypes():
    """The dtypes of every Conv2d output computed inside the block (a global forward hook)."""
    seen: list[torch.dtype] = []

    def hook(module, args, output):
        if isinstance(module, torch.nn.Conv2d):
            seen.append(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_amp_and_compile_values_are_config_errors_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"amp='fp16'; expected one of \['none', 'bf16'\]"):
        T.train_config("smoke", ["amp=fp16"])
    with pytest.raises(ConfigError, match=r"amp='fp16'; expected one of \['none', 'bf16'\]"):
        E.eval_config({"engine": "tent", "amp": "fp16"})
    with pytest.raises(ConfigError, match="compile"):
        E.eval_config({"engine": "tent", "compile": "maybe"})
    with pytest.raises(ConfigError, match="compile"):
        T.train_config("smoke", ["compile=maybe"])
    # TTT's joint-training forward reads fc2 through a hook: a compiled model could not run it
    with pytest.raises(ConfigError, match=r"compile=true with train.engine='ttt'.*'source'"):
        T.train_config("smoke", ["compile=true"])
    engine = T.build_engine("source", T.build_model("mnist_bn"), "mnist_bn")
    with pytest.raises(ConfigError, match=r"amp='float16'"):
        engine.amp = "float16"
    assert engine.amp == "none"
    engine.amp = "BF16"
    assert engine.amp == "bf16"


def test_amp_bf16_training_runs_in_bfloat16_close_to_float32_and_resumes_only_with_bf16(smoke_run, tmp_path):
    """train.py amp=bf16: the forwards run in bfloat16 (every convolution output), the weights and the Adam
    state stay float32, the epoch's losses are within 5 % of the float32 run's (10 steps from the same
    init) and the clean accuracy within 5 points; a checkpoint of it is not resumed with amp=none."""
    out = tmp_path / "bf16"
    with conv_output_dtypes() as dtypes:
        T.run(smoke_config(out, "amp=bf16"))
    assert set(dtypes) == {torch.bfloat16}
    fp32, bf16 = read_stats(smoke_run), read_stats(out)
    for key in ("train/task_loss", "train/ssl_loss"):
        assert bf16[key][0] == pytest.approx(fp32[key][0], rel=0.05), key
    assert bf16["eval"]["clean/accuracy"] == pytest.approx(fp32["eval"]["clean/accuracy"], abs=0.05)
    ck = T.load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert all(v.dtype == torch.float32 for v in ck["engine_state"].values() if v.is_floating_point())
    adam = [t for s in ck["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
    assert adam and all(t.dtype == torch.float32 for t in adam)
    assert T.load_checkpoint(smoke_run / "checkpoints" / "last.ckpt")["config_hash"] == config_hash(
        T._training_part(T._validate(smoke_config(smoke_run)))
    ), "the default's training hash (the cache key of trained models) did not change"
    with pytest.raises(CheckpointError, match="another model/training config"):
        T.run(smoke_config(out, "amp=none"))


def _predictions(run_dir: Path, out: Path, engine: str, amp: str, *extra: str):
    """``(predictions, labels, conv output dtypes)`` of the engine on evaluate.py's stream, built by
    evaluate.py's own functions (the dtypes of the adaptation and prediction forwards, not of the float32
    calibration)."""
    overrides = [o for o in eval_overrides(run_dir, out) if not o.startswith("engine=")]
    c = E.eval_config({"engine": engine}, [*overrides, f"amp={amp}", *extra])
    batches, _, _, _ = E.make_stream(c, E.init_distributed())
    example, _ = T.load_mnist("train", 2)
    eng, _, _, _ = E.load_engine(c, run_dir, torch.device("cpu"), example)
    E.calibrate(eng, c, torch.device("cpu"))
    assert eng.amp == amp
    torch.manual_seed(0)
    batches = list(batches)
    with conv_output_dtypes() as dtypes:
        preds = torch.cat([eng(b.x)[0].argmax(1) for b in batches])
    return preds, torch.cat([b.y for b in batches]), set(dtypes)


@pytest.mark.parametrize("engine", ["ttt", "ttt_pp", "source"])
def test_amp_bf16_evaluate_predicts_as_float32(smoke_run, tmp_path, engine):
    """evaluate.py amp=bf16 on 96 MNIST-C images of the smoke model: >= 95 % of the predictions equal the
    float32 ones (measured 97-100 % over the registry); the records name the option."""
    fp32, labels, dtypes = _predictions(smoke_run, tmp_path, engine, "none")
    assert dtypes == {torch.float32}
    bf16, _, dtypes = _predictions(smoke_run, tmp_path, engine, "bf16")
    assert dtypes == {torch.bfloat16}
    assert (fp32 == bf16).float().mean() >= 0.95
    assert abs((fp32 == labels).float().mean() - (bf16 == labels).float().mean()) <= 0.05


def test_amp_bf16_through_evaluate_run(smoke_run, tmp_path):
    fp32 = eval_records(E.run(hydra_compose("evaluate", eval_overrides(smoke_run, tmp_path / "fp32"))))
    with conv_output_dtypes() as dtypes:
        path = E.run(hydra_compose("evaluate", [*eval_overrides(smoke_run, tmp_path / "bf16"), "amp=bf16"]))
    assert set(dtypes) == {torch.bfloat16}
    bf16 = eval_records(path)
    assert fp32.keys() == bf16.keys()
    for key in fp32:
        assert bf16[key][0] == pytest.approx(fp32[key][0], abs=0.05), key
    assert {(r["extra"]["amp"], r["extra"]["compile"]) for r in read_jsonl(path)} == {("bf16", False)}
    assert {r["extra"]["compiled_forwards"] for r in read_jsonl(path)} == {"none"}


class CompileRecorder:
    """Stands in for ``torch.compile``: records what it was given, returns a counting pass-through."""

    def __init__(self):
        self.compiled, self.calls = [], 0

    def __call__(self, fn, *args, **kwargs):
        self.compiled.append((fn, kwargs))

        def run(*a, **kw):
            self.calls += 1
            return fn(*a, **kw)

        return run


@pytest.mark.parametrize("engine, forwards_per_batch", [("ttt", 2), ("memo", None), ("source", 1)])
def test_compile_compiles_the_wrapped_model_and_its_forwards_use_it(
    smoke_run, tmp_path, monkeypatch, engine, forwards_per_batch
):
    """compile=true calls torch.compile on the wrapped model's forward (``model._call_impl``) and, for
    TTT, on a torch.fx copy of the model truncated after its features layer (fc2), sharing its parameters;
    the evaluation's forwards go through the results: every forward of source; TTT's prediction (the full
    model) and its adaptation (the truncated copy); MEMO (BatchNorm-free model) its adaptation and
    prediction forwards.  The predictions equal the eager run's (the stand-in does not change the
    computation)."""
    recorder = CompileRecorder()
    small = ["benchmark.num_examples=8"] if engine == "memo" else []  # MEMO adapts image by image
    eager_preds, _, _ = _predictions(smoke_run, tmp_path, engine, "none", *small)
    monkeypatch.setattr(torch, "compile", recorder)
    overrides = [o for o in eval_overrides(smoke_run, tmp_path) if not o.startswith("engine=")]
    c = E.eval_config({"engine": engine}, [*overrides, *small, "compile=true"])
    assert c["compile"] is True
    example, _ = T.load_mnist("train", 2)
    eng, _, _, _ = E.load_engine(c, smoke_run, torch.device("cpu"), example)
    assert len(recorder.compiled) == (2 if engine == "ttt" else 1)
    fn, _ = recorder.compiled[0]
    assert fn.__self__ is eng.model and fn.__func__ is torch.nn.Module._call_impl
    if engine == "ttt":
        truncated, _ = recorder.compiled[1]
        assert isinstance(truncated, torch.fx.GraphModule) and eng.compiled_features
        assert truncated.fc2 is eng.model.fc2 and not hasattr(truncated, "fc3"), "stops at the features"
        assert set(eng.model.state_dict()) == set(T.build_model("tutorial_net").state_dict())
    batches = list(E.make_stream(c, E.init_distributed())[0])
    torch.manual_seed(0)
    preds = torch.cat([eng(b.x)[0].argmax(1) for b in batches])
    assert torch.equal(preds, eager_preds)
    assert E.compiled_forwards(eng) == "all"
    if forwards_per_batch is not None:
        assert recorder.calls == forwards_per_batch * len(batches)
    else:  # memo: one forward over the views per adaptation step and image, one prediction per image
        assert recorder.calls == 2 * sum(len(b.x) for b in batches)


def test_train_compile_trains_through_the_compiled_model_and_enters_the_hash(tmp_path, monkeypatch):
    """train.py compile=true (train.engine=source: no hooks) compiles the model's forward once and every
    training step runs through it; compile is part of the training hash (no resume without it)."""
    recorder = CompileRecorder()
    monkeypatch.setattr(torch, "compile", recorder)
    out = tmp_path / "compiled"
    T.run(smoke_config(out, "compile=true", "train.engine=source", "eval.enabled=false"))
    assert len(recorder.compiled) == 1
    fn, _ = recorder.compiled[0]
    assert fn.__func__ is torch.nn.Module._call_impl and type(fn.__self__).__name__ == "Net"
    assert recorder.calls == 10, "the 10 training steps' forwards"
    with pytest.raises(CheckpointError, match="another model/training config"):
        T.run(smoke_config(out, "train.engine=source", "eval.enabled=false"))


def test_train_epoch_gives_it3_the_one_hot_labels():
    """IT3's training scheme needs the ground truth fed in (``f(x, y) ~ y``: paper, torch-ttt's example,
    the official notebooks): ``train_epoch`` passes the one-hot labels as ``target``, so the epoch's
    self-supervised loss is ``distance(s(f(x, y)), y)``, not the test-time idempotence loss it used to get."""
    import torch.nn.functional as F
    from torch import nn

    from tttlab.torch_ttt.engine.it3_engine import IT3Engine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    engine = IT3Engine(model, "1", example_input=x[:2], feedback="softmax")
    seen = []
    forward = engine.ttt_forward

    def spy(inputs, target=None, **kwargs):
        seen.append(target)
        return forward(inputs, target=target, **kwargs)

    engine.ttt_forward = spy
    train = {"shuffle": False, "ssl_weight": 0.35, "stop_after_steps": None, "checkpoint_every": 100}
    cfg = {"seed": 0, "data": {"batch_size": 4}, "logging": {"progress": False}, "train": train}
    state = {"epoch": 0, "batch": 0, "step": 0, "correct": 0, "seen": 0, "task_loss": 0.0, "ssl_loss": 0.0}
    first = engine.train()(x[:4], target=F.one_hot(y[:4], 3).float())[1].item()
    seen.clear()
    opt = torch.optim.SGD(engine.parameters(), lr=0.0)  # lr 0: the loss of batch 1 is checkable
    assert T.train_epoch(engine, opt, x, y, state, cfg, lambda: None, torch.device("cpu"))
    assert len(seen) == 2 and all(t is not None for t in seen)
    torch.testing.assert_close(seen[0], F.one_hot(y[:4], 3).float())
    torch.testing.assert_close(seen[1], F.one_hot(y[4:], 3).float())
    second = engine(x[4:], target=F.one_hot(y[4:], 3).float())[1].item()
    assert state["ssl_loss"] == pytest.approx(4 * first + 4 * second, rel=1e-5)


def test_it3_training_has_its_own_cache_key_and_the_others_keep_theirs(monkeypatch):
    """Models trained before IT3 got its labels must not be resumed or reused: the ``ittt`` training key
    changed (and evaluate.py trains the IT3 head with ``conf/engine/ittt.yaml``'s ``feedback``); the other
    engines' keys are the ones main had (``mnist_bn``, 10,000 images, as the README's sweep)."""
    overrides = ["eval.enabled=false", "device=cpu", "data.num_examples=10000"]
    keys = {
        e: config_hash(T._training_part(T.train_config("mnist_bn", [f"train.engine={e}", *overrides])))
        for e in ("ttt", "ittt", "masked_ttt")
    }
    assert keys["ttt"] == "9a60db50be25" and keys["masked_ttt"] == "60c31a8c1179"  # unchanged
    assert keys["ittt"] != "d338ba0fb2b1"  # main's key, whose models were trained without the labels
    trained = []
    monkeypatch.setattr(T, "run", lambda tc: trained.append(tc))

    class OneRank:
        rank = 0

        def barrier(self):
            pass

    for engine in ("ittt", "ttt"):
        c = E.eval_config({"engine": engine}, ["train_experiment=mnist_bn", "cache_dir=/nonexistent-cache",
                                               "train_overrides=['data.num_examples=10000']"])  # fmt: skip
        path = E.training_run(c, OneRank())
        assert path.name.endswith(keys["ttt"]) == (engine == "ttt")
    assert trained[0]["train"]["engine_kwargs"] == {"feedback": "softmax"}
    assert trained[1]["train"]["engine_kwargs"] == {}


class _OneRank:
    rank = 0

    def barrier(self):
        pass


@pytest.mark.parametrize("engine", ["eata", "deyo"])
def test_training_of_an_entropy_engine_keeps_its_key_when_it_is_the_train_engine(engine, monkeypatch):
    """Only an engine with a head trains with the evaluated engine's ``kwargs`` (commit 4c831a0, untested
    there): ``engine=eata train_engine=eata`` (or DeYO) has kwargs in ``conf/engine`` (``d_margin``,
    ``patch_len``), but they only act at test time, so the model trained for it is the one of the plain
    training config, under that config's cache key."""
    trained = []
    monkeypatch.setattr(T, "run", lambda tc: trained.append(tc))
    overrides = ["train_experiment=mnist_bn", "cache_dir=/nonexistent-cache", f"train_engine={engine}"]
    c = E.eval_config({"engine": engine}, overrides)
    assert c["engine"]["kwargs"], "the premise: the evaluated engine has kwargs"
    path = E.training_run(c, _OneRank())
    plain = T.train_config("mnist_bn", [f"train.engine={engine}", "eval.enabled=false", "device=cpu"])
    assert trained[0]["train"]["engine_kwargs"] == plain["train"]["engine_kwargs"]
    assert path.name == f"mnist_bn-{engine}-{config_hash(T._training_part(plain))}"


def test_train_epoch_weighs_it3s_term_equally_as_upstream():
    """Upstream IT3 adds its two training terms with weight 1 (both official notebooks: ``CE(pass 1) +
    CE(pass 2)``; torch-ttt's IT3 example: ``nll + loss_ttt``), not the TTT tutorial's 0.35: with
    ``train.ssl_weight`` null the step is the SGD step of ``CE(f(x, 0), y) + 1.0 * ssl``, computed by hand;
    an explicit weight still wins."""
    import torch.nn.functional as F
    from torch import nn

    from tttlab.torch_ttt.engine.it3_engine import IT3Engine

    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0])
    state0 = {"epoch": 0, "batch": 0, "step": 0, "correct": 0, "seen": 0, "task_loss": 0.0, "ssl_loss": 0.0}
    for given, used in ((None, 1.0), (0.35, 0.35)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        engine = IT3Engine(model, "1", example_input=x[:2], feedback="softmax")
        params = list(engine.parameters())
        out, ssl = engine.train()(x, target=F.one_hot(y, 3).float())
        want = [p - 0.5 * g for p, g in zip(params, torch.autograd.grad(F.cross_entropy(out, y) + used * ssl,
                                                                        params))]  # fmt: skip
        train = {"shuffle": False, "ssl_weight": given, "stop_after_steps": None, "checkpoint_every": 100}
        cfg = {"seed": 0, "data": {"batch_size": 4}, "logging": {"progress": False}, "train": train}
        assert T.train_epoch(engine, torch.optim.SGD(params, lr=0.5), x, y, dict(state0), cfg, lambda: None,
                             torch.device("cpu"))  # fmt: skip
        for p, w in zip(params, want):
            torch.testing.assert_close(p.detach(), w.detach(), rtol=1e-6, atol=1e-7)
    assert T.ssl_weight({"ssl_weight": None}, IT3Engine) == 1.0


def test_shipped_configs_give_it3_weight_one_and_the_others_the_tutorials():
    """``train.ssl_weight: null`` in ``config.yaml`` and ``mnist_bn.yaml`` resolves to the trained engine's
    ``joint_training_weight``: 1.0 for ``ittt`` (a new cache key: main's IT3 models, trained at 0.35 with
    ``feedback: softmax``, had ``91b9a5146901``), 0.35 for the others, whose composed configs and cache keys
    are unchanged (pinned in the test above and in ``test_compile_modes``); a given value still wins."""
    overrides = ["eval.enabled=false", "device=cpu", "data.num_examples=10000"]
    for engine, weight in (("ittt", 1.0), ("ttt", 0.35), ("ttt_pp", 0.35), ("masked_ttt", 0.35)):
        for experiment in ("mnist_bn", "smoke", None):
            c = T.train_config(experiment, [f"train.engine={engine}", *overrides])
            assert c["train"]["ssl_weight"] == weight, (engine, experiment)
    it3 = T.train_config(
        "mnist_bn", ["train.engine=ittt", "train.engine_kwargs={feedback: softmax}", *overrides]
    )
    assert config_hash(T._training_part(it3)) != "91b9a5146901"
    it3_old = T.train_config("mnist_bn", ["train.engine=ittt", "train.engine_kwargs={feedback: softmax}",
                                          "train.ssl_weight=0.35", *overrides])  # fmt: skip
    assert it3_old["train"]["ssl_weight"] == 0.35
    assert config_hash(T._training_part(it3_old)) == "91b9a5146901"
    ttt_pp = T.train_config("mnist_bn", ["train.engine=ttt_pp", *overrides])
    assert config_hash(T._training_part(ttt_pp)) == "c149c04b9968"
    with pytest.raises(ConfigError, match="train.ssl_weight=nan"):
        T.train_config("mnist_bn", ["train.ssl_weight=nan"])


def test_it3_anchor_is_test_time_only_it_keeps_the_training_key(monkeypatch):
    """``+engine.kwargs.anchor=frozen`` changes the test-time second pass, not the trained model: the
    cached model is the one trained for the default (same key, same training kwargs)."""
    trained = []
    monkeypatch.setattr(T, "run", lambda tc: trained.append(tc))
    paths = []
    for extra in ([], ["engine.kwargs.anchor=frozen"]):  # the command line: +engine.kwargs.anchor=frozen
        c = E.eval_config({"engine": "ittt"}, ["train_experiment=mnist_bn", "cache_dir=/nonexistent-cache",
                                               *extra])  # fmt: skip
        paths.append(E.training_run(c, _OneRank()))
    assert paths[0] == paths[1]
    assert (
        trained[0]["train"]["engine_kwargs"]
        == trained[1]["train"]["engine_kwargs"]
        == {"feedback": "softmax"}
    )


def test_it3_notebook_training_trains_its_own_model_and_the_default_key_stays(monkeypatch):
    """``+engine.kwargs.training=notebook`` (and its draws, ``truth_probability`` / ``neutral``) shape the
    trained model: the evaluation trains the IT3 head with them, under a key of its own; without them
    the key is the default's (``anchor`` alone keeps it, as above); ``test_signal`` acts at test time only
    and keeps the notebook model's key."""
    trained = []
    monkeypatch.setattr(T, "run", lambda tc: trained.append(tc))
    paths = []
    for extra in ([], ["engine.kwargs.training=notebook"],
                  ["engine.kwargs.training=notebook", "engine.kwargs.truth_probability=0.2",
                   "engine.kwargs.neutral=uniform", "engine.kwargs.distance=js"],
                  ["engine.kwargs.training=notebook", "engine.kwargs.test_signal=neutral"]):  # fmt: skip
        c = E.eval_config({"engine": "ittt"}, ["train_experiment=mnist_bn", "cache_dir=/nonexistent-cache",
                                               *extra])  # fmt: skip
        paths.append(E.training_run(c, _OneRank()))
    assert len(set(paths)) == 3 and paths[3] == paths[1], "test_signal is test time only: the same model"
    assert [t["train"]["engine_kwargs"] for t in trained] == [
        {"feedback": "softmax"},
        {"feedback": "softmax", "training": "notebook"},
        {"feedback": "softmax", "training": "notebook", "truth_probability": 0.2, "neutral": "uniform"},
        {"feedback": "softmax", "training": "notebook"},
    ]  # fmt: skip
    from tttlab.core.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="training='papers'"):  # a bad value: before any training
        E.check_engine_fits_the_trained_model(
            E.eval_config({"engine": "ittt"}, ["train_experiment=mnist_bn", "engine.kwargs.training=papers"]),
            E.evaluated_model(E.eval_config({"engine": "ittt"}, ["train_experiment=mnist_bn"])),
        )


def test_it3_distance_enters_the_cache_key_only_where_training_uses_it(monkeypatch):
    """IT3's ``distance`` is the torch-ttt training term's; ``training="notebook"`` trains on two task losses
    and never calls it, so its models for two distances are one model: one cache entry (they had two keys and
    trained twice), trained without the distance.  Under the default scheme each distance is its own model.
    The keys of the default and of the torch-ttt scheme's distances are main's (existing caches still hit);
    the notebook model's changed on 2026-12-02 (:func:`tttlab.torch_ttt.train._training_part`)."""
    trained = []
    monkeypatch.setattr(T, "run", lambda tc: trained.append(tc["train"]["engine_kwargs"]))
    names = {}
    for training in ("torch_ttt", "notebook"):
        for distance in (None, "js", "notebook_js"):
            extra = [f"engine.kwargs.distance={distance}"] if distance else []
            extra += ["engine.kwargs.training=notebook"] if training == "notebook" else []
            c = E.eval_config({"engine": "ittt"}, ["train_experiment=mnist_bn", "cache_dir=/nonexistent-cache",
                                                   *extra])  # fmt: skip
            names[training, distance] = E.training_run(c, _OneRank()).name
    assert names["torch_ttt", None] == "mnist_bn-ittt-e881647adeee"
    assert names["torch_ttt", "js"] == "mnist_bn-ittt-402bb8b12810"
    assert names["torch_ttt", "notebook_js"] == "mnist_bn-ittt-e6a7ce079020"
    assert names["notebook", None] == names["notebook", "js"] == names["notebook", "notebook_js"]
    # the notebook model's key since 2026-12-02 (its second pass no longer updates the statistics of the
    # BatchNorm layers before the features twice); main's a2d85a48702c names the models trained before
    assert names["notebook", None] == "mnist_bn-ittt-a263317d948d"
    assert len(set(names.values())) == 4
    assert trained[3:] == [{"feedback": "softmax", "training": "notebook"}] * 3
    # training=notebook from train_overrides: the evaluation's distance stays out of the key too
    c = E.eval_config({"engine": "ittt"}, ["train_experiment=mnist_bn", "cache_dir=/nonexistent-cache",
                                           "engine.kwargs.distance=js",
                                           "train_overrides=['+train.engine_kwargs.training=notebook']"])  # fmt: skip
    assert E.training_run(c, _OneRank()).name == names["notebook", None]


#: what load_engine's warning about a head trained with other engine kwargs says
OTHER_KWARGS = "the given engine.kwargs win over those its head was trained with"


def evaluate_warnings(caplog) -> list[str]:
    """The warnings ``tttlab.torch_ttt.evaluate`` logged (whatever their wording)."""
    return [
        r.getMessage() for r in caplog.records if r.name == "tttlab.torch_ttt.evaluate" and r.levelno >= 30
    ]


@pytest.fixture(scope="module")
def ittt_run(tmp_path_factory) -> Path:
    """A smoke IT3 run (``tutorial_net``, torch-ttt's scheme, no engine kwargs recorded)."""
    out = tmp_path_factory.mktemp("runs") / "ittt"
    T.run(smoke_config(out, "train.engine=ittt", "eval.enabled=false", "data.num_examples=64"))
    return out


def test_a_train_run_trained_with_other_it3_kwargs_only_warns(ittt_run, tmp_path, caplog):
    """A ``train_run`` whose IT3 head was trained with ``feedback="output"`` (torch-ttt's default, no kwargs
    recorded), evaluated with ``conf/engine/ittt.yaml``'s ``feedback: softmax``: a warning naming the key
    with both values, then the evaluation's kwargs win.  Evaluated with the default it was trained with,
    spelled out, no warning (the check used to compare against the recorded kwargs only and warned then
    too)."""
    out = ittt_run
    example, _ = T.load_mnist("train", 2)
    c = E.eval_config({"engine": "ittt"}, [f"train_run={out}", "device=cpu"])
    assert c["engine"]["kwargs"] == {"feedback": "softmax"}
    with caplog.at_level("WARNING", logger="tttlab.torch_ttt.evaluate"):
        eng, _, trained_with, _ = E.load_engine(c, out, torch.device("cpu"), example)
    assert trained_with == "ittt" and eng.feedback == "softmax"
    assert "feedback='softmax' (trained: 'output')" in caplog.text and OTHER_KWARGS in caplog.text
    # the default spelled out (the head was trained with it: the run recorded no kwargs) is no difference
    # nor is a test-time-only argument (IT3's anchor: the training does not depend on it)
    for extra in (
        ["engine.kwargs.feedback=output"],
        ["engine.kwargs.feedback=output", "engine.kwargs.anchor=frozen"],
    ):
        caplog.clear()
        same = E.eval_config({"engine": "ittt"}, [f"train_run={out}", "device=cpu", *extra])
        with caplog.at_level("WARNING", logger="tttlab.torch_ttt.evaluate"):
            eng, _, _, _ = E.load_engine(same, out, torch.device("cpu"), example)
        assert eng.feedback == "output" and not evaluate_warnings(caplog), extra
        assert eng.anchor == ("frozen" if len(extra) == 2 else "none")
    # another distance changes this model's training (the torch-ttt scheme's term): a warning; a head
    # trained with training=notebook (the same state's shapes; the checkpoint says so) serves every distance
    notebook = tmp_path / "notebook"
    ck = T.load_checkpoint(T.checkpoint_file(out))
    T.checkpoint_file(notebook).parent.mkdir(parents=True)
    T.save_checkpoint(T.checkpoint_file(notebook), {**ck, "engine_kwargs": {"training": "notebook"}})
    for run, scheme, warns in ((out, [], True), (notebook, ["engine.kwargs.training=notebook"], False)):
        caplog.clear()
        over = [
            f"train_run={run}",
            "device=cpu",
            "engine.kwargs.feedback=output",
            "engine.kwargs.distance=js",
        ]
        other = E.eval_config({"engine": "ittt"}, [*over, *scheme])
        with caplog.at_level("WARNING", logger="tttlab.torch_ttt.evaluate"):
            eng, _, _, _ = E.load_engine(other, run, torch.device("cpu"), example)
        assert eng.distance == "js" and bool(evaluate_warnings(caplog)) == warns, run
        assert all(OTHER_KWARGS in w for w in evaluate_warnings(caplog))


def test_checkpoint_kwargs_merge_under_the_given_ones_in_the_checks_too(ittt_run, tmp_path, caplog):
    """``load_engine`` builds the evaluated engine with the train run's recorded engine kwargs under the
    given ones; the warning names each given key whose value differs from the head's training, with both
    values, and only those.  (1) The layer the model registry gives the engine (``tutorial_net``'s
    ``fc2``), spelled out, is what the head was trained with: no warning (it warned, the layer being in
    neither the recorded kwargs nor the constructor's defaults).  Another layer of the same width (``fc1``:
    the head's state fits) warns ``features_layer_name='fc1' (trained: 'fc2')`` and is used.  (2) The
    single-image-batch check before any training builds its throw-away engine with the same merged
    kwargs: ``test_signal=neutral`` on a ``training=notebook`` run passed ``load_engine`` but was refused
    by the check, built with the given kwargs alone ("expected training='notebook'"); on a run trained
    otherwise both refuse it."""
    from tttlab.core.errors import InvalidInputError

    example, _ = T.load_mnist("train", 2)
    for layer, warns in (("fc2", False), ("fc1", True)):
        caplog.clear()
        c = E.eval_config({"engine": "ittt"}, [f"train_run={ittt_run}", "device=cpu", "engine.kwargs.feedback=output",
                                               f"+engine.kwargs.features_layer_name={layer}"])  # fmt: skip
        with caplog.at_level("WARNING", logger="tttlab.torch_ttt.evaluate"):
            eng, _, _, _ = E.load_engine(c, ittt_run, torch.device("cpu"), example)
        assert eng.features_layer_name == layer and bool(evaluate_warnings(caplog)) == warns, layer
        if warns:
            [said] = evaluate_warnings(caplog)
            assert "with features_layer_name='fc1' (trained: 'fc2');" in said and OTHER_KWARGS in said
    notebook = tmp_path / "notebook"
    ck = T.load_checkpoint(T.checkpoint_file(ittt_run))
    T.checkpoint_file(notebook).parent.mkdir(parents=True)
    T.save_checkpoint(T.checkpoint_file(notebook), {**ck, "engine_kwargs": {"training": "notebook"}})
    stream = [
        "stream=noisy",
        "noisy.num_examples=33",
        "noisy.batch_size=32",
        "+engine.kwargs.test_signal=neutral",
    ]
    c = E.eval_config({"engine": "ittt"}, [f"train_run={notebook}", "device=cpu", *stream])
    assert E.evaluation_engine_kwargs(c, *E.trained_engine_kwargs(c)) == {
        "training": "notebook", "feedback": "softmax", "test_signal": "neutral"
    }  # fmt: skip
    E.check_stream_batches(c, E.evaluated_model(c))  # a last batch of 1 image: the engine takes it
    eng, _, _, _ = E.load_engine(c, notebook, torch.device("cpu"), example)
    assert (eng.training_scheme, eng.test_signal) == ("notebook", "neutral")
    plain = E.eval_config({"engine": "ittt"}, [f"train_run={ittt_run}", "device=cpu", *stream])
    for check in (lambda: E.check_stream_batches(plain, E.evaluated_model(plain)),
                  lambda: E.load_engine(plain, ittt_run, torch.device("cpu"), example)):  # fmt: skip
        with pytest.raises(InvalidInputError, match="expected training='notebook'"):
            check()


def test_records_and_title_show_the_engine_kwargs_the_evaluation_ran_with(ittt_run, tmp_path):
    """An evaluation of a ``train_run`` merges its checkpoint's engine kwargs under the given ones, and
    ``config.yaml`` holds the given ones only: every record's ``extra.engine_kwargs`` and the printed title
    say what the engine ran with.  The checkpoint says ``training=notebook`` (not IT3's default) and
    ``feedback=output``; the evaluation gives ``feedback=softmax`` (conf/engine/ittt.yaml) and
    ``test_signal=neutral``: the checkpoint's training, the given feedback and test signal.  With
    ``engine.kwargs={}`` it runs with the checkpoint's kwargs alone."""
    ck = T.load_checkpoint(T.checkpoint_file(ittt_run))
    notebook = tmp_path / "notebook"
    T.checkpoint_file(notebook).parent.mkdir(parents=True)
    T.save_checkpoint(
        T.checkpoint_file(notebook), {**ck, "engine_kwargs": {"training": "notebook", "feedback": "output"}}
    )
    stream = {"stream": "noisy", "noisy": {"num_examples": 8, "batch_size": 8}, "train_run": str(notebook),
              "device": "cpu", "progress": False}  # fmt: skip
    given = {"engine": {"name": "ittt", "kwargs": {"feedback": "softmax", "test_signal": "neutral"}}}
    path = E.run({**stream, **given, "out_dir": str(tmp_path / "given")})
    records = read_jsonl(path)
    assert records and all(
        r["extra"]["engine_kwargs"]
        == {"training": "notebook", "feedback": "softmax", "test_signal": "neutral"}
        for r in records
    )
    import yaml

    assert (
        yaml.safe_load((path.parent / "config.yaml").read_text())["engine"]["kwargs"]
        == given["engine"]["kwargs"]
    )
    title = E.summary_lines(path)[0]
    assert "1 step(s), engine kwargs feedback=softmax, test_signal=neutral, training=notebook)" in title, (
        title
    )
    cleared = E.run(
        {**stream, "engine": "ittt", "out_dir": str(tmp_path / "cleared")}, clear_engine_kwargs=True
    )
    assert all(r["extra"]["engine_kwargs"] == {"training": "notebook", "feedback": "output"}
               for r in read_jsonl(cleared))  # fmt: skip
    assert "engine kwargs feedback=output, training=notebook)" in E.summary_lines(cleared)[0]
    # a value JSON cannot hold is recorded as its repr, not refused after the evaluation
    assert E.recorded_kwargs({"a": (1, 2), "b": torch.float32}) == {"a": [1, 2], "b": "torch.float32"}


@pytest.mark.parametrize(
    "engine, cfg, needle",
    [
        ("tent", {"benchmark": {"num_examples": 129, "batch_size": 64}},
         "benchmark.batch_size=64 leaves a last batch of 1 image (129 images per domain = 2 x 64 + 1, with "
         "benchmark.num_examples=129)"),
        ("bn", {"benchmark": {"num_examples": 65, "batch_size": 16, "setting": "continual"}},
         "benchmark.batch_size=16 leaves a last batch of 1 image (65 images per domain = 4 x 16 + 1"),
        ("actmad", {"benchmark": {"num_examples": 129, "batch_size": 64}}, "needs at least 2 samples"),
        ("eata", {"stream": "noisy", "noisy": {"num_examples": 129, "batch_size": 64}},
         "noisy.batch_size=64 leaves a last batch of 1 image (129 images per stream"),
    ],
)  # fmt: skip
def test_a_single_image_last_batch_is_refused_before_any_training(tmp_path, monkeypatch, engine, cfg, needle):
    """mnist_bn normalises flat fc features with a BatchNorm1d: a last batch of one image (129 = 2 x 64 + 1)
    stopped the run with a clean error only once the model was trained and the stream reached it.  The
    stream's batch sizes are known from the config: the error now comes first, names the setting and a
    batch size that works (and that size passes the same check)."""

    def no_training(*args, **kwargs):
        raise AssertionError("a model was trained before the error")

    monkeypatch.setattr(E, "training_run", no_training)
    c = {"engine": engine, "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
         "logging": {"progress": False}, **cfg}  # fmt: skip
    c.setdefault("benchmark", {})["corruptions"] = ["fog"]
    with pytest.raises(ConfigError) as e:
        E.run(c)
    msg = str(e.value)
    assert needle in msg and "checked before training the model" in msg, msg
    key = "noisy" if c.get("stream") == "noisy" else "benchmark"
    fits = int(re.search(rf"e\.g\. {key}\.batch_size=(\d+)", msg).group(1))
    assert (65 if engine == "bn" else 129) % fits != 1, msg
    ok = E.eval_config({**c, key: {**c[key], "batch_size": fits}})
    assert E.check_stream_batches(ok, E.evaluated_model(ok)) is None


@pytest.mark.parametrize("engine, refused", [("tent", True), ("source", False)])
def test_the_checks_before_training_build_one_engine_and_one_benchmark(
    monkeypatch, tmp_path, engine, refused
):
    """The engine-fits check and the single-image check each built a throw-away engine, and the single-image
    check built the benchmark a second time; both checks now share one engine and the stream's benchmark,
    with the same outcome (tent refuses the last batch of one image, source takes it) and torch's random
    state left as it was."""
    import tttlab.core.benchmark as B

    class Stop(Exception):
        pass

    def no_training(*args, **kwargs):
        raise Stop

    built = {"engine": 0, "benchmark": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            built[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(E, "training_run", no_training)
    monkeypatch.setattr(T, "build_engine", counting("engine", T.build_engine))
    monkeypatch.setattr(B, "from_config", counting("benchmark", B.from_config))
    c = {"engine": engine, "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
         "benchmark": {"num_examples": 129, "batch_size": 64, "corruptions": ["fog"]}}  # fmt: skip
    torch.manual_seed(5)
    state = torch.get_rng_state()
    with pytest.raises(ConfigError if refused else Stop) as e:
        E.run(c)
    assert refused == ("leaves a last batch of 1 image" in str(e.value))
    assert built == {"engine": 1, "benchmark": 1}
    assert torch.equal(state, torch.get_rng_state())


def test_single_image_batches_pass_where_the_engine_takes_them():
    """No error where one image is fine: engines without test-batch statistics (source, memo's prior), BN
    with a prior, and a stream whose batches all hold 2 or more images."""
    base = {"benchmark": {"num_examples": 129, "batch_size": 64, "corruptions": ["fog"]}}
    for engine in ("source", "memo", {"name": "bn", "kwargs": {"prior_strength": 16}}):
        c = E.eval_config({**base, "engine": engine})
        assert E.check_stream_batches(c, E.evaluated_model(c)) is None, engine
    c = E.eval_config({**base, "engine": "tent", "benchmark": {**base["benchmark"], "num_examples": 130}})
    assert E.check_stream_batches(c, E.evaluated_model(c)) is None


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_display_keys_rerun_the_same_run(smoke_run, tmp_path, command):
    """``logging.progress`` and ``logging.level`` change only what is shown: the same command run again with
    them changed is the same run.  Before, evaluate refused its own folder ('holds the records of another
    config ... differs in logging.progress: False -> True') and a finished training run warned 'created with
    a different config' and left its records under the old config_hash."""
    from tttlab.core.testing import check_display_keys_rerun_the_same_run

    shown = ["logging.progress=true", "logging.level=DEBUG"]
    if command == "train":  # the smoke training, then run again finished: it resumes and writes nothing
        out = tmp_path / "train"
        quiet = smoke_config(out, "logging.progress=false")
        check_display_keys_rerun_the_same_run(
            out, lambda: T.run(quiet), lambda: T.run(smoke_config(out, *shown))
        )
    else:
        out = tmp_path / "eval"
        overrides = [*eval_overrides(smoke_run, out), "benchmark.corruptions=[fog]"]
        records = check_display_keys_rerun_the_same_run(
            out,
            lambda: E.run(hydra_compose("evaluate", overrides)),
            lambda: E.run(hydra_compose("evaluate", [*overrides, *shown])),
        )
        assert [r["metric"] for r in records] == ["accuracy", "s_per_image"]
