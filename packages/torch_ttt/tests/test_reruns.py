"""Running train.py again in a run directory with another config, and bad engine arguments / optimizer
names (new-user walkthrough): nothing in the directory may describe a run that did not happen, and no
number of an earlier run may be reported as this run's."""

from __future__ import annotations

import warnings

import pytest
import torch
from omegaconf import OmegaConf

from tttlab.core.errors import CheckpointError, ConfigError
from tttlab.core.records import config_hash, read_jsonl, read_stats
from tttlab.torch_ttt import evaluate as E
from tttlab.torch_ttt import train as T

#: the smoke experiment, smaller still (about a second per run)
SMALL = ["data.num_examples=128", "eval.num_examples=64", "train.checkpoint_every=100"]


def run(out, *overrides):
    return T.run(T.train_config("smoke", [f"out_dir={out}", *SMALL, *overrides]))


def values(out) -> list[tuple]:
    return [(r["metric"], r["corruption"], r["step"], r["value"]) for r in read_jsonl(out / "records.jsonl")]


def test_a_refused_resume_names_the_keys_and_leaves_config_yaml_alone(tmp_path):
    out = run(tmp_path / "r")
    before = (out / "config.yaml").read_bytes()
    with pytest.raises(CheckpointError, match=r"train\.lr: 0\.01 -> 0\.02"):
        run(out, "train.lr=0.02")
    assert (out / "config.yaml").read_bytes() == before, "config.yaml still describes the checkpoint's run"
    # a checkpoint written before checkpoints held their training config: the keys come from config.yaml
    ckpt = out / "checkpoints" / "last.ckpt"
    ck = torch.load(ckpt, weights_only=True)
    del ck["training_config"]
    torch.save(ck, ckpt)
    with pytest.raises(CheckpointError, match=r"train\.lr: 0\.01 -> 0\.02"):
        run(out, "train.lr=0.02")


def test_resume_false_replaces_the_previous_runs_records(tmp_path):
    out = run(tmp_path / "r")
    run(out, "train.lr=0.02", "train.resume=false")
    fresh = run(tmp_path / "fresh", "train.lr=0.02")
    # the old run's evaluations were kept and the new run skipped its own as "already in records.jsonl"
    assert values(out) == values(fresh)
    assert read_stats(out)["eval"] == read_stats(fresh)["eval"]


def test_another_eval_config_does_not_reuse_the_evaluations(tmp_path, caplog):
    """The same weights, another ``eval`` section: its evaluations are computed anew, next to the earlier
    ones under their own ``config_hash``.  Every record names a config file of the folder: the earlier config
    is kept as ``config-<hash>.yaml``, said in one logged warning (it was core's UserWarning 'different
    config ... overwriting it', and the earlier records named a hash no file of the folder had)."""
    out = run(tmp_path / "r")
    first = config_hash(OmegaConf.to_container(OmegaConf.load(out / "config.yaml")))
    with warnings.catch_warnings(), caplog.at_level("WARNING"):
        warnings.simplefilter("error", UserWarning)
        run(out, "eval.noise_std=1.0")
    second = config_hash(T.train_config("smoke", [f"out_dir={out}", *SMALL, "eval.noise_std=1.0"]))
    assert [r.getMessage() for r in caplog.records if r.name == "tttlab.core.records"] == [
        f"{out}: this run's config (hash {second}) "
        f"differs from the folder's config.yaml (hash {first}) in eval.noise_std: 2.0 -> 1.0; config.yaml now "
        f"holds this run's; the folder's 5 records of the earlier config keep its config_hash, and that config "
        f"is kept as config-{first}.yaml"
    ], caplog.text
    configs = {config_hash(OmegaConf.to_container(OmegaConf.load(f))) for f in out.glob("config*.yaml")}
    assert {r["config_hash"] for r in read_jsonl(out / "records.jsonl")} == configs == {first, second}
    fresh = run(tmp_path / "fresh", "eval.noise_std=1.0")
    assert read_stats(out)["eval"] == read_stats(fresh)["eval"]
    assert len(read_jsonl(out / "records.jsonl")) == 9, "both configs' evaluations, one training record"


