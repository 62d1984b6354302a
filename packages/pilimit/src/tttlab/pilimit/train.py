"""Train pi-nets (infinite, finite sampled, muP) on flattened images, ImageNet32 transfer, or MAML.

    tttlab-pilimit-train +experiment=mnist                      # CPU proxy, minutes
    tttlab-pilimit-train +experiment=mnist model.kind=finite model.width=1024
    tttlab-pilimit-train +experiment=mnist model.kind=mup model.width=1024
    tttlab-pilimit-train +experiment=paper_cifar10 data.root=/data/cifar-10-batches-py device=cuda
    tttlab-pilimit-train +experiment=paper_transfer data.root=/data/imagenet32 transfer.root=/data/cifar10
    tttlab-pilimit-train +experiment=maml_mnist                 # few-shot proxy on MNIST digits
    tttlab-pilimit-train +experiment=paper_omniglot maml.root=/data/omniglot device=cuda
    tttlab-pilimit-train +experiment=smoke                      # seconds

Paper: Yang, Santacroce, Hu, ICLR 2022 (``yang2022pinets``); upstream ``experiments/cifar10/cifar10mlp.py``,
``experiments/imagenet/transfer_imagenet.py``, ``experiments/meta`` of github.com/santacml/pilim (facts:
the commands' hyperparameters).  Run directory (core ``RunDir``): ``config.yaml``, ``records.jsonl``
(``test_accuracy``/``train_loss``/``train_accuracy`` per epoch, ``transfer_accuracy``,
``fewshot_accuracy``, ``val_fewshot_accuracy``), ``stats.json``, ``checkpoints/best_val.ckpt`` (MAML with
``eval.checkpoint=best_val``: the net of the best validation accuracy, the one tested), ``checkpoints/last.ckpt`` (atomic; written every
``train.checkpoint_every`` steps; a killed run started again with the same config resumes and ends with
the same numbers, bitwise on CPU).

Deviations: ``transfer`` fits kernel ridge regression on the trained net's last-layer kernel
``|g||g'| V(gbar . gbar')`` of ``transfer.num_train`` CIFAR-10 images (upstream: the saved kernel
output of the whole training set), with the ridge ``transfer.ridge`` times the mean of the kernel's
diagonal added to the diagonal (our choice, not upstream's: it makes the regulariser independent of the
kernel's scale, which differs between widths and between muP and pi-nets); data order comes from ``numpy.random.default_rng((seed, epoch))``.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tttlab.core._io import atomic_path
from tttlab.core.cli import apply_log_level, check_hydra_command, user_errors
from tttlab.core.config import RunConfig, config_diff, package_yaml, to_plain
from tttlab.core.errors import CheckpointError, ConfigError
from tttlab.core.records import RunDir, check_run_dir, config_hash, recorded_keys
from tttlab.core.torch import read_torch_file, resolve_device

from . import precision
from .data import NUM_CLASSES, TRANSFER_LAYOUTS, data_root, load_flat, mnist_classes, omniglot_classes
from .maml import check_maml_config, evaluate_fewshot, meta_loss, sample_episode
from .nets import FinPiMLP, InfMLP
from .optim import PiSGD, make_scheduler

log = logging.getLogger("tttlab.pilimit.train")
CHECKPOINT = "last"
BEST_CHECKPOINT = "best_val"  # eval.checkpoint=best_val: checkpoints/best_val.ckpt
KINDS = {"inf": "pilimit.inf_pinet", "finite": "pilimit.finite_pinet", "mup": "pilimit.mup"}
TASKS = ("classify", "transfer", "maml")
#: Version of what a training config means, part of the run identity (the resume and model-cache key): bumped
#: whenever the same config trains differently.  1 (no field in the hash, as every run before 2026-12-01): an
#: epoch of classify/transfer was floor(N / batch) steps, the partial last batch dropped; 2: an epoch keeps it
#: (ceil(N / batch) steps).  A version-1 checkpoint resumes only where both versions train the same
#: (:meth:`_Run.check_semantics`): classify/transfer without a partial batch; never MAML, whose outer step
#: (summed over the meta-batch, the frozen readout out of the clip norm) and evaluation count changed on
#: 2026-12-01 too, under version 1, so a version-1 MAML checkpoint may come from either side.
SEMANTICS = 2
#: finite/mup only; at 1.0 (the default) they stay out of the training part's hash (runs made before resume)
INIT_ALPHAS = ("first_layer_init_alpha", "second_layer_init_alpha")


@dataclass
class ModelConfig:
    kind: str = "inf"  # inf | finite | mup
    r: int = 400
    depth: int = 2
    width: int = 1024  # finite / mup hidden width (ignored for inf)
    first_layer_alpha: float = 1.0
    last_layer_alpha: float = 1.0
    bias_alpha: float = 1.0
    last_bias_alpha: float | None = None
    chunk_size: int | None = 16384
    cache_mb: float = 64.0  # per pi-layer forward: q-derived chunks kept for the backward (0: recompute)
    impl: str = "chunked"  # chunked | reference
    dtype: str = "float32"  # storage of A/B: float32 | bfloat16 | float16
    sample_seed: int = 0  # Omega of finite nets
    # finite / mup only: the sampled (or muP-drawn) input weight and the next weight are multiplied by these
    # at initialisation (pilimit_orig meta/train.py's --first-layer-init-alpha / --second-layer-init-alpha)
    first_layer_init_alpha: float = 1.0
    second_layer_init_alpha: float = 1.0
    # the infinite readout (and so a sampled finite net's) starts at zero (pilimit_lib) or, false, with r rows
    # A ~ N(0, 1/r^2) (pilimit_orig's InfPiMLP default: its CIFAR-10 / ImageNet commands); MAML: together with
    # maml.readout_zero_init (zero only when both are true)
    readout_zero_init: bool = True


@dataclass
class OptimConfig:
    lr: float = 1.0
    wd: float = 0.0
    first_layer_lr_mult: float = 1.0
    last_layer_lr_mult: float = 1.0
    bias_lr_mult: float = 0.5  # upstream's default
    apply_lr_mult_to_wd: bool = True
    gclip: float = 0.0
    gclip_per_param: bool = False
    gproj: bool = True  # finite nets only; mup forces false
    scheduler: str = "none"  # none | multistep | cosine
    lr_drop_ratio: float = 0.5
    lr_drop_milestones: list[float] = field(default_factory=list)  # in epochs
    gclip_drop_with_lr: bool = False  # multistep: clip x lr_drop_ratio at the milestones (pilimit_orig)


@dataclass
class TrainSection:
    task: str = "classify"  # classify | transfer | maml
    epochs: int = 1
    test_split: str = "test"
    # classify/transfer: train (and test) on these labels only, relabelled 0..k-1 in this order (null: all);
    # paper_transfer: upstream's fixed random 250 of ImageNet32's 1000 classes
    classes: list[int] | None = None
    num_test: int | None = None
    test_batch_size: int = 256
    checkpoint_every: int = 200
    resume: bool = True
    stop_after_steps: int | None = None  # simulate a kill (tests)


@dataclass
class TransferConfig:
    dataset: str = "cifar10"
    root: str | None = None
    num_train: int = 10000
    num_test: int | None = None
    ridge: float = 1e-4


@dataclass
class MamlConfig:
    dataset: str = "mnist"  # mnist (digits 0-4 train, 5-9 test) | omniglot
    root: str | None = None
    image_size: int = 28
    num_ways: int = 5
    num_shots: int = 1
    num_shots_test: int = 1
    step_size: float = 0.5
    num_inner_steps: int = 1
    meta_batch_size: int = 8
    num_batches: int = 1000  # outer steps per epoch
    num_test_batches: int = 500  # evaluation: this many batches of meta_batch_size episodes (upstream's)
    adapt_readout_only: bool = True
    gproj_inner: bool = True
    gproj_outer: bool = True
    readout_zero_init: bool = True


#: eval.checkpoint values: the last epoch's net (default) or the best-validation net (MAML, upstream's choice)
EVAL_CHECKPOINTS = ("last", "best_val")
#: the fixed generator seed of the meta-train / validation class split (the same split for every run seed)
VAL_SPLIT_SEED = 0


@dataclass
class EvalSection:
    # which net the final few-shot test number is taken from: last (the last epoch's, every epoch's test
    # accuracy recorded) | best_val (MAML: validation classes held out of meta-training are evaluated after
    # every epoch, the net of the best validation accuracy is kept in checkpoints/best_val.ckpt and evaluated
    # on the meta-test classes once, after training, as upstream's meta/train.py + meta/test.py)
    checkpoint: str = "last"
    # best_val: this fraction of the meta-train classes (a fixed seeded draw) becomes the validation classes;
    # 0.143 = 172 / 1,200, the validation share of the non-test characters in Vinyals' Omniglot split
    # (torchmeta's, which upstream uses)
    val_fraction: float = 0.143


@dataclass
class TrainConfig(RunConfig):
    experiment_name: str = "default"
    threads: int | None = None  # torch intra-op threads on CPU; null: torch's default
    amp: str = (
        "none"  # none | bf16: torch.autocast(device.type, bfloat16) around forward + loss (precision.py)
    )
    # false | true (torch's default mode) | a torch.compile mode (default, reduce-overhead, max-autotune,
    # max-autotune-no-cudagraphs): torch.compile of the pi-layer chunk kernels (inf) or features/readout
    # (finite)
    compile: Any = False
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    maml: MamlConfig = field(default_factory=MamlConfig)
    eval: EvalSection = field(default_factory=EvalSection)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="tttlab_pilimit_train", node=TrainConfig)


def to_dict(cfg) -> dict[str, Any]:
    """A plain dict of an OmegaConf / dataclass / mapping config (``None`` -> {})."""
    return to_plain(cfg)


def conf_yaml(relative: str) -> dict[str, Any]:
    """A YAML file of the shipped ``conf/`` (``defaults`` and ``hydra`` keys dropped), unresolved."""
    return package_yaml("tttlab.pilimit.conf", relative)


def train_config(experiment: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """``config.yaml`` + ``experiment/<experiment>.yaml`` + ``overrides``, validated, without Hydra's app.
    The overrides mean what the same flags mean on ``tttlab-pilimit-train``'s command line
    (:func:`tttlab.core.config.apply_overrides`): ``key=value``, ``+key=value``, ``++key=value``, ``~key``,
    ``~key=value``, values read by Hydra's grammar."""
    from omegaconf import OmegaConf

    from tttlab.core.config import apply_overrides

    parts = [conf_yaml("config.yaml")]
    if experiment:
        parts.append(conf_yaml(f"experiment/{experiment}.yaml"))
    merged = apply_overrides(OmegaConf.merge(*parts), overrides, TrainConfig)
    return validate(OmegaConf.to_container(merged, resolve=True))


