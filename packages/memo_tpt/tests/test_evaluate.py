import re
from pathlib import Path

import pytest

from tttlab.core.errors import ConfigError
from tttlab.core.records import config_hash, load_records
from tttlab.core.registry import list_methods
from tttlab.core.testing import run_faked_command_into_a_closed_pipe, run_into_a_closed_pipe
from tttlab.memo_tpt.evaluate import METHODS, eval_config, run

SPEC_NAMES = sorted(m.name for m in list_methods() if m.package == "memo_tpt")
#: the records' ``step``: adaptation steps per image at the evaluate defaults (TPT tts 1, MEMO 1 step)
STEPS = {"memo_tpt.tpt": 1, "memo_tpt.memo": 1, "memo_tpt.clip_zeroshot": 0, "memo_tpt.tpt_ensemble": 0}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def test_specs_are_the_evaluated_methods():
    assert SPEC_NAMES == sorted(METHODS)


@pytest.mark.parametrize("method", SPEC_NAMES)
def test_contract_records(method, cache, tmp_path):
    bench = {"corruptions": ["gaussian_noise", "fog"], "num_examples": 3}
    path = run(method=method, profile="smoke", out_dir=str(tmp_path / "a"), cache_dir=str(cache), benchmark=bench,
               progress=False)  # fmt: skip
    df = load_records(path)
    acc = df[df.metric == "accuracy"]
    assert list(acc.corruption) == ["gaussian_noise", "fog", "mean"]
    assert (acc.n.iloc[:2] == 3).all() and acc.n.iloc[2] == 6
    assert set(df.metric) == {"accuracy", "s_per_image"} and (df.method == method).all()
    assert ((acc.value >= 0) & (acc.value <= 1)).all() and (df.package == "memo_tpt").all()
    # every record says how many adaptation steps each image took (none before: core's table showed none)
    assert df.step.tolist() == [STEPS[method]] * len(df)  # (a nullable column: .all() would skip missing)
    # ... and the config's hash is the config's alone (a new record field, not a new config key)
    config = eval_config(method=method, profile="smoke", out_dir=str(tmp_path / "a"), cache_dir=str(cache),
                         benchmark=bench, progress=False)  # fmt: skip
    assert (df.config_hash == config_hash(config)).all()
    models = sorted(p.name for p in cache.iterdir())
    again = load_records(run(method=method, profile="smoke", out_dir=str(tmp_path / "b"), cache_dir=str(cache),
                             benchmark=bench, progress=False))  # fmt: skip
    assert sorted(p.name for p in cache.iterdir()) == models  # reused, not retrained
    assert list(again[again.metric == "accuracy"].value) == list(acc.value)  # deterministic


def test_bad_config(tmp_path):
    with pytest.raises(ConfigError, match="tpt.nviews"):
        run(method="memo_tpt.tpt", tpt={"nviews": 3})
    with pytest.raises(ConfigError, match="method"):
        run(method="memo_tpt.nope")
    # no did-you-mean: a method's name misspelt, or given without its package, a key given without its node
    for method, meant in (("memo_tpt.mem", "memo_tpt.memo"), ("memo", "memo_tpt.memo"),
                          ("memo_tpt.clip", "memo_tpt.clip_zeroshot")):  # fmt: skip
        with pytest.raises(
            ConfigError, match=re.escape(f"method={method!r} (did you mean {meant!r}?); expected")
        ):
            run(method=method)
    with pytest.raises(
        ConfigError, match=re.escape("'severities' (did you mean 'benchmark.severities'?) (known keys: ")
    ):
        run(method="memo_tpt.memo", severities=[1])
    # the node's keys as the other commands list them (was a Python list: "expected one of ['amp', ...]")
    with pytest.raises(
        ConfigError,
        match=r"'benchmark\.severitys' \(did you mean 'benchmark\.severities'\?\) \(known keys in 'benchmark': name, ",
    ):
        run(method="memo_tpt.memo", benchmark={"severitys": [1]})
    # bad-input audit: bool('maybe') was True; a cache_dir that is a file was a FileExistsError
    (tmp_path / "a_file").write_text("x")
    for key, value in (("progress", "maybe"), ("cache_dir", str(tmp_path / "a_file"))):
        with pytest.raises(ConfigError, match=f"{key}="):
            run(method="memo_tpt.memo", **{key: value})


