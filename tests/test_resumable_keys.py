"""Contract of every training command's ``RESUMABLE_KEYS``: the keys that may change between a run and its
resume without changing its numbers (core ``RunDir(resumable_keys=...)`` treats a rerun that differs from its
folder's config only in them as the same run: its records are re-tagged, never recomputed).

A key put in that list that does change numbers (``seed``, a data size, a learning rate) would merge two
different runs into one without a word, and no package test would notice: each flips only the keys its author
had in mind.  This test flips every key of the list, read from the module, so a key added to it is checked the
day it is added.  Per command, on a tiny config:

1. the reference: the base config, uninterrupted, in a folder of its own;
2. in another folder (``out_dir`` flipped), every resumable key at a value other than the base config's
   (:func:`flipped`); keys that act on one invocation only (stop after a step, skip the evaluation, do not
   resume: ``Command.per_run``) stop it part-way or make it do less, or the command's kill hook
   (``Command.kill``) stops it; then the same flipped config with those keys back at their base values, which
   resumes and finishes (so every other flipped key governs both the start of the run, e.g. a seed's
   initialisation, and its end, e.g. an evaluation);
3. the base config in that folder: the same run, which computes nothing new.

A command with several tasks whose config nodes only one of them reads (pilimit: classify, transfer, MAML)
runs this on a tiny config of each (``Command.tasks``): flipped in a run that never reads it, a key changes
nothing, right or wrong.

The records of 2+3 must equal the reference's in every number (``VOLATILE_RECORD_FIELDS`` and timings aside),
the folder must hold one config and one ``config_hash`` (no ``config-<hash>.yaml`` kept for another config),
and no run may log that it replaced another config.  A key whose base value has no obvious other value (a
``None``, a mapping) needs an entry in ``Command.flips``; without one the test fails and says so.

Some keys change float rounding that a tiny CPU run cannot show (the thread count, the device, precision,
compilation): those are refused by name (:data:`NEVER_RESUMABLE`), and so is any key the module itself lists
as changing numbers.  Every module of ``packages/*/src`` that defines ``RESUMABLE_KEYS`` must have a
:data:`COMMANDS` entry (the parametrization cannot miss a new command).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
NO_TORCH = os.environ.get("TTTLAB_EXPECT_NO_TORCH") == "1"
# mttt_jax's case, run alone: the XLA settings and cache of mttt_jax's tests (its conftest's)
if NO_TORCH and "jax" not in sys.modules:
    from tttlab.core.testing import fast_xla_compiles_for_tests

    fast_xla_compiles_for_tests()

#: keys whose effect on the numbers a tiny CPU run may not show: never resumable
NEVER_RESUMABLE = {"seed", "device", "threads", "num_threads", "amp", "compile", "jit", "distributed"}
#: attributes of a module that list keys it documents as changing numbers (a checkpoint may resume across them)
NUMBER_CHANGING_LISTS = ("PLACEMENT_KEYS", "RESUMED_ACROSS_KEYS")


@dataclasses.dataclass(frozen=True)
class Command:
    module: str  # the module that defines RESUMABLE_KEYS
    package: str  # the distribution's import name, to skip where it is not installed
    framework: str  # torch or jax: skipped where it is not installed
    config: Callable[[Path], dict]  # out_dir -> the tiny base config, composed as the command composes it
    run: Callable[[dict], Any]
    flips: dict[str, Any] = dataclasses.field(default_factory=dict)  # values where flipped() has no rule
    per_run: tuple[str, ...] = ()  # keys that act on one invocation: back at their base value to finish
    kill: Callable[[dict], Any] | None = None  # runs a config and stops it part-way (no per_run key does)
    timing_metrics: tuple[str, ...] = ()
    #: run in the torch-free environment only (make test-jax), as the package's own tests
    torch_free_only: bool = False
    #: the command's other tasks, whose config nodes its base config's run never reads (pilimit's ``maml.*``):
    #: ``name: out_dir -> a tiny config of that task``.  Flipped in the base run, a key under such a node
    #: changes nothing, right or wrong: each task runs the contract on its own config (and resume code) too.
    tasks: dict[str, Callable[[Path], dict]] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# the commands


def _torch_ttt_config(out: Path) -> dict:
    from tttlab.torch_ttt import train as T

    small = ["data.num_examples=64", "eval.num_examples=32", "eval.num_steps=[0,1]", "logging.progress=false"]
    return T.train_config("smoke", [f"out_dir={out}", *small])


def _torch_ttt_run(c: dict) -> None:
    from tttlab.torch_ttt import train as T

    T.run(c)


def _pilimit_config(out: Path) -> dict:
    from tttlab.pilimit import train as T

    small = ["logging.progress=false", "threads=1", "data.num_examples=32", "train.num_test=16"]
    return T.train_config("smoke", [*small, f"out_dir={out}"])


def _pilimit_task(task: str) -> Callable[[Path], dict]:
    """A tiny run of pilimit's ``maml`` (MNIST digits, best-validation checkpoint: it reads ``maml.*`` and
    ``eval.*``) or ``transfer`` task (MNIST to MNIST: it reads ``transfer.*``), which the classify smoke run
    never reads."""

    def config(out: Path) -> dict:
        from tttlab.pilimit import train as T

        small = ["logging.progress=false", "threads=1", "model.r=8", f"out_dir={out}"]
        if task == "maml":
            maml = ["maml.num_batches=2", "maml.num_test_batches=2", "maml.meta_batch_size=2", "maml.num_ways=3",
                    "train.epochs=3", "eval.checkpoint=best_val", "eval.val_fraction=0.5"]  # fmt: skip
            return T.train_config("maml_mnist", [*small, *maml])
        transfer = ["data.num_examples=32", "train.num_test=16", "train.task=transfer", "transfer.dataset=mnist",
                    "transfer.num_train=24", "transfer.num_test=16"]  # fmt: skip
        return T.train_config("smoke", [*small, *transfer])

    return config


def _pilimit_run(c: dict) -> None:
    from tttlab.pilimit import train as T

    T.run(c)


def _mttt_config(out: Path) -> dict:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    # mttt_jax's tests' shared run (TINY + SHARED_RUN of its test_train.py / conftest.py): the same XLA programs,
    # which their persistent compilation cache holds by the time this runs (make test-jax runs them first)
    tiny = [
        "experiment=smoke", "model=smoke", "arch.depth=1", "arch.width=8", "arch.mlp_dim=16", "arch.num_heads=2",
        "input.num_examples=16", "evals.batch_size=8", "evals.num_examples=8", "logging.progress=false",
        "input.batch_size=8", "total_epochs=2", "checkpoint_every_steps=3",
        "inner.TTT.inner_itr=2", "inner.TTT.SGD=true", f"out_dir={out}",
    ]  # fmt: skip
    with initialize_config_module(config_module="tttlab.mttt_jax.conf", version_base=None):
        return OmegaConf.to_container(compose("config", overrides=tiny), resolve=True)


def _mttt_run(c: dict) -> None:
    from tttlab.mttt_jax import train as T

    T.train(c)


def _ttt_mae_config(kind: str) -> Callable[[Path], dict]:
    def config(out: Path) -> dict:
        from tttlab.ttt_mae import train as T
        from tttlab.ttt_mae.common import compose

        small = {"epochs": 2, "data": {"num_examples": 32}, "batch_size": 16, "logging": {"progress": False}}
        extra = {}
        if kind == "probe":  # the encoder it probes: a one-epoch pretraining beside the folders, made once
            pre = out.parent / "pretrained"
            if not (pre / T.FINAL).exists():
                T.run(
                    compose("pretrain", "smoke_pretrain", {"out_dir": str(pre), **small, "epochs": 1}),
                    "pretrain",
                )
            extra = {"finetune": str(pre / T.FINAL)}
        return compose(kind, f"smoke_{kind}", {"out_dir": str(out), **small, **extra})

    return config


def _ttt_mae_run(kind: str, stop_after_steps: int | None = None) -> Callable[[dict], None]:
    def run(c: dict) -> None:
        from tttlab.ttt_mae import train as T

        T.run(c, kind, stop_after_steps=stop_after_steps)

    return run


_MAE_FLIPS = {"save_ckpt_freq": 2, "benchmark.severities": [3], "benchmark.corruptions": ["fog"]}

COMMANDS = {
    "torch_ttt.train": Command(
        "tttlab.torch_ttt.train", "tttlab.torch_ttt", "torch", _torch_ttt_config, _torch_ttt_run,
        flips={"train.stop_after_steps": 1, "train.checkpoint_every": 1},
        per_run=("train.stop_after_steps", "train.resume", "eval.enabled"), timing_metrics=("s_per_image",),
    ),
    "pilimit.train": Command(
        "tttlab.pilimit.train", "tttlab.pilimit", "torch", _pilimit_config, _pilimit_run,
        # transfer.ridge (1e-4) halved moves no prediction of the tiny transfer run; 1.0 does
        flips={"train.stop_after_steps": 3, "train.checkpoint_every": 1, "transfer.ridge": 1.0},
        per_run=("train.stop_after_steps", "train.resume"),
        tasks={"maml": _pilimit_task("maml"), "transfer": _pilimit_task("transfer")},
    ),
    "mttt_jax.train": Command(
        "tttlab.mttt_jax.train", "tttlab.mttt_jax", "jax", _mttt_config, _mttt_run,
        flips={"max_steps": 3, "checkpoint_every_steps": 2, "keep_checkpoints": 1},
        per_run=("max_steps", "resume"), timing_metrics=("epoch_time_s",), torch_free_only=True,
    ),
    "ttt_mae.pretrain": Command(
        "tttlab.ttt_mae.train", "tttlab.ttt_mae", "torch", _ttt_mae_config("pretrain"), _ttt_mae_run("pretrain"),
        flips=_MAE_FLIPS, kill=_ttt_mae_run("pretrain", stop_after_steps=3),
    ),
    "ttt_mae.probe": Command(
        "tttlab.ttt_mae.train", "tttlab.ttt_mae", "torch", _ttt_mae_config("probe"), _ttt_mae_run("probe"),
        flips=_MAE_FLIPS, kill=_ttt_mae_run("probe", stop_after_steps=3),
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# flipping keys


def _get(c: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(c, dict) or part not in c:
            raise KeyError(key)
        c = c[part]
    return c


def _set(c: dict, key: str, value: Any) -> None:
    *heads, last = key.split(".")
    for part in heads:
        c = c[part]
    c[last] = value


def _has(c: dict, key: str) -> bool:
    try:
        _get(c, key)
    except KeyError:
        return False
    return True


def other_value(key: str, value: Any, flips: dict[str, Any]) -> list[tuple[str, Any]]:
    """``[(key, new value), ...]`` for one resumable key: ``flips``' value(s) for it or a key below it, else
    a rule by type (a bool negated, a number moved, a string extended)."""
    below = [(k, v) for k, v in flips.items() if k == key or k.startswith(key + ".")]
    if below:
        return below
    if isinstance(value, bool):
        return [(key, not value)]
    if isinstance(value, int):
        return [(key, value + 1)]
    if isinstance(value, float):
        return [(key, value / 2 if value else 0.5)]  # halved: stays in a range such as [0, 1)
    if isinstance(value, str):
        return [(key, value + "_flipped")]
    raise AssertionError(
        f"resumable key {key!r} is {value!r} in the test's config: give it another value in this command's "
        "Command.flips, so the test can check that changing it changes no number"
    )


def flipped(cmd: Command, base: dict, keys: tuple[str, ...], out: Path) -> tuple[dict, list[str]]:
    """``base`` with every key of ``keys`` at another value, in the folder ``out``; and ``key: old -> new``
    for each change."""
    c, changes = copy.deepcopy(base), [f"out_dir: {base['out_dir']} -> {out}"]
    for key in keys:
        if key == "out_dir":
            continue  # another folder than the reference's: set below
        if not _has(base, key):
            continue  # a key of another command of the same module (the probe's weights_only)
        for k, v in other_value(key, _get(base, key), cmd.flips):
            assert _get(base, k) != v, f"{k}={v!r} is the base config's value: flip it to another"
            _set(c, k, v)
            changes.append(f"{k}: {_get(base, k)!r} -> {v!r}")
    c["out_dir"] = str(out)
    return c, changes


def _number_records(path: Path, timing: tuple[str, ...]) -> list[dict]:
    from tttlab.core.records import read_jsonl
    from tttlab.core.testing import VOLATILE_RECORD_FIELDS

    return [
        {k: v for k, v in r.items() if k not in VOLATILE_RECORD_FIELDS}
        for r in read_jsonl(path / "records.jsonl")
        if r["metric"] not in timing
    ]


def _declaring_modules() -> set[str]:
    """Every module of ``packages/*/src`` that assigns ``RESUMABLE_KEYS`` at its top level."""
    found = set()
    for src in ROOT.glob("packages/*/src"):
        for f in src.rglob("*.py"):
            if re.search(r"^RESUMABLE_KEYS\s*[:=]", f.read_text(encoding="utf-8"), re.M):
                found.add(".".join(f.relative_to(src).with_suffix("").parts))
    return found


