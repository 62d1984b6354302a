"""The commands as a new user runs them: the README's sequence of runs, clean errors, devices, torchrun."""

from __future__ import annotations

import sys

import pytest
import torch

from tttlab.core.errors import CheckpointError, ConfigError, InvalidInputError
from tttlab.core.testing import run_into_a_closed_pipe
from tttlab.pilimit import train as T
from tttlab.pilimit.train import resolve_device, run, train_config

SMOKE = ["logging.progress=false", "threads=1", "data.num_examples=64", "train.num_test=32"]


def test_readme_runs_get_their_own_default_out_dirs():
    """The README runs ``+experiment=mnist`` then ``model.kind=finite model.width=1024`` then ``model.kind=mup``
    (and seeds 0/1/2): with one shared default out_dir the second command was refused (another config)."""
    variants = [[], ["model.kind=finite", "model.width=1024"], ["model.kind=mup", "model.width=1024"],
                ["model.kind=finite", "model.width=256"], ["seed=1"]]  # fmt: skip
    dirs = [train_config("mnist", v)["out_dir"] for v in variants]
    assert dirs[:3] == ["runs/pilimit/mnist/inf-seed0", "runs/pilimit/mnist/finite1024-seed0",
                        "runs/pilimit/mnist/mup1024-seed0"]  # fmt: skip
    assert len(set(dirs)) == len(dirs)


def test_hydra_command_line_resolves_the_default_out_dir():
    from hydra import compose, initialize_config_module

    from tttlab.pilimit.train import register_configs

    register_configs()
    with initialize_config_module(config_module="tttlab.pilimit.conf", version_base=None):
        cfg = compose("config", overrides=["+experiment=maml_mnist", "model.kind=finite", "seed=2"])
    assert cfg.out_dir == "runs/pilimit/maml_mnist/finite1024-seed2"


def test_train_config_override_list_means_what_the_command_line_means():
    """``train_config``'s overrides (also an evaluation's ``train_overrides``) went to OmegaConf's dotlist:
    ``++model.width`` and ``~device`` were unknown keys ``'++model'`` / ``'~device'``, ``+seed=1`` replaced the
    config's seed where the command line refuses it, and values were read as YAML
    (``experiment_name=007`` became ``'7'``).  They now
    take Hydra's rules (core's ``apply_overrides``): the same config as ``tttlab-pilimit-train
    +experiment=mnist <overrides>``, and a refusal where the command line refuses."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from tttlab.pilimit.train import register_configs, validate

    register_configs()
    with initialize_config_module(config_module="tttlab.pilimit.conf", version_base=None):
        for overrides in (
            ["experiment_name=007"],
            ["++model.width=256", "model.r=${model.depth}"],
            ["~device"],  # a top-level field: deleted, then the schema's default
        ):
            line = compose("config", overrides=["+experiment=mnist", *overrides])
            expected = validate(OmegaConf.to_container(line, resolve=True))
            assert train_config("mnist", overrides) == expected, overrides
        for bad, needle in (
            ("+seed=1", "cannot add 'seed'"),
            ("~model.width=7", "its value is 1024, not 7"),
            ("~model.width", r"a field of the config's schema \(ModelConfig\)"),  # nested: not deletable
            ("+maml.num_ways=3", r"cannot add 'maml.num_ways', it is already set \(to 5\)"),  # the schema's
        ):
            with pytest.raises(HydraException):
                compose("config", overrides=["+experiment=mnist", bad])
            with pytest.raises(ConfigError, match=needle):
                train_config("mnist", [bad])
    assert train_config("mnist", ["experiment_name=007"])["out_dir"] == "runs/pilimit/007/inf-seed0"


def test_refusal_names_the_differing_keys(tmp_path):
    run(train_config("smoke", [*SMOKE, f"out_dir={tmp_path}", "train.stop_after_steps=1"]))
    with pytest.raises(CheckpointError, match=r"model\.kind: 'inf' -> 'finite'; model\.width: 64 -> 32\)"):
        run(train_config("smoke", [*SMOKE, f"out_dir={tmp_path}", "model.kind=finite", "model.width=32"]))


def test_device_errors_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="device='gpu0'"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device.*device=cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")


def test_torchrun_is_refused(tmp_path, monkeypatch):
    """Under torchrun every rank trained the whole net and wrote the same run directory."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2.*without torchrun"):
        run(train_config("smoke", [*SMOKE, f"out_dir={tmp_path}"]))
    assert not (tmp_path / "checkpoints").exists()