def test_cli_help_errors_and_summary(cache, tmp_path, monkeypatch, capsys):
    """``tttlab-memo-tpt-evaluate --help`` was 'unknown config key --help' with a traceback; bad values are
    one-line errors; a run prints its accuracy before the records path (it printed only the path)."""
    import sys

    from tttlab.memo_tpt.evaluate import main

    monkeypatch.setattr(sys, "argv", ["tttlab-memo-tpt-evaluate", "--help"])
    main()
    assert "usage: tttlab-memo-tpt-evaluate" in capsys.readouterr().out
    for bad, expected in (
        ("profile=huge", "ConfigError: profile='huge'"),
        ("fog", "arguments ['fog']"),
        # Hydra's '+': "unknown config key '+logging' (did you mean 'logging'?)"
        ("+logging.level=DEBUG", "ConfigError: +logging.level=DEBUG: this command is no Hydra app and takes no "
         "'+': give logging.level=DEBUG\n"),
        # a '~' that zsh/sh left made a folder named '~': the Hydra commands' line
        ("out_dir=~/runs", "ConfigError: 'out_dir=~/runs': the shell left '~' unexpanded (zsh and sh expand it only "
         "at the start of a word); give out_dir=$HOME/runs or the full path\n"),
    ):  # fmt: skip
        monkeypatch.setattr(sys, "argv", ["tttlab-memo-tpt-evaluate", bad])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and "tttlab-memo-tpt-evaluate: error: " in err and expected in err, err
    # quoted for Hydra ('out_dir="~/runs"'), as tttlab-compare and the Hydra commands take it: the home's
    from tttlab.memo_tpt import evaluate as memo_evaluate

    def folders(cfg):  # what run() is given, said as a refusal
        raise ConfigError(f"got {cfg['out_dir']}")

    with monkeypatch.context() as m:
        m.setenv("HOME", "/home/tester")
        m.setattr(memo_evaluate, "run", folders)
        m.setattr(sys, "argv", ["tttlab-memo-tpt-evaluate", 'out_dir="~/runs"'])
        with pytest.raises(SystemExit):
            main()
    assert capsys.readouterr().err.endswith("ConfigError: got /home/tester/runs\n")
    monkeypatch.setattr(sys, "argv", ["tttlab-memo-tpt-evaluate", "method=memo_tpt.memo", "profile=smoke",
                                      f"out_dir={tmp_path}", f"cache_dir={cache}", "progress=false",
                                      "benchmark.corruptions=[fog,contrast]", "benchmark.num_examples=2"])  # fmt: skip
    main()
    out = capsys.readouterr().out.splitlines()
    # per domain accuracy % and ms/image, then the mean (it printed the mean only), then the mean line
    # ... and the steps, as torch_ttt's evaluate prints them
    assert (
        out[0] == "memo_tpt.memo on mnist_c (episodic, reset per_image, 1 step(s)): accuracy %, ms/image"
    ), out
    assert [line.split()[0] for line in out[1:4]] == ["fog-5", "contrast-5", "mean"], out
    assert out[4].startswith("memo_tpt.memo: accuracy ") and "(mean over corruptions, 4 images)" in out[4]
    assert out[5].endswith("records.jsonl") and len(out) == 6


