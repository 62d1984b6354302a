"""The command-line scripts as a user meets them: upstream's flags, clean errors, epoch numbering."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tttlab.core.errors import ConfigError, InvalidInputError, TTTLabError
from tttlab.core.testing import run_faked_command_into_a_closed_pipe, run_into_a_closed_pipe
from tttlab.mttt_jax import train as T
from tttlab.mttt_jax.cli import translate_upstream_args, user_errors

#: in-process Hydra apps must not install log handlers on pytest's captured streams
NO_HYDRA_LOGGING = ["hydra/job_logging=none", "hydra/hydra_logging=none"]


@pytest.fixture
def no_log_setup(monkeypatch):
    import logging

    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)


@pytest.mark.parametrize(
    "argv, expected",
    [
        # upstream README, Quick Start
        (["--config", "config_patch.py", "--config.inner.TTT.inner_itr=1", "--config.inner.TTT.inner_lr=(1.,)",
          "--config.input.accum_time=1", "--workdir", "./exp/patch_MTTT_MLP"],
         ["experiment=paper_patch", "inner.TTT.inner_itr=1", "inner.TTT.inner_lr=[1.]", "input.accum_time=1",
          "out_dir=./exp/patch_MTTT_MLP"]),
        # pixels, SGD T=4, '=' forms, a path to the config file
        (["--config=../mttt/config_pixel.py", "--config.inner.TTT.inner_itr=4",
          "--config.inner.TTT.inner_lr=(1.,1.,1.,1.)", "--config.inner.TTT.SGD=True", "--workdir=./exp/p"],
         ["experiment=paper_pixel", "inner.TTT.inner_itr=4", "inner.TTT.inner_lr=[1.,1.,1.,1.]",
          "inner.TTT.SGD=true", "out_dir=./exp/p"]),
        # MTTT-Linear flags, value as the next argument, Hydra overrides mixed in
        (["--config", "config_patch.py", "--config.inner.TTT.decoder_LN", "False", "tfds_path=/d",
          "--config.model=small"],
         ["experiment=paper_patch", "inner.TTT.decoder_LN=false", "tfds_path=/d", "model=small"]),
    ],
)  # fmt: skip
def test_upstream_flags_translate_to_hydra_overrides(argv, expected):
    out, translated = translate_upstream_args(argv)
    assert translated and out == expected


def test_hydra_overrides_pass_through_untouched():
    argv = ["experiment=mnist_patch", "inner.TTT.inner_itr=4", "inner.TTT.inner_lr=[1.,1.,1.,1.]"]
    assert translate_upstream_args(argv) == (argv, False)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--config", "config_foo.py"], "config_foo.py.*config_patch.py"),
        (["--config", "config_patch.py:variant=ti"], "takes no ':variant=ti' argument"),
        (["--workdir"], "--workdir needs a value"),
    ],
)
def test_bad_upstream_flags_are_tttlab_errors(argv, match):
    with pytest.raises(TTTLabError, match=match):
        translate_upstream_args(argv)


def test_translated_command_reaches_train_with_the_right_config(tmp_path, monkeypatch, capsys, no_log_setup):
    """``tttlab-mttt-train --config config_patch.py ... --workdir X`` runs train with the paper config."""
    seen = {}
    monkeypatch.setattr(T, "train", lambda cfg: seen.update(T.to_dict(cfg)) or {"val/prec@1": []})
    work = tmp_path / "exp" / "patch_MTTT_linear"
    monkeypatch.setattr(sys, "argv", [
        "tttlab-mttt-train", "--config", "config_patch.py", "--config.inner.TTT.inner_encoder=mlp_1",
        "--config.inner.TTT.inner_encoder_init=zero", "--config.inner.TTT.inner_encoder_bias=False",
        "--config.inner.TTT.decoder_LN=False", "--config.inner.TTT.train_init=False",
        "--config.inner.TTT.inner_lr=(1.,)", "--workdir", str(work), *NO_HYDRA_LOGGING,
    ])  # fmt: skip
    T.main()
    assert seen["experiment_name"] == "paper_patch" and seen["out_dir"] == str(work)
    assert seen["inner"]["TTT"] == dict(inner_encoder="mlp_1", inner_itr=1, inner_lr=[1.0], train_init=False,
                                        inner_encoder_init="zero", inner_encoder_bias=False, decoder_LN=False,
                                        SGD=False)  # fmt: skip
    assert "upstream flags translated to: tttlab-mttt-train experiment=paper_patch" in capsys.readouterr().err


def test_user_error_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys, no_log_setup):
    def bad(cfg):
        raise InvalidInputError("/YOUR/TFDS/PATH does not exist; expected a TFDS data_dir")

    monkeypatch.setattr(T, "train", bad)
    monkeypatch.setattr(
        sys, "argv", ["tttlab-mttt-train", "experiment=smoke", f"out_dir={tmp_path / 'r'}", *NO_HYDRA_LOGGING]
    )
    with pytest.raises(SystemExit) as exc:
        T.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert (
        "tttlab-mttt-train: error: InvalidInputError: /YOUR/TFDS/PATH does not exist" in err
        and "Traceback" not in err
    )


@pytest.mark.parametrize(
    "override, message",
    [
        # bad-input audit: these trained nothing or on NaN (exit 0), or ended in a ZeroDivisionError, a JAX,
        # numpy or re traceback
        ("total_epochs=0", "total_epochs=0; expected an integer >= 1"),
        ("steps_per_epoch=0", "steps_per_epoch=0; expected null or an integer >= 1"),
        ("lr=nan", "lr=nan; expected a finite number >= 0"),
        ("inner.TTT.inner_lr=[nan]", "inner.TTT.inner_lr=[nan]; expected finite learning rates"),
        ("inner.TTT.inner_lr=[1.,x]", "inner.TTT.inner_lr=[1.0, 'x']; expected a learning rate"),
        ("input.batch_size=0", "input.batch_size=0; expected an integer >= 1"),
        ("input.accum_time=0", "input.accum_time=0; expected an integer >= 1"),
        ("image_size=0", "image_size=0; expected an integer >= 1"),
        ("dtype=float64x", "dtype='float64x'; expected one of"),
        ("seed=-1", "seed=-1; expected an integer >= 0"),
        ("wd_mults=[['(',1.0]]", "wd_mults pattern '(' is not a regular expression"),
        # a key the config lacks, added with Hydra's '+' (its own advice for 'inner.TTT.inner_iter=4'): trained
        # with the default T=1 and no word; optax's keys stay free (scale_by_adam's own keyword arguments)
        (
            "+inner.TTT.inner_iter=4",
            "unknown config key 'inner.TTT.inner_iter'; did you mean 'inner.TTT.inner_itr'? (known keys in "
            "'inner.TTT': inner_encoder, inner_itr, inner_lr, train_init, ",
        ),
        ("+foo=1", "unknown config key 'foo' (known keys: experiment_name, name, out_dir, "),
        # a bare leaf name: the key meant is logging.progress (it was no did-you-mean)
        ("+progress=false", "unknown config key 'progress'; did you mean 'logging.progress'? (known keys: "),
        (
            "+optax.b2=0.95 +input.augment.rand=1",
            "unknown config key 'input.augment.rand'; did you mean 'input.augment.randaug'? (known keys in",
        ),
    ],
)
def test_bad_values_are_one_line_errors_before_any_work(tmp_path, monkeypatch, capsys, no_log_setup, override,
                                                        message):  # fmt: skip
    out = tmp_path / "r"
    monkeypatch.setattr(sys, "argv", ["tttlab-mttt-train", "experiment=smoke", f"out_dir={out}",
                                      *override.split(), *NO_HYDRA_LOGGING])  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        T.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"tttlab-mttt-train: error: MTTTConfigError: {message}" in err, err
    assert not (out / "records.jsonl").exists()


@pytest.mark.parametrize(
    "command, arg, line",
    [
        # plain YAML: Hydra said "Key 'foo' is not in struct ... use +foo=1", which check_known_keys refused next
        ("tttlab-mttt-train", "foo=1", "unknown config key 'foo' (known keys: experiment_name, name, out_dir, "),
        ("tttlab-mttt-train", "progress=false", "unknown config key 'progress'; did you mean 'logging.progress'? "
         "(known keys: experiment_name, "),
        ("tttlab-mttt-evaluate", "logging.level=DEBUG", "unknown config key 'logging.level' (known keys in "
         "'logging': progress)"),
        # optax's keys (scale_by_adam's arguments) and evaluate's keys evaluate.yaml leaves out: '+' adds them
        ("tttlab-mttt-train", "optax.b2=0.95", "Could not override 'optax.b2'. To append to your config use "
         "+optax.b2=0.95 (Key 'b2' is not in struct)"),
        ("tttlab-mttt-evaluate", "seed=1", "Could not override 'seed'. To append to your config use +seed=1 (Key "
         "'seed' is not in struct)"),
    ],
)  # fmt: skip
def test_a_key_the_config_lacks_is_named_before_hydra_unless_plus_adds_it(monkeypatch, capsys, no_log_setup,
                                                                          command, arg, line):  # fmt: skip
    """The configs are plain YAML, so Hydra called any missing key free and advised '+foo=1', which the
    command then refused (check_known_keys, evaluate's run): now core names the key as unknown, with the key
    meant, before Hydra starts; where '+' is right (optax's keyword arguments, +seed=1 of evaluate) Hydra's
    advice stays."""
    from tttlab.mttt_jax import evaluate as E

    main = T.main if command.endswith("train") else E.main
    monkeypatch.setattr(sys, "argv", [command, arg, "run_dir=runs/none" if "evaluate" in command else "seed=0",
                                      *NO_HYDRA_LOGGING])  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert (
        exc.value.code == 2
        and err.startswith(f"{command}: error: ConfigError: {line}")
        and err.count("\n") == 1
    )


def test_plot_inner_epochs_are_numbered_as_in_the_log(monkeypatch, capsys):
    from tttlab.mttt_jax import plots

    assert plots.epoch_indices(None) is None and plots.epoch_indices(["all"]) == "all"
    assert plots.epoch_indices(["1", "2", "-1"]) == [0, 1, -1], "epoch 1 is the first (log, panel titles)"
    for bad in (["0"], ["x"]):
        with pytest.raises(InvalidInputError, match="--epochs"):
            plots.epoch_indices(bad)
    with pytest.raises(SystemExit) as exc:
        plots.plot_inner_main(["runs/does/not/exist", "--epochs", "1"])
    assert exc.value.code == 2 and "does/not/exist" in capsys.readouterr().err


def test_plot_multi_draws_upstreams_validation_error_by_default(tmp_path, monkeypatch):
    """``tttlab-mttt-plot-multi RUN`` (upstream: ``python plot_multi.py``) draws the validation error
    1 - prec@1 per epoch, as upstream's plot; ``--metric`` still picks another statistic."""
    from tttlab.core.plots import _series
    from tttlab.mttt_jax import plots

    seen = []
    monkeypatch.setattr(plots, "plot_learning_curves", lambda runs, metric, **kw: seen.append(metric))
    plots.plot_multi_main([str(tmp_path), "--out", str(tmp_path / "c")])
    plots.plot_multi_main([str(tmp_path), "--metric", "val/loss", "--out", str(tmp_path / "d")])
    assert seen == ["val/error", "val/loss"]
    assert list(_series("r", {"val/prec@1": [0.25, 0.75]}, "val/error")) == [0.75, 0.25]


def test_evaluate_command_shows_progress_by_default():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="tttlab.mttt_jax.evaluate_conf", version_base=None):
        cfg = compose("evaluate", overrides=["run_dir=x"])
    assert cfg.logging.progress is True


def test_user_errors_passes_other_exceptions_through():
    with pytest.raises(ZeroDivisionError), user_errors("x"):
        raise ZeroDivisionError


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, trained_run, caplog):
    """``inner.TTT.inner_itr=1`` into the out_dir of a T=2 run: same parameter shapes, so without the check
    the finished T=2 run was silently "resumed" and its stats reported as T=1's.  (A copy of the session's
    shared run, conftest.py: TINY, 2 epochs, T=2 SGD.)"""
    import shutil

    from tttlab.core.errors import CheckpointError

    from .conftest import SHARED_RUN
    from .test_train import TINY, compose

    shutil.copytree(trained_run[0], tmp_path / "run")
    first = trained_run[1]
    out = f"out_dir={tmp_path / 'run'}"
    config_before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"inner\.TTT\.inner_itr: 2 -> 1.*resume=false"):
        T.train(compose([*TINY, *SHARED_RUN, out, "inner.TTT.inner_itr=1"]))
    assert (tmp_path / "run" / "config.yaml").read_text() == config_before, "refused before rewriting it"
    # keys that do not change the computation resume (here: the finished run, nothing left to do)
    again = T.train(compose([*TINY, *SHARED_RUN, out, "checkpoint_every_steps=2", "logging.progress=true"]))
    assert again == first
    # resume=false (and max_steps) change no number: the same run, its records re-tagged; starting over, it
    # replaces them instead of appending a second copy (epoch 1 was recorded twice under one config_hash)
    import warnings

    import yaml

    from tttlab.core.records import config_hash, read_jsonl

    def start_overs():  # each start over says in one warning what it removed (core RunDir(start_over=...)):
        # it warned once for the checkpoints, once for the records, and core's UserWarning 'different config
        # ... overwriting it' came with them for another config's folder
        return [r.getMessage() for r in caplog.records if "resume=false" in r.getMessage()]

    run_dir = tmp_path / "run"
    hash_before = config_hash(yaml.safe_load((run_dir / "config.yaml").read_text()))
    with warnings.catch_warnings(), caplog.at_level("WARNING"):
        warnings.filterwarnings("error", message=".*different config.*")
        T.train(compose([*TINY, *SHARED_RUN, out, "resume=false", "max_steps=2"]))
    hash_after = config_hash(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert start_overs() == [
        f"{run_dir}: starting over (resume=false): removing the previous run's 2 checkpoints (steps 3, 4) in "
        f"checkpoints/ and the 8 records in the folder (8 of config_hash {hash_after})"  # re-tagged: same run
        "; resume=false starts over on every run: leave it out of the next command to resume"
    ], caplog.text
    assert hash_before != hash_after
    # a max_steps stop says so (it ended quietly, and the command printed epoch 1's number as "final")
    assert "stopped at step 2 of 4 (max_steps=2)" in caplog.text, caplog.text
    assert T._result_label(1, 2).startswith("val/prec@1 after epoch 1 of 2") and T._result_label(2, 2) == (
        "final val/prec@1"
    )
    records = read_jsonl(tmp_path / "run" / "records.jsonl")
    assert sorted((r["metric"], r["step"]) for r in records) == sorted(
        (m, 2) for m in ("val/prec@1", "val/loss", "train/loss", "epoch_time_s")
    ), records
    assert {r["config_hash"] for r in records} == {
        config_hash(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()))
    }
    caplog.clear()
    with warnings.catch_warnings(), caplog.at_level("WARNING"):
        warnings.filterwarnings("error", message=".*different config.*")
        fresh = T.train(
            compose([*TINY, *SHARED_RUN, out, "inner.TTT.inner_itr=1", "resume=false", "total_epochs=1"])
        )
    t1_hash = config_hash(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert start_overs() == [
        f"{run_dir}: starting over (resume=false): removing the previous run's checkpoint (step 2) in "
        f"checkpoints/ and the 4 records in the folder (4 of config_hash {hash_after}), and replacing the "
        f"folder's config.yaml (hash {hash_after}) with this run's (hash {t1_hash}), which differs in "
        "inner.TTT.inner_itr: 2 -> 1; total_epochs: 2 -> 1"
        "; resume=false starts over on every run: leave it out of the next command to resume"
    ], caplog.text
    assert len(fresh["val/inner_loss"][0][0]) == 2, "T=1 reports 2 inner losses per layer"
    assert fresh["step"] == [2], "started over (the T=2 run's checkpoints removed)"
    # starting over removes the records of every config in the folder, with one warning naming them (the
    # T=2 run's 4 records stayed next to T=1's under their own hash: two runs' epochs in one folder)
    records = read_jsonl(tmp_path / "run" / "records.jsonl")
    assert {r["config_hash"] for r in records} == {t1_hash} and len(records) == 4, records
    # without a checkpoint (deleted by hand), another config's records are refused by default, as with one
    # (it trained next to them with a 'different config' warning), nothing written; the message names ways out
    from tttlab.core.errors import RunDirConflictError

    shutil.rmtree(tmp_path / "run" / "checkpoints")
    before = {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir() if f.is_file()}
    with pytest.raises(RunDirConflictError) as refused:
        T.train(compose([*TINY, *SHARED_RUN, out, "total_epochs=1"]))
    message = str(refused.value)
    assert "inner.TTT.inner_itr: 1 -> 2" in message and f"out_dir={tmp_path / 'run'}_2" in message, message
    assert "set resume=false to start over there (it removes the records of every config" in message, message
    assert {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir() if f.is_file()} == before


def test_tfds_path_defaults_to_tfds_data_dir(monkeypatch):
    """Upstream (and tfds) read ImageNet from $TFDS_DATA_DIR when no path is given."""
    from .test_train import compose

    monkeypatch.setenv("TFDS_DATA_DIR", "/data/tfds")
    assert compose(["experiment=paper_patch"]).tfds_path == "/data/tfds"
    assert compose(["experiment=paper_patch", "tfds_path=/other"]).tfds_path == "/other"
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert compose(["experiment=paper_patch"]).tfds_path == ""


def test_evaluate_prints_a_table_per_domain_then_the_records_path(
    tmp_path, monkeypatch, capsys, no_log_setup
):
    """``tttlab-mttt-evaluate`` printed only the records path, the numbers being log lines of fractions with
    the domains sorted by name (clean among them); it prints core's table now, as the other packages'
    evaluate commands do: accuracy % and ms/image per domain, clean first, the mean over corruptions last,
    then the path.  The records are write_records' own, in the order evaluate gives (the benchmark's: clean,
    then the corruptions as listed, snow before fog here); they were sorted by name."""
    from tttlab.core.benchmark import Domain
    from tttlab.core.records import RunDir
    from tttlab.mttt_jax import evaluate as E

    per_domain = {
        Domain(None, None): {"correct": 4, "n": 4, "secs": 0.004, "inner": [0.25]},
        Domain("snow", 5): {"correct": 3, "n": 4, "secs": 0.002, "inner": [0.5]},
        Domain("fog", 5): {"correct": 1, "n": 4, "secs": 0.006, "inner": [1.0]},
        Domain("frost", 5): {"correct": 0, "n": 0, "secs": 0.0, "inner": []},  # no images: no record
    }
    rd = RunDir(tmp_path / "eval", {"x": 1})
    with rd.writer(method="mttt_jax.mttt_mlp", dataset="mnist_c", setting="reset_each_shift") as w:
        E.write_records(w, per_domain, ttt=True, train_run="runs/x")
    seen = {}
    monkeypatch.setattr(E, "run", lambda cfg: seen.setdefault("run_dir", cfg.run_dir) and rd.records_path)
    monkeypatch.setattr(sys, "argv", ["tttlab-mttt-evaluate", f"run_dir={tmp_path}", *NO_HYDRA_LOGGING])
    E.main()
    assert seen["run_dir"] == str(tmp_path)
    assert capsys.readouterr().out.splitlines() == [
        "mttt_jax.mttt_mlp on mnist_c (reset_each_shift): accuracy %, ms/image",
        "  clean                    100.0     1.000",
        "  snow-5                    75.0     0.500",
        "  fog-5                     25.0     1.500",
        "  mean                      50.0",
        str(rd.records_path),
    ]


@pytest.mark.parametrize("command", ["tttlab-mttt-train", "tttlab-mttt-evaluate"])
def test_help_names_the_command_and_offers_only_its_own_config_groups(
    command, monkeypatch, capsys, no_log_setup
):
    """``--help`` began "train is powered by Hydra." / "evaluate is powered by Hydra." (the Python file's
    name); it names the console script now.  train's page lists the experiments and the config; evaluate's
    listed the same experiments (its evaluate.yaml lay in the training's config folder, whose experiment group
    Hydra offers), which it does not take: its config has a folder of its own and its page no groups section.
    (In process: the console scripts' start-up is tested by the closed-pipe tests below.)"""
    from hydra.core.hydra_config import HydraConfig

    from tttlab.mttt_jax import evaluate as E

    main = T.main if command.endswith("train") else E.main
    monkeypatch.setattr(sys, "argv", [command, "--help", *NO_HYDRA_LOGGING])
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # check_hydra_command guards it: put back after
    # Hydra's help sets its HydraConfig (no run directory in it): put back after, for the tests' user_errors
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.splitlines()[0] == f"{command} is powered by Hydra.", out[:300]
    groups = "== Configuration groups ==" in out, "experiment: mnist_patch, mnist_pixel, paper_patch" in out
    assert groups == ((True, True) if command.endswith("train") else (False, False)), out[:600]
    assert ("run_dir: ???" if command.endswith("evaluate") else "experiment_name: ") in out


def test_evaluate_composes_the_training_config_also_inside_its_running_hydra_app():
    """The compare path of evaluate (``method`` + ``profile``) composes the profile's training config, also
    inside the running ``tttlab-mttt-evaluate`` (``run_dir=null +method=... +profile=...``), whose Hydra
    knows evaluate's config folder only: the same config (the cached model's key) as outside it, and the
    app's Hydra is left as it was."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from tttlab.core.records import config_hash
    from tttlab.mttt_jax import evaluate as E

    overrides = [*E.PROFILES["smoke"], *E.MIXER_FLAGS["linear_attention"]]
    outside = E.compose_train(overrides)
    assert not GlobalHydra.instance().is_initialized()
    with initialize_config_module(config_module="tttlab.mttt_jax.evaluate_conf", version_base=None):
        app = GlobalHydra.instance().hydra
        inside = E.compose_train(overrides)
        assert GlobalHydra.instance().hydra is app
        assert compose("evaluate", overrides=["run_dir=x"]).run_dir == "x"
    assert inside == outside and outside["inner"]["layer_type"] == "linear_attention"
    assert config_hash(inside) == config_hash(outside)


def test_the_help_setting_leaves_the_configs_and_their_hashes_alone():
    """``hydra.help.app_name`` lives in the ``hydra`` node, which the composed config (what train and evaluate
    get, and hash into run identities and cached-model keys) does not hold: pinned hashes of the smoke and
    mnist_patch training configs and of the evaluate config, as composed before the setting (and before
    evaluate.yaml moved into a config folder of its own, with its own help template)."""
    from hydra import compose, initialize_config_module

    from tttlab.core.records import config_hash

    with initialize_config_module(config_module="tttlab.mttt_jax.conf", version_base=None):
        hashes = [
            config_hash(T.to_dict(compose("config", overrides=["experiment=smoke"]))),
            config_hash(T.to_dict(compose("config", overrides=["experiment=mnist_patch"]))),
        ]
        assert "hydra" not in compose("config", overrides=["experiment=smoke"])
    with initialize_config_module(config_module="tttlab.mttt_jax.evaluate_conf", version_base=None):
        hashes.append(config_hash(T.to_dict(compose("evaluate", overrides=["run_dir=x"]))))
    assert hashes == PINNED_HASHES, hashes


#: the hashes before the setting (a change of the configs themselves changes them: re-pin then, knowingly)
PINNED_HASHES = ["9fb7fc892d38", "e73e8349e643", "cd62d9570631"]


# One Hydra command in the torch-free environment runs end to end here: the hook is core's (check_hydra_command, tested in
# core's test_cli) and tests/test_install.py checks that every @hydra.main entry point calls it.
@pytest.mark.parametrize("module", ["tttlab.mttt_jax.train"])
def test_help_into_a_closed_pipe_ends_quietly(module):
    """``tttlab-mttt-train --help | head -3`` ended in a BrokenPipeError traceback from Hydra's print; it ends
    with no output on stderr and exit status 141 (128 + SIGPIPE)."""
    res = run_into_a_closed_pipe("-m", module, "--help")
    assert (res.returncode, res.stderr) == (141, ""), res.stderr[-2000:]


def test_evaluate_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """The evaluate's result table into a closed pipe (``tttlab-mttt-evaluate ... | head -3``; ``run`` is faked) ended
    in Hydra's error report with a BrokenPipeError and exit status 1: it was printed outside user_errors."""
    records = tmp_path / "records.jsonl"
    records.touch()
    res = run_faked_command_into_a_closed_pipe(
        "tttlab-mttt-evaluate",
        "tttlab.mttt_jax.evaluate",
        "run",
        repr(str(records)),
        "main()",
        "run_dir=" + str(tmp_path / "run"),
    )
    assert (res.returncode, res.stderr) == (141, ""), res.stderr[-2000:]


def test_train_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """train's final accuracy line into a closed pipe (``train`` is faked) ended in Hydra's error report with a
    BrokenPipeError and exit status 1: it was printed outside user_errors."""
    res = run_faked_command_into_a_closed_pipe(
        "tttlab-mttt-train",
        "tttlab.mttt_jax.train",
        "train",
        "{'val/prec@1': [0.5]}",
        "main()",
        "out_dir=" + str(tmp_path / "run"),
    )
    assert (res.returncode, res.stderr) == (141, ""), res.stderr[-2000:]


@pytest.mark.parametrize(
    "args, message",
    [
        # no run_dir: Hydra's traceback for hydra.run.dir=${run_dir}/eval (exit 1); run_dir=null: a folder None/eval
        ([], "ConfigError: run_dir is not set: evaluate a tttlab-mttt-train run with run_dir=<its folder"),
        (["run_dir=null"], "ConfigError: run_dir is not set: evaluate a tttlab-mttt-train run with run_dir=<its folder"),
        # Hydra's remedy "+experiment=smoke" then failed in run: unknown evaluate keys ['experiment']
        (["experiment=smoke"], "ConfigError: experiment=smoke: evaluate takes no experiment (a tttlab-mttt-train "
         "option); it evaluates a trained run: run_dir=<the run's folder, runs/mttt/smoke after tttlab-mttt-train "
         "experiment=smoke>"),
        (["run_dir=r", "+experiment=smoke"], "ConfigError: +experiment=smoke: evaluate takes no experiment"),
        (["run_dir=r", "lr=0.1"], "ConfigError: lr=0.1: evaluate takes no lr (a tttlab-mttt-train option)"),
        # a method of no model: its odd line (method=mttt_jax.'mttt_mpl') after Hydra made runs/mttt/eval/...
        (["+method=mttt_jax.mttt_mpl"], "ConfigError: method='mttt_jax.mttt_mpl': no such MTTT method (did you "
         "mean 'mttt_jax.mttt_mlp'?); expected +method=mttt_jax.<mixer> [+profile=smoke|quick|full], <mixer> one "
         "of mttt_mlp,"),
        (["+method=mttt_jax.mttt_mlp", "+profile=fast"], "ConfigError: profile='fast'; expected one of smoke, "
         "quick, full (+method=mttt_jax.<mixer>"),
        # Hydra's None is a string: the folder None/eval, which core's check blamed on out_dir=null
        (["run_dir=None"], "ConfigError: run_dir=None, but the command's run directory (hydra.run.dir: "
         "${mttt_eval_dir:${out_dir},"),
    ],
)  # fmt: skip
def test_evaluate_without_a_run_or_with_a_training_option_is_one_line(
    tmp_path, monkeypatch, capsys, no_log_setup, args, message
):
    """Each ends in one ``tttlab-mttt-evaluate: error:`` line naming what evaluate takes (run_dir=, or
    +method=mttt_jax.<mixer> +profile=...), exit status 2, before Hydra makes any folder."""
    from tttlab.mttt_jax import evaluate as E

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(E, "run", lambda cfg: pytest.fail("evaluate ran"))
    monkeypatch.setattr(sys, "argv", ["tttlab-mttt-evaluate", *args, *NO_HYDRA_LOGGING])
    with pytest.raises(SystemExit) as exc:
        E.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"tttlab-mttt-evaluate: error: {message}"), err
    if "run_dir=None" in args:
        assert err.endswith("would be the folder 'None/eval': on Hydra's command line None is the string 'None' "
                            "(null is null); give run_dir=<value>\n"), err  # fmt: skip
    else:
        assert "+method=mttt_jax.<mixer> [+profile=smoke|quick|full]" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, hydra_dir, out_dir",
    [
        (["run_dir=r"], "r/eval", None),  # as before: run writes into <run_dir>/eval
        (["run_dir=r", "out_dir=o"], "o", "o"),  # Hydra's log went into r/eval, the records into o
        (["+method=mttt_jax.mttt_mlp", "+profile=smoke"], "runs/mttt/eval/mttt_mlp-smoke",
         "runs/mttt/eval/mttt_mlp-smoke"),  # needed run_dir=null, then made None/eval; records in the cache
        (["run_dir=null", "+method=linear_attention"], "runs/mttt/eval/linear_attention-full",
         "runs/mttt/eval/linear_attention-full"),
    ],
)  # fmt: skip
def test_evaluate_run_directory_is_where_its_records_go(tmp_path, monkeypatch, capsys, no_log_setup, args, hydra_dir,
                                                        out_dir):  # fmt: skip
    """Hydra's run directory (its log) is the folder the records go to: out_dir, else <run_dir>/eval, else for
    +method=... without a run, runs/mttt/eval/<mixer>-<profile>, which evaluate gets as its out_dir."""
    from tttlab.mttt_jax import evaluate as E

    monkeypatch.chdir(tmp_path)
    records = tmp_path / "records.jsonl"
    records.touch()
    seen = {}
    monkeypatch.setattr(E, "run", lambda cfg: seen.update(T.to_dict(cfg)) or records)
    monkeypatch.setattr(sys, "argv", ["tttlab-mttt-evaluate", *args, *NO_HYDRA_LOGGING])
    E.main()
    assert seen["out_dir"] == out_dir and seen["run_dir"] == ("r" if "run_dir=r" in args else None)
    made = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_dir())
    assert made == sorted(str(p) for p in (Path(hydra_dir), *Path(hydra_dir).parents) if str(p) != ".")


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_display_keys_rerun_the_same_run(tmp_path, trained_run, command):
    """``logging.progress`` (and evaluate's ``progress``, which compare passes) change only what is shown:
    the same command run again with them changed is the same run.  Before, evaluate refused its own folder
    ('holds the records of another config ... differs in progress: False -> True') and a finished training
    run warned 'created with a different config' and left its records under the old config_hash."""
    from tttlab.core.testing import check_display_keys_rerun_the_same_run
    from tttlab.mttt_jax import evaluate as E

    from .test_train import TINY, compose

    out = tmp_path / command
    if command == "train":  # TINY's 1 epoch, then run again finished: it resumes and writes nothing
        base = [*TINY, "input.num_examples=8", "evals.num_examples=4", f"out_dir={out}"]
        check_display_keys_rerun_the_same_run(
            out, lambda: T.train(compose(base)), lambda: T.train(compose([*base, "logging.progress=true"]))
        )
    else:
        bench = {
            "name": "mnist_c",
            "corruptions": ["fog"],
            "severities": [5],
            "batch_size": 4,
            "num_examples": 4,
        }
        c = {"run_dir": str(trained_run[0]), "out_dir": str(out), "benchmark": bench}
        quiet = {**c, "progress": False, "logging": {"progress": False}}
        records = check_display_keys_rerun_the_same_run(
            out,
            lambda: E.run(quiet),
            lambda: E.run({**quiet, "progress": True, "logging": {"progress": True}}),
        )
        assert {r["corruption"] for r in records if r["metric"] == "accuracy"} == {"fog", "mean"}


