"""Joint training of a model and an engine's self-supervised head, then the seed 004 noisy evaluation.

    tttlab-torch-ttt-train +experiment=mnist_tutorial          # seed 004 (~2 min on 2 idle cores; 5 min at load ~12, 1 thread)
    python -m tttlab.torch_ttt.train +experiment=smoke         # seconds
    tttlab-torch-ttt-train +experiment=mnist_bn                # the BatchNorm model of the mnist_c runs

Flow (each step a small function): :func:`load_mnist` (embedded MNIST, normalised as the tutorial) ->
:func:`build_model_and_engine` (the auxiliary head exists before the optimizer is made, so it is trained)
-> :func:`train_epoch` (``loss = task + ssl_weight * ssl``; ``train.ssl_weight: null``, the shipped
configs' value, is the engine's own ``joint_training_weight``: 0.35 (the torch-ttt tutorial's) for all
but IT3, whose upstream code weighs both terms equally, 1.0; IT3 gets the one-hot labels as ``target``,
its training scheme ``f(x, y) ~ y``; atomic checkpoints every
``train.checkpoint_every`` steps and at each epoch end) -> :func:`evaluate_noisy` (clean accuracy, the
tutorial's ``x + 2 N(0, 1)`` test stream without TTT, and with TTT after each of ``eval.num_steps``).

Run directory (``out_dir``, core ``RunDir``): ``config.yaml``, ``env.json``, ``records.jsonl`` (core
schema), ``stats.json`` (per-epoch training curves and the evaluation summary), ``checkpoints/last.ckpt``
(model, engine incl. heads, optimizer, RNG state, position in the epoch).  A run started again in the same
directory resumes from ``last.ckpt`` and ends with the same records (bitwise on CPU); evaluation records
already written are not written twice.  ``train.stop_after_steps`` stops the process after that many
optimisation steps *without* a checkpoint, as a kill would (used by the resume test).

Options (top-level keys, as ttt_mae's): ``amp=none|bf16`` runs the training and evaluation forwards
under bfloat16 autocast (``engine.amp``; parameters, gradients and the Adam state stay float32, the
task and self-supervised losses are computed in float32); ``compile=true`` compiles the model in place
(``engine.compile()``; ``compile=<torch.compile mode>``, e.g. ``reduce-overhead``, passes that mode),
refused for the engines that read a features layer through a hook (TTT, TTT++, IT3, masked TTT, ActMAD:
their training forward could not run compiled).  Both enter the training
config's hash when not at their defaults: a checkpoint is not resumed with other values.

Differences from the tutorial: the noise is drawn once from ``eval.noise_seed`` and the same noisy images
serve every evaluation (no TTT and TTT after 0..3 steps are paired; the tutorial drew fresh noise in each
pass); the embedded MNIST has 50,000 training images (torchvision's has 60,000).
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tttlab.core._io import atomic_path
from tttlab.core.cli import apply_log_level, check_hydra_command, user_errors
from tttlab.core.config import DataConfig, RunConfig, package_yaml, to_plain
from tttlab.core.errors import CheckpointError, ConfigError, TTTLabError
from tttlab.core.lazy import lazy_exports
from tttlab.core.records import RunDir, check_run_dir, config_hash, read_jsonl

from .engine_registry import EngineRegistry, get_engine

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .engine.base_engine import BaseEngine

#: names imported where they are used, as they import torch (1.3-2.5 s), which ``--help`` and Hydra's checks
#: (``--cfg job``) do not need; still attributes of this module (``T.build_model``), loaded on first use
_TORCH_NAMES = {
    "OPTIMIZERS": ".engine.base_engine", "BaseEngine": ".engine.base_engine", "MODELS": ".models",
    "build_model": ".models", "model_info": ".models", "check_amp": ".precision", "check_compile": ".precision",
    "compile_kwargs": ".precision", "read_torch_file": "tttlab.core.torch", "resolve_device": "tttlab.core.torch",
}  # fmt: skip

__getattr__, __dir__ = lazy_exports(globals(), _TORCH_NAMES)


log = logging.getLogger("tttlab.torch_ttt.train")

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: engines whose auxiliary head (or decoder / embedder) must be trained jointly with the model
HEADED = ("ttt", "ttt_pp", "ittt", "masked_ttt")
CHECKPOINT = "last"


def checkpoint_file(run_dir) -> Path:
    """A train run's checkpoint (``<run_dir>/checkpoints/last.ckpt``, core's RunDir rule), without making
    anything: evaluate reads it from runs it did not open."""
    return RunDir.checkpoint_path_in(run_dir, CHECKPOINT)


#: the corruption name of the tutorial's noise in records (it is not a Hendrycks corruption)
TUTORIAL_NOISE = "tutorial_noise"


# ----------------------------------------------------------------------------------------------------------
# config schema (unknown keys are errors; conf/config.yaml fills it)


@dataclass
class ModelConfig:
    name: str = "tutorial_net"  # see tttlab.torch_ttt.models.MODELS


@dataclass
class TrainSection:
    engine: str = "ttt"  # engine trained jointly (its head); "source" = plain supervised training
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    ssl_weight: float | None = None  # None: the engine's joint_training_weight (resolved by _validate)
    epochs: int = 1
    lr: float = 0.01
    optimizer: str = "adam"  # adam | sgd | adamw
    shuffle: bool = False  # the tutorial does not shuffle; True: a permutation per (seed, epoch)
    checkpoint_every: int = 200  # optimisation steps between checkpoints (and at every epoch end)
    resume: bool = True
    stop_after_steps: int | None = None  # simulate a kill after this many steps (tests)


@dataclass
class NoisyEvalConfig:
    enabled: bool = True
    batch_size: int = 32
    noise_std: float = 2.0
    noise_seed: int = 0
    num_examples: int | None = None  # test images (first N); None: all 10,000
    num_steps: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    lr: float | None = None  # None: the engine's default (TTT: 1e-2, as upstream)
    optimizer_name: str | None = None


@dataclass
class TrainConfig(RunConfig):
    experiment_name: str = "default"
    amp: str = "none"  # none | bf16: bfloat16 autocast of the forwards (training and evaluation)
    # false | true (torch's default mode) | a torch.compile mode (default, reduce-overhead, max-autotune,
    # max-autotune-no-cudagraphs): the model compiled in place (engines without hooks only, see README)
    compile: Any = False
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: NoisyEvalConfig = field(default_factory=NoisyEvalConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="tttlab_torch_ttt_train", node=TrainConfig)


def to_dict(cfg) -> dict[str, Any]:
    """A plain dict of an OmegaConf / dataclass / mapping config (``None`` -> {})."""
    return to_plain(cfg)


def conf_yaml(relative: str) -> dict[str, Any]:
    """A YAML file of the shipped ``conf/`` (``defaults`` and ``hydra`` keys dropped), unresolved."""
    return package_yaml("tttlab.torch_ttt.conf", relative)


def experiment_names() -> list[str]:
    """The ``+experiment=`` names shipped in ``conf/experiment/`` (sorted)."""
    from importlib import resources

    folder = resources.files("tttlab.torch_ttt.conf").joinpath("experiment")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def training_experiment_names() -> list[str]:
    """The experiments of :func:`experiment_names` that this command composes (sorted): those whose YAML sets
    only keys of :class:`TrainConfig`.  The others (``paper_tent_cifar10c``, ``photos_mobilenet_v2``, ...) are
    the evaluate command's; as an evaluation's ``train_experiment`` they ended in an OmegaConf traceback."""
    from dataclasses import fields

    keys = {f.name for f in fields(TrainConfig)}
    return [n for n in experiment_names() if set(conf_yaml(f"experiment/{n}.yaml")) <= keys]


#: The override that empties ``train.engine_kwargs`` (:func:`clears_train_engine_kwargs`).
CLEAR_TRAIN_ENGINE_KWARGS = "train.engine_kwargs={}"


def clears_override(overrides, override: str) -> bool:
    """Whether the ``key=value`` ``overrides`` hold ``override`` (an empty mapping, ``key={}``; spaces and a
    leading ``+`` ignored).  Hydra, and OmegaConf's merge, merge an empty mapping into the one a YAML file
    sets, so that it changes nothing; the commands read it from the overrides and empty the mapping."""
    return any(_is_override(o, override) for o in overrides or ())


def _is_override(o, override: str) -> bool:
    return str(o).replace(" ", "").lstrip("+") == override


def _override_value(value: str):
    """The value of a ``key=value`` override as Hydra's grammar reads it (what the command line and
    :func:`apply_overrides` set; a sweep or a malformed value: the text), to tell a mapping (merged into what
    is there) from a whole value (:func:`named_paths`).  Not YAML's reading: Hydra's ``{a:1}`` is the mapping
    ``{'a': 1}``, where YAML reads one key ``'a:1'``."""
    from tttlab.core.config import parse_override

    try:
        return parse_override(f"x={value}").value()
    except ConfigError:
        return value


def named_keys(overrides, mapping: str) -> set[str]:
    """The top-level keys of the mapping at dotted path ``mapping`` (``engine.kwargs``) that the ``key=value``
    ``overrides`` set: ``[+|++]<mapping>.<key>[...]=...`` and ``<mapping>={<key>: ..., ...}``.  A deletion
    (``~<mapping>.<key>``) sets none."""
    return set(named_paths(overrides, mapping))


def named_paths(overrides, mapping: str) -> dict[str, Any]:
    """What the ``key=value`` ``overrides`` set inside the mapping at dotted path ``mapping``, as a tree:
    ``{key: True}`` where an override gave the entry's whole value (a scalar or a list:
    ``<mapping>.a.b=1`` gives ``{"a": {"b": True}}``), ``{key: {...}}`` where it gave a mapping, which Hydra
    and OmegaConf merge into what is there, so only its own keys are the override's (``<mapping>.a={b: 1}``
    and ``<mapping>={a: {b: 1}}`` give the same tree; an empty one, ``{}``, names no key below it).
    Deletions (``~...``) set nothing."""
    tree: dict[str, Any] = {}
    for o in overrides or ():
        key, sep, value = str(o).partition("=")
        key = key.strip()
        if not sep or key.startswith("~"):
            continue
        key = key.lstrip("+")
        if key.startswith(mapping + "."):
            _mark(tree, key[len(mapping) + 1 :].split("."), _override_value(value))
        elif key == mapping:
            given = _override_value(value)
            for k, v in (given if isinstance(given, dict) else {}).items():
                _mark(tree, [str(k)], v)
    return tree


def _mark(tree: dict[str, Any], path: list[str], given: Any) -> None:
    """Record in ``tree`` (:func:`named_paths`) that an override set ``given`` at ``path``, in override
    order: a later whole value (``True``) covers what earlier overrides set below it; an entry already
    covered whole stays so (what is merged into it later is the overrides' too)."""
    node = tree
    for part in path[:-1]:
        if node.get(part) is True:
            return
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    last = path[-1]
    if not isinstance(given, dict):
        node[last] = True
    elif node.get(last) is not True:
        if not isinstance(node.get(last), dict):
            node[last] = {}
        for k, v in given.items():
            _mark(node[last], [str(k)], v)


def _project(composed: Any, tree: dict[str, Any]) -> dict[str, Any]:
    """The entries of the mapping ``composed`` that ``tree`` (:func:`named_paths`) names, at any depth."""
    out = {}
    for k, v in composed.items():
        named = tree.get(str(k))
        if named is None:
            continue
        out[k] = _project(v, named) if isinstance(named, dict) and isinstance(v, Mapping) else v
    return out


def cleared_mapping(composed, overrides, mapping: str) -> dict[str, Any]:
    """What ``<mapping>={}`` (e.g. ``engine.kwargs={}``) leaves of the ``composed`` mapping: what the same
    ``overrides`` set explicitly (:func:`named_paths`), in whichever order they come (before or after the
    ``{}``), at any depth (``+engine.kwargs.a.b=1`` keeps ``a.b``, not the rest of a composed ``a``), and
    nothing of the YAML's or a preset's.  ``composed`` holds the overrides' values as Hydra (or
    :func:`apply_overrides`) parsed them."""
    return _project(composed or {}, named_paths(overrides, mapping))


def _is_deletion(o) -> bool:
    return str(o).lstrip().startswith("~")


def apply_overrides(config, overrides, *clears: str, schema=None):
    """The OmegaConf ``config`` with the ``key=value`` ``overrides`` applied in order, as the command line
    would apply them (:func:`tttlab.core.config.apply_overrides`: Hydra's forms, values and refusals, on a
    config composed on ``schema``).  The ``clears`` overrides (``key={}``) are left out: the caller empties
    that mapping itself, then puts back what the other overrides set (:func:`cleared_mapping`); Hydra would
    merge the empty mapping into the YAML's, changing nothing."""
    from tttlab.core.config import apply_overrides as core_apply_overrides

    kept = [o for o in overrides or () if not any(_is_override(o, c) for c in clears)]
    return core_apply_overrides(config, kept, schema)


def keep_deletions(merged, composed: Mapping, command_line) -> None:
    """Delete from the OmegaConf ``merged`` config, in place, the keys the command line's deletions
    (``~key`` / ``~key=value`` in ``command_line``) removed from the config Hydra ``composed`` from it: a
    caller that merges the shipped YAML under ``composed`` (for partial mappings) would restore them.  A key
    the same command line set again after deleting it is in ``composed`` and stays."""
    from omegaconf import OmegaConf, open_dict

    for o in command_line or ():
        if not _is_deletion(o):
            continue
        key = str(o).strip()[1:].partition("=")[0].strip()
        node: Any = composed
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            continue  # still in the composed config: set again after the deletion
        parent, _, last = key.rpartition(".")
        holder = OmegaConf.select(merged, parent, throw_on_missing=False) if parent else merged
        if OmegaConf.is_dict(holder) and last in holder:
            with open_dict(merged):
                del holder[last]


def clears_train_engine_kwargs(overrides) -> bool:
    """Whether ``overrides`` hold ``train.engine_kwargs={}``: no engine arguments from ``conf/config.yaml`` nor
    from the experiment (``mnist_tutorial``'s ``features_layer_name: fc2``), the engine class's own defaults
    (and the model registry's layers), as ``engine.kwargs={}`` means for the evaluation.  Explicit
    ``train.engine_kwargs.<key>=...`` overrides among the same ``overrides`` still apply
    (:func:`cleared_mapping`)."""
    return clears_override(overrides, CLEAR_TRAIN_ENGINE_KWARGS)


def train_config(
    experiment: str | None = None, overrides: list[str] | None = None, *, clear_engine_kwargs: bool = False
) -> dict[str, Any]:
    """The training config as Hydra composes it (``config.yaml``, then ``experiment/<experiment>.yaml``,
    then the command line's overrides with its rules, :func:`apply_overrides`), without Hydra (usable inside a
    running Hydra app), validated.  ``clear_engine_kwargs`` (or ``train.engine_kwargs={}`` among ``overrides``):
    ``train.engine_kwargs`` holds only what ``overrides`` set in it (:func:`clears_train_engine_kwargs`)."""
    from omegaconf import OmegaConf

    parts = [conf_yaml("config.yaml")]
    if experiment:
        parts.append(conf_yaml(f"experiment/{experiment}.yaml"))
    merged = apply_overrides(
        OmegaConf.merge(*parts), overrides, CLEAR_TRAIN_ENGINE_KWARGS, schema=TrainConfig
    )
    c = OmegaConf.to_container(merged, resolve=True)
    if clear_engine_kwargs or clears_train_engine_kwargs(overrides):
        c["train"]["engine_kwargs"] = cleared_mapping(
            c["train"].get("engine_kwargs"), overrides, "train.engine_kwargs"
        )
    return _validate(c)


# ----------------------------------------------------------------------------------------------------------
# building blocks


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28, 1) -> float (N, 1, 28, 28), ``(x / 255 - 0.1307) / 0.3081`` as the tutorial."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - MNIST_MEAN) / MNIST_STD


