"""``--help`` as a user runs it: Hydra's page names the command."""

import sys

import pytest

from tttlab.core.testing import run_faked_command_into_a_closed_pipe, run_into_a_closed_pipe


@pytest.mark.parametrize(
    ("module", "command"),
    [
        ("tttlab.torch_ttt.train", "tttlab-torch-ttt-train"),
        ("tttlab.torch_ttt.evaluate", "tttlab-torch-ttt-evaluate"),
    ],
)
def test_help_names_the_command(module, command, monkeypatch, capsys):
    """The first line of ``--help`` said "evaluate is powered by Hydra." / "train is powered by Hydra." (the
    Python file's name); it names the console script, as ttt_mae's and memo_tpt's commands do, and the page
    still lists the experiments and engines.  In process, as ``python -m <module> --help`` (its ``argv[0]`` is
    the file; the console script's start-up is the closed-pipe tests' below); the conftest puts back the
    HydraConfig and logging that Hydra's help leaves."""
    import importlib

    main = importlib.import_module(module).main
    monkeypatch.setattr(sys, "argv", [sys.modules[module].__file__, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.splitlines()[0] == f"{command} is powered by Hydra.", out[:300]
    assert "experiment: " in out and "mnist_tutorial" in out


# One Hydra command per environment runs end to end here: the hook is core's (check_hydra_command, tested in
# core's test_cli) and tests/test_install.py checks that every @hydra.main entry point calls it.
@pytest.mark.parametrize("module", ["tttlab.torch_ttt.train"])
def test_help_into_a_closed_pipe_ends_quietly(module):
    """``tttlab-torch-ttt-train --help | head -3`` ended in a BrokenPipeError traceback from Hydra's print; it
    ends with no output on stderr and exit status 141 (128 + SIGPIPE)."""
    res = run_into_a_closed_pipe("-m", module, "--help")
    assert (res.returncode, res.stderr) == (141, ""), res.stderr[-2000:]


def test_evaluate_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """The evaluate's result table into a closed pipe (``tttlab-torch-ttt-evaluate ... | head -3``; ``run`` is faked)
    ended in Hydra's error report with a BrokenPipeError and exit status 1: it was printed outside user_errors."""
    records = tmp_path / "records.jsonl"
    records.touch()
    res = run_faked_command_into_a_closed_pipe(
        "tttlab-torch-ttt-evaluate",
        "tttlab.torch_ttt.evaluate",
        "run",
        repr(str(records)),
        "main()",
        "hydra.run.dir=" + str(tmp_path / "run"),
    )
    assert (res.returncode, res.stderr) == (141, ""), res.stderr[-2000:]


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("engine=tent", "expected train.engine=tent"),
        ("+engine=tent", "expected train.engine=tent"),
        ("+engine.kwargs.d_margin=0.4", "expected +train.engine_kwargs.d_margin=0.4"),
        ("engine.optimization.lr=0.1", "expected train.engine=<name> and train.engine_kwargs.<key>=<value>"),
    ],
)
def test_train_refuses_the_evaluate_commands_engine_keys_with_the_training_ones(
    monkeypatch, capsys, arg, expected
):
    """``tttlab-torch-ttt-train engine=tent`` (its ``--help`` lists the shared ``engine`` group) got Hydra's
    "No match in the defaults list. To append to your default list use +engine=tent", and with the '+'
    "Key 'engine' not in 'TrainConfig'": now one line naming training's key, exit 2, before Hydra starts."""
    from tttlab.torch_ttt import train

    monkeypatch.setattr(sys, "argv", ["tttlab-torch-ttt-train", "+experiment=smoke", arg])
    with pytest.raises(SystemExit) as exc:
        train.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tttlab-torch-ttt-train: error: ConfigError: {arg}: ") and err.count("\n") == 1
    assert err.rstrip().endswith(expected)
    train.check_no_evaluate_engine_keys(["train.engine=tent", "+experiment=smoke", "train.engine_kwargs={}"])


MODEL_NAMES = "['mnist_bn', 'mobilenet_v2', 'tutorial_net', 'wrn28_10']"


#: the top-level keys of tttlab-torch-ttt-evaluate's config, as the unknown-key line lists them
EVAL_KEYS = (
    "seed, out_dir, device, data, benchmark, logging, experiment_name, amp, compile, stream, train_run, "
    "train_experiment, train_overrides, train_engine, cache_dir, engine, noisy, calibration, model_checkpoint, "
    "engine_defaults"
)


