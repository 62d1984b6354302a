import pytest

from tttlab.core.errors import CheckpointError, ConfigError, DatasetNotFoundError, InvalidInputError
from tttlab.core.records import load_records
from tttlab.ttt_mae import evaluate as E

METHODS = ["ttt_mae.baseline", "ttt_mae.ttt"]
BENCH = {"corruptions": ["gaussian_noise", "brightness"], "num_examples": 3}


@pytest.fixture
def cache(smoke_cache):
    return smoke_cache


def run(tmp_path, cache, method, **kw):
    return E.run({"method": method, "profile": "smoke", "out_dir": str(tmp_path / method), "cache_dir": cache,
                  "progress": False, "benchmark": dict(BENCH), **kw})  # fmt: skip


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory, smoke_cache) -> dict:
    """``run(<tmp>, cache, method)`` of each method, once for this file: the tests that only read these
    records share them (each evaluated its own copy before; a test that changes a run directory makes its
    own)."""
    out = tmp_path_factory.mktemp("default_runs")
    return {method: run(out, smoke_cache, method) for method in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_contract_records(default_runs, method):
    path = default_runs[method]
    df = load_records(path)
    acc = df[(df.metric == "accuracy") & (df.corruption != "mean")]
    assert sorted(acc.corruption) == ["brightness", "gaussian_noise"] and set(acc.n) == {3}
    assert set(acc.severity) == {5} and (acc.wall_time_s > 0).all()
    assert len(df[df.metric == "s_per_image"]) == 2
    mean = df[(df.metric == "accuracy") & (df.corruption == "mean")]
    assert mean.value.iloc[0] == pytest.approx(acc.value.mean())
    steps = 0 if method == "ttt_mae.baseline" else 2
    curve = df[(df.metric == "accuracy_curve") & (df.corruption == "brightness")].sort_values("step")
    assert curve.step.tolist() == list(range(steps + 1))
    assert curve.value.iloc[-1] == pytest.approx(acc[acc.corruption == "brightness"].value.iloc[0])
    images = load_records(path.parent / "images", metric="correct")
    assert len(images) == 6 and all(len(e["predictions"]) == steps + 1 for e in images.extra)
    assert set(df.method) == {method}


def test_ttt_step0_is_the_baseline_and_resume(tmp_path, cache, default_runs):
    base = load_records(default_runs["ttt_mae.baseline"])
    path = run(tmp_path, cache, "ttt_mae.ttt")
    ttt = load_records(path)
    b = base[base.metric == "accuracy"].set_index("corruption").value
    t0 = ttt[(ttt.metric == "accuracy_curve") & (ttt.step == 0)].set_index("corruption").value
    assert all(b[k] == pytest.approx(t0[k]) for k in t0.index)
    # kill: drop the last two per-image records and the summary; the rerun redoes only those
    img = path.parent / "images" / "records.jsonl"
    lines = img.read_text().splitlines(keepends=True)
    img.write_text("".join(lines[:-2]))
    path.write_text(path.read_text())  # the summary is rewritten, not appended
    again = load_records(run(tmp_path, cache, "ttt_mae.ttt"))
    assert len(img.read_text().splitlines()) == 6
    key = ["metric", "corruption", "step", "value"]
    again, ttt = again[again.metric != "s_per_image"], ttt[ttt.metric != "s_per_image"]
    assert again[key].sort_values(key).values.tolist() == ttt[key].sort_values(key).values.tolist()


def test_batched_group_equals_loop(tmp_path, cache):
    a = load_records(run(tmp_path / "a", cache, "ttt_mae.ttt", group_size=1).parent / "images")
    b = load_records(run(tmp_path / "b", cache, "ttt_mae.ttt", group_size=3).parent / "images")
    pa = sorted((r.corruption, r.extra["index"], tuple(r.extra["predictions"])) for r in a.itertuples())
    pb = sorted((r.corruption, r.extra["index"], tuple(r.extra["predictions"])) for r in b.itertuples())
    assert pa == pb


def test_bad_inputs(tmp_path, cache):
    with pytest.raises(ConfigError, match="method"):
        E.eval_config({"method": "ttt_mae.tent"})
    with pytest.raises(ConfigError, match="profile"):
        E.eval_config({"profile": "huge"})
    with pytest.raises(InvalidInputError, match="steps_per_example"):
        run(tmp_path, cache, "ttt_mae.ttt", steps_per_example=-1)
    with pytest.raises(InvalidInputError, match="mask_ratio"):
        run(tmp_path, cache, "ttt_mae.ttt", mask_ratio=1.5)
    with pytest.raises(ConfigError, match=r"amp='fp16'; expected one of \['none', 'bf16'\]"):
        run(tmp_path, cache, "ttt_mae.baseline", amp="fp16")
    with pytest.raises(ConfigError, match="compile"):
        run(tmp_path, cache, "ttt_mae.baseline", compile="maybe")
    with pytest.raises(
        ConfigError, match="input_size=30; expected a positive integer divisible by the patch size 7"
    ):
        run(tmp_path, cache, "ttt_mae.ttt", input_size=30)
    with pytest.raises(DatasetNotFoundError):
        run(
            tmp_path,
            cache,
            "ttt_mae.ttt",
            benchmark={"name": "imagenet_c", "root": str(tmp_path / "missing")},
            resume_model=str(tmp_path / "x.pth"),
        )
    with pytest.raises(CheckpointError, match="x.pth"):
        run(tmp_path, cache, "ttt_mae.ttt", resume_model=str(tmp_path / "x.pth"))
    with pytest.raises(ConfigError, match="unknown config key"):
        run(tmp_path, cache, "ttt_mae.ttt", steps=3)
    with pytest.raises(ConfigError, match="seed=-1; expected an integer >= 0"):  # was numpy's ValueError
        run(tmp_path, cache, "ttt_mae.ttt", seed=-1)


def test_hydra_configs_compose():
    """Every shipped experiment composes with its entry point's schema (unknown keys would fail)."""
    from importlib import resources

    from hydra import compose, initialize_config_module

    from tttlab.ttt_mae.common import register_configs

    register_configs()
    files = sorted(p.name[:-5] for p in resources.files("tttlab.ttt_mae.conf").joinpath("experiment").iterdir()
                   if p.name.endswith(".yaml"))  # fmt: skip
    assert len(files) >= 16
    with initialize_config_module("tttlab.ttt_mae.conf", version_base=None):
        for exp in files:
            entry = exp.rsplit("_", 1)[1]
            cfg = compose(entry, overrides=[f"+experiment={exp}"])
            assert cfg.experiment_name == exp
            if entry == "baseline":
                assert cfg.steps_per_example == 0
        ttt = compose("ttt", overrides=["+experiment=paper_ttt"])
        assert (ttt.steps_per_example, ttt.batch_size, ttt.blr, ttt.finetune_mode) == (
            20,
            128,
            1e-2,
            "encoder",
        )
        assert (ttt.mask_ratio, ttt.optimizer_momentum, ttt.single_crop, ttt.classifier_depth) == (
            0.75,
            0.9,
            True,
            12,
        )
        assert list(ttt.benchmark.severities) == [5]


def test_summary_records_from_the_per_image_records(tmp_path, cache, default_runs):
    """The summary (core ``write_domain_summary`` + curves) holds what the per-image records say, with the
    same fields as before the move to core: accuracy / s_per_image at ``step=steps``, mean over corruptions."""
    import numpy as np

    path = default_runs["ttt_mae.ttt"]
    df = load_records(path)
    images = load_records(path.parent / "images", metric="correct")
    steps = 2
    for corr, sel in images.groupby("corruption"):
        flags = np.array([[int(p == e["label"]) for p in e["predictions"]] for e in sel.extra])
        secs = float(sel.wall_time_s.sum())
        dom = df[df.corruption == corr]
        acc = dom[dom.metric == "accuracy"].iloc[0]
        spi = dom[dom.metric == "s_per_image"].iloc[0]
        assert (acc.value, acc.n, acc.step, acc.severity) == (flags[:, -1].mean(), 3, steps, 5)
        assert acc.wall_time_s == pytest.approx(secs) and spi.value == pytest.approx(secs / 3)
        assert (spi.n, spi.step) == (3, steps)
        assert acc.extra["correct"] == flags[:, -1].sum()
        want = {"steps_per_example": steps, "batch_size": 4, "reset": "per_image"}
        assert {k: acc.extra[k] for k in want} == want
        curve = dom[dom.metric == "accuracy_curve"].sort_values("step")
        assert curve.value.tolist() == pytest.approx(flags.mean(axis=0).tolist())
        loss = dom[dom.metric == "mae_loss"].sort_values("step")
        assert loss.step.tolist() == [1, 2]
        # the MAE loss curve is the mean over images; an image's record is its prediction after the last step
        want_loss = np.mean([e["losses"] for e in sel.extra], axis=0)
        assert loss.value.tolist() == pytest.approx(want_loss.tolist(), rel=1e-6)
        assert sel.value.tolist() == flags[:, -1].tolist()
    mean = df[df.corruption == "mean"]
    assert len(mean) == 1 and mean.iloc[0].step == steps and mean.iloc[0].n == 6
    assert mean.iloc[0].extra["domains"] == 2
    one = run(tmp_path / "one", cache, "ttt_mae.ttt", benchmark={**BENCH, "corruptions": ["brightness"]})
    one = load_records(one)
    assert "mean" not in set(one.corruption)  # no mean over a single corruption, as before
    # ``seed`` reaches the TTT views and masks: the same model (the seed-0 files) with seed 1 sees other masks
    pre, probe = E.trained_model("smoke", cache, 0, "cpu", False)
    other = run(tmp_path / "seed1", cache, "ttt_mae.ttt", seed=1, resume_model=str(pre), resume_finetune=str(probe),
                benchmark={**BENCH, "corruptions": ["gaussian_noise"]})  # fmt: skip
    other = load_records(other.parent / "images", metric="correct")
    mine = images[images.corruption == "gaussian_noise"]
    a = sorted((e["index"], e["losses"]) for e in mine.extra)
    b = sorted((e["index"], e["losses"]) for e in other.extra)
    assert [x[0] for x in a] == [x[0] for x in b] == [0, 1, 2]
    assert all(x[1] != y[1] for x, y in zip(a, b))


def test_progress_bar_counts_images_and_summary_is_logged(tmp_path, cache, monkeypatch, capsys, caplog):
    """On a terminal the evaluate loop shows a bar with a total (tqdm prints nothing for total=None) and
    the domain being adapted; the per-domain and mean accuracies are logged at the end."""
    import logging
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with caplog.at_level(logging.INFO, logger="tttlab.ttt_mae.evaluate"):
        run(tmp_path, cache, "ttt_mae.baseline", progress=True)
    err = capsys.readouterr().err
    assert "ttt_mae.baseline" in err and "/6 [" in err and "brightness-5" in err, err[-500:]
    msgs = "\n".join(r.getMessage() for r in caplog.records)
    assert (
        "ttt_mae.baseline gaussian_noise-5: accuracy" in msgs and "mean accuracy over 2 corruptions" in msgs
    )


def test_negative_lr_and_group_size_are_config_errors(tmp_path, cache):
    with pytest.raises(ConfigError, match=r"blr=-1.0 .*expected a learning rate >= 0"):
        run(tmp_path, cache, "ttt_mae.ttt", blr=-1.0)
    with pytest.raises(ConfigError, match=r"lr=-0.5; expected"):
        run(tmp_path, cache, "ttt_mae.ttt", lr=-0.5)
    with pytest.raises(ConfigError, match=r"group_size=0; expected >= 1"):
        run(tmp_path, cache, "ttt_mae.ttt", group_size=0)
    with pytest.raises(ConfigError, match=r"optimizer_type='adam' with group_size=2.*set group_size=1"):
        run(tmp_path, cache, "ttt_mae.ttt", group_size=2, optimizer_type="adam")


def test_records_are_written_from_the_adapters_results(tmp_path, cache, monkeypatch):
    """The record wiring alone, with a stand-in adapter that is wrong before adapting and right after its
    last step: per-image ``correct`` after the last step, the curve 0 -> 1, the losses' mean per step."""
    import numpy as np

    from tttlab.ttt_mae.ttt import ImageResult

    seen = []  # the labels of the images taken, in order (one image at a time: group_size 1)
    real_make = E.make_bench

    def make_bench(c):
        bench = real_make(c)
        domain_dataset = bench.domain_dataset

        class Taking:
            def __init__(self, ds):
                self.ds = ds

            def __len__(self):
                return len(self.ds)

            def take(self, idx):
                images, labels = self.ds.take(idx)
                seen.extend(np.asarray(labels).tolist())
                return images, labels

        bench.domain_dataset = lambda dom: Taking(domain_dataset(dom))
        return bench

    class Adapter:
        def __init__(self, model, s, device):
            self.steps = s.steps_per_example

        def adapt(self, raw, generator, normalize):
            y = seen[-1]
            preds = [(y + 1) % 10] * self.steps + [y]
            return ImageResult(preds, [float(k + 1) * (y + 1) for k in range(self.steps)])

    monkeypatch.setattr(E, "make_bench", make_bench)
    monkeypatch.setattr(E, "TTTAdapter", Adapter)
    path = run(tmp_path, cache, "ttt_mae.ttt")
    images = load_records(path.parent / "images", metric="correct")
    assert len(images) == 6 and (images.value == 1).all()
    df = load_records(path)
    acc = df[(df.metric == "accuracy")]
    assert (acc.value == 1.0).all()
    for corr in ("gaussian_noise", "brightness"):
        curve = df[(df.metric == "accuracy_curve") & (df.corruption == corr)].sort_values("step")
        assert curve.value.tolist() == [0.0, 0.0, 1.0]
        labels = [e["label"] for e in images[images.corruption == corr].extra]
        loss = df[(df.metric == "mae_loss") & (df.corruption == corr)].sort_values("step")
        assert loss.value.tolist() == pytest.approx([k * (np.mean(labels) + 1) for k in (1, 2)])


def test_amp_and_compile_reach_the_contract(tmp_path, cache, monkeypatch):
    """evaluate.run(amp=bf16): the adaptation runs under autocast (a hooked Linear's output is bfloat16),
    amp enters the records' config_hash, and >= 90 % of the per-step predictions equal fp32's (smoke model,
    6 images x 3 predictions); compile=true reaches torch.compile (a recorder) and what it returns is called,
    the baseline included (it compiled the MAE loss, which 0 steps never call)."""
    import torch

    def preds(path):
        df = load_records(path.parent / "images", metric="correct")
        return sorted(
            (r.corruption, r.extra["index"], p)
            for r in df.itertuples()
            for p in enumerate(r.extra["predictions"])
        )

    fp = run(tmp_path / "fp", cache, "ttt_mae.ttt")
    seen = []
    real_load = E.load_model

    def hooked(c, device):
        model = real_load(c, device)
        model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        return model

    monkeypatch.setattr(E, "load_model", hooked)
    bf = run(tmp_path / "bf", cache, "ttt_mae.ttt", amp="bf16")
    assert seen and set(seen) == {torch.bfloat16}
    a, b = preds(fp), preds(bf)
    assert len(a) == len(b) == 18 and sum(x == y for x, y in zip(a, b)) >= 0.9 * len(a)
    assert set(load_records(fp).config_hash).isdisjoint(set(load_records(bf).config_hash))
    calls = []

    def record(fn, **kw):  # torch.compile's stand-in: counts the calls of what it returns
        def compiled(*a, **k):
            calls.append(fn)
            return fn(*a, **k)

        return compiled

    monkeypatch.setattr(torch, "compile", record)
    for method in METHODS:
        calls.clear()
        run(tmp_path / "c", cache, method, compile=True)
        assert calls, f"{method}: nothing compiled was called"


@pytest.mark.parametrize("entry", ["ttt", "baseline"])
def test_benchmark_order_keys_reach_the_stream(entry):
    """``benchmark.shuffle`` and ``benchmark.dirichlet_delta`` (compare passes the latter) reach core's
    benchmark (mutation audit: dropping either passed every test: per-image TTT gives the same accuracy on
    any order)."""
    from tttlab.ttt_mae.common import compose

    default = E.make_bench(compose(entry, "smoke_ttt"))
    assert default.shuffle is True and default.dirichlet_delta is None
    c = compose(entry, "smoke_ttt", {"benchmark": {"shuffle": False, "dirichlet_delta": 0.25}})
    bench = E.make_bench(c)
    assert bench.shuffle is False and bench.dirichlet_delta == 0.25


def test_methods_and_profiles_default_to_their_own_folders():
    """``run(method="ttt_mae.baseline", profile="smoke")`` wrote to the profile's experiment folder
    (runs/ttt_mae/smoke_ttt), the same as ``ttt_mae.ttt``'s: the second run overwrote the first's config
    and records."""
    dirs = {(m, p): E.eval_config(method=m, profile=p)["out_dir"] for m in E.METHODS for p in E.PROFILES}
    assert dirs[("ttt_mae.ttt", "smoke")] == "runs/ttt_mae/eval/ttt-smoke"
    assert dirs[("ttt_mae.baseline", "quick")] == "runs/ttt_mae/eval/baseline-quick"
    assert len(set(dirs.values())) == len(dirs)
    assert E.eval_config(method="ttt_mae.baseline", profile="smoke", out_dir="/x/y")["out_dir"] == "/x/y"


def test_compose_override_list_means_what_the_command_line_means():
    """``compose``'s overrides went to OmegaConf's dotlist: ``++seed=3`` and ``~experiment_name=ttt`` were
    unknown keys ``'++seed'`` / ``'~experiment_name'``, ``+seed=1`` replaced the seed where
    ``tttlab-ttt-mae-ttt +seed=1`` refuses it, and values were read as YAML (``experiment_name=007``: ``'7'``).
    They now take Hydra's rules (core's ``apply_overrides``): the config ``tttlab-ttt-mae-ttt <overrides>``
    composes, and a refusal where that command line refuses."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from tttlab.core.config import validate
    from tttlab.ttt_mae.common import TTTConfig, compose, register_configs, to_dict

    register_configs()
    with initialize_config_module("tttlab.ttt_mae.conf", version_base=None):
        for overrides in (["experiment_name=007"], ["++seed=3", "steps_per_example=01"]):
            line = hydra_compose("ttt", overrides=overrides)
            expected = to_dict(validate(OmegaConf.to_container(line, resolve=True), TTTConfig))
            assert compose("ttt", overrides=overrides) == expected, overrides
        for bad, needle in (
            ("+seed=1", "cannot add 'seed'"),
            ("~experiment_name=x", "its value is 'ttt', not 'x'"),
        ):
            with pytest.raises(HydraException):
                hydra_compose("ttt", overrides=[bad])
            with pytest.raises(ConfigError, match=needle):
                compose("ttt", overrides=[bad])
    assert compose("ttt", overrides=["experiment_name=007"])["out_dir"] == "runs/ttt_mae/007"


@pytest.mark.parametrize("command", ["pretrain", "probe", "ttt_mae.ttt"])
def test_display_keys_rerun_the_same_run(tmp_path, cache, command):
    """``logging.progress`` / ``logging.level`` (and ``progress``, which compare passes) change only what is
    shown: the same command run again with them changed is the same run.  Before, a finished pretraining or
    probing run warned 'created with a different config' and its records kept the old config_hash beside
    the new config.yaml.  (ttt and baseline, one code path, were right already: their records name the hash
    of the config's identity, which leaves ``logging`` out.)"""
    from tttlab.core.records import config_hash
    from tttlab.core.testing import check_display_keys_rerun_the_same_run
    from tttlab.ttt_mae import train as T
    from tttlab.ttt_mae.common import compose

    shown = {"logging": {"progress": True, "level": "DEBUG"}}
    if command in METHODS:
        out = tmp_path / command
        check_display_keys_rerun_the_same_run(
            out, lambda: run(tmp_path, cache, command), lambda: run(tmp_path, cache, command, progress=True),
            record_hash=lambda cfg: config_hash(E.identity(cfg)),
        )  # fmt: skip
        return
    small = {"epochs": 1, "data": {"num_examples": 32}, "batch_size": 16, "logging": {"progress": False}}
    pre = tmp_path / "pretrain"
    c = compose("pretrain", "smoke_pretrain", {"out_dir": str(pre), **small})
    if command == "probe":
        T.run(c, "pretrain")
        out = tmp_path / "probe"
        c = compose("probe", "smoke_probe", {"out_dir": str(out), "finetune": str(pre / "checkpoints" / "last.ckpt"),
                                             **small})  # fmt: skip
    check_display_keys_rerun_the_same_run(
        c["out_dir"], lambda: T.run(c, command), lambda: T.run({**c, **shown}, command)
    )


@pytest.mark.parametrize("command", ["pretrain", "probe"])
def test_resumable_keys_rerun_the_same_run(tmp_path, command):
    """``save_ckpt_freq``, ``experiment_name`` (and the probe's ``weights_only``) change no number: a run
    killed in its second epoch and started again with them changed is the same run.  Before, it warned
    'created with a different config' and left its first epoch's record under the old config_hash beside
    the new config.yaml.  Its records equal an uninterrupted run's, of either config: save_ckpt_freq=2
    recorded the second epoch only (records and stats.json were written at checkpoint epochs only)."""
    from tttlab.core.records import read_jsonl, read_stats
    from tttlab.core.testing import check_resumable_keys_rerun_the_same_run
    from tttlab.ttt_mae import train as T
    from tttlab.ttt_mae.common import compose

    small = {"epochs": 2, "data": {"num_examples": 32}, "batch_size": 16, "logging": {"progress": False}}
    extra, changed = {}, {"save_ckpt_freq": 2, "experiment_name": "moved"}
    if command == "probe":
        pre = tmp_path / "pretrain"
        T.run(compose("pretrain", "smoke_pretrain", {"out_dir": str(pre), **small, "epochs": 1}), "pretrain")
        extra, changed = {"finetune": str(pre / T.FINAL)}, {**changed, "weights_only": False}

    def cfg(out, **kw):
        return compose(command, f"smoke_{command}", {"out_dir": str(out), **small, **extra, **kw})

    T.run(cfg(tmp_path / "reference", **changed), command)  # changed: the same numbers, the same records
    out = tmp_path / "run"
    records = check_resumable_keys_rerun_the_same_run(
        out,
        lambda: T.run(cfg(out), command, stop_after_steps=3),  # 2 steps an epoch: killed in the second
        lambda: T.run(cfg(out, **changed), command),
        reference=read_jsonl(tmp_path / "reference" / "records.jsonl"),
    )
    assert [r["step"] for r in records if r["metric"] == "train_loss"] == [0, 1]
    assert read_stats(tmp_path / "reference")["epoch"] == read_stats(out)["epoch"] == [0, 1]