def validate(cfg) -> dict[str, Any]:
    from tttlab.core.config import validate as core_validate

    c = to_dict(core_validate(to_dict(cfg), TrainConfig))
    if c["model"]["kind"] not in KINDS:
        raise ConfigError(f"model.kind={c['model']['kind']!r}; expected one of {sorted(KINDS)}")
    if c["train"]["task"] not in TASKS:
        raise ConfigError(f"train.task={c['train']['task']!r}; expected one of {TASKS}")
    if int(c["train"]["checkpoint_every"]) < 1:
        raise ConfigError(f"train.checkpoint_every={c['train']['checkpoint_every']}: expected >= 1")
    t, m = c["train"], c["model"]
    for key, value, ok, expected in (
        ("seed", c["seed"], c["seed"] >= 0, "an integer >= 0"),
        ("threads", c["threads"], c["threads"] is None or c["threads"] >= 1, "null or an integer >= 1"),
        ("train.epochs", t["epochs"], t["epochs"] >= 1, "an integer >= 1"),
        ("train.test_batch_size", t["test_batch_size"], t["test_batch_size"] >= 1, "an integer >= 1"),
        ("train.stop_after_steps", t["stop_after_steps"], t["stop_after_steps"] is None or t["stop_after_steps"] >= 0,
         "null or an integer >= 0"),
        ("data.root", c["data"]["root"], c["data"]["root"] is None or c["data"]["name"] not in ("mnist", "digits"),
         f"null: data.name={c['data']['name']!r} is embedded and read from no path"),
        *((f"model.{k}", m[k], m[k] is None or math.isfinite(m[k]), "a finite number")
          for k in ("first_layer_alpha", "last_layer_alpha", "bias_alpha", "last_bias_alpha",
                    "first_layer_init_alpha", "second_layer_init_alpha")),
    ):  # fmt: skip
        if not ok:
            raise ConfigError(f"{key}={value!r}: expected {expected}")
    for k in INIT_ALPHAS:
        if m["kind"] == "inf" and m[k] != 1.0:
            raise ConfigError(
                f"model.{k}={m[k]!r} with model.kind=inf: the init alphas scale a finite net's sampled weights; "
                "expected model.kind=finite or mup (or 1.0)"
            )
    if c["train"]["task"] == "maml":
        check_maml_config(c["maml"])
    ev = c["eval"]
    if ev["checkpoint"] not in EVAL_CHECKPOINTS:
        raise ConfigError(f"eval.checkpoint={ev['checkpoint']!r}; expected one of {EVAL_CHECKPOINTS}")
    if ev["checkpoint"] == "best_val" and c["train"]["task"] != "maml":
        raise ConfigError(
            f"eval.checkpoint=best_val with train.task={c['train']['task']}: the best-validation net is kept for "
            "MAML only (validation classes held out of meta-training); expected train.task=maml or "
            "eval.checkpoint=last"
        )
    if not 0 < float(ev["val_fraction"]) < 1:  # NaN fails too
        raise ConfigError(f"eval.val_fraction={ev['val_fraction']!r}: expected a number between 0 and 1")
    c["amp"], c["compile"] = precision.check(
        c["amp"], c["compile"], m["dtype"], m["impl"] if m["kind"] == "inf" else None
    )
    return c


