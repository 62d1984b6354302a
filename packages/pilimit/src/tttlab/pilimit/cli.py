"""Upstream's command-line flags for ``tttlab-pilimit-train``.

The upstream README runs ``python -m experiments.cifar10.cifar10mlp --lr 1.0 --gclip-per-param --gclip 0.4
... --save-dir ./output/`` (and ``experiments.imagenet.transfer_imagenet``, ``experiments.meta.train``).
:func:`translate_upstream_args` turns those flags into this package's Hydra overrides, so a copied
command runs after ``tttlab-pilimit-train +experiment=<paper_cifar10|paper_transfer|paper_omniglot>``;
``pilimit_orig``'s README commands (``cifar10.cifar10infmlp``, ``meta.train``) run after the experiments
made from them (:data:`ORIG_EXPERIMENTS`), where its ``--depth D`` becomes ``model.depth=D-1``.
:data:`FLAGS` is the table (also in the package README).
"""

from __future__ import annotations

import shlex
import sys

from tttlab.core.errors import ConfigError

#: upstream flag -> Hydra key (the flag takes a value) or ``(key, value)`` (a switch)
FLAGS: dict[str, str | tuple[str, str]] = {
    # experiments.cifar10.cifar10mlp / experiments.imagenet.transfer_imagenet
    "--lr": "optim.lr",
    "--wd": "optim.wd",
    "--gclip": "optim.gclip",
    "--gclip-per-param": ("optim.gclip_per_param", "true"),
    "--lr-drop-ratio": "optim.lr_drop_ratio",
    "--lr-drop-milestones": "optim.lr_drop_milestones",
    "--scheduler": "optim.scheduler",
    "--first-layer-lr-mult": "optim.first_layer_lr_mult",
    "--last-layer-lr-mult": "optim.last_layer_lr_mult",
    "--bias-lr-mult": "optim.bias_lr_mult",
    "--no-apply-lr-mult-to-wd": ("optim.apply_lr_mult_to_wd", "false"),
    "--r": "model.r",
    "--depth": "model.depth",
    "--width": "model.width",  # 0 = infinite (model.kind=inf), N > 0 = finite pi-net of width N
    "--first-layer-alpha": "model.first_layer_alpha",
    "--last-layer-alpha": "model.last_layer_alpha",
    "--bias-alpha": "model.bias_alpha",
    "--last-bias-alpha": "model.last_bias_alpha",
    "--gaussian-init": ("model.kind", "mup"),
    "--no-Gproj": ("optim.gproj", "false"),
    "--float": ("model.dtype", "float32"),
    "--batch-size": "data.batch_size",
    "--epochs": "train.epochs",
    "--seed": "seed",
    "--cuda": ("device", "cuda"),
    "--save-dir": "out_dir",
    "--save-model": ("", ""),  # always saved (checkpoints/last.ckpt)
    # experiments.meta.train (MAML)
    "--num-ways": "maml.num_ways",
    "--num-shots": "maml.num_shots",
    "--num-shots-test": "maml.num_shots_test",
    "--step-size": "maml.step_size",
    "--num-batches": "maml.num_batches",
    "--num-test-batches": "maml.num_test_batches",
    "--num-epochs": "train.epochs",
    "--meta-lr": "optim.lr",
    "--grad-clip": "optim.gclip",
    "--infnet_r": "model.r",
    "--dtype": "model.dtype",
    "--use-cuda": ("device", "cuda"),
    "--adapt-readout-only": ("maml.adapt_readout_only", "true"),
    "--Gproj-inner": ("maml.gproj_inner", "true"),
    "--Gproj-outer": ("maml.gproj_outer", "true"),
    "--readout-zero-init": ("maml.readout_zero_init", "true"),
    "--output-folder": "out_dir",
    "--dataset": "maml.dataset",
    "--hidden-size": "model.width",  # -1 = infinite, N > 0 = finite pi-net of width N
    # meta.train's name for cifar10infmlp's --gaussian-init (the same N(0, 2/fan_in) draw)
    "--mu-init": ("model.kind", "mup"),
    "--first-layer-init-alpha": "model.first_layer_init_alpha",
    "--second-layer-init-alpha": "model.second_layer_init_alpha",
}
#: upstream flags with no counterpart here (ignored with a note): value-taking or switches
IGNORED: dict[str, bool] = {
    "--human": False, "--verbose": False, "--num-workers": True, "--normalize": True,
    "--transfer": False, "--transfer-milestones": True,  # paper_transfer always evaluates the transfer at the end
    "--meta-momentum": True,  # PiSGD has no momentum (the paper's commands use 0)
}  # fmt: skip
MAML_EXPERIMENTS = ("paper_omniglot", "paper_omniglot_orig", "paper_omniglot_finite", "paper_omniglot_mup",
                    "maml_mnist")  # fmt: skip