def load_mnist(split: str, num_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_examples`` images of an embedded MNIST split, normalised, and their labels."""
    import torch

    from tttlab.core import data

    ds = data.mnist(split)
    n = len(ds) if num_examples is None else min(int(num_examples), len(ds))
    images, labels = ds.take(np.arange(n))
    return normalise(images), torch.from_numpy(np.asarray(labels, dtype=np.int64))


def noisy(x: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """The tutorial's corruption ``x + std * N(0, 1)`` (after normalisation), from its own generator."""
    import torch

    return x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(int(seed)))


def _accepted(cls: type, **candidates) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in candidates.items() if k in params}


def build_engine(
    name: str,
    model: nn.Module,
    model_name: str,
    kwargs: dict[str, Any] | None = None,
    optimization: dict[str, Any] | None = None,
    example_input: torch.Tensor | None = None,
) -> BaseEngine:
    """Engine ``name`` around ``model`` with the layers the model registry names (unless ``kwargs`` do)."""
    from .models import model_info

    cls = get_engine(name)
    info = model_info(model_name)
    kwargs = dict(kwargs or {})
    check_engine_kwargs(name, kwargs)
    try:
        return _construct(cls, name, model, info, dict(kwargs), optimization, example_input)
    except (TypeError, ValueError) as exc:
        if not kwargs or isinstance(exc, TTTLabError):
            raise
        raise ConfigError(f"engine {name!r} rejects its arguments {kwargs}: {exc}") from exc