@pytest.mark.parametrize(
    ("command", "arg", "expected"),
    [
        ("train", "model=resnet", f"model=resnet: model is a section; expected model.name=resnet (one of "
         f"{MODEL_NAMES})"),
        (
            "evaluate",
            "model=mnist_bn",
            "model=mnist_bn: tttlab-torch-ttt-evaluate has no 'model' key; the model is train_run's, the one "
            "train_experiment trains (one of ['mnist_bn', 'mnist_tutorial', 'smoke']), or a pretrained one: "
            f"model_checkpoint.name=<one of {MODEL_NAMES}>",
        ),
        ("train", "train.lrr=0.1", "unknown config key 'train.lrr'; did you mean 'train.lr'? (known keys in "
         "'train': engine, engine_kwargs, ssl_weight, epochs, lr, optimizer, shuffle, checkpoint_every, resume, "
         "stop_after_steps)"),
        ("train", "foo=1", "unknown config key 'foo' (known keys: seed, out_dir, device, data, benchmark, "
         "logging, experiment_name, amp, compile, model, train, eval)"),
        # a bare leaf name (the key is logging.progress), a misspelt node on the way: the key meant
        ("evaluate", "progress=false", "unknown config key 'progress'; did you mean 'logging.progress'? (known "
         f"keys: {EVAL_KEYS})"),
        ("evaluate", "engin.name=bn", f"unknown config key 'engin.name'; did you mean 'engine.name'? (known keys: "
         f"{EVAL_KEYS})"),
        # a list key given a scalar: Hydra's "int is not a ListConfig, list or tuple"
        ("evaluate", "benchmark.severities=7", "benchmark.severities=7: benchmark.severities is a list (now [5]); "
         "give a list, e.g. benchmark.severities=[7]"),
        # a free-form node (an engine's kwargs): Hydra's '+' is the remedy there, and its message stays
        ("evaluate", "engine.kwargs.foo=1", "Could not override 'engine.kwargs.foo'. To append to your config "
         "use +engine.kwargs.foo=1 (Key 'foo' is not in struct)"),
        # an optimization parameter: misspelt, a did-you-mean (was Hydra's '+', then OptimizationParameters'
        # refusal); one the engine YAML leaves out keeps Hydra's '+'
        ("evaluate", "engine.optimization.num_stepz=2", "unknown config key 'engine.optimization.num_stepz'; did "
         "you mean 'engine.optimization.num_steps'? (known keys in 'engine.optimization': num_steps, lr, "
         "optimizer_name, reset, momentum, nesterov, weight_decay, betas, copy_model)"),
        ("evaluate", "engine.optimization.momentum=0.5", "Could not override 'engine.optimization.momentum'. To "
         "append to your config use +engine.optimization.momentum=0.5 (Key 'momentum' is not in struct)"),
    ],
)  # fmt: skip
def test_a_key_the_command_lacks_names_the_key_to_use(monkeypatch, capsys, command, arg, expected):
    """``tttlab-torch-ttt-train model=resnet`` got Hydra's "str is not a subclass of ModelConfig" (the key is
    model.name), and ``tttlab-torch-ttt-evaluate model=mnist_bn`` Hydra's "To append to your config use
    +model=mnist_bn", which is refused next (evaluate has no model key).  Likewise any key a schema node
    lacks (``train.lrr=0.1``: "use +train.lrr=0.1", refused next by the command's validation): now core's
    check names it unknown, with a close key and the node's keys.  One line each, exit 2, before Hydra
    starts."""
    import importlib

    module = importlib.import_module(f"tttlab.torch_ttt.{command}")
    monkeypatch.setattr(sys, "argv", [f"tttlab-torch-ttt-{command}", arg])
    with pytest.raises(SystemExit) as exc:
        module.main()
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"tttlab-torch-ttt-{command}: error: ConfigError: {expected}\n"


def test_train_help_and_config_check_import_no_torch(monkeypatch, capsys):
    """``tttlab-torch-ttt-train --help`` and ``--cfg job`` run with torch unimportable: ``train`` imported
    torch, the models, engines and precision helpers at its top, and the package's ``__init__`` the engines'
    base module (1.3-2.5 s of each start-up); they load where a run uses them.  The package's names and the
    module's old names (``T.build_model``) still resolve, to the objects of their modules."""
    import importlib

    from tttlab.core.testing import imported_afresh

    with imported_afresh(["tttlab.torch_ttt", "tttlab.core.torch"], blocked=["torch"]):
        main = importlib.import_module("tttlab.torch_ttt.train").main
        monkeypatch.setattr(sys, "argv", ["tttlab-torch-ttt-train", "--help"])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 0
        argv = [
            "--cfg",
            "job",
            "+experiment=smoke",
            "seed=7",
            "hydra/job_logging=none",
            "hydra/hydra_logging=none",
        ]
        monkeypatch.setattr(sys, "argv", ["tttlab-torch-ttt-train", *argv])
        main()
        with pytest.raises(ImportError, match="torch"):
            importlib.import_module("tttlab.torch_ttt").get_engine("tent")  # an engine's module: torch
    out = capsys.readouterr().out
    assert "tttlab-torch-ttt-train is powered by Hydra" in out and "\nseed: 7\n" in out, out[-2000:]
    import tttlab.torch_ttt as package
    from tttlab.torch_ttt import train as T
    from tttlab.torch_ttt.engine import base_engine
    from tttlab.torch_ttt.models import build_model

    assert T.build_model is build_model and package.BaseEngine is base_engine.BaseEngine
    assert sorted(set(dir(package))) == dir(package) and set(package.__all__) <= set(dir(package))