def test_every_module_with_resumable_keys_has_a_command_here():
    assert _declaring_modules() == {c.module for c in COMMANDS.values()}, (
        "a module defines RESUMABLE_KEYS without a COMMANDS entry here (or an entry names a module that no "
        "longer does): add one, so that its keys are checked"
    )


CASES = [(name, None) for name in sorted(COMMANDS)] + [
    (name, task) for name in sorted(COMMANDS) for task in sorted(COMMANDS[name].tasks)
]


@pytest.mark.parametrize("name, task", CASES, ids=[n if t is None else f"{n}:{t}" for n, t in CASES])
def test_resumable_keys_change_no_number(name, task, tmp_path, caplog, monkeypatch):
    """The contract on the command's tiny base config, or (``task``) on a tiny run of another of its tasks."""
    cmd = COMMANDS[name]
    missing = [m for m in (cmd.package, cmd.framework) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed in this environment")
    if cmd.torch_free_only and not NO_TORCH and importlib.util.find_spec("torch") is not None:
        pytest.skip(
            f"{name} runs in the torch-free environment (make test-jax), as {cmd.package}'s own tests do"
        )
    from tttlab.core.records import APPEND_ENV, _load_yaml_config, config_hash, read_jsonl

    monkeypatch.delenv(APPEND_ENV, raising=False)
    module = importlib.import_module(cmd.module)
    keys = tuple(module.RESUMABLE_KEYS)
    documented = {k for attr in NUMBER_CHANGING_LISTS for k in getattr(module, attr, ())}
    bad = sorted(k for k in keys if k in documented or k.rsplit(".", 1)[-1] in NEVER_RESUMABLE)
    assert not bad, f"{cmd.module}.RESUMABLE_KEYS names keys that change numbers: {bad}"
    config = cmd.config if task is None else cmd.tasks[task]

    reference = tmp_path / "reference"
    base = config(reference)
    cmd.run(base)
    out = tmp_path / "run"
    first, changes = flipped(cmd, base, keys, out)
    finish = copy.deepcopy(first)
    for key in cmd.per_run:
        if _has(base, key):
            _set(finish, key, copy.deepcopy(_get(base, key)))
    again = {**copy.deepcopy(base), "out_dir": str(out)}
    caplog.clear()
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="tttlab.core.records"):
        warnings.filterwarnings("error", message=".*different config.*")
        (cmd.kill or cmd.run)(first)
        partial = len(read_jsonl(out / "records.jsonl"))
        cmd.run(finish)
        cmd.run(again)
    said = [r.getMessage() for r in caplog.records if r.name == "tttlab.core.records"]
    assert said == [], f"{name}: a rerun with only resumable keys changed said {said}"
    got, want = _number_records(out, cmd.timing_metrics), _number_records(reference, cmd.timing_metrics)
    assert want, f"{name}: the reference run recorded nothing"
    assert partial < len(want), f"{name}: the first run did not stop part-way, so no resume was checked"
    assert got == want, (
        f"{name}: a run with every key of {cmd.module}.RESUMABLE_KEYS changed ({'; '.join(changes)}) recorded "
        "other numbers than the same config without the change: one of them is no resumable key"
    )
    assert sorted(p.name for p in out.glob("config*.yaml")) == ["config.yaml"], "one folder, one config"
    shown = config_hash(_load_yaml_config(out / "config.yaml"))
    assert {r["config_hash"] for r in read_jsonl(out / "records.jsonl")} == {shown}, "one folder, one hash"