def check_engine_kwargs(name: str, kwargs: dict[str, Any] | None, key: str = "engine.kwargs") -> None:
    """A :class:`ConfigError` naming the keys of ``kwargs`` that engine ``name``'s constructor does not take
    (checked with the config, before any training: a misspelt key used to fail only after it)."""
    cls = get_engine(name)
    accepted = [
        k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "model", "args", "kwargs")
    ]
    unknown = sorted(set(kwargs or {}) - set(accepted) - {"optimization_parameters"})
    if unknown:
        raise ConfigError(
            f"{key}: engine {name!r} has no argument(s) {unknown}; its arguments are {accepted}"
        )


def registry_engine_kwargs(name: str, model_name: str) -> dict[str, Any]:
    """The engine arguments :func:`build_engine` takes from the model registry when the given kwargs do not
    set them: ActMAD's ``features_layer_names``, the ``features_layer_name`` of the engines that take one
    (``model_info(model_name)``); ``{}`` for the other engines."""
    from .models import model_info

    cls, info = get_engine(name), model_info(model_name)
    if name == "actmad":
        return {"features_layer_names": list(info.actmad_layers)}
    if "features_layer_name" in inspect.signature(cls.__init__).parameters:
        return {"features_layer_name": info.layer_for(name)}
    return {}