def test_a_run_dir_that_is_or_lies_below_a_file_says_evaluate_reads_an_existing_run(
    tmp_path, monkeypatch, capsys, no_log_setup
):
    """run_dir is the trained run evaluate reads: a file there ended "expected a directory (or a path that does
    not exist yet)", an output folder's wording (core's, which out_dir keeps)."""
    from tttlab.mttt_jax import evaluate as E

    (tmp_path / "f").write_text("x")
    monkeypatch.setattr(E, "run", lambda cfg: pytest.fail("evaluate ran"))
    for arg, where in ((f"run_dir={tmp_path / 'f' / 'run'}", f"lies below the file {tmp_path / 'f'}"),
                       (f"run_dir={tmp_path / 'f'}", "is a file")):  # fmt: skip
        monkeypatch.setattr(sys, "argv", ["tttlab-mttt-evaluate", arg, *NO_HYDRA_LOGGING])
        with pytest.raises(SystemExit) as exc:
            E.main()
        assert exc.value.code == 2
        assert capsys.readouterr().err == (
            f"tttlab-mttt-evaluate: error: InvalidInputError: {arg}: the path {where}; expected an existing run "
            "folder (the out_dir of a tttlab-mttt-train run, e.g. runs/mttt/smoke)\n"
        )
    # out_dir, which evaluate writes, keeps the output folder's wording
    monkeypatch.setattr(
        sys, "argv", ["tttlab-mttt-evaluate", "run_dir=r", f"out_dir={tmp_path / 'f'}", *NO_HYDRA_LOGGING]
    )
    with pytest.raises(SystemExit):
        E.main()
    assert capsys.readouterr().err.endswith(
        "is a file; expected a directory (or a path that does not exist yet)\n"
    )