# ----------------------------------------------------------------------------------------------------------
# building blocks


def build_model(c: dict[str, Any], d_in: int, d_out: int, device) -> torch.nn.Module:
    """The configured net, initialised from ``torch.manual_seed(seed)`` (finite nets: sampled from it)."""
    m = c["model"]
    torch.manual_seed(int(c["seed"]))
    # .get: configs written before the option existed have no model.readout_zero_init (they had a zero readout)
    zero_readout = bool(m.get("readout_zero_init", True))
    if c["train"]["task"] == "maml":
        zero_readout = zero_readout and bool(c["maml"]["readout_zero_init"])
    inf = InfMLP(
        d_in, d_out, r=m["r"], depth=m["depth"], first_layer_alpha=m["first_layer_alpha"],
        last_layer_alpha=m["last_layer_alpha"], bias_alpha=m["bias_alpha"], last_bias_alpha=m["last_bias_alpha"],
        chunk_size=m["chunk_size"], impl=m["impl"], dtype=m["dtype"], device=device, cache_mb=m["cache_mb"],
        readout_zero_init=zero_readout,
    )  # fmt: skip
    if m["kind"] == "inf":
        return inf
    return FinPiMLP(
        inf, m["width"], seed=int(m["sample_seed"]), gaussian_init=m["kind"] == "mup",
        # .get: the config of a checkpoint written before the init alphas existed has neither
        first_layer_init_alpha=m.get("first_layer_init_alpha", 1.0),
        second_layer_init_alpha=m.get("second_layer_init_alpha", 1.0),
    )  # fmt: skip


def build_optimizer(c: dict[str, Any], net, steps_per_epoch: int, total_steps: int):
    o = c["optim"]
    opt = PiSGD(
        net, lr=o["lr"], weight_decay=o["wd"], first_layer_lr_mult=o["first_layer_lr_mult"],
        last_layer_lr_mult=o["last_layer_lr_mult"], bias_lr_mult=o["bias_lr_mult"],
        apply_lr_mult_to_wd=o["apply_lr_mult_to_wd"], gclip=o["gclip"], gclip_per_param=o["gclip_per_param"],
        gproj=bool(o["gproj"]) and c["model"]["kind"] == "finite",
    )  # fmt: skip
    milestones = [int(float(e) * steps_per_epoch) for e in o["lr_drop_milestones"]]
    sched = make_scheduler(
        opt, o["scheduler"], total_steps, milestones, o["lr_drop_ratio"],
        drop_gclip=bool(o.get("gclip_drop_with_lr", False)),
    )  # fmt: skip
    return opt, sched


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    # a missing, truncated or foreign file: a CheckpointError naming the path (core's safe reader)
    ck = read_torch_file(path, option=None, what="tttlab-pilimit checkpoint")
    if not isinstance(ck, dict) or ck.get("format") != "tttlab.pilimit/1":
        raise CheckpointError(f"{path}: not a tttlab.pilimit/1 checkpoint")
    return ck


def progress_bar(total: int | None, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not (enabled and sys.stderr.isatty()))


def training_part(c: dict[str, Any], semantics: int = SEMANTICS) -> dict[str, Any]:
    """What the trained weights depend on (a checkpoint resumes only a run with the same): the config's
    training keys and the code's :data:`SEMANTICS` (``semantics=1``: the part as runs before it had it)."""
    keys = ("seed", "data", "model", "optim")
    part = {k: c[k] for k in keys}
    if semantics > 1:
        part["semantics"] = semantics
    if (
        c.get("amp", "none") != "none"
    ):  # amp=none leaves the hash of existing runs and cached models as it was
        part["amp"] = c["amp"]
    part["train"] = {k: c["train"][k] for k in ("task", "epochs")}
    if c["train"]["task"] == "maml":
        part["maml"] = c["maml"]
    if c.get("eval", {}).get("checkpoint", "last") != "last":  # the default keeps existing identities
        part["eval"] = c["eval"]  # best_val holds classes out of meta-training
    part["model"] = {
        k: v for k, v in c["model"].items()
        if k not in ("chunk_size", "impl", "cache_mb") and not (k in INIT_ALPHAS and v == 1.0)
        and not (k == "readout_zero_init" and v)  # true (the default): the hash runs had before the option
    }  # fmt: skip
    # gclip_drop_with_lr=false (the default) leaves the hash of existing runs and cached models as it was
    part["optim"] = {k: v for k, v in c["optim"].items() if k != "gclip_drop_with_lr" or v}
    return part