#: experiments made from pilimit_orig's commands: its ``--depth D`` (D + 1 weight matrices: input, D - 1
#: hidden pi-layers, readout) is ``model.depth = D - 1`` here (pilimit_lib's and our depth counts the hidden
#: pi-layers: input, ``depth`` hidden pi-layers, readout; upstream's compare_mlp.py pairs InfMLP(L) with
#: pilimit_orig's InfPiMLP(L=L+1))
ORIG_EXPERIMENTS = ("paper_cifar10_finite", "paper_cifar10_mup", "paper_omniglot_orig", "paper_omniglot_finite",
                    "paper_omniglot_mup")  # fmt: skip
#: finite-width experiments whose upstream README command passes ``--hidden-size -1`` (a slip: meta/train.py
#: then trains the infinite pi-net and never reads --mu-init or the init alphas); width of upstream's
#: benchmark drivers (scans/meta/{mu,pifinnet}_benchmark_driver.sh)
FINITE_README_SLIP = {"paper_omniglot_finite": 2048, "paper_omniglot_mup": 2048}


def _value(flag: str, v: str) -> str:
    if flag == "--lr-drop-milestones":
        return "[" + ",".join(x for x in v.replace(" ", "").split(",") if x) + "]"
    if v in ("True", "False", "None"):
        return {"True": "true", "False": "false", "None": "null"}[v]
    return v


#: Hydra's own options that take a value (``--info``'s is optional: one of its choices); the value is passed
#: on as it is, never read as meta.train's positional data folder
HYDRA_VALUE_OPTIONS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                       "--config-dir", "-cd", "--experimental-rerun")  # fmt: skip
HYDRA_INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def _number(flag: str, val: str) -> float:
    try:
        return float(val)
    except ValueError:
        raise ConfigError(f"upstream flag {flag} {val!r}: expected a number") from None