@pytest.mark.parametrize(
    "override, needle",
    [("train.optimizer=adan", "train.optimizer='adan'"),
     ("train.engine_kwargs.featres_layer_name=fc2", "train.engine_kwargs: engine 'ttt' has no argument(s) "
                                                     "['featres_layer_name']")],
)  # fmt: skip
def test_train_bad_optimizer_or_engine_argument_writes_nothing(tmp_path, override, needle):
    with pytest.raises(ConfigError) as info:
        run(tmp_path / "r", override)
    assert needle in str(info.value)
    assert not (tmp_path / "r").exists(), (
        "the run directory was made (config.yaml, env.json) before the error"
    )


def test_evaluate_checks_engine_arguments_with_the_config():
    # was: only after training the cached model (minutes)
    with pytest.raises(ConfigError, match=r"engine\.kwargs: engine 'tent' has no argument\(s\) \['foo'\]"):
        E.eval_config({"engine": {"name": "tent", "kwargs": {"foo": 1}}})


def test_a_damaged_checkpoint_says_what_was_expected_and_how_to_recover(tmp_path):
    out = run(tmp_path / "r")
    ckpt = out / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"hello\n")  # torch's own message for this file is "101"
    with pytest.raises(CheckpointError) as info:
        T.load_checkpoint(ckpt)
    message = str(info.value)
    assert str(ckpt) in message and "expected a torch.save file written by tttlab-torch-ttt-train" in message
    assert "train.resume=false" in message
    run(out, "train.resume=false")  # which starts over
    assert T.load_checkpoint(ckpt)["done"]


def test_ctrl_c_is_one_line_and_status_130_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    """Ctrl-C during training printed a 60-line KeyboardInterrupt traceback through torch's kernels."""
    import contextlib

    out, steps = tmp_path / "r", []

    class CtrlCAtStep6:
        def update(self, n=1):
            steps.append(n)
            if len(steps) == 6:
                raise KeyboardInterrupt

    args = ["data.num_examples=320", "train.checkpoint_every=4"]
    with monkeypatch.context() as m:
        m.setattr(T, "progress_bar", lambda *a, **k: contextlib.nullcontext(CtrlCAtStep6()))
        with pytest.raises(SystemExit) as exit_info, T.user_errors("tttlab-torch-ttt-train"):
            run(out, *args)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "tttlab-torch-ttt-train: interrupted\n"
    assert T.load_checkpoint(out / "checkpoints" / "last.ckpt")["state"]["step"] == 4
    run(out, *args)
    assert values(out) == values(run(tmp_path / "fresh", *args))


@pytest.mark.parametrize(
    "override, needle",
    [("train_engine=foo", "train_engine='foo'; expected auto or one of ['source'"),
     ("train_experiment=mnsit_bn", "train_experiment='mnsit_bn' (did you mean 'mnist_bn'?); expected one of "
                                   "['mnist_bn', 'mnist_tutorial', 'smoke']"),
     ("train_experiment=photos_mobilenet_v2", "train_experiment='photos_mobilenet_v2' is an experiment of "
      "tttlab-torch-ttt-evaluate (+experiment=...), not a training one; expected one of ['mnist_bn', "
      "'mnist_tutorial', 'smoke']")],
)  # fmt: skip
def test_evaluate_names_the_training_keys_it_was_given(override, needle):
    # train_engine=foo was accepted until the model was about to be trained, then reported as
    # train.engine='foo' (a key the user had not written); a misspelt experiment did not list the others.
    # The list held evaluate's experiments too (paper_tent_cifar10c, photos_mobilenet_v2, ...), and
    # train_experiment=photos_mobilenet_v2 passed the check and ended in OmegaConf's InterpolationKeyError
    # traceback ('engine.name' not found) when the training config was composed
    with pytest.raises(ConfigError) as info:
        E.eval_config({"engine": "tent"}, [override])
    assert needle in str(info.value)