def test_commands_print_one_error_line(monkeypatch, capsys):
    import logging

    from tttlab.pilimit import evaluate as E

    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)
    monkeypatch.setattr(sys, "argv", ["tttlab-pilimit-evaluate", "method=pilimit.nope"])
    with pytest.raises(SystemExit) as exc:
        E.main()
    err = capsys.readouterr().err
    assert (
        exc.value.code == 2 and "tttlab-pilimit-evaluate: error: " in err and "method='pilimit.nope'" in err
    )
    assert "Traceback" not in err
    # a Hydra command's options: was "unknown evaluate keys ['-m']" (and ['--cfg', 'job'])
    monkeypatch.setattr(sys, "argv", ["tttlab-pilimit-evaluate", "-m", "seed=0,1", "--cfg", "job"])
    with pytest.raises(SystemExit) as exc:
        E.main()
    assert (exc.value.code, capsys.readouterr().err) == (
        2,
        "tttlab-pilimit-evaluate: error: ConfigError: arguments ['-m', '--cfg', 'job']: expected key=value, no "
        "options (this command is no Hydra app: one evaluation per command; see tttlab-pilimit-evaluate --help)\n",
    )
    # Hydra's '+' / '~': '+logging.level=DEBUG' was "unknown evaluate keys ['+logging']"
    for arg, line in (
        ("+logging.level=DEBUG", "+logging.level=DEBUG: this command is no Hydra app and takes no '+': give "
         "logging.level=DEBUG"),
        ("~seed", "~seed: this command is no Hydra app and deletes no key: leave seed out for its default"),
        # a '~' that zsh/sh left: it made a folder named '~' ('train_run=~' was null), as the Hydra commands say
        ("out_dir=~/runs", "'out_dir=~/runs': the shell left '~' unexpanded (zsh and sh expand it only at the "
         "start of a word); give out_dir=$HOME/runs or the full path"),
    ):  # fmt: skip
        monkeypatch.setattr(sys, "argv", ["tttlab-pilimit-evaluate", arg])
        with pytest.raises(SystemExit) as exc:
            E.main()
        assert (exc.value.code, capsys.readouterr().err) == (
            2,
            f"tttlab-pilimit-evaluate: error: ConfigError: {line}\n",
        )

    def folders(cfg):  # what run() is given, said as a refusal
        raise InvalidInputError(f"got {cfg['out_dir']} {cfg['cache_dir']}")

    # quoted for Hydra, as tttlab-compare and the Hydra commands take it: the home's (it made a folder named '~')
    monkeypatch.setenv("HOME", "/home/tester")
    monkeypatch.setattr(E, "run", folders)
    monkeypatch.setattr(sys, "argv", ["tttlab-pilimit-evaluate", 'out_dir="~/runs"', "cache_dir='~'"])
    with pytest.raises(SystemExit):
        E.main()
    assert capsys.readouterr().err.endswith("InvalidInputError: got /home/tester/runs /home/tester\n")

    def bad(cfg):
        raise InvalidInputError("r=0: expected an integer >= 1")

    monkeypatch.setattr(T, "run", bad)
    monkeypatch.setattr(sys, "argv", ["tttlab-pilimit-train", "+experiment=smoke", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none", "hydra.run.dir=."])  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        T.main()
    err = capsys.readouterr().err
    assert (
        exc.value.code == 2
        and "tttlab-pilimit-train: error: InvalidInputError: r=0: expected an integer >= 1" in err
    )


def test_evaluate_a_trained_run_records_its_own_method(tmp_path):
    """``train_run=<finite run>`` was recorded as pilimit.inf_pinet (the default method) in runs/pilimit/eval."""
    from tttlab.core.records import load_records
    from tttlab.pilimit.evaluate import run as evaluate

    train_dir = run(train_config("smoke", [*SMOKE, "model.kind=finite", "model.width=32", "train.epochs=1",
                                           f"out_dir={tmp_path / 'fin'}"]))  # fmt: skip
    bench = {"corruptions": ["fog"], "num_examples": 8, "batch_size": 8}
    df = load_records(evaluate({"train_run": str(train_dir), "benchmark": bench, "progress": False}))
    assert set(df.method) == {"pilimit.finite_pinet"}
    assert (tmp_path / "fin" / "eval" / "records.jsonl").exists()
    with pytest.raises(ConfigError, match="trained model.kind=finite"):
        evaluate({"train_run": str(train_dir), "method": "pilimit.mup", "benchmark": bench})


def test_evaluate_default_out_dir_is_one_folder_per_method_and_profile(tmp_path, monkeypatch):
    """runs/pilimit/eval/<method> was shared by the profiles: their records went into one file and
    config.yaml was overwritten (with a warning)."""
    from tttlab.pilimit.evaluate import METHODS, PROFILES, _config, default_out_dir
    from tttlab.pilimit.evaluate import run as evaluate

    dirs = {(m, p): _config(None, {"method": m, "profile": p})["out_dir"] for m in METHODS for p in PROFILES}
    assert len(set(dirs.values())) == len(dirs)
    assert dirs["pilimit.inf_pinet", "quick"] == "runs/pilimit/eval/inf_pinet-quick"
    assert _config(None, {})["out_dir"] == "runs/pilimit/eval/inf_pinet-full" == default_out_dir(
        "pilimit.inf_pinet", "full")  # fmt: skip
    assert _config(None, {"out_dir": "mine", "profile": "smoke"})["out_dir"] == "mine"
    assert _config(None, {"train_run": str(tmp_path / "r")})["out_dir"] == str(tmp_path / "r" / "eval")
    monkeypatch.chdir(tmp_path)
    path = evaluate({"method": "pilimit.mup", "profile": "smoke", "cache_dir": str(tmp_path / "models"),
                     "progress": False, "benchmark": {"corruptions": ["fog"], "num_examples": 8}})  # fmt: skip
    assert (
        path.resolve() == (tmp_path / "runs/pilimit/eval/mup-smoke/records.jsonl").resolve() and path.exists()
    )


def test_evaluate_prints_a_table_per_domain_then_the_records_path(tmp_path, monkeypatch, capsys):
    """``tttlab-pilimit-evaluate`` printed only the records path (the mean in a log line): it now prints the
    accuracy and ms/image per domain and the mean, as torch_ttt's evaluate does, then the path."""
    import logging

    from tttlab.core.records import RecordWriter
    from tttlab.pilimit import evaluate as E

    path = tmp_path / "records.jsonl"
    # as the evaluate writes them: step 0 (prediction only, no test-time step), shown in the title
    defaults = dict(method="pilimit.mup", dataset="mnist_c", setting="reset_each_shift", step=0)
    with RecordWriter(path, defaults) as w:
        for corruption, acc in (("fog", 0.5), ("snow", 0.75)):
            w.write(corruption=corruption, severity=5, metric="accuracy", value=acc, n=8)
            w.write(corruption=corruption, severity=5, metric="s_per_image", value=1e-4, n=8)
        w.write(corruption="mean", severity=5, metric="accuracy", value=0.625, n=16)
    seen = {}
    monkeypatch.setattr(E, "run", lambda cfg: seen.setdefault("cfg", cfg) and path)
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)
    monkeypatch.setattr(sys, "argv", ["tttlab-pilimit-evaluate", "method=pilimit.mup", "profile=smoke"])
    E.main()
    assert seen["cfg"] == {"method": "pilimit.mup", "profile": "smoke"}
    assert capsys.readouterr().out.splitlines() == [
        "pilimit.mup on mnist_c (reset_each_shift, 0 step(s)): accuracy %, ms/image",
        "  fog-5                     50.0     0.100",
        "  snow-5                    75.0     0.100",
        "  mean                      62.5",
        str(path),
    ]


def test_train_help_names_the_command(monkeypatch, capsys):
    """``tttlab-pilimit-train --help`` began "train is powered by Hydra." (the file's name); it names the
    command now, and still lists the experiments.  In process, as ``python -m tttlab.pilimit.train --help``
    (its ``argv[0]`` is the file); the conftest puts back the HydraConfig and logging Hydra's help leaves."""
    monkeypatch.setattr(sys, "argv", [T.__file__, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        T.main()
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.splitlines()[0] == "tttlab-pilimit-train is powered by Hydra.", out[:300]
    assert "experiment: maml_mnist, mnist, " in out


def test_evaluate_help(monkeypatch, capsys):
    from tttlab.pilimit import evaluate as E

    monkeypatch.setattr(sys, "argv", ["tttlab-pilimit-evaluate", "--help"])
    E.main()  # was: "unknown evaluate keys ['--help']"
    assert "train_run=" in capsys.readouterr().out


CIFAR10MLP = ("--lr 1.0 --gclip-per-param --gclip 0.4 --lr-drop-ratio 0.15 --lr-drop-milestones 40 --scheduler multistep "
              "--wd 0.00001 --r 400 --batch-size 8 --epochs 50 --width 0 --cuda --seed 0  --depth 2 --bias-alpha 0.5 "
              "--first-layer-lr-mult 0.1 --last-layer-lr-mult 4.0 --first-layer-alpha 1.0 --last-layer-alpha 0.5 "
              "--no-apply-lr-mult-to-wd --save-dir ./output/")  # fmt: skip
TRANSFER = ("--save-dir=./output/ --save-model --cuda --r 200 --lr=0.01 --batch-size=16 --gclip=0  --epochs=40 --human "
            "--wd=0.0001 --bias-alpha=0.5 --first-layer-lr-mult=1.0 --last-layer-lr-mult=1.0 --gclip-per-param")  # fmt: skip
MAML = ("dataset --dataset omniglot --num-ways 5 --num-shots 1 --use-cuda --step-size 0.5 --batch-size 8 --num-workers 2 "
        "--num-epochs 2 --output-folder results --meta-lr .1  --grad-clip 0.1 --meta-momentum 0 --num-shots-test 1 "
        "--normalize None --hidden-size -1 --bias-alpha 4 --infnet_r 200 --first-layer-alpha 2  --verbose "
        "--first-layer-lr-mult 0.2 --dtype float16 --num-batches 1000 --num-test-batches 500 --adapt-readout-only "
        "--Gproj-inner --Gproj-outer --last-layer-lr-mult 0 --scheduler cosine --readout-zero-init --depth 1")  # fmt: skip


@pytest.mark.parametrize("experiment, flags, changed", [
    ("paper_cifar10", CIFAR10MLP, {"out_dir": "./output/", "device": "cuda"}),
    ("paper_transfer", TRANSFER, {"out_dir": "./output/", "device": "cuda"}),
    ("paper_omniglot", MAML, {"out_dir": "results", "device": "cuda", "maml.root": "dataset"}),
])  # fmt: skip
def test_upstream_readme_commands_translate_to_the_paper_experiments(experiment, flags, changed):
    """Each upstream README command, translated and put on top of its experiment, changes nothing but the
    output folder, the device (and the data folder): the experiments are those commands."""
    from tttlab.core.config import config_diff
    from tttlab.pilimit.cli import translate_upstream_args

    out, translated, notes = translate_upstream_args([f"+experiment={experiment}", *flags.split()])
    assert translated and out[0] == f"+experiment={experiment}"
    diff = config_diff(train_config(experiment), train_config(experiment, out[1:]))
    assert {line.split(": ", 1)[0] for line in diff} == set(changed), (diff, out)
    for line in diff:
        key = line.split(": ", 1)[0]
        assert line.endswith(f"-> {changed[key]!r}"), (line, out)


def test_upstream_flag_errors():
    from tttlab.pilimit.cli import translate_upstream_args

    with pytest.raises(ConfigError, match="add \\+experiment=paper_cifar10"):
        translate_upstream_args(["--lr", "1.0"])
    with pytest.raises(ConfigError, match="unknown flag --lrr"):
        translate_upstream_args(["+experiment=paper_cifar10", "--lrr", "1.0"])
    with pytest.raises(ConfigError, match="--r needs a value"):
        translate_upstream_args(["+experiment=paper_cifar10", "--r"])
    out, _, _ = translate_upstream_args(["+experiment=mnist", "--width", "256", "--gaussian-init"])
    assert out[1:] == ["model.width=256", "model.kind=mup"]
    # a value that is not a number: a ValueError traceback before; --meta-momentum 0 was dropped silently
    for flag in ("--width", "--hidden-size", "--meta-momentum"):
        with pytest.raises(ConfigError, match=f"upstream flag {flag} '1k': expected a number"):
            translate_upstream_args(["+experiment=paper_omniglot", flag, "1k"])
    out, _, notes = translate_upstream_args(["+experiment=paper_omniglot", "--meta-momentum", "0"])
    assert out == ["+experiment=paper_omniglot"] and notes == [
        "--meta-momentum 0 ignored (PiSGD has no momentum)"
    ]
    # Hydra's own options keep their values: `--cfg job` on a MAML experiment is not a data folder `job`
    for experiment in ("maml_mnist", "paper_omniglot", "mnist"):
        for hydra_args in (["--cfg", "job"], ["-c", "job", "--resolve"], ["--info", "config"]):
            argv = [f"+experiment={experiment}", "threads=1", *hydra_args]
            assert translate_upstream_args(argv) == (argv, False, [])
    out, _, _ = translate_upstream_args(["+experiment=paper_omniglot", "/data/omniglot", "--cfg", "job"])
    assert out == ["+experiment=paper_omniglot", "maml.root=/data/omniglot", "--cfg", "job"]
    # `--cfg job` before the upstream flags: their overrides came after it, which Hydra's argparse refuses
    # ("unrecognized arguments: optim.lr=0.5 ..."); Hydra's options now go last, the overrides in order
    argv = ["+experiment=paper_cifar10", "--cfg", "job", "data.root=/d", "--lr", "0.5", "--resolve", "--r", "8"]  # fmt: skip
    out, _, _ = translate_upstream_args(argv)
    assert out == ["+experiment=paper_cifar10", "data.root=/d", "optim.lr=0.5", "model.r=8", "--cfg", "job",
                   "--resolve"]  # fmt: skip
    from hydra._internal.utils import get_args_parser

    parsed = get_args_parser().parse_args(out)  # what hydra.main parses: every override, then --cfg job
    assert parsed.overrides == out[:4] and parsed.cfg == "job" and parsed.resolve
    assert translate_upstream_args(["+experiment=mnist", "threads=1"]) == (
        ["+experiment=mnist", "threads=1"],
        False,
        [],
    )


# evaluate prints its own usage text; train's is Hydra's, covered by core's test of check_hydra_command
# (tests/test_install.py checks that every @hydra.main entry point calls it)
@pytest.mark.parametrize("module", ["tttlab.pilimit.evaluate"])
def test_help_into_a_closed_pipe_ends_quietly(module):
    """``tttlab-pilimit-evaluate --help | head -3`` (the module's own usage text) ended in a BrokenPipeError
    traceback; it ends with no output on stderr and exit status 141 (128 + SIGPIPE)."""
    res = run_into_a_closed_pipe("-m", module, "--help")
    assert (res.returncode, res.stderr) == (141, ""), res.stderr[-2000:]