def translate_upstream_args(argv: list[str]) -> tuple[list[str], bool, list[str]]:
    """``(overrides, translated, notes)``: ``argv`` with upstream flags replaced by Hydra overrides.

    Raises :class:`ConfigError` for an unknown ``--flag``, a flag without its value, or upstream flags
    without an ``+experiment=...`` (they only make sense on top of a paper experiment).
    """
    out: list[str] = []
    #: Hydra's own options (--cfg job, --resolve, ...), put after every override: Hydra's argparse takes its
    #: overrides as one run of positionals, so an override after `--cfg job` ("unrecognized arguments")
    #: is refused, and translated flags given after such an option would become that override
    hydra_opts: list[str] = []
    notes: list[str] = []
    translated = False
    experiment = next(
        (a.split("=", 1)[1] for a in argv if a.startswith(("+experiment=", "experiment="))), None
    )
    maml = experiment in MAML_EXPERIMENTS
    i = 0
    while i < len(argv):
        a = argv[i]
        if i + 1 < len(argv) and (
            a in HYDRA_VALUE_OPTIONS or (a in ("--info", "-i") and argv[i + 1] in HYDRA_INFO_CHOICES)
        ):
            hydra_opts += [a, argv[i + 1]]
            i += 2
            continue
        if maml and not a.startswith(("-", "+", "~")) and "=" not in a:  # meta.train's positional data folder
            out.append(f"maml.root={a}")
            translated = True
            i += 1
            continue
        if not a.startswith("--") or a in ("--help", "--hydra-help", "--info", "--cfg", "--resolve",
                                           "--package", "--multirun", "--run", "--config-name",
                                           "--config-path", "--config-dir", "-h") or a.startswith("--cfg="):  # fmt: skip
            (hydra_opts if a.startswith("-") else out).append(a)
            i += 1
            continue
        flag, eq, val = a.partition("=")
        spec = FLAGS.get(flag)
        takes_value = isinstance(spec, str) or IGNORED.get(flag, False)
        if spec is None and flag not in IGNORED:
            raise ConfigError(
                f"unknown flag {flag}: tttlab-pilimit-train takes Hydra overrides (key=value, see "
                f"--help) or these upstream flags: {' '.join(sorted(FLAGS))}"
            )
        translated = True
        if takes_value and not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"upstream flag {flag} needs a value")
            val = argv[i + 1]
            i += 1
        i += 1
        if flag == "--meta-momentum":
            if _number(flag, val) != 0:
                raise ConfigError(
                    f"--meta-momentum {val}: PiSGD has no momentum (the paper's commands use 0)"
                )
            notes.append(f"{flag} {val} ignored (PiSGD has no momentum)")
            continue
        if flag in IGNORED:
            notes.append(f"{flag} ignored (no counterpart here)")
            continue
        if isinstance(spec, tuple):
            if spec[0]:
                out.append(f"{spec[0]}={spec[1]}")
            continue
        if flag in ("--width", "--hidden-size"):
            n = int(_number(flag, val))
            out += ["model.kind=inf"] if n <= 0 else ["model.kind=finite", f"model.width={n}"]
            if n <= 0 and experiment in FINITE_README_SLIP:
                notes.append(
                    f"{flag} {val} selects the infinite pi-net in upstream's meta/train.py (which then ignores "
                    f"--mu-init and the init alphas); translated as given (model.kind=inf unless --mu-init or "
                    f"--gaussian-init makes it muP). {experiment} is the finite net of width "
                    f"{FINITE_README_SLIP[experiment]} (upstream's benchmark drivers): pass --hidden-size "
                    f"{FINITE_README_SLIP[experiment]} for it"
                )
            continue
        if flag == "--depth" and experiment in ORIG_EXPERIMENTS:
            d = int(_number(flag, val))
            out.append(f"model.depth={d - 1}")
            notes.append(f"{flag} {val} is pilimit_orig's depth (input layer, {d - 1} hidden pi-layer(s), "
                         f"readout): model.depth={d - 1}")  # fmt: skip
            continue
        if flag == "--batch-size" and maml:  # meta.train: episodes per outer step
            out.append(f"maml.meta_batch_size={val}")
            continue
        out.append(f"{spec}={_value(flag, val)}")
    if translated and not any(x.startswith(("+experiment=", "experiment=")) for x in out):
        raise ConfigError(
            "upstream flags go on top of a paper experiment: add +experiment=paper_cifar10 (cifar10mlp), "
            "+experiment=paper_transfer (transfer_imagenet) or +experiment=paper_omniglot (meta.train)"
        )
    if any(x == "model.kind=mup" for x in out):  # --gaussian-init with --width N: muP at width N
        out = [x for x in out if x != "model.kind=finite"]
        out = [x for x in out if x != "model.kind=mup"] + ["model.kind=mup"]
    return out + hydra_opts, translated, notes


def apply_upstream_translation(prog: str) -> None:
    """Rewrite ``sys.argv`` in place and print the translated command (errors: one line, exit 2)."""
    from .train import user_errors

    with user_errors(prog):
        args, translated, notes = translate_upstream_args(sys.argv[1:])
    if translated:
        print(f"{prog}: upstream flags translated to: {prog} {shlex.join(args)}", file=sys.stderr)
        for n in notes:
            print(f"{prog}: {n}", file=sys.stderr)
        sys.argv[1:] = args


__all__ = ["FLAGS", "IGNORED", "apply_upstream_translation", "translate_upstream_args"]