def _construct(cls, name, model, info, kwargs, optimization, example_input) -> BaseEngine:
    optimization = {k: v for k, v in (optimization or {}).items() if v is not None}
    registry = registry_engine_kwargs(name, info.name)
    if name == "actmad":
        layers = kwargs.pop("features_layer_names", None) or registry["features_layer_names"]
        return cls(model, features_layer_names=list(layers), optimization_parameters=optimization, **kwargs)
    if "features_layer_name" in registry:
        kwargs.setdefault("features_layer_name", registry["features_layer_name"])
        extra = _accepted(cls, example_input=example_input) if example_input is not None else {}
        extra = {k: v for k, v in extra.items() if k not in kwargs}
        return cls(model, optimization_parameters=optimization, **extra, **kwargs)
    return cls(model, optimization, **kwargs)


def build_model_and_engine(cfg: dict[str, Any], example_input: torch.Tensor, device: torch.device):
    """Model (seeded init), its training engine with the head built now, and the optimizer over both."""
    import torch

    from .models import build_model
    from .precision import compile_kwargs

    torch.manual_seed(int(cfg["seed"]))
    model = build_model(cfg["model"]["name"]).to(device)
    t = cfg["train"]
    engine = build_engine(t["engine"], model, cfg["model"]["name"], t["engine_kwargs"], None, example_input)
    engine.to(device)
    engine.amp = cfg.get("amp", "none")  # bf16: the forwards autocast, parameters and Adam state float32
    kwargs = compile_kwargs(cfg.get("compile"))
    if kwargs is not None:
        engine.compile(**kwargs)
    name, lr = str(t["optimizer"]).lower(), float(t["lr"])
    if name == "adam":
        opt = torch.optim.Adam(engine.parameters(), lr=lr)
    elif name == "adamw":
        opt = torch.optim.AdamW(engine.parameters(), lr=lr)
    elif name == "sgd":
        opt = torch.optim.SGD(engine.parameters(), lr=lr, momentum=0.9)
    else:
        raise ConfigError(f"train.optimizer={name!r}; expected adam, adamw or sgd")
    return model, engine, opt


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, rename: never a half-written file."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    from tttlab.core.torch import read_torch_file

    try:  # a truncated or foreign file: core's safe reader names the path and torch's diagnosis
        ck = read_torch_file(path, option=None, what="tttlab-torch-ttt checkpoint")
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}; expected a torch.save file written by tttlab-torch-ttt-train (a damaged one: train "
            "again, with train.resume=false in that out_dir or in another out_dir)"
        ) from None
    if not isinstance(ck, dict) or not str(ck.get("format", "")).startswith("tttlab.torch_ttt/"):
        what = f"a dict with keys {sorted(map(str, ck))[:6]}" if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(
            f"{path} holds {what}, not a tttlab-torch-ttt checkpoint (format 'tttlab.torch_ttt/1', written by "
            "tttlab-torch-ttt-train)"
        )
    return ck


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not (enabled and sys.stderr.isatty()))


def ssl_weight(train_section: dict[str, Any], engine: BaseEngine | type[BaseEngine]) -> float:
    """``train.ssl_weight``, or the engine's :attr:`~BaseEngine.joint_training_weight` where it is null."""
    value = train_section.get("ssl_weight")
    return float(engine.joint_training_weight if value is None else value)