def test_a_log_level_given_with_a_plus_is_refused_as_without_it(tmp_path, monkeypatch, capsys, no_log_setup):
    """No mttt_jax command has a log level (tttlab-mttt-train refuses logging.level as unknown); evaluate
    refused ``logging.level=DEBUG`` but ran with ``+logging.level=DEBUG``, ignoring it.  Both are one line now,
    before any model is read."""
    from tttlab.mttt_jax import evaluate as E

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    for arg in ("+logging.level=DEBUG", "logging.level=DEBUG"):
        monkeypatch.setattr(sys, "argv", ["tttlab-mttt-evaluate", f"run_dir={tmp_path / 'run'}", arg,
                                          *NO_HYDRA_LOGGING])  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            E.main()
        assert exc.value.code == 2
        assert capsys.readouterr().err == (
            "tttlab-mttt-evaluate: error: ConfigError: unknown config key 'logging.level' (known keys in "
            "'logging': progress)\n"
        )
        assert list((tmp_path / "cwd").iterdir()) == []
    with pytest.raises(ConfigError, match=r"^unknown config key 'logging.level'"):
        E.run({"run_dir": str(tmp_path / "run"), "logging": {"progress": False, "level": "DEBUG"}})
    with pytest.raises(ConfigError, match=r"^logging=3; expected a mapping"):  # was a TypeError
        E.run({"run_dir": str(tmp_path / "run"), "logging": 3})