def test_memo_source_accuracy_is_the_unadapted_model(cache, tmp_path):
    """MEMO's records carry ``source_accuracy``: the cached CNN without adaptation (eval-mode BatchNorm) on
    the same images, recomputed here from the model file and the benchmark."""
    import numpy as np
    import torch

    from tttlab.core.benchmark import make_benchmark
    from tttlab.memo_tpt import evaluate as E
    from tttlab.memo_tpt import tiny_clip as T

    bench = {"corruptions": ["gaussian_noise", "fog"], "num_examples": 4}
    # BatchNorm on the test image's own statistics (prior strength 0): predictions unlike the source model's
    kw = dict(method="memo_tpt.memo", profile="smoke", cache_dir=str(cache), benchmark=bench, progress=False,
              memo={"prior_strength": 0.0})  # fmt: skip
    df = load_records(run(out_dir=str(tmp_path), **kw))
    c = E.eval_config(**kw)
    b = c["benchmark"]
    net, _ = T.load_or_train_cnn("smoke", str(cache), 0, False)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (T.MNIST_MEAN, T.MNIST_STD))
    hits: dict = {}
    for batch in make_benchmark(b["name"], corruptions=b["corruptions"], severities=b["severities"],
                                setting=b["setting"], batch_size=8, num_examples=b["num_examples"],
                                seed=b["seed"]).batches():  # fmt: skip
        with torch.no_grad():
            pred = net.eval()((E._images(batch) - mean) / std).argmax(1).numpy()
        for d, ok in zip(batch.domain_ids, pred == np.asarray(batch.labels)):
            hits.setdefault(int(d), []).append(bool(ok))
    acc = df[(df.metric == "accuracy") & (df.corruption != "mean")]
    assert len(acc) == 2
    for i, corr in enumerate(bench["corruptions"]):
        row = acc[acc.corruption == corr].iloc[0]
        assert row.extra["source_accuracy"] == pytest.approx(np.mean(hits[i]))
    assert any(row.value != row.extra["source_accuracy"] for row in acc.itertuples())  # the test can tell


def test_default_out_dir_is_one_folder_per_method_and_profile(cache, tmp_path, monkeypatch):
    """runs/memo_tpt/eval was shared by every method and profile: their records went into one file and
    config.yaml was overwritten (with a warning) by each run."""
    from tttlab.memo_tpt.evaluate import default_out_dir, eval_config

    dirs = {
        (m, p): eval_config(method=m, profile=p)["out_dir"]
        for m in METHODS
        for p in ("smoke", "quick", "full")
    }
    assert len(set(dirs.values())) == len(dirs)
    assert (
        dirs["memo_tpt.tpt", "full"]
        == "runs/memo_tpt/eval/tpt-full"
        == default_out_dir("memo_tpt.tpt", "full")
    )
    assert dirs["memo_tpt.memo", "smoke"] == "runs/memo_tpt/eval/memo-smoke"
    assert eval_config(method="memo_tpt.memo", out_dir="mine")["out_dir"] == "mine"
    monkeypatch.chdir(tmp_path)
    path = run(method="memo_tpt.clip_zeroshot", profile="smoke", cache_dir=str(cache), progress=False,
               benchmark={"corruptions": ["fog"], "num_examples": 2})  # fmt: skip
    assert path == Path("runs/memo_tpt/eval/clip_zeroshot-smoke/records.jsonl") and path.exists()
    assert sorted(p.name for p in (tmp_path / "runs" / "memo_tpt" / "eval").iterdir()) == [
        "clip_zeroshot-smoke"
    ]


def test_run_again_replaces_its_records_and_keeps_other_configs(cache, tmp_path, monkeypatch):
    """Kill audit: evaluate starts again from zero, and a run killed after its last record (or simply run
    again) appended a second copy of every record.  The same config now replaces its records.  Another
    config in the same folder is refused unless appending is asked for (core's RunDir)."""
    from tttlab.core.errors import RunDirConflictError
    from tttlab.core.records import APPEND_ENV

    monkeypatch.delenv(APPEND_ENV, raising=False)
    bench = {"corruptions": ["fog"], "num_examples": 2}
    kw = dict(method="memo_tpt.clip_zeroshot", profile="smoke", out_dir=str(tmp_path), cache_dir=str(cache),
              progress=False)  # fmt: skip
    first = load_records(run(**kw, benchmark=bench))
    # the same run with the progress bar on (the command's default) is that run again, not another config
    # (it was refused: 'differs in progress: False -> True'); its records replace the earlier ones
    shown = load_records(run(**{**kw, "progress": True}, benchmark=bench))
    assert len(shown) == 2 and shown.config_hash.nunique() == 1
    acc = [part[part.metric == "accuracy"].value.tolist() for part in (shown, first)]
    assert acc[0] == acc[1]
    first = load_records(run(**kw, benchmark=bench))
    with pytest.raises(RunDirConflictError, match="benchmark.num_examples: 2 -> 3"):
        run(**kw, benchmark={**bench, "num_examples": 3})
    assert len(load_records(tmp_path)) == 2
    monkeypatch.setenv(APPEND_ENV, "1")
    other = load_records(run(**kw, benchmark={**bench, "num_examples": 3}))
    again = load_records(run(**kw, benchmark=bench))
    assert len(first) == 2 and len(other) == 4 and len(again) == 4
    assert sorted(again.n) == [2, 2, 3, 3], "one copy per config"