def train_epoch(
    engine: BaseEngine,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    state: dict[str, Any],
    cfg: dict[str, Any],
    on_checkpoint,
    device: torch.device,
) -> bool:
    """One epoch from ``state["batch"]`` on (a resumed epoch skips the batches already done).

    ``state`` holds ``epoch``, ``batch``, ``step`` and the running sums; ``on_checkpoint()`` is called every
    ``checkpoint_every`` steps.  Returns False when ``stop_after_steps`` ended the process early.
    """
    import torch
    import torch.nn.functional as F

    t, bs = cfg["train"], int(cfg["data"]["batch_size"])
    n = len(x)
    if t["shuffle"]:
        order = torch.from_numpy(np.random.default_rng([int(cfg["seed"]), state["epoch"]]).permutation(n))
    else:
        order = torch.arange(n)
    num_batches = -(-n // bs)
    engine.train()
    with progress_bar(num_batches, f"epoch {state['epoch'] + 1}", cfg["logging"]["progress"]) as bar:
        bar.update(state["batch"])
        for b in range(state["batch"], num_batches):
            idx = order[b * bs : (b + 1) * bs]
            xb, yb = x[idx].to(device), y[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            # e.g. IT3 learns f(x, y) ~ y from the ground truth fed in (engine.training_kwargs)
            out, ssl = engine(xb, **engine.training_kwargs(yb))
            task = F.cross_entropy(out, yb)
            loss = task + ssl_weight(t, engine) * ssl
            loss.backward()
            optimizer.step()
            state["correct"] += int((out.detach().argmax(1) == yb).sum())
            state["seen"] += len(yb)
            state["task_loss"] += float(task.detach()) * len(yb)
            state["ssl_loss"] += float(ssl.detach()) * len(yb)
            state["batch"], state["step"] = b + 1, state["step"] + 1
            bar.update(1)
            if t["stop_after_steps"] is not None and state["step"] >= int(t["stop_after_steps"]):
                log.warning("stopping after %d steps (train.stop_after_steps) as a kill would: the steps since "
                            "the last checkpoint are not saved; run again without it to resume from that "
                            "checkpoint", state["step"])  # fmt: skip
                return False
            if state["batch"] < num_batches and state["step"] % int(t["checkpoint_every"]) == 0:
                on_checkpoint()
    return True


def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device, amp: str = "none"
) -> float:
    import torch

    from .precision import autocast

    model.eval()
    correct = 0
    with torch.no_grad(), autocast(torch.device(device).type, amp):  # no_grad: was its decorator
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            correct += int((model(xb.to(device)).argmax(1) == yb.to(device)).sum())
    return correct / max(len(y), 1)


def evaluate_noisy(
    engine: BaseEngine,
    x: torch.Tensor,
    y: torch.Tensor,
    num_steps: int,
    batch_size: int,
    device,
    *,
    lr: float | None = None,
    optimizer_name: str | None = None,
    progress: bool = False,
) -> tuple[float, int, float]:
    """``(accuracy, n, seconds)`` of ``engine`` adapting ``num_steps`` steps per batch, reset per batch."""
    engine.eval()
    settings = engine.optimization_parameters
    settings["num_steps"], settings["reset"] = int(num_steps), "per_batch"
    if lr is not None:
        settings["lr"] = float(lr)
    if optimizer_name is not None:
        settings["optimizer_name"] = optimizer_name
    correct, t0 = 0, time.perf_counter()
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    with progress_bar(len(batches), f"TTT {num_steps} steps", progress) as bar:
        for xb, yb in batches:
            out, _ = engine(xb.to(device))
            correct += int((out.argmax(1) == yb.to(device)).sum())
            bar.update(1)
    return correct / max(len(y), 1), len(y), time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------
# the run


def compilable_engines() -> list[str]:
    """Engines whose adaptation and joint-training forwards a compiled model runs (no inner-layer hooks)."""
    return [n for n in EngineRegistry.names() if get_engine(n).compiled_adaptation]


def _validate(cfg) -> dict[str, Any]:
    from tttlab.core.config import validate

    from .engine.base_engine import OPTIMIZERS
    from .models import MODELS, model_info
    from .precision import check_amp, check_compile

    c = to_dict(validate(to_dict(cfg), TrainConfig))
    if c["train"]["engine"] not in EngineRegistry.names():
        raise ConfigError(f"train.engine={c['train']['engine']!r}; expected one of {EngineRegistry.names()}")
    check_engine_kwargs(c["train"]["engine"], c["train"]["engine_kwargs"], "train.engine_kwargs")
    if str(c["train"]["optimizer"]).lower() not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer={c['train']['optimizer']!r}; expected one of {list(OPTIMIZERS)}")
    c["amp"] = check_amp(c["amp"])
    c["compile"] = check_compile(c["compile"])
    if c["compile"] and not get_engine(c["train"]["engine"]).compiled_adaptation:
        raise ConfigError(
            f"compile={str(c['compile']).lower()} with train.engine={c['train']['engine']!r}: this engine "
            "reads its features layer through a forward hook, which a compiled model does not run, so the "
            "joint-training forward would stay eager; compile is offered for train.engine in "
            f"{compilable_engines()}"
        )
    if model_info(c["model"]["name"]).source_dataset != "mnist":  # e.g. wrn28_10: pretrained, CIFAR-10
        raise ConfigError(
            f"model.name={c['model']['name']!r} is not an MNIST model; train.py trains on MNIST (expected one of "
            f"{sorted(k for k, v in MODELS.items() if v.source_dataset == 'mnist')}); evaluate a pretrained "
            "model with tttlab-torch-ttt-evaluate model_checkpoint.name=... model_checkpoint.path=..."
        )
    if int(c["train"]["checkpoint_every"]) < 1:
        raise ConfigError(f"train.checkpoint_every={c['train']['checkpoint_every']}: expected >= 1")
    if c["data"]["name"] != "mnist" or c["data"]["root"] is not None:
        raise ConfigError(
            f"data.name={c['data']['name']!r}, data.root={c['data']['root']!r}: train.py trains on the embedded "
            "MNIST only; expected data.name=mnist and no data.root"
        )
    t, e = c["train"], c["eval"]
    checks = [
        ("train.lr", t["lr"], 0 <= t["lr"] < math.inf, "a finite number >= 0"),
        ("train.ssl_weight", t["ssl_weight"], t["ssl_weight"] is None or math.isfinite(t["ssl_weight"]),
         "null (the engine's weight) or a finite number"),
        ("train.epochs", t["epochs"], t["epochs"] >= 1, "an integer >= 1"),
        ("train.stop_after_steps", t["stop_after_steps"],
         t["stop_after_steps"] is None or t["stop_after_steps"] >= 0, "null or an integer >= 0"),
        ("eval.batch_size", e["batch_size"], e["batch_size"] >= 1, "an integer >= 1"),
        ("eval.num_examples", e["num_examples"], e["num_examples"] is None or e["num_examples"] >= 1,
         "null or an integer >= 1"),
        # the noise is std * N(0, 1): a negative std was the noise of |std| recorded under a negative value
        ("eval.noise_std", e["noise_std"], 0 <= e["noise_std"] < math.inf, "a finite number >= 0"),
        # checked here, not after training (the tutorial trains for minutes before it evaluates)
        ("eval.num_steps", e["num_steps"], all(k >= 0 for k in e["num_steps"]), "a list of integers >= 0"),
        ("eval.lr", e["lr"], e["lr"] is None or 0 <= e["lr"] < math.inf, "null or a finite number >= 0"),
        ("eval.optimizer_name", e["optimizer_name"],
         e["optimizer_name"] is None or str(e["optimizer_name"]).lower() in OPTIMIZERS,
         f"null or one of {list(OPTIMIZERS)}"),
    ]  # fmt: skip
    for key, value, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{key}={value!r}: expected {expected}")
    # null: the trained engine's own weight, written into the config (and so into its hash: IT3's 1.0 is a
    # new cache key, the other engines' 0.35 keeps theirs)
    t["ssl_weight"] = ssl_weight(t, get_engine(t["engine"]))
    return c


def run(
    cfg, *, clear_engine_kwargs: bool = False, command_line: list[str] | None = None, **overrides
) -> Path:
    """Train (or resume) and evaluate; returns the run directory.  ``clear_engine_kwargs`` (or
    ``train.engine_kwargs={}`` in ``command_line``, the Hydra overrides ``cfg`` was composed from): no
    engine arguments from the YAML, only those ``command_line`` sets (``+train.engine_kwargs.<key>=...``,
    before or after the ``{}``; :func:`cleared_mapping`)."""
    import torch

    from tttlab.core.torch import resolve_device

    c = {**to_dict(cfg), **overrides}
    if clear_engine_kwargs or clears_train_engine_kwargs(command_line):
        train = c.get("train") or {}
        kept = cleared_mapping(train.get("engine_kwargs"), command_line, "train.engine_kwargs")
        c["train"] = {**train, "engine_kwargs": kept}
    c = _validate(c)
    device = resolve_device(c["device"])
    ckpt_path = checkpoint_file(c["out_dir"])
    # everything that can refuse the run before RunDir writes config.yaml: a refused resume left the run
    # directory's config.yaml describing the refused config, next to the other config's checkpoint
    ck = None
    if c["train"]["resume"] and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        if ck.get("config_hash") != config_hash(_training_part(c)):
            raise CheckpointError(
                f"{ckpt_path} was written by a run with another model/training config"
                f"{_training_diff(ck, c)}; use another out_dir or train.resume=false"
            )
    elif c["train"]["resume"]:
        # no checkpoint to resume (deleted to save space, say): a folder holding another training config's
        # records is refused as its checkpoint would be, instead of starting over and deleting those records
        # unasked; train.resume=false still starts over there
        check_run_dir(
            c["out_dir"], c, identity=_folder_training_part, resumable_keys=RESUMABLE_KEYS, append_env=False,
            start_over="train.resume=false",
        )  # fmt: skip
    d: DataConfig | dict = c["data"]
    x, y = load_mnist(d.get("split") or "train", d.get("num_examples"))
    model, engine, opt = build_model_and_engine(c, x[:2].to(device), device)
    out = _open_run_dir(c, ckpt_path, start_over=ck is None)
    state = {"epoch": 0, "batch": 0, "step": 0, "correct": 0, "seen": 0, "task_loss": 0.0, "ssl_loss": 0.0}
    history: dict[str, list] = {}
    if ck is not None:
        engine.load_state_dict(ck["engine_state"])
        opt.load_state_dict(ck["optimizer"])
        state, history = ck["state"], ck["history"]
        torch.set_rng_state(ck["rng"])
        if state["epoch"] >= int(c["train"]["epochs"]):
            log.info("%s: training already finished (%d epochs); evaluations already in records.jsonl are "
                     "kept, missing ones computed", ckpt_path, state["epoch"])  # fmt: skip
        else:
            log.info("resumed from %s at epoch %d, batch %d", ckpt_path, state["epoch"], state["batch"])

    def checkpoint(done: bool = False) -> None:
        save_checkpoint(
            ckpt_path,
            {
                "format": "tttlab.torch_ttt/1", "model_name": c["model"]["name"],
                "engine_name": c["train"]["engine"], "engine_kwargs": c["train"]["engine_kwargs"],
                "model_state": model.state_dict(), "engine_state": engine.state_dict(),
                "optimizer": opt.state_dict(), "state": dict(state), "history": history,
                "rng": torch.get_rng_state(), "done": done, "config_hash": config_hash(_training_part(c)),
                "training_config": _training_part(c),
            },
        )  # fmt: skip

    defaults = dict(
        package="torch_ttt", framework="torch", model=c["model"]["name"], seed=int(c["seed"]),
        extra={"train_engine": c["train"]["engine"]},
    )  # fmt: skip
    with out.writer(**defaults) as writer:
        have = _recorded(out.records_path, _eval_hash(c))
        epochs = int(c["train"]["epochs"])
        while state["epoch"] < epochs:
            t0 = time.perf_counter()
            if not train_epoch(engine, opt, x, y, state, c, checkpoint, device):
                return out.path
            n = max(state["seen"], 1)
            epoch_stats = {
                "train/accuracy": state["correct"] / n, "train/task_loss": state["task_loss"] / n,
                "train/ssl_loss": state["ssl_loss"] / n, "train/steps": state["step"],
            }  # fmt: skip
            for k, v in epoch_stats.items():
                history.setdefault(k, []).append(v)
            epoch = state["epoch"] + 1
            # the record and the stats before the checkpoint: a kill in between redoes the epoch from the
            # previous checkpoint (same numbers, the record is not written twice); the other order lost them
            method = f"torch_ttt.{c['train']['engine']}"
            if (method, "train_accuracy", None, epoch) not in have:
                writer.write(
                    method=method, dataset="mnist", metric="train_accuracy", step=epoch,
                    value=epoch_stats["train/accuracy"], n=n, wall_time_s=time.perf_counter() - t0,
                )  # fmt: skip
            out.write_stats(history)
            state.update(epoch=epoch, batch=0, correct=0, seen=0, task_loss=0.0, ssl_loss=0.0)
            checkpoint(done=epoch == epochs)
            log.info("epoch %d: %s", epoch, epoch_stats)
        if c["eval"]["enabled"]:
            summary = _noisy_evaluation(c, model, engine, writer, have, device)
            out.write_stats({**history, "eval": summary})
    return out.path


#: config keys that change no number a training run records (core ``RunDir(resumable_keys=...)``): where its
#: folder is, how often it checkpoints, whether it resumes, where it stops, whether it evaluates at the end
#: (the evaluation's numbers do not depend on it).  A run that differs from its folder's config only in them
#: (and core's display keys) is the same run: no warning, its records re-tagged with the new config_hash.
#: ``device``, ``amp``, ``compile``, the batch sizes and seeds change numbers and stay in its identity.
RESUMABLE_KEYS = ("out_dir", "experiment_name", "train.checkpoint_every", "train.resume", "train.stop_after_steps",
                  "eval.enabled")  # fmt: skip


def _training_part(c: dict[str, Any]) -> dict[str, Any]:
    """What the weights depend on (a checkpoint only resumes a run with the same)."""
    t = {k: v for k, v in c["train"].items() if k not in ("stop_after_steps", "checkpoint_every", "resume")}
    part = {"seed": c["seed"], "model": c["model"], "train": t, "data": c["data"]}
    # precision and compilation change the float rounding of the weights; only non-default values enter
    # (so the default's hash, the cache key of models trained before these options, is unchanged)
    part.update(
        {k: c[k] for k, default in (("amp", "none"), ("compile", False)) if c.get(k, default) != default}
    )
    if c["train"].get("engine") == "ittt":
        # IT3 trains with the labels as target since 2026-12-01: models trained without them (same config
        # otherwise) have another key and are neither resumed nor reused from a cache
        part["ittt_target"] = "one_hot_labels"
        if (c["train"].get("engine_kwargs") or {}).get("training") == "notebook":
            # since 2026-12-02 the notebook scheme's second pass leaves the running statistics of the
            # BatchNorm layers before the features layer as the first pass left them (they were updated
            # twice per batch): the weights trained before have another key
            part["ittt_notebook_statistics"] = "pre_features_once"
    return part


def _folder_training_part(c: dict[str, Any]) -> Any:
    """:func:`_training_part` of a run folder's ``config.yaml``, or the whole config where it has no training
    part (an evaluate's folder, another tool's ``config.yaml``): then another config, refused with the keys
    that differ, not a ``KeyError``."""
    try:
        return _training_part(c)
    except (KeyError, TypeError, AttributeError):
        return c


def _training_diff(ck: dict[str, Any], c: dict[str, Any]) -> str:
    """`` (key: old -> new, ...)`` between a refused checkpoint's training config and ``c``'s: from the
    checkpoint (``training_config``) or, for a checkpoint written before it held one, from the run
    directory's ``config.yaml`` (still the checkpoint's: it is rewritten only once the run is accepted)."""
    from tttlab.core.config import config_diff

    old = ck.get("training_config")
    if old is None:
        path = Path(c["out_dir"]) / "config.yaml"
        try:
            from omegaconf import OmegaConf

            old = _training_part(to_dict(OmegaConf.load(path)))
        except Exception:  # noqa: BLE001 - no or another config.yaml: the message goes without the keys
            return ""
    diff = config_diff(to_dict(old), _training_part(c))
    return f" ({', '.join(diff[:8])}{', ...' if len(diff) > 8 else ''})" if diff else ""


def _open_run_dir(c: dict[str, Any], ckpt_path: Path, start_over: bool) -> RunDir:
    """The run directory; a run that does not resume (``start_over``: no checkpoint, or
    ``train.resume=false``) replaces what an earlier run left there: its checkpoint and its records, of every
    config, and another config's ``config.yaml`` (core ``RunDir(start_over=...)``: one warning naming what
    went, nothing when nothing did; a separate evaluate writes to a folder of its own).  They were kept, and
    the new run then skipped every evaluation "already in records.jsonl", reporting the old run's numbers in
    its stats.json."""
    if not start_over:
        return RunDir(c["out_dir"], c, resumable_keys=RESUMABLE_KEYS)
    removed = []
    if ckpt_path.exists():  # only with train.resume=false: a run that resumes has no checkpoint here
        ckpt_path.unlink()
        removed.append(f"the previous run's checkpoint {ckpt_path.relative_to(c['out_dir'])}")
    why = "no checkpoint" if c["train"]["resume"] else "train.resume=false"
    return RunDir(c["out_dir"], c, resumable_keys=RESUMABLE_KEYS, start_over=why, removed=removed)


def _eval_hash(c: dict[str, Any]) -> str:
    """What the noisy evaluation's numbers depend on: the trained weights' config and the ``eval`` section
    (its ``enabled`` flag aside)."""
    e = {k: v for k, v in c["eval"].items() if k != "enabled"}
    return config_hash({"training": _training_part(c), "eval": e})


def _recorded(path: Path, eval_hash: str | None = None) -> dict[tuple, float]:
    """``{(method, metric, corruption, step): value}`` of the records already written (a resumed run skips
    them and takes their values into the stats' evaluation summary).  With ``eval_hash``, evaluation records
    of another ``eval`` config (a rerun with e.g. ``eval.noise_std=1``) do not count: they were reused as
    this config's numbers."""
    out = {}
    for r in read_jsonl(path):
        other = r["extra"].get("eval_hash") not in (None, eval_hash)
        if eval_hash is not None and r["metric"] != "train_accuracy" and other:
            continue
        out[(r["method"], r["metric"], r["corruption"], r["step"])] = r["value"]
    return out


def _noisy_evaluation(c, model, engine, writer, have, device) -> dict[str, Any]:
    e = c["eval"]
    xt, yt = load_mnist("test", e["num_examples"])
    xn = noisy(xt, float(e["noise_std"]), int(e["noise_seed"]))
    bs, progress = int(e["batch_size"]), c["logging"]["progress"]
    summary: dict[str, Any] = {}
    common = dict(dataset="mnist", setting="episodic", n=len(yt),
                  extra={"train_engine": c["train"]["engine"], "eval_hash": _eval_hash(c)})  # fmt: skip
    for key, corruption, images in (("clean", None, xt), ("noisy", TUTORIAL_NOISE, xn)):
        t0 = time.perf_counter()
        acc = accuracy(model, images, yt, bs, device, c["amp"])
        summary[f"{key}/accuracy"] = acc
        if ("torch_ttt.source", "accuracy", corruption, 0) not in have:
            writer.write(
                method="torch_ttt.source", corruption=corruption, metric="accuracy", step=0, value=acc,
                wall_time_s=time.perf_counter() - t0, **common,
            )  # fmt: skip
        log.info("%s accuracy without TTT: %.4f", key, acc)
    method = f"torch_ttt.{c['train']['engine']}"
    if c["train"]["engine"] in ("source", "bn"):
        return summary
    for k in e["num_steps"]:
        if (method, "accuracy", TUTORIAL_NOISE, int(k)) in have:
            log.info("noisy accuracy with %s after %d steps: already in records.jsonl", method, k)
            summary[f"ttt/{k}_steps/accuracy"] = have[(method, "accuracy", TUTORIAL_NOISE, int(k))]
            continue
        acc, n, secs = evaluate_noisy(
            engine, xn, yt, int(k), bs, device, lr=e["lr"], optimizer_name=e["optimizer_name"],
            progress=progress,
        )  # fmt: skip
        summary[f"ttt/{k}_steps/accuracy"] = acc
        writer.write(
            method=method, corruption=TUTORIAL_NOISE, metric="accuracy", step=int(k), value=acc,
            wall_time_s=secs, **common,
        )  # fmt: skip
        log.info("noisy accuracy with %s after %d steps: %.4f (%.1f s)", method, k, acc, secs)
    return summary


def check_no_evaluate_engine_keys(argv: list[str]) -> None:
    """``engine=tent`` / ``+engine.kwargs.x=1`` are the evaluate command's keys (its ``engine`` group, which
    ``--help`` lists for both commands because they share ``conf/``); training's are ``train.engine`` and
    ``train.engine_kwargs``.  Hydra's own messages for them (``No match in the defaults list. To append ...
    use +engine=tent``; with it, ``Key 'engine' not in 'TrainConfig'``) pointed the wrong way."""
    for arg in argv:
        prefix = arg[: len(arg) - len(arg.lstrip("+~"))]
        key, sep, value = arg[len(prefix) :].partition("=")
        if key != "engine" and not key.startswith("engine."):
            continue
        if key == "engine":
            hint = f"train.engine={value}"
        elif key.startswith("engine.kwargs."):
            hint = f"{prefix}train.engine_kwargs.{key.removeprefix('engine.kwargs.')}{sep}{value}"
        else:
            hint = "train.engine=<name> and train.engine_kwargs.<key>=<value>"
        raise ConfigError(
            f"{arg}: tttlab-torch-ttt-train has no 'engine' key (that is tttlab-torch-ttt-evaluate's); "
            f"expected {hint}"
        )


def _model_names() -> list[str]:
    from .models import MODELS  # imports torch: only for a refusal (--help and a good command line need none)

    return sorted(MODELS)


def check_model_overrides(prog: str, argv: list[str], *, evaluate: bool = False) -> None:
    """``model=resnet``: training's ``model`` is a section (``model.name=<name>``), and Hydra said only "str is
    not a subclass of ModelConfig"; the evaluate command has no ``model`` key at all (Hydra: "To append to
    your config use +model=...", refused next): its model is ``train_run``'s, the one ``train_experiment``
    trains, or ``model_checkpoint.name``'s.  A ``ConfigError`` naming the override and the way."""
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        key = key.strip()
        if evaluate and (key == "model" or key.startswith("model.")):
            raise ConfigError(
                f"{arg}: {prog} has no 'model' key; the model is train_run's, the one train_experiment trains "
                f"(one of {training_experiment_names()}), or a pretrained one: model_checkpoint.name=<one of "
                f"{_model_names()}>"
            )
        if not evaluate and key == "model" and not value.strip().startswith("{"):
            raise ConfigError(
                f"{arg}: model is a section; expected model.name={value} (one of {_model_names()})"
            )


def main() -> None:
    import hydra

    register_configs()
    with user_errors("tttlab-torch-ttt-train"):
        args = [a for a in sys.argv[1:] if not a.startswith("-")]
        check_no_evaluate_engine_keys(args)
        check_model_overrides("tttlab-torch-ttt-train", args)

    @hydra.main(config_path="conf", config_name="config", version_base=None)
    def _main(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        with user_errors("tttlab-torch-ttt-train"):
            apply_log_level(cfg)  # under Hydra basicConfig is a no-op: logging.level set here
            # the composed cfg cannot tell train.engine_kwargs={} (merged: no change) from no override, nor
            # the kwargs the command line set from the YAML's
            task = list(HydraConfig.get().overrides.task)
            print(run(cfg, clear_engine_kwargs=clears_train_engine_kwargs(task), command_line=task))

    check_hydra_command("tttlab-torch-ttt-train", "tttlab.torch_ttt.conf", "config")
    _main()


if __name__ == "__main__":
    main()