@torch.no_grad()
def accuracy(
    net, x: torch.Tensor, y: torch.Tensor, batch_size: int, device, amp: str = "none"
) -> tuple[float, float]:
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch_size):
        with precision.autocast(device, amp):
            out = net(x[i : i + batch_size].to(device))
        out = out.float()
        yb = y[i : i + batch_size].to(device)
        correct += int((out.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
    return correct / max(len(x), 1), loss / max(len(x), 1)


def method_name(c: dict[str, Any]) -> str:
    return KINDS[c["model"]["kind"]]


# ----------------------------------------------------------------------------------------------------------
# runs


#: config keys that change no number a training run records (core ``RunDir(resumable_keys=...)``): where its
#: folder is, how often it checkpoints, whether it resumes, where it stops.  A run that differs from its
#: folder's config only in them (and core's display keys) is the same run: no warning, its records re-tagged
#: with the new config_hash.  ``threads``, ``device``, ``model.chunk_size`` / ``cache_mb`` / ``impl`` and the
#: test batch size may be resumed across (they are no part of :func:`training_part`) but change float sums.
RESUMABLE_KEYS = (
    "out_dir",
    "experiment_name",
    "train.checkpoint_every",
    "train.resume",
    "train.stop_after_steps",
)


def _training_identity(c: dict[str, Any]) -> Any:
    """:func:`training_part` of a folder's config, or the whole config where it lacks a key (a foreign
    ``config.yaml``: then another config, refused with the keys that differ)."""
    try:
        return training_part(c)
    except (KeyError, TypeError):
        return c


def _config_diff(old: dict | None, new: dict) -> str:
    """`` (model.kind: 'inf' -> 'finite'; ...)`` over the training part of two configs, or ``""``."""
    if not isinstance(old, dict):
        return ""
    try:
        diff = config_diff(training_part(old), training_part(new))
    except (KeyError, TypeError):
        return ""
    return f" ({'; '.join(diff)})" if diff else ""


def refuse_distributed() -> None:
    """torchrun would start independent copies that write the same run directory: refuse it."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise ConfigError(
            f"WORLD_SIZE={world}: tttlab-pilimit trains in one process only (data-parallel pi-nets would have "
            "to all-gather the rows every rank appends; not implemented); run without torchrun"
        )


def run_name(kind: str, width) -> str:
    """The model part of the default ``out_dir``: ``inf``, ``finite1024``, ``mup1024``."""
    return str(kind) if kind == "inf" else f"{kind}{width}"


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("pilimit_net", run_name, replace=True)


_register_resolvers()


class _Run:
    """Shared checkpoint/resume machinery of the three tasks.

    Reads (and checks) the checkpoint to resume from, if any, but makes no run directory: the task calls
    :meth:`open` once its data and net are known to be good, so a mistyped ``data.root`` / ``maml.root`` or
    an impossible config leaves no half-made run (``config.yaml``) behind.
    """

    def __init__(self, c: dict[str, Any]):
        self.c = c
        self.device = resolve_device(c["device"])
        self.key = config_hash(training_part(c))
        # RunDir's rule (<out_dir>/checkpoints/last.ckpt), read before the run directory is made
        self.ckpt_path = RunDir.checkpoint_path_in(c["out_dir"], CHECKPOINT)
        ckpt = self.ckpt_path
        self._ck = load_checkpoint(ckpt) if (c["train"]["resume"] and ckpt.exists()) else None
        #: the semantics version of the checkpoint to resume when it is older than SEMANTICS (same config)
        self.old_semantics: int | None = None
        self._semantics_checked = False
        if self._ck is not None and self._ck.get("config_hash") == config_hash(training_part(c, semantics=1)):
            # this config, trained by the code before SEMANTICS: check_semantics decides
            self.old_semantics = 1
        #: a checkpoint of another config is refused by :meth:`open` (before RunDir rewrites config.yaml), not
        #: here: the task builds its net and optimizer in between, so a bad value among the changed keys
        #: (optim.lr=-1, model.dtype=float8) is reported as itself, not as a config unlike the checkpoint's
        self._refusal: CheckpointError | None = None
        if self.old_semantics is None and self._ck is not None and self._ck.get("config_hash") != self.key:
            self._refusal = CheckpointError(
                f"{ckpt} was written by a run with another model/training config"
                f"{_config_diff(self._ck.get('config'), c)}; use another out_dir or train.resume=false"
            )
        # the config as given (a copy: MAML adjusts c["optim"] later), so a resumed run keeps the same hash
        self._recorded = copy.deepcopy(
            {**c, "train": {k: v for k, v in c["train"].items() if k != "stop_after_steps"}}
        )
        self.out: RunDir | None = None

    def check_semantics(self, examples: int | None = None, batch_size: int | None = None) -> None:
        """Before :meth:`open`: a checkpoint of this config written under semantics version 1 resumes only
        when version 1 and :data:`SEMANTICS` train the same: every epoch of ``examples`` at ``batch_size``
        has no partial batch.  MAML (``examples=None``) never: see :data:`SEMANTICS`.  Otherwise a
        CheckpointError naming the folder and what to do."""
        self._semantics_checked = True
        if self.old_semantics is None:
            return
        if examples is None:
            raise CheckpointError(
                f"{self.c['out_dir']}: its checkpoint {self.ckpt_path} was written by tttlab-pilimit before "
                f"2026-12-01 (run semantics {self.old_semantics}), when MAML's outer step changed (the "
                "gradient summed over the meta-batch instead of its mean, a frozen readout left out of the clip "
                "norm) and so did the evaluation's episode count, under the same config; which side wrote it "
                "cannot be told, so it is not resumed; start the run again in that folder with "
                "train.resume=false (or give another out_dir)"
            )
        if batch_size and examples % batch_size:
            old, new = examples // batch_size, math.ceil(examples / batch_size)
            raise CheckpointError(
                f"{self.c['out_dir']}: its checkpoint {self.ckpt_path} was written by tttlab-pilimit before "
                f"2026-12-01 (run semantics {self.old_semantics}), whose epochs dropped the partial last batch "
                f"({old} steps of {batch_size}, {examples % batch_size} of the {examples} examples left out); "
                f"this version keeps it ({new} steps an epoch), so resuming would change the epoch length and "
                "the lr milestones in the middle of the run; start the run again in that folder with "
                "train.resume=false (or give another out_dir)"
            )
        log.info(
            "%s was written under run semantics %d; this run trains the same under %d (no partial batch): "
            "resuming it", self.ckpt_path, self.old_semantics, SEMANTICS,
        )  # fmt: skip

    def open(self) -> RunDir:
        """Make (or reopen) the run directory: ``config.yaml``, ``records.jsonl``, ``checkpoints/``.

        A run that resumes no checkpoint (none there) in a folder holding another training config's records
        is refused (``RunDirConflictError`` naming the keys), as a checkpoint of another config is: their
        epochs were taken as this run's.  ``train.resume=false`` asks to start over: not refused, and the
        folder's checkpoints and records of every config are removed (core ``RunDir(start_over=...)``, one
        warning naming them and the replaced config's keys): the records stayed under their own
        ``config_hash`` beside the new run's, two runs in one folder.  The previous run's checkpoints go first
        (``last``; ``best_val`` where this run writes one), so that a start over killed before its first
        checkpoint is not resumed from them.  An evaluate writes to ``<out_dir>/eval``, a folder of its own,
        which stays."""
        if self._refusal is not None:
            raise self._refusal
        if self._ck is None and self.c["train"]["resume"]:
            check_run_dir(self.c["out_dir"], self._recorded, identity=_training_identity,
                          resumable_keys=RESUMABLE_KEYS, append_env=False,
                          start_over="train.resume=false")  # fmt: skip
        if self.c["train"]["resume"]:
            self.out = RunDir(self.c["out_dir"], self._recorded, resumable_keys=RESUMABLE_KEYS)
        else:
            # the previous run's checkpoints before its records: a start over killed before its first
            # checkpoint was resumed from them, with the records gone (a folder without records, read as done).
            # Only the files this run writes (best_val: MAML with eval.checkpoint=best_val)
            names = (
                (CHECKPOINT, BEST_CHECKPOINT) if self.c["eval"]["checkpoint"] == "best_val" else (CHECKPOINT,)
            )
            removed = []
            for name in names:
                old = RunDir.checkpoint_path_in(self.c["out_dir"], name)
                if old.is_file():
                    old.unlink()
                    removed.append(f"the previous run's checkpoint checkpoints/{old.name}")
            self.out = RunDir(self.c["out_dir"], self._recorded, resumable_keys=RESUMABLE_KEYS,
                              start_over="train.resume=false", removed=removed)  # fmt: skip
        self.ckpt_path = self.out.checkpoint_path(CHECKPOINT)
        return self.out

    def done(self) -> set[tuple]:
        """``(metric, step)`` of the records of this run's config (its ``config_hash``) in the folder: what a
        resumed run does not write again (another config's records there are not this run's)."""
        if self.out is None:
            raise RuntimeError("_Run.open() first")
        # not done_keys(load_records(...)): no pandas import (0.5-1 s) before the first step
        return recorded_keys(self.out.path, keys=["metric", "step"], config_hash=self.out.config_hash)

    def try_resume(self, net, opt, sched) -> dict[str, Any] | None:
        if self.out is None:
            raise RuntimeError("_Run.open() first: the run directory is made before training starts")
        if self._ck is not None and self.old_semantics is not None and not self._semantics_checked:
            raise RuntimeError(
                "_Run.check_semantics() first: an older checkpoint resumes only after that check"
            )
        ck, self._ck = self._ck, None
        if ck is None:
            return None
        net.load_state_dict(ck["model_state"])
        opt.load_state_dict(ck["optimizer"])
        if sched is not None and ck.get("scheduler"):
            sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"])
        log.info("resumed from %s at %s", self.ckpt_path, ck["state"])
        return ck

    def save(self, net, opt, sched, state, history, done: bool) -> None:
        save_checkpoint(
            self.ckpt_path,
            {
                "format": "tttlab.pilimit/1", "model_kind": self.c["model"]["kind"], "config": self.c,
                "model_state": net.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None, "state": dict(state),
                "history": history, "rng": torch.get_rng_state(), "done": done, "config_hash": self.key,
                "semantics": SEMANTICS,
            },
        )  # fmt: skip


def _log_stop(step: int, total: int) -> None:
    """A ``train.stop_after_steps`` stop ended the command quietly (exit 0, the folder printed as for a
    finished run): say that it stopped and how to finish."""
    log.warning("stopped at step %d of %d (train.stop_after_steps), checkpointed: run the command again "
                "without train.stop_after_steps to finish it", step, total)  # fmt: skip


def run(cfg, **overrides) -> Path:
    """Train (or resume) per ``cfg``; returns the run directory."""
    c = validate({**to_dict(cfg), **overrides})
    refuse_distributed()
    if c.get("threads"):
        torch.set_num_threads(int(c["threads"]))
    if c["train"]["task"] == "maml":
        return _run_maml(c)
    return _run_classify(c)


def num_outputs(c: dict[str, Any]) -> int:
    """Output width of a classify/transfer net: the dataset's classes, or ``len(train.classes)``."""
    classes = c["train"].get("classes")
    return len(classes) if classes else NUM_CLASSES[c["data"]["name"]]


def _run_classify(c: dict[str, Any]) -> Path:
    # the config's values first (the device, the dataset's name), then the paths: a user with a wrong
    # device and a wrong transfer.root heard of the path, fixed it, and only then of the device
    resolve_device(c["device"])
    d = c["data"]
    if d["name"] not in NUM_CLASSES:
        raise ConfigError(f"data.name={d['name']!r}; expected one of {sorted(NUM_CLASSES)}")
    t = c["transfer"]
    if c["train"]["task"] == "transfer" and t["dataset"] not in ("mnist", "digits"):
        # read after training: a missing transfer.root is an error now, not after hours of training
        data_root(
            t["root"], t["dataset"], "transfer.root", TRANSFER_LAYOUTS.get(t["dataset"], "a dataset folder")
        )
    R = _Run(c)
    classes = c["train"].get("classes")
    x, y = load_flat(d["name"], d.get("split") or "train", d.get("root"), d.get("num_examples"), classes)
    xt, yt = load_flat(d["name"], c["train"]["test_split"], d.get("root"), c["train"]["num_test"], classes)
    bs, epochs = int(d["batch_size"]), int(c["train"]["epochs"])
    if bs > len(x):
        raise ConfigError(f"data.batch_size={bs} exceeds the {len(x)} training examples")
    # every example once an epoch, the last batch smaller when bs does not divide them: upstream's DataLoader
    # (drop_last=False; CIFAR-10 at batch 32: 1,563 steps, the last of 16 images); the lr milestones count
    # these steps, as upstream's int(epochs x len(train_loader))
    steps_per_epoch = math.ceil(len(x) / bs)
    R.check_semantics(len(x), bs)  # an older checkpoint of this config: the same epochs, or an error now
    net = build_model(c, x.shape[1], num_outputs(c), R.device)
    opt, sched = build_optimizer(c, net, steps_per_epoch, steps_per_epoch * epochs)
    if c["compile"]:
        precision.compile_net(net, c["compile"])
    amp = c["amp"]
    state = {"epoch": 0, "batch": 0, "step": 0, "loss": 0.0, "correct": 0, "seen": 0}
    history: dict[str, list] = {}
    R.open()  # only now: the data, the checkpoint and the net are good
    ck = R.try_resume(net, opt, sched)
    if ck is not None:
        state, history = ck["state"], ck["history"]
    if isinstance(net, InfMLP):
        net.reserve(net.r + steps_per_epoch * epochs * bs)
    method, seed = method_name(c), int(c["seed"])
    defaults = dict(package="pilimit", framework="torch", model=f"{c['model']['kind']}_pinet_mlp", seed=seed,
                    dataset=d["name"], method=method)  # fmt: skip
    stop = c["train"]["stop_after_steps"]
    every = int(c["train"]["checkpoint_every"])
    with R.out.writer(**defaults) as writer:
        have = R.done()
        while state["epoch"] < epochs:
            t0 = time.perf_counter()
            perm = np.random.default_rng((seed, state["epoch"])).permutation(len(x))
            net.train()
            with progress_bar(
                steps_per_epoch, f"epoch {state['epoch'] + 1}", c["logging"]["progress"]
            ) as bar:
                bar.update(state["batch"])
                while state["batch"] < steps_per_epoch:
                    idx = torch.from_numpy(perm[state["batch"] * bs : (state["batch"] + 1) * bs])
                    xb, yb = x[idx].to(R.device), y[idx].to(R.device)
                    with precision.autocast(R.device, amp):
                        out = net(xb).float()
                        loss = F.cross_entropy(out, yb)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    if sched is not None:
                        sched.step()
                    state["loss"] += float(loss.detach()) * len(yb)
                    state["correct"] += int((out.argmax(1) == yb).sum())
                    state["seen"] += len(yb)
                    state["batch"] += 1
                    state["step"] += 1
                    bar.update(1)
                    if state["step"] % every == 0:
                        R.save(net, opt, sched, state, history, done=False)
                    if stop is not None and state["step"] >= int(stop):
                        R.save(net, opt, sched, state, history, done=False)
                        _log_stop(state["step"], steps_per_epoch * epochs)
                        return R.out.path
            epoch = state["epoch"] + 1
            acc, tloss = accuracy(net, xt, yt, int(c["train"]["test_batch_size"]), R.device, amp)
            n = max(state["seen"], 1)
            stats = {"train_loss": state["loss"] / n, "train_accuracy": state["correct"] / n,
                     "test_accuracy": acc, "test_loss": tloss, "rows": int(getattr(net, "M", 0)),
                     "epoch_time_s": time.perf_counter() - t0}  # fmt: skip
            for k, v in stats.items():
                history.setdefault(k, []).append(v)
            for metric in ("test_accuracy", "train_loss", "train_accuracy"):
                if (metric, epoch) not in have:
                    nn_ = len(yt) if metric == "test_accuracy" else n
                    writer.write(metric=metric, step=epoch, value=stats[metric], n=nn_,
                                 wall_time_s=stats["epoch_time_s"], extra={"rows": stats["rows"]})  # fmt: skip
            log.info("epoch %d: %s", epoch, stats)
            state.update(epoch=epoch, batch=0, loss=0.0, correct=0, seen=0)
            # stats before the checkpoint: a kill in between redoes the epoch (the other order left the last
            # epoch out of stats.json for good: the resumed run had nothing left to do)
            R.out.write_stats(history)
            R.save(net, opt, sched, state, history, done=epoch == epochs and c["train"]["task"] == "classify")
        if c["train"]["task"] == "transfer":
            res = transfer_eval(c, net, R.device)
            if ("transfer_accuracy", epochs) not in have:
                writer.write(metric="transfer_accuracy", step=epochs, value=res["accuracy"], n=res["n"],
                             dataset=c["transfer"]["dataset"], extra={"num_train": res["num_train"]})  # fmt: skip
            R.out.write_stats({**history, "transfer": res})
            R.save(net, opt, sched, state, history, done=True)
    return R.out.path


@torch.no_grad()
def _features(net, x, bs, device, amp: str = "none") -> torch.Tensor:
    with precision.autocast(device, amp):
        return torch.cat([net.features(x[i : i + bs].to(device)).double() for i in range(0, len(x), bs)])


@torch.no_grad()
def transfer_eval(c: dict[str, Any], net, device) -> dict[str, Any]:
    """Kernel ridge regression on the trained net's last-layer kernel (one-hot targets minus 0.1)."""
    from .maml import _kernel

    t = c["transfer"]
    x, y = load_flat(t["dataset"], "train", t["root"], t["num_train"], key="transfer.root")
    xt, yt = load_flat(t["dataset"], "test", t["root"], t["num_test"], key="transfer.root")
    bs = int(c["train"]["test_batch_size"])
    f, ft = _features(net, x, bs, device, c["amp"]), _features(net, xt, bs, device, c["amp"])
    k = _kernel(net, f, f)
    kt = _kernel(net, ft, f)
    targets = F.one_hot(y.to(device), int(y.max()) + 1).double() - 0.1
    k.diagonal().add_(float(t["ridge"]) * k.diagonal().mean())
    alpha = torch.linalg.solve(k, targets)
    pred = (kt @ alpha).argmax(1).cpu()
    return {"accuracy": float((pred == yt).float().mean()), "n": len(yt), "num_train": len(y)}


def _maml_classes(m: dict[str, Any]):
    if m["dataset"] == "mnist":
        return mnist_classes("train", range(5), per_class=1000), mnist_classes("test", range(5, 10))
    if m["dataset"] == "omniglot":
        return omniglot_classes(m["root"], "train", m["image_size"]), omniglot_classes(
            m["root"], "test", m["image_size"]
        )
    raise ConfigError(f"maml.dataset={m['dataset']!r}; expected mnist or omniglot")


def split_validation(classes: list, fraction: float, num_ways: int) -> tuple[list, list]:
    """``(meta-train, validation)``: ``round(fraction x len(classes))`` classes drawn with the fixed
    :data:`VAL_SPLIT_SEED` become the validation classes (both keep their original order)."""
    n = len(classes)
    k = round(float(fraction) * n)
    if k < num_ways or n - k < num_ways:
        raise ConfigError(
            f"eval.val_fraction={fraction} of the {n} meta-train classes leaves {k} validation and {n - k} "
            f"meta-train classes; expected at least maml.num_ways={num_ways} of each"
        )
    val = set(np.random.default_rng(VAL_SPLIT_SEED).permutation(n)[:k].tolist())
    return [x for i, x in enumerate(classes) if i not in val], [x for i, x in enumerate(classes) if i in val]


def _run_maml(c: dict[str, Any]) -> Path:
    R = _Run(c)
    m = c["maml"]
    train_classes, test_classes = _maml_classes(m)
    best_val = c["eval"]["checkpoint"] == "best_val"
    if best_val:  # validation classes held out of meta-training, as upstream's meta-val split
        train_classes, val_classes = split_validation(
            train_classes, c["eval"]["val_fraction"], int(m["num_ways"])
        )
    d_in = int(train_classes[0][0].size)
    epochs, steps_per_epoch = int(c["train"]["epochs"]), int(m["num_batches"])
    R.check_semantics()  # an older MAML checkpoint of this config: an error now
    net = build_model(c, d_in, int(m["num_ways"]), R.device)
    if c["model"]["kind"] != "inf" and not m["gproj_outer"]:
        c["optim"]["gproj"] = False
    if c["model"]["kind"] == "finite":
        c["optim"]["gproj"] = bool(m["gproj_outer"])
    opt, sched = build_optimizer(c, net, steps_per_epoch, steps_per_epoch * epochs)
    if c["compile"]:
        precision.compile_net(net, c["compile"])
    amp = c["amp"]
    state = {"epoch": 0, "batch": 0, "step": 0, "loss": 0.0, "acc": 0.0}
    if best_val:
        state.update(best_val=None, best_epoch=0)  # the best validation accuracy so far and its epoch
    history: dict[str, list] = {}
    R.open()  # only now: the episodes' classes, the checkpoint and the net are good
    best_path = R.out.checkpoint_path(BEST_CHECKPOINT)
    ck = R.try_resume(net, opt, sched)
    if ck is not None:
        state, history = ck["state"], ck["history"]
    rows_per_step = (
        int(m["meta_batch_size"]) * int(m["num_ways"]) * (int(m["num_shots"]) + int(m["num_shots_test"]))
    )
    if isinstance(net, InfMLP):
        net.reserve(net.r + 2 * rows_per_step * steps_per_epoch * epochs)
    seed = int(c["seed"])
    defaults = dict(package="pilimit", framework="torch", model=f"{c['model']['kind']}_pinet_mlp", seed=seed,
                    dataset=f"{m['dataset']}_fewshot", method=method_name(c))  # fmt: skip
    stop, every = c["train"]["stop_after_steps"], int(c["train"]["checkpoint_every"])
    args = (int(m["num_ways"]), int(m["num_shots"]), int(m["num_shots_test"]))
    with R.out.writer(**defaults) as writer:
        have = R.done()
        while state["epoch"] < epochs:
            t0 = time.perf_counter()
            with progress_bar(
                steps_per_epoch, f"meta-epoch {state['epoch'] + 1}", c["logging"]["progress"]
            ) as bar:
                bar.update(state["batch"])
                while state["batch"] < steps_per_epoch:
                    rng = np.random.default_rng((seed, state["epoch"], state["batch"]))
                    eps = [
                        sample_episode(train_classes, *args, rng) for _ in range(int(m["meta_batch_size"]))
                    ]
                    eps = [type(e)(*(t.to(R.device) for t in (e.xs, e.ys, e.xq, e.yq))) for e in eps]
                    with precision.autocast(R.device, amp):
                        loss, acc = meta_loss(net, eps, float(m["step_size"]), int(m["num_inner_steps"]))
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    if sched is not None:
                        sched.step()
                    state["loss"] += float(loss.detach()) / len(eps)  # the mean over episodes
                    state["acc"] += acc
                    state["batch"] += 1
                    state["step"] += 1
                    bar.update(1)
                    if state["step"] % every == 0:
                        R.save(net, opt, sched, state, history, done=False)
                    if stop is not None and state["step"] >= int(stop):
                        R.save(net, opt, sched, state, history, done=False)
                        _log_stop(state["step"], steps_per_epoch * epochs)
                        return R.out.path
            epoch = state["epoch"] + 1
            # num_test_batches batches of meta_batch_size tasks, as upstream's meta/train.py (and test.py) load
            # their evaluation tasks: 500 x 8 = 4,000 episodes in the paper's commands
            episodes = int(m["num_test_batches"]) * int(m["meta_batch_size"])
            # best_val: the validation classes every epoch (the meta-test classes once, after training)
            metric, classes, eval_seed = (
                ("val_fewshot_accuracy", val_classes, 20_000 + seed) if best_val
                else ("fewshot_accuracy", test_classes, 10_000 + seed)
            )  # fmt: skip
            with precision.autocast(R.device, amp):
                res = evaluate_fewshot(net, classes, m, episodes, seed=eval_seed, device=R.device)
            stats = {"meta_train_loss": state["loss"] / steps_per_epoch, "meta_train_accuracy": state["acc"] / steps_per_epoch,
                     metric: res["accuracy"], metric.replace("accuracy", "ci95"): res["ci95"],
                     "rows": int(getattr(net, "M", 0)), "epoch_time_s": time.perf_counter() - t0}  # fmt: skip
            for k, v in stats.items():
                history.setdefault(k, []).append(v)
            if (metric, epoch) not in have:
                writer.write(metric=metric, step=epoch, value=res["accuracy"],
                             n=res["episodes"] * args[0] * args[2], wall_time_s=stats["epoch_time_s"],
                             extra={"ci95": res["ci95"], "ways": args[0], "shots": args[1], "rows": stats["rows"]})  # fmt: skip
            log.info("meta-epoch %d: %s", epoch, stats)
            if best_val and (state["best_val"] is None or res["accuracy"] > state["best_val"]):
                # the first epoch of the highest validation accuracy (upstream: saved when strictly better);
                # written before last.ckpt: a kill in between redoes the epoch, which writes the same file again
                save_checkpoint(best_path, {"format": "tttlab.pilimit/1", "model_kind": c["model"]["kind"],
                                            "config": c, "config_hash": R.key, "semantics": SEMANTICS,
                                            "model_state": net.state_dict(), "epoch": epoch,
                                            "val_accuracy": res["accuracy"]})  # fmt: skip
                state.update(best_val=res["accuracy"], best_epoch=epoch)
            state.update(epoch=epoch, batch=0, loss=0.0, acc=0.0)
            R.out.write_stats(history)  # before the checkpoint, as in classify
            R.save(net, opt, sched, state, history, done=epoch == epochs and not best_val)
        if best_val:
            res = _test_best_val(c, best_path, test_classes, d_in, R.device, seed)
            if ("fewshot_accuracy", epochs) not in have:
                writer.write(metric="fewshot_accuracy", step=epochs, value=res["accuracy"],
                             n=res["episodes"] * args[0] * args[2],
                             extra={"ci95": res["ci95"], "ways": args[0], "shots": args[1],
                                    "checkpoint": "best_val", "best_epoch": res["best_epoch"],
                                    "val_accuracy": res["val_accuracy"]})  # fmt: skip
            R.out.write_stats({**history, "best_val": res})
            R.save(net, opt, sched, state, history, done=True)
    return R.out.path


def load_best_val(path: Path, c: dict[str, Any], d_in: int, device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``(net, checkpoint)`` of a run's ``checkpoints/best_val.ckpt`` (``eval.checkpoint=best_val``)."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; expected the best-validation net of an eval.checkpoint="
                              "best_val run that finished at least one epoch")  # fmt: skip
    ck = load_checkpoint(path)
    net = build_model(c, d_in, int(c["maml"]["num_ways"]), device)
    net.load_state_dict(ck["model_state"])
    return net.eval(), ck


def _test_best_val(
    c: dict[str, Any], path: Path, test_classes, d_in: int, device, seed: int
) -> dict[str, Any]:
    """The meta-test few-shot accuracy of the best-validation net (the same episodes as eval.checkpoint=last
    evaluates after every epoch)."""
    m = c["maml"]
    net, ck = load_best_val(path, c, d_in, device)
    if c["compile"]:
        precision.compile_net(net, c["compile"])
    episodes = int(m["num_test_batches"]) * int(m["meta_batch_size"])
    with precision.autocast(device, c["amp"]):
        res = evaluate_fewshot(net, test_classes, m, episodes, seed=10_000 + seed, device=device)
    return {**res, "best_epoch": int(ck["epoch"]), "val_accuracy": float(ck["val_accuracy"])}


def load_trained(run_dir, device="cpu"):
    """``(net, config)`` of a finished run directory."""
    path = RunDir.checkpoint_path_in(run_dir, CHECKPOINT)
    if not path.exists():
        raise CheckpointError(
            f"{run_dir}: no checkpoints/{CHECKPOINT}.ckpt; expected a tttlab-pilimit-train run"
        )
    ck = load_checkpoint(path)
    c = ck["config"]
    if c["train"]["task"] == "maml":
        m = c["maml"]
        d_in, d_out = int(m["image_size"]) ** 2, int(m["num_ways"])
    else:
        d_in = {"mnist": 784, "digits": 784, "cifar10": 3072, "imagenet32": 3072}[c["data"]["name"]]
        d_out = num_outputs(c)
    net = build_model(c, d_in, d_out, resolve_device(device) if isinstance(device, str) else device)
    net.load_state_dict(ck["model_state"])
    return net.eval(), c, ck


def main() -> None:
    """``tttlab-pilimit-train``: Hydra overrides, plus upstream's flags (translated, :mod:`tttlab.pilimit.cli`)."""
    import hydra

    from .cli import apply_upstream_translation

    apply_upstream_translation("tttlab-pilimit-train")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    register_configs()

    @hydra.main(config_path="conf", config_name="config", version_base=None)
    def _main(cfg) -> None:
        with user_errors("tttlab-pilimit-train"):
            apply_log_level(cfg)  # under Hydra basicConfig is a no-op: logging.level set here
            print(run(cfg))

    check_hydra_command("tttlab-pilimit-train", "tttlab.pilimit.conf", "config")
    _main()


if __name__ == "__main__":
    main()