def test_memo_source_pass_runs_under_the_same_autocast(cache, tmp_path, monkeypatch):
    """MEMO's ``extra.source_accuracy`` (the unadapted model) is measured under the run's ``amp`` like the
    adaptation (mutation audit: a source pass left in float32 passed every test)."""
    import torch

    from tttlab.memo_tpt import evaluate as E

    seen = []
    real = E.build_method

    def hooked(c, device):
        adapt, name, memo = real(c, device)
        memo.model.register_forward_pre_hook(
            lambda m, a: seen.append((torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()))
        )
        return adapt, name, memo

    monkeypatch.setattr(E, "build_method", hooked)
    run(method="memo_tpt.memo", profile="smoke", cache_dir=str(cache), progress=False, out_dir=str(tmp_path),
        amp="bf16", benchmark={"corruptions": ["fog"], "num_examples": 4})  # fmt: skip
    assert (True, False) in seen and {a for a, _ in seen} == {True}  # the no-grad source pass included


def test_benchmark_order_keys_reach_the_stream(monkeypatch, tmp_path):
    """``benchmark.shuffle`` and ``benchmark.dirichlet_delta`` (compare passes the latter) reach core's
    benchmark; defaults: shuffled, i.i.d. (mutation audit: dropping either passed every test: a per-image
    method's accuracy does not depend on the order)."""
    import tttlab.core.benchmark as B
    from tttlab.memo_tpt import evaluate as E

    built, real = [], B.make_benchmark

    class _Stop(Exception):
        pass

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        raise _Stop

    monkeypatch.setattr(E, "build_method", lambda c, device: (None, "none", None))
    monkeypatch.setattr(B, "make_benchmark", spy)
    for bench in ({}, {"shuffle": False, "dirichlet_delta": 0.25}):
        with pytest.raises(_Stop):
            run(
                method="memo_tpt.tpt", profile="smoke", out_dir=str(tmp_path), benchmark=bench, progress=False
            )
    assert [(b.shuffle, b.dirichlet_delta) for b in built] == [(True, None), (False, 0.25)]


def test_progress_bars_stay_quiet_when_stderr_is_not_a_terminal(cache, tmp_path, capfd):
    """``progress=true`` (the command's default) draws bars on a terminal only: run with its output in a
    log file or a pipe, the training of the tiny models and the evaluation loop print no ``\\r`` bar
    frames, as the other subpackages' commands (the design's "quiet when not a TTY")."""
    import sys

    assert not sys.stderr.isatty()  # capfd: stderr is a file here, as in `cmd > log 2>&1`
    bench = {"corruptions": ["fog"], "num_examples": 2}
    run(method="memo_tpt.memo", profile="smoke", out_dir=str(tmp_path / "a"), cache_dir=str(tmp_path / "models"),
        benchmark=bench, progress=True)  # fmt: skip
    err = capfd.readouterr().err
    assert "\r" not in err and "it/s" not in err and "%|" not in err, err[-500:]


# evaluate prints its own usage text; the Hydra commands' help is covered by core's test of
# check_hydra_command (tests/test_install.py checks that every @hydra.main entry point calls it)
@pytest.mark.parametrize("module", ["tttlab.memo_tpt.evaluate"])
def test_help_into_a_closed_pipe_ends_quietly(module):
    """``tttlab-memo-tpt-evaluate --help | head -3`` (its own usage text) ended in a BrokenPipeError
    traceback; it ends with no output on stderr and exit status 141 (128 + SIGPIPE)."""
    res = run_into_a_closed_pipe("-m", module, "--help")
    assert (res.returncode, res.stderr) == (141, ""), res.stderr[-2000:]