def test_a_folder_of_an_evaluate_without_a_checkpoint_is_refused_not_a_key_error(tmp_path):
    """train.py given the out_dir of a torch_ttt evaluate (its config.yaml has no train section, its records
    are the evaluation's) ended in KeyError 'train' from the no-checkpoint check; it is refused as another
    config's folder is (before any data is read), and the folder is left as it was."""
    from tttlab.core.errors import RunDirConflictError
    from tttlab.core.records import RunDir

    # an evaluate's config, in part (E.eval_config's first call takes seconds)
    evaluate = {"seed": 0, "engine": {"name": "tent"}, "train_run": None, "benchmark": {"name": "mnist_c"}}
    folder = RunDir(tmp_path / "ev", evaluate)
    with folder.writer(method="torch_ttt.tent", metric="accuracy") as w:
        w.write(value=0.5, corruption="fog", severity=5)
    before = {p.name: p.read_bytes() for p in folder.path.iterdir()}
    with pytest.raises(RunDirConflictError, match="train.resume=false"):
        run(folder.path)
    assert {p.name: p.read_bytes() for p in folder.path.iterdir()} == before


def test_without_a_checkpoint_another_training_configs_records_are_refused_not_deleted(tmp_path, caplog):
    """A finished run's checkpoint deleted, a rerun with another train.lr started over unasked and deleted
    the earlier run's records; a folder with a checkpoint of that config is refused (e2e walkthrough)."""
    from tttlab.core.errors import RunDirConflictError

    out = run(tmp_path / "r")
    (out / "checkpoints" / "last.ckpt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(RunDirConflictError, match=r"train\.lr: 0\.01 -> 0\.02.*train\.resume=false"):
        run(out, "train.lr=0.02")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    # another eval section (same weights) and train.resume=false are not refused; each start over says in
    # one warning (core RunDir(start_over=...), shared with pilimit, mttt_jax and ttt_mae) what it removed
    # (the checkpoint where there is one, a line of its own before) and the replaced config's keys, where
    # core's UserWarning 'different config ... overwriting it' came beside them
    def start_over_warnings(*overrides):
        before = read_jsonl(out / "records.jsonl")
        old_hash = config_hash(OmegaConf.to_container(OmegaConf.load(out / "config.yaml")))
        caplog.clear()
        with warnings.catch_warnings(), caplog.at_level("WARNING"):
            warnings.filterwarnings("error", message=".*different config.*")
            run(out, *overrides)
        counts = {h: sum(r["config_hash"] == h for r in before) for h in {r["config_hash"] for r in before}}
        named = ", ".join(f"{n} of config_hash {h}" for h, n in sorted(counts.items()))
        said = [r.getMessage() for r in caplog.records if "starting over" in r.getMessage()]
        return said, f"the {len(before)} records in the folder ({named}), and replacing the folder's " + (
            f"config.yaml (hash {old_hash}) with this run's (hash "
            f"{config_hash(OmegaConf.to_container(OmegaConf.load(out / 'config.yaml')))}), which differs in "
        )

    said, records = start_over_warnings("eval.noise_std=1.0")
    assert said == [f"{out}: starting over (no checkpoint): removing {records}eval.noise_std: 2.0 -> 1.0"]
    said, records = start_over_warnings("train.lr=0.02", "train.resume=false")
    assert said == [
        f"{out}: starting over (train.resume=false): removing the previous run's checkpoint "
        f"checkpoints/last.ckpt and {records}eval.noise_std: 1.0 -> 2.0; train.lr: 0.01 -> 0.02"
        "; train.resume=false starts over on every run: leave it out of the next command to resume"
    ], caplog.text
    assert {r["extra"].get("train_engine") for r in read_jsonl(out / "records.jsonl")} == {"ttt"}
    assert len({r["config_hash"] for r in read_jsonl(out / "records.jsonl")}) == 1