def test_paper_command_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """``tttlab-memo-tpt-tpt``'s result path into a closed pipe (``run_paper`` is faked) ended in Hydra's error report
    with a BrokenPipeError and exit status 1: it was printed outside user_errors."""
    records = tmp_path / "records.jsonl"
    records.touch()
    res = run_faked_command_into_a_closed_pipe(
        "tttlab-memo-tpt-tpt",
        "tttlab.memo_tpt.main",
        "run_paper",
        repr(str(records)),
        "tpt_main()",
        "hydra.run.dir=" + str(tmp_path / "run"),
    )
    assert (res.returncode, res.stderr) == (141, ""), res.stderr[-2000:]


def test_a_bad_value_is_reported_before_another_configs_folder(cache, tmp_path, monkeypatch):
    """A bad value given to a folder that already holds records (rerunning the README's
    ``tttlab-memo-tpt-evaluate method=memo_tpt.memo profile=full`` with ``benchmark.severities=[7]``,
    ``memo.steps=-1``, ``memo.top_k=0``) is reported as itself: it was refused as 'holds the records of
    another config ... differs in ...', and only a rerun with a new out_dir named the value.  ``top_k=0`` /
    ``selection=0`` (a count of no views) were refused only at the first image, by select_confident."""
    import torch.nn as nn

    from tttlab.core.errors import RunDirConflictError, SeverityError
    from tttlab.core.records import APPEND_ENV, RunDir
    from tttlab.memo_tpt.memo import Memo
    from tttlab.memo_tpt.tpt import TPT

    monkeypatch.delenv(APPEND_ENV, raising=False)
    bench = {"corruptions": ["fog"], "num_examples": 2}
    kw = dict(method="memo_tpt.memo", profile="smoke", out_dir=str(tmp_path / "e"), cache_dir=str(cache),
              progress=False, benchmark=bench)  # fmt: skip
    with RunDir(kw["out_dir"], eval_config(**kw), other_config="error").writer(method="x") as w:
        w.write(metric="accuracy", value=0.5)
    for extra, error, match in (
        ({"benchmark": {**bench, "severities": [7]}}, SeverityError, "got 7"),
        ({"memo": {"steps": -1}}, ConfigError, "steps=-1"),
        ({"memo": {"top_k": 0}}, ConfigError, "top_k=0; expected a number of views >= 1"),
        ({"device": "cuda:99"}, Exception, "cuda:99"),
    ):
        with pytest.raises(error, match=match):
            run(**{**kw, **extra})
    with pytest.raises(RunDirConflictError, match="num_examples"):  # a good value: the folder's conflict
        run(**{**kw, "benchmark": {**bench, "num_examples": 3}})
    for bad in (0, -2, 0.0, float("nan")):
        with pytest.raises(ConfigError, match="top_k="):
            Memo(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), top_k=bad)
    with pytest.raises(ConfigError, match="selection=0"):
        TPT(nn.Linear(2, 2), ["a", "b"], selection=0)


def test_tpt_records_count_the_prompt_steps_and_the_alignment_apart(tmp_path, monkeypatch):
    """The records' ``step`` of TPT is its prompt-tuning steps ``tpt.tts`` (the paper's ``tta_steps``);
    seed 002's visual alignment steps go to ``extra.align_steps`` (``step`` was ``align_steps + tts``: 3
    here, read as three TPT steps).  Zero-shot CLIP predicts the batch as it is: no alignment runs, so none
    is recorded (it recorded ``step`` = ``align_steps`` before).  An untrained tiny CLIP: only the records
    are checked."""
    from tttlab.memo_tpt import tiny_clip as T
    from tttlab.memo_tpt.models import build_clip

    def untrained(profile, cache_dir, seed, progress, *a, **kw):
        return build_clip("tiny-mnist", config=T.clip_config(T.PROFILES[profile])), Path("untrained.pt")

    monkeypatch.setattr(T, "load_or_train_clip", untrained)
    bench = {"corruptions": ["fog"], "num_examples": 2}
    for method, step, extra in (("memo_tpt.tpt", 1, {"align_steps": 2}), ("memo_tpt.clip_zeroshot", 0, {})):
        df = load_records(run(method=method, profile="smoke", out_dir=str(tmp_path / method), benchmark=bench,
                              tpt={"align_steps": 2}, progress=False))  # fmt: skip
        assert df.step.tolist() == [step] * len(df), method
        assert all(e.get("align_steps") == extra.get("align_steps") for e in df.extra), method
