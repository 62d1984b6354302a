"""Every chosen method of every installed subpackage side by side on one corruption benchmark.

    tttlab-compare                                            # the demo set, profile full, out_dir compare_out
    tttlab-compare profile=quick jobs=2 out_dir=runs/cmp
    tttlab-compare 'methods=[torch_ttt.*,mttt_jax.mttt_mlp]' 'seeds=[0,1,2]' 'setting=[reset_each_shift,continual]'
    tttlab-compare --list                                     # the installed methods (and what is missing)

Quote an argument with brackets or braces (``'seeds=[0,1]'``): zsh and fish expand them otherwise.

Configuration: ``conf/compare.yaml`` (Hydra; ``key=value`` overrides, ``--key value`` also works;
schema :class:`CompareConfig`, unknown keys are errors).  ``profiles`` in that file is the profile table:
per profile the corruptions, images per domain and batch size compare asks of the benchmark, a timeout,
and the ``profile`` name every evaluate receives (which sizes the model it trains).

How it runs (the core imports no subpackage and no framework):

1. ``methods`` (names or globs) are resolved through :mod:`tttlab.core.registry`; a method of a known
   subpackage that is not installed is listed with its install command, never a crash.
2. One task per method x setting x seed.  Its records live in
   ``<out_dir>/runs/<benchmark>-<profile>-<key>/<method>/<setting>/seed<k>/part-<hash>/`` (``key``
   hashes what changes the numbers: benchmark, images, batch size, device, overrides).  Domains already
   recorded there are not recomputed (:func:`tttlab.core.records.done_keys`): in the ``episodic`` and
   ``reset_each_shift`` settings per domain (a new part evaluates only the missing corruptions); in the
   stream settings (``continual``, ``mixed``, ``gradual``) the whole stream is one unit.  A part only
   counts while the method's code is unchanged: each records the fingerprint of its subpackage's and the
   core's source and YAML files (:func:`code_fingerprint`), and parts written by other code are recomputed.
3. Each task runs the spec's ``evaluate`` (``module:function``) in a subprocess of its own
   (``python -c`` :data:`RUNNER`, config as JSON, the evaluate contract of the subpackages), ``jobs`` at
   a time, so that JAX and torch never share a process and a crash loses nothing else.  The first task
   of each subpackage runs before its siblings so that they reuse the models it trains (under
   ``<cache_dir>/models/<package>-<code fingerprint>``: a model trained by other code is not reused).
   The corrupted domains are generated once, here, into ``<cache_dir>/benchmark``.  A ``device`` the
   machine lacks (``cuda`` without a GPU, ``cuda:3`` with two) is one error before any task runs: the
   frameworks of the methods to run are asked what they find, each in a subprocess
   (:func:`check_device_present`).
4. A failed task (exit status, timeout, or no records) is reported with the tail of its stderr.
5. The records are read back and summarised: per method (x setting) the accuracy per corruption (mean
   over severities and seeds), the mean over corruptions (mean +- sample std over seeds when there are
   several), the gain over the subpackage's baseline (``baselines``) and the adaptation cost in seconds
   per image; printed (rich if installed) and written as ``report.md``, ``results.csv`` (one row per
   method x setting x seed x domain: the records themselves), ``summary.csv``, ``heatmap.png/.svg`` and
   ``bars.png/.svg``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import atomic_path, atomic_write_json, atomic_write_text, remove_stale_temps, source_fingerprint
from .errors import ConfigError, UnknownNameError
from .records import APPEND_ENV, config_hash, load_records

#: settings whose domains are independent (the method is reset at every domain): resumable per domain.
INDEPENDENT_SETTINGS = ("episodic", "reset_each_shift")
PROFILES = ("smoke", "quick", "full")
STDERR_TAIL_LINES = 25

#: The subprocess: import ``evaluate`` and call it with the JSON config in argv[1]; write argv[2].  It runs
#: in a session of its own, and a thread ends that session when the comparison that started it (pid argv[3],
#: given so that a comparison dying before the thread starts is seen too) is gone
#: (``kill -9``, which no handler sees): an orphaned evaluate would otherwise go on writing the part (and the
#: model cache) that the comparison, started again, evaluates anew at the same time.
RUNNER = """\
import importlib, json, os, signal, sys, threading, time
def _orphaned(parent=int(sys.argv[3]) if len(sys.argv) > 3 else os.getppid()):
    while os.getppid() == parent:
        time.sleep(0.5)
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=_orphaned, daemon=True).start()
job = json.load(open(sys.argv[1]))
module, _, attr = job["evaluate"].partition(":")
fn = importlib.import_module(module)
for part in attr.split("."):
    fn = getattr(fn, part)
t0 = time.perf_counter()
path = fn(job["config"])
tmp = sys.argv[2] + ".tmp"
with open(tmp, "w") as f:
    json.dump({"records": None if path is None else str(path), "seconds": time.perf_counter() - t0}, f)
import os
os.replace(tmp, sys.argv[2])
"""

SHORT_NAMES = {
    "gaussian_noise": "gaus", "shot_noise": "shot", "impulse_noise": "imp", "defocus_blur": "defo",
    "glass_blur": "glas", "motion_blur": "motn", "zoom_blur": "zoom", "snow": "snow", "frost": "fros",
    "fog": "fog", "brightness": "brit", "contrast": "cont", "elastic_transform": "elas",
    "pixelate": "pix", "jpeg_compression": "jpeg", "speckle_noise": "spec", "gaussian_blur": "gblu",
    "spatter": "spat", "saturate": "satu",
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class CompareConfig:
    """``conf/compare.yaml``; see the comments there."""

    methods: Any = field(default_factory=list)  # names or globs (a list or one string)
    benchmark: str = "mnist_c"
    root: str | None = None
    setting: Any = "reset_each_shift"  # a setting or a list of them
    dirichlet_delta: float | None = None  # label-correlated streams (tttlab.core.benchmark); None: i.i.d.
    stream_order: str = "tttlab"  # tttlab | mariodoebler (tttlab.core.benchmark)
    corruptions: Any = None  # None: the profile's
    severities: Any = field(default_factory=lambda: [5])
    seeds: Any = field(default_factory=lambda: [0])
    profile: str = "full"
    num_examples: Any = None  # None: the profile's; "all"
    batch_size: int | None = None
    jobs: int = 1
    threads: int | None = None
    out_dir: str = "compare_out"
    cache_dir: str | None = None
    device: str = "cpu"
    timeout_s: float | None = None
    progress: bool = True
    python: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, str] = field(default_factory=dict)
    profiles: dict[str, Any] = field(default_factory=dict)


_BOOL_KEYS = {f.name for f in dataclasses.fields(CompareConfig) if f.type in (bool, "bool")}
_KEYS = {f.name for f in dataclasses.fields(CompareConfig)}


def _split_argv(argv: Sequence[str]) -> list[str]:
    """``--key value`` / ``--key=value`` -> ``key=value`` (Hydra overrides pass through unchanged)."""
    out, i = [], 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a.startswith("-") and not a.startswith("--") and len(a) > 1:  # -m, -c job: a Hydra command's
            raise ConfigError(
                f"{a}: tttlab-compare takes key=value (or --key value), no Hydra option; it runs every method, seed "
                "and setting of its lists itself: e.g. 'seeds=[0,1,2]' 'setting=[reset_each_shift,continual]'"
            )
        if a.startswith("--") and len(a) > 2:
            key = a[2:].replace("-", "_")
            if "=" in key:
                out.append(key)
            elif i + 1 < len(argv) and "=" not in argv[i + 1] and not argv[i + 1].startswith("--"):
                out.append(f"{key}={argv[i + 1]}")
                i += 1
            elif key in _BOOL_KEYS:
                out.append(f"{key}=true")
            elif key not in _KEYS:  # a mistyped --list / --help: was "--lst needs a value"
                options = ["list", "help", *sorted(_KEYS)]
                close = difflib.get_close_matches(key, options, n=1)
                hint = f" (did you mean --{close[0].replace('_', '-')}?)" if close else ""
                raise ConfigError(f"unknown option {a}{hint}: tttlab-compare takes --list, --help and key=value "
                                  f"(or --key value) with the keys {', '.join(sorted(_KEYS))}")  # fmt: skip
            else:
                raise ConfigError(f"{a} needs a value: {a} VALUE or {key}=VALUE (only a true/false key such as "
                                  f"--progress may stand alone)")  # fmt: skip
        else:
            out.append(a)
        i += 1
    return out


@contextlib.contextmanager
def _store_groups_hidden(keys):
    """Hide the Hydra ``ConfigStore`` groups named like compare's keys while it composes ``compare.yaml``.

    :func:`tttlab.core.config.register_configs` (public: a project's ``conf/*.yaml`` can build on its
    schemas) stores the config groups ``benchmark``, ``data`` and ``logging``; after it, in the same process
    (a user's script, the test session), Hydra read compare's scalar ``benchmark=cifar10_c`` as a choice in
    that group and refused it ("No match in the defaults list").
    """
    from hydra.core.config_store import ConfigStore

    repo = ConfigStore.instance().repo
    hidden = {k: repo.pop(k) for k in set(keys) if isinstance(repo.get(k), dict)}
    try:
        yield
    finally:
        repo.update(hidden)


def _bad_override(
    overrides: list[str], exc: Exception, compose, given: Mapping[str, str] | None = None
) -> str:
    """The message for overrides Hydra refused together: the first one it refuses after those before it
    (``seeds=[0,1,2] seeds.2=3`` is right: the list has an item 2 by then), named with Hydra's reason and its
    cause (``seeds.x=1: ... invalid literal for int()`` said "bad override in [<every override>]";
    ``overrides=[1]``: "Cannot merge DictConfig with ListConfig"), and for a list key indexed by a name, how a
    list is given.  ``given``: the command line's form of an override that :func:`load_config` rewrote (the
    ``++`` of a mapping key), which the message names instead (it said "bad override ++overrides=[1]")."""
    given = given or {}
    first, before = None, []
    for i, o in enumerate(overrides):  # with the overrides before it: seeds=[0,1,2] seeds.2=3 is no mistake
        try:
            compose("compare", overrides=overrides[: i + 1])
        except Exception as refused:  # noqa: BLE001
            first, exc, before = o, refused, overrides[:i]
            break
    reason = str(exc).splitlines()[0]
    cause = exc.__cause__
    why = " ".join(str(cause).splitlines()[0].split()) if cause is not None and str(cause).strip() else ""
    if why and why not in reason:
        reason += f" ({why})"
    for ours, theirs in given.items():  # the overrides as the user wrote them
        reason = reason.replace(ours, theirs)
    if first is None:
        return f"bad override in {[given.get(o, o) for o in overrides]}: {reason}"
    first_given = given.get(first, first)
    key = first.split("=", 1)[0].lstrip("+~")
    head, _, rest = key.partition(".")
    if rest and not rest.split(".")[0].isdigit():
        default = compose("compare", overrides=before).get(head)
        if isinstance(default, Sequence) and not isinstance(default, str):
            return (
                f"bad override {first_given}: {head} is a list (now {list(default)}), not a mapping; give the "
                f"whole list, e.g. {head}=[1,2], or one item by its index, e.g. {head}.0=1"
            )
    return f"bad override {first_given}: {reason}"


def load_config(overrides: Sequence[str] = (), values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``conf/compare.yaml`` + Hydra ``overrides`` (``key=value``) + ``values``, validated; a plain dict."""
    values = dict(values or {})
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from .config import validate

    overrides = _split_argv(overrides)
    # a word that is no override: the shell split 'seeds=[0, 1]' unquoted (Hydra's lexer said "bad override
    # seeds=[0,: no viable alternative at input '[0,'"), a space after '=', 'profile quick': core's line
    from .cli import _not_an_override

    for word in overrides:  # 'tttlab-compare list': it said "'list': an override is key=value"
        if word.lower() in ("list", "help"):
            raise ConfigError(f"'{word}': an option has two dashes: give --{word.lower()}")
    not_one = _not_an_override(overrides, overrides)
    if not_one:
        raise ConfigError(not_one)
    for o in overrides:  # before Hydra: what it would accept with a result the user did not mean
        problem = _deleted_required_key(o) or _dotted_method_override(o) or _comma_list(o)
        if problem:
            raise ConfigError(problem)
    # the mapping-valued keys take new entries without Hydra's `+` (the composed config is in struct mode)
    given = {
        f"++{o}": o
        for o in overrides
        if o.split(".", 1)[0].split("=", 1)[0] in _MAPPING_KEYS and o[:1] not in "+~"
    }
    overrides = [f"++{o}" if f"++{o}" in given else o for o in overrides]
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    known = [o for o in overrides if not _unknown_key(o)]
    try:
        with (
            _store_groups_hidden(o.split("=", 1)[0].lstrip("+~").split(".", 1)[0] for o in overrides),
            initialize_config_module(config_module="tttlab.core.conf", version_base=None),
        ):
            try:
                cfg = compose("compare", overrides=known)
            except Exception as exc:  # noqa: BLE001 - Hydra's override errors have many types
                raise ConfigError(_bad_override(known, exc, compose, given)) from None
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"bad override in {list(overrides)}: {str(exc).splitlines()[0]}") from None
    unknown = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides if _unknown_key(o)}
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in values:
        if key not in {f.name for f in dataclasses.fields(CompareConfig)}:
            unknown[key] = values[key]
    data.update({k: v for k, v in values.items() if k not in unknown})
    data.update(unknown)  # validate() names them, with a did-you-mean
    c = OmegaConf.to_container(validate(data, CompareConfig), resolve=True)
    return check_config(c)


_MAPPING_KEYS = ("overrides", "baselines", "profiles")

#: The keys every comparison needs, and what each holds: ``~seeds`` (Hydra's deletion) gave the schema's
#: default silently ([0]), ``~profiles`` an empty profile table ("'profile'='full': expected one of []").
#: Deleting one of the others means null (the profile's value) or, for ``overrides``/``baselines``, none.
_REQUIRED_KEYS = {
    "methods": "method names or globs, e.g. 'methods=[torch_ttt.*]'",
    "benchmark": "a benchmark name, e.g. benchmark=mnist_c",
    "setting": "a setting or a list of them, e.g. setting=reset_each_shift",
    "stream_order": "tttlab or mariodoebler",
    "severities": "severities in 1..5, e.g. 'severities=[5]'",
    "seeds": "a list of integers >= 0, e.g. 'seeds=[0,1,2]'",
    "profile": "smoke, quick or full",
    "jobs": "a positive integer",
    "out_dir": "a directory",
    "device": "cpu, cuda, cuda:N or auto",
    "progress": "true or false",
    "profiles": "the profile table of conf/compare.yaml",
}

#: The keys of a row of the profile table (``profiles.<name>``).
_PROFILE_KEYS = ("corruptions", "num_examples", "batch_size", "timeout_s", "overrides")


def _deleted_required_key(override: str) -> str | None:
    """The message for ``~key`` (``~key=value``) of a key every comparison needs, or of a key whose default
    is null (Hydra said "Could not delete from config. 'root' does not exist."), else ``None`` (``~overrides``,
    ``~baselines``: none; a key below a top-level one)."""
    key = override.split("=", 1)[0]
    name = key[1:]
    if not key.startswith("~") or name in ("overrides", "baselines") or name not in _KEYS:
        return None
    if name not in _REQUIRED_KEYS:
        return f"{override}: compare's keys cannot be deleted; give {name}=null for its default (or leave it out)"
    return (
        f"{override}: config key {name!r} cannot be deleted, every comparison needs it ({_REQUIRED_KEYS[name]}); "
        f"give {name}=VALUE, or leave it out for conf/compare.yaml's value"
    )


def _hydra_literal(value: Any) -> str:
    """``value`` as a Hydra override writes it: ``{engine:{optimization:{num_steps:2}}}``."""
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_hydra_literal(v)}" for k, v in value.items()) + "}"
    return str(value)


def _dotted_method_override(override: str) -> str | None:
    """The message for ``overrides.torch_ttt.tent.<key>=<value>`` (or under ``profiles.<p>.overrides``),
    else ``None``.  Hydra splits a key at every dot, so the method's name became two nested keys
    (``overrides.torch_ttt.tent=3`` is ``{torch_ttt: {tent: 3}}``), and a glob is no key it can read: no
    method is ever named so.  The line says the form that works, with the method and keys the user wrote
    (it was "'overrides.torch_ttt' matches no method; did you mean 'torch_ttt.bn'?")."""
    key, sep, value = override.partition("=")
    parts = key.lstrip("+~").split(".")
    if parts[0] == "overrides":
        where, rest = "overrides", parts[1:]
    elif parts[0] == "profiles" and len(parts) > 3 and parts[2] == "overrides":
        where, rest = f"profiles.{parts[1]}.overrides", parts[3:]
    else:
        return None
    if not rest:
        return None
    from . import registry

    packages = set(registry.KNOWN_PACKAGES)
    if rest[0] not in packages:  # a package of another project's methods
        packages |= {s.package for s in installed_methods()[0]}
    cut = 2 if rest[0] in packages and len(rest) > 1 else 1
    method, keys = ".".join(rest[:cut]), rest[cut:]
    if cut == 1:  # a short name (overrides.tent.<key>): the method it names, when one does
        names = [s.name for s in installed_methods()[0] if s.name.endswith(f".{method}")]
        method = names[0] if len(names) == 1 else method
    head = f"{override}: Hydra splits a key at its dots, so no method is named here"
    if key.startswith("~"):
        return f"{head}; give {where} whole without that method, e.g. '{where}={{}}'"
    if not sep:
        return None
    if keys:
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        return (
            f"{head}; give a method's evaluate keys as one mapping under its name or glob, quoted: "
            f"'{where}={{{method}:{_hydra_literal(nested)}}}'"
        )
    if value.strip().startswith("{"):  # the method's keys, given whole: they go under its name as they are
        return (
            f"{head}; give a method's evaluate keys as one mapping under its name or glob, quoted: "
            f"'{where}={{{method}:{value.strip()}}}'"
        )
    return (
        f"{head}; give a method's evaluate keys as one mapping under its name or glob, quoted: "
        f"'{where}={{{method}:{{KEY:{value}}}}}' with KEY one of its evaluate keys, nested keys as mappings "
        "(e.g. 'overrides={torch_ttt.tent:{engine:{optimization:{num_steps:3}}}}')"
    )


def _comma_list(override: str) -> str | None:
    """The message for ``key=a,b`` (no brackets), else ``None``: Hydra reads it as a sweep, which compare
    does not run ("Ambiguous value for argument"); compare takes a list in brackets."""
    key, sep, value = override.partition("=")
    value, name = value.strip(), key.lstrip("+")
    if (
        not sep
        or key.startswith("~")
        or "," not in value
        or value[:1] in "[{'\""
        or "(" in value
        or "${" in value
        or "," not in value.replace("\\,", "")  # an escaped comma ('out_dir=runs/a\\,b') is part of one value
    ):
        return None
    head = f"{override}: a comma list without brackets is a Hydra sweep, which compare does not run"
    if name.rpartition(".")[2] in _LIST_KEYS:  # a profile row's corruptions too
        return f"{head}; give a list in brackets, quoted: '{name}=[{value}]'"
    return f"{head}; {name} takes one value"


#: The keys that take a list (or one value).
_LIST_KEYS = ("methods", "setting", "corruptions", "severities", "seeds")


def _unknown_key(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    top = key.split(".", 1)[0]
    return "=" in override and top not in {f.name for f in dataclasses.fields(CompareConfig)}


def _as_list(value, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, Mapping):
        raise ConfigError(f"config key {name!r}={value!r}: expected a value or a list of values")
    # one value (seeds=1.5: the caller's check names what it expects; it said "expected a value")
    return [value]


def check_config(c: dict[str, Any]) -> dict[str, Any]:
    """Fill the profile's values, normalise lists, check names and ranges; raises ConfigError."""
    from . import corruptions as C
    from .benchmark import BENCHMARKS, SETTINGS, UNLABELLED_BENCHMARKS

    profiles = c.get("profiles") or {}
    if not isinstance(profiles, Mapping):
        raise ConfigError(f"config key 'profiles'={profiles!r}: expected the profile table, a mapping of profile "
                          "names to their rows (conf/compare.yaml)")  # fmt: skip
    # profiles.quick=3 was taken (a TypeError once chosen), a misspelt key of a row ignored
    for name, row in profiles.items():
        if not isinstance(row, Mapping):
            raise ConfigError(
                f"config key 'profiles.{name}'={row!r}: expected a row of the profile table, a mapping with the "
                f"keys {', '.join(_PROFILE_KEYS)} (e.g. profiles.{name}.num_examples=100)"
            )
        for key in row:
            if key not in _PROFILE_KEYS:
                close = difflib.get_close_matches(str(key), _PROFILE_KEYS, n=1)
                hint = f" (did you mean 'profiles.{name}.{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown config key 'profiles.{name}.{key}'{hint} (known keys in "
                                  f"'profiles.{name}': {', '.join(_PROFILE_KEYS)})")  # fmt: skip
        if row.get("overrides") is not None and not isinstance(row["overrides"], Mapping):
            raise ConfigError(f"config key 'profiles.{name}.overrides'={row['overrides']!r}: expected a mapping "
                              "of method globs to evaluate keys")  # fmt: skip
    if c["profile"] not in profiles:
        names = {str(n).lower(): str(n) for n in profiles}
        close = difflib.get_close_matches(str(c["profile"]).lower(), list(names), n=1)
        hint = f" (did you mean {names[close[0]]!r}?)" if close else ""
        raise ConfigError(f"config key 'profile'={c['profile']!r}{hint}: expected one of {sorted(profiles)}")
    prof = dict(profiles[c["profile"]])
    for key in ("out_dir", "cache_dir", "root", "python"):
        # a '~' Hydra took quoted ('out_dir="~/runs"'): the user's home, not a folder named '~' in the working one
        if isinstance(c.get(key), str) and c[key].startswith("~"):
            c[key] = os.path.expanduser(c[key])
    c["methods"] = [str(m) for m in _as_list(c["methods"], "methods")]
    if not c["methods"]:
        raise ConfigError(
            "config key 'methods' is empty: name at least one method or glob (e.g. torch_ttt.*)"
        )
    if c["benchmark"] not in BENCHMARKS:
        raise ConfigError(
            f"config key 'benchmark'={c['benchmark']!r}: expected one of {', '.join(BENCHMARKS)}"
        )
    if c["benchmark"] in UNLABELLED_BENCHMARKS:  # labels are image indices: every method's accuracy is 0
        raise ConfigError(
            f"config key 'benchmark'={c['benchmark']!r} has no class labels (each image is labelled by its "
            "index), so the methods' accuracies would be meaningless; its agreement protocol runs with "
            "tttlab-torch-ttt-evaluate +experiment=photos_mobilenet_v2"
        )
    # each setting once (setting=[continual,continual] ran the same task twice, into one folder)
    c["setting"] = list(dict.fromkeys(str(s) for s in _as_list(c["setting"], "setting")))
    if not c["setting"]:  # setting=null or []: no task at all, and a report of "no results"
        raise ConfigError(f"config key 'setting' is empty: name at least one of {', '.join(SETTINGS)}")
    for s in c["setting"]:
        if s not in SETTINGS:
            raise ConfigError(f"config key 'setting' has {s!r}: expected one of {', '.join(SETTINGS)}")
    from .benchmark import check_dirichlet_delta
    from .errors import InvalidInputError

    try:
        c["dirichlet_delta"] = check_dirichlet_delta(c.get("dirichlet_delta"))
    except InvalidInputError as exc:
        raise ConfigError(f"config key {exc}") from None
    from .benchmark import STREAM_ORDERS

    c["stream_order"] = c.get("stream_order", "tttlab")
    if c["stream_order"] not in STREAM_ORDERS:
        raise ConfigError(
            f"config key 'stream_order'={c['stream_order']!r}: expected one of {', '.join(STREAM_ORDERS)}"
        )
    corr = c["corruptions"] if c["corruptions"] is not None else prof.get("corruptions", "common")
    try:
        c["corruptions"] = list(C.resolve(corr if isinstance(corr, str) else list(corr)))
    except Exception as exc:  # noqa: BLE001 - UnknownNameError / InvalidInputError from resolve
        raise ConfigError(f"config key 'corruptions'={corr!r}: {exc}") from None
    if not c["corruptions"]:
        raise ConfigError(
            f"config key 'corruptions'={corr!r} is empty: name at least one corruption or a subset "
            f"({', '.join(C.SUBSETS)})"
        )
    if c.get("root") and c["benchmark"] in ("mnist_c", "digits_c"):
        raise ConfigError(
            f"config key 'root'={c['root']!r}: benchmark {c['benchmark']!r} is embedded and reads no files; "
            "drop root (it is for cifar10_c / imagenet_c)"
        )
    sev = _as_list(c["severities"], "severities")
    if not sev or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 5 for s in sev):
        raise ConfigError(f"config key 'severities'={c['severities']!r}: expected severities in 1..5")
    if c["stream_order"] == "mariodoebler":  # the given order is the stream's (gradual, mixed)
        c["severities"] = list(dict.fromkeys(int(s) for s in sev))
    else:
        c["severities"] = sorted(set(int(s) for s in sev))
    if c["benchmark"] not in ("mnist_c", "digits_c"):
        from .benchmark import make_benchmark

        # a missing or wrong root, or one without a chosen domain's files: refused here, not once per
        # method in its subprocess
        make_benchmark(
            c["benchmark"], root=c.get("root"), corruptions=c["corruptions"], severities=c["severities"]
        )
    seeds = _as_list(c["seeds"], "seeds")
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"config key 'seeds'={c['seeds']!r}: expected a list of integers >= 0")
    c["seeds"] = list(dict.fromkeys(int(s) for s in seeds))
    n = c["num_examples"] if c["num_examples"] is not None else prof.get("num_examples")
    if n == "all":
        n = None
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"config key 'num_examples'={n!r}: expected a positive integer, null or 'all'")
    c["num_examples"] = n
    bs = c["batch_size"] if c["batch_size"] is not None else prof.get("batch_size", 64)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ConfigError(f"config key 'batch_size'={bs!r}: expected a positive integer")
    c["batch_size"] = bs
    if c["timeout_s"] is None:
        c["timeout_s"] = prof.get("timeout_s")
    if c["timeout_s"] is not None and not c["timeout_s"] > 0:
        raise ConfigError(
            f"config key 'timeout_s'={c['timeout_s']!r}: expected a positive number of seconds or null"
        )
    if not re.fullmatch(r"cpu|cuda(:\d+)?|gpu|tpu|auto|mps", str(c["device"])):
        raise ConfigError(
            f"config key 'device'={c['device']!r}: expected cpu, cuda or cuda:N (also auto, gpu, tpu, mps)"
        )
    for key in ("jobs", "threads"):
        v = c[key]
        if v is not None and (isinstance(v, bool) or v < 1):
            raise ConfigError(f"config key {key!r}={v!r}: expected a positive integer")
    for key in ("out_dir", "cache_dir"):  # "" (e.g. an unset $VAR) would be the working directory
        if c[key] is not None and not str(c[key]).strip():
            raise ConfigError(f"config key {key!r} is empty; expected a directory" + (
                " (or null: <out_dir>/cache)" if key == "cache_dir" else ""))  # fmt: skip
    if c["cache_dir"] is None:
        c["cache_dir"] = str(Path(c["out_dir"]) / "cache")
    for key in (
        "out_dir",
        "cache_dir",
    ):  # a file on the way would end in NotADirectoryError / FileExistsError
        path = Path(c[key])
        for p in (path, *path.parents):
            if p.exists():
                if not p.is_dir():
                    raise ConfigError(f"config key {key!r}={c[key]!r}: {p} is a file; expected a directory")
                break
    if c.get("python"):  # a missing interpreter failed every method in turn, each with FileNotFoundError
        import shutil

        python = str(c["python"])
        found = shutil.which(python) if os.sep not in python else python
        if not found or not Path(found).is_file() or not os.access(found, os.X_OK):
            raise ConfigError(f"config key 'python'={python!r}: no such executable; expected a Python interpreter "
                              "that has the methods' subpackages (null: this one)")  # fmt: skip
    for key in ("overrides", "baselines"):
        if c.get(key) is not None and not isinstance(c[key], Mapping):
            raise ConfigError(f"config key {key!r}={c[key]!r}: expected a mapping")
    # (planning checked this only for a chosen method)
    for pattern, extra in (c.get("overrides") or {}).items():
        if not isinstance(extra, Mapping):
            raise ConfigError(
                f"config key 'overrides.{pattern}'={extra!r}: expected a mapping of its evaluate keys, e.g. "
                f"'overrides={{{pattern}:{{KEY:{extra}}}}}'"
            )
    for package, name in (c.get("baselines") or {}).items():
        if not isinstance(name, str) or not name.startswith(f"{package}."):
            raise ConfigError(
                f"config key 'baselines.{package}'={name!r}: expected a method of that subpackage ({package}.<name>)"
            )
    return c


# ----------------------------------------------------------------------------------------------------------
# methods


@dataclass
class Unavailable:
    """A requested method that cannot run here: ``reason`` is ``not installed`` or ``unknown``."""

    name: str
    reason: str
    message: str


def resolve_methods(patterns: Sequence[str], strict: bool = False):
    """``(specs, unavailable)`` for names or globs; ``strict``: unknown names raise UnknownNameError.

    A name or glob of a known subpackage that is not installed is *unavailable* with the install command
    (never an error); a name nothing matches is unavailable as ``unknown`` (an error when ``strict``).
    """
    from . import registry

    installed, problems = installed_methods()
    by_name = {s.name: s for s in installed}
    packages = {s.package for s in installed}
    chosen: dict[str, Any] = {}
    unavailable: list[Unavailable] = []
    for pattern in patterns:
        package = pattern.split(".", 1)[0]
        if any(ch in pattern for ch in "*?["):
            hits = [s for s in installed if fnmatch.fnmatchcase(s.name, pattern)]
        else:
            hits = [by_name[pattern]] if pattern in by_name else []
            if not hits:
                suffix = [s for s in installed if s.name.endswith("." + pattern)]
                hits = suffix if len(suffix) == 1 else []
        if hits:
            for s in hits:
                chosen.setdefault(s.name, s)
            continue
        if package in registry.KNOWN_PACKAGES and package not in packages and _dist_installed(package):
            unavailable.append(
                Unavailable(
                    pattern,
                    "broken",
                    f"{registry.KNOWN_PACKAGES[package]} is installed but its "
                    f"methods could not be listed ({problems.get(package, '?').split(': ', 1)[-1]})",
                )  # fmt: skip
            )
            continue
        if package in registry.KNOWN_PACKAGES and package not in packages:
            unavailable.append(
                Unavailable(pattern, "not installed", registry.missing_package_message(package))
            )
            continue
        of_package = sorted(s.name for s in installed if s.package == pattern)
        if of_package:  # methods=torch_ttt: it said "did you mean 'torch_ttt.bn'"
            msg = (f"{pattern!r} is a subpackage, not a method: {pattern}.* runs all its methods "
                   f"({', '.join(of_package)}), or name one")  # fmt: skip
        elif re.search(r"[\s,]", pattern.strip()) or re.fullmatch(r"\[[^]]*\]", pattern.strip()):
            # one string holding a list: 'methods=[a b]', methods="a,b" or methods="[a]" (Hydra's quotes make a
            # string); it did-you-meant the first name
            names = ",".join(n for n in re.split(r"[\s,\[\]'\"]+", pattern) if n)
            msg = (f"unknown method {pattern!r}: one name holding a list; give the methods as a list, names "
                   f"separated by commas, the whole argument quoted for the shell: 'methods=[{names}]'")  # fmt: skip
        else:
            try:
                registry.get_method(pattern)  # raises with a did-you-mean and the installed methods
                msg = f"no installed method matches {pattern!r}"
            except UnknownNameError as exc:
                msg = str(exc)
        if strict:
            raise UnknownNameError(msg)
        unavailable.append(Unavailable(pattern, "unknown", msg))
    return list(chosen.values()), unavailable


def installed_methods() -> tuple[list[Any], dict[str, str]]:
    """``(specs, problems)``: the registry's methods, and per entry point that failed to load its warning."""
    from . import registry

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        specs = registry.list_methods()
    problems = {}
    for w in caught:
        msg = str(w.message)
        if msg.startswith("skipping the methods of entry point "):
            problems[msg.split("entry point ", 1)[1].split(" ", 1)[0]] = msg
        else:
            warnings.warn(msg, stacklevel=2)
    return specs, problems


def group_unavailable(unavailable: Sequence[Unavailable]) -> list[tuple[list[str], str]]:
    """``[(names, message)]``: the unavailable methods that share a message (a subpackage) together."""
    groups: dict[str, list[str]] = {}
    for u in unavailable:
        groups.setdefault(u.message, []).append(u.name)
    return [(names, message) for message, names in groups.items()]


def _dist_installed(package: str) -> bool:
    from importlib import metadata

    from . import registry

    try:
        metadata.distribution(registry.KNOWN_PACKAGES[package])
        return True
    except metadata.PackageNotFoundError:
        return False


# ----------------------------------------------------------------------------------------------------------
# tasks


@dataclass(eq=False)
class Task:
    """One evaluate subprocess: a method x setting x seed over ``corruptions`` x ``severities``."""

    spec: Any  # registry.MethodSpec
    setting: str
    seed: int
    root: Path  # <run root>/<method>/<setting>/seed<k>
    corruptions: list[str]
    severities: list[int]
    todo: list[tuple[str, int]]  # domains to compute; empty: all done (resumed)
    part: Path | None = None  # the run directory evaluate writes (None when nothing is left to do)
    status: str = "pending"  # pending | running | ok | failed | resumed
    seconds: float = 0.0
    returncode: int | None = None
    error: str = ""
    stderr_tail: str = ""
    started: float = 0.0
    fingerprint: str = ""  # code_fingerprint of the spec when planned; parts written by other code are stale

    @property
    def label(self) -> str:
        return f"{self.spec.name} [{self.setting}, seed {self.seed}]"


def code_fingerprint(spec) -> str:
    """Fingerprint of the code that computes ``spec``'s numbers: its subpackage's source and configs, and
    the core's (the benchmark streams, subsets, corruptions and metrics the numbers also depend on).

    ``tttlab.<package>`` for the subpackages; the evaluate's top-level module otherwise.  A compare part
    written under another fingerprint is not resumed from (``""``: unknown, never matches a stored one).
    """
    import hashlib

    module = spec.evaluate.partition(":")[0]
    pkg = f"tttlab.{spec.package}"
    top = pkg if module == pkg or module.startswith(pkg + ".") else module.split(".")[0]
    own = source_fingerprint(top)
    if not own:
        return ""
    both = f"{own}:{source_fingerprint('tttlab.core')}".encode()
    return hashlib.sha256(both).hexdigest()[: len(own)]


def run_key(c: dict[str, Any]) -> str:
    """What changes a method's numbers apart from the domains: the folder name under ``runs/``."""
    key = {
        "benchmark": c["benchmark"], "root": c["root"], "num_examples": c["num_examples"],
        "batch_size": c["batch_size"], "profile": c["profile"], "device": c["device"],
    }  # fmt: skip
    if c.get("dirichlet_delta") is not None:  # i.i.d. streams keep the keys they always had
        key["dirichlet_delta"] = c["dirichlet_delta"]
    if c.get("stream_order", "tttlab") != "tttlab":  # so do streams in the default order
        key["stream_order"] = c["stream_order"]
    return f"{c['benchmark']}-{c['profile']}-{config_hash(key)[:8]}"


def _method_overrides(c: dict[str, Any], name: str) -> dict[str, Any]:
    """Extra evaluate keys of a method: the profile's ``overrides``, then the config's (globs, in order)."""
    out: dict[str, Any] = {}
    profile = (c.get("profiles") or {}).get(c["profile"]) or {}
    for where, table in (("profiles." + c["profile"] + ".overrides", profile.get("overrides")),
                         ("overrides", c.get("overrides"))):  # fmt: skip
        for pattern, extra in (table or {}).items():
            if fnmatch.fnmatchcase(name, pattern):
                if not isinstance(extra, Mapping):
                    raise ConfigError(f"config key '{where}.{pattern}' must be a mapping of evaluate keys")
                out = _deep_merge(out, extra)
    return out


def _deep_merge(a: Mapping, b: Mapping) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _parts(root: Path) -> list[Path]:
    """The part run directories of a task root, oldest records first."""
    if not root.is_dir():
        return []
    parts = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("part-")]
    return sorted(parts, key=lambda p: ((p / "records.jsonl").stat().st_mtime if (p / "records.jsonl").exists()
                                        else 0.0, p.name))  # fmt: skip


def _part_name(corruptions: Sequence[str], severities: Sequence[int]) -> str:
    return "part-" + config_hash({"corruptions": list(corruptions), "severities": list(severities)})[:8]


def _status(part: Path) -> dict[str, Any]:
    f = part / "compare_status.json"
    try:
        return json.loads(f.read_text()) if f.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _part_code(part: Path) -> str | None:
    """The code fingerprint a part was computed with (its job file is written before evaluate runs, so a
    killed run's partial records keep theirs)."""
    code = _status(part).get("code")
    if code is None:
        try:
            code = json.loads((part / "compare_job.json").read_text()).get("code")
        except (OSError, json.JSONDecodeError):
            code = None
    return code


def task_records(task: Task, c: dict[str, Any]):
    """The per-domain records of a task (latest wins per domain and metric), as a DataFrame.

    Columns: the records schema.  ``method``/``setting``/``seed`` are the task's (what compare asked
    for); clean rows and the evaluate's own ``mean`` rows are dropped.
    """
    import pandas as pd

    if task.setting in INDEPENDENT_SETTINGS:
        parts = _parts(task.root)
    else:  # a stream is one unit: only a finished run of exactly this stream counts
        part = task.root / _part_name(task.corruptions, task.severities)
        parts = [part] if part.is_dir() and _status(part).get("ok") else []
    if task.fingerprint:  # parts written by other code (an edited package) are stale
        parts = [p for p in parts if _part_code(p) == task.fingerprint]
    frames = []
    for order, part in enumerate(parts):
        sources = [part] if any(part.glob("records*.jsonl")) else []
        other = _status(part).get("records")
        if other and Path(other).exists() and Path(other).resolve().parent != part.resolve():
            sources.append(Path(other))
        if not sources:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            df = load_records(*sources)
        df["_order"] = order
        frames.append(df)
    if not frames:
        from .records import records_frame

        return records_frame([])
    df = pd.concat(frames, ignore_index=True)
    corr = df["corruption"].astype(object)
    corr = corr.where(~corr.isin(["clean", "none", ""]), None)
    df["corruption"] = corr
    df = df[df["corruption"].notna() & (df["corruption"] != "mean")]
    df = df[df["metric"].isin(["accuracy", "s_per_image"])]
    df["reported_method"] = df["method"]
    df["method"] = task.spec.name
    df["setting"] = task.setting
    df["seed"] = task.seed
    if len(df) == 0:
        return df
    df = df.sort_values("_order", kind="stable")
    df = df.drop_duplicates(["corruption", "severity", "metric"], keep="last")
    return df.drop(columns=["_order"]).reset_index(drop=True)


def plan(c: dict[str, Any], specs: Sequence[Any]) -> list[Task]:
    """The tasks of a comparison, with the domains each still has to compute."""
    from .records import done_keys

    base = Path(c["out_dir"]) / "runs"
    wanted = [(cr, s) for cr in c["corruptions"] for s in c["severities"]]
    tasks = []
    for spec in specs:
        fingerprint = code_fingerprint(spec)  # once per method: it reads the subpackage's files
        for setting in c["setting"]:
            for seed in c["seeds"]:
                key = run_key(c) + ("-" + config_hash(_method_overrides(c, spec.name))[:6]
                                    if _method_overrides(c, spec.name) else "")  # fmt: skip
                root = base / key / spec.name / setting / f"seed{seed}"
                t = Task(spec, setting, seed, root, list(c["corruptions"]), list(c["severities"]), [],
                         fingerprint=fingerprint)  # fmt: skip
                df = task_records(t, c)
                have = done_keys(df, ["corruption", "severity"], metric="accuracy") if len(df) else set()
                todo = [d for d in wanted if d not in have]
                if todo and setting not in INDEPENDENT_SETTINGS:
                    todo = list(wanted)
                elif todo and setting == "reset_each_shift" and c.get("stream_order") == "mariodoebler":
                    # a corruption's severities share one adaptation (no reset between them): redo it whole
                    todo = [d for d in wanted if d[0] in {cr for cr, _ in todo}]
                t.todo = todo
                if not todo:
                    t.status = "resumed"
                else:
                    corr = [cr for cr in c["corruptions"] if any(d[0] == cr for d in todo)]
                    sev = [s for s in c["severities"] if any(d[1] == s for d in todo)]  # their order
                    if setting in INDEPENDENT_SETTINGS:
                        # a product corruptions x severities that covers the missing domains only where
                        # possible; otherwise (rare: a ragged set) the missing corruptions at all severities
                        if {(cr, s) for cr in corr for s in sev} != set(todo):
                            sev = list(c["severities"])
                        t.corruptions, t.severities = corr, sev
                    t.part = root / _part_name(t.corruptions, t.severities)
                tasks.append(t)
    return tasks


def model_cache_dir(task: Task, c: dict[str, Any]) -> Path:
    """Where the evaluate of ``task`` caches the models it trains: one folder per subpackage and code version.

    The subpackages key their cached models by the training config only; a model trained by older code
    (an edited or upgraded package) must not be reused, so the folder carries the code fingerprint, as
    the run parts do.  The methods of one subpackage share it (the first trains, its siblings reuse).
    """
    name = task.spec.package + (f"-{task.fingerprint[:10]}" if task.fingerprint else "")
    return Path(c["cache_dir"]).resolve() / "models" / name


def evaluate_config(task: Task, c: dict[str, Any]) -> dict[str, Any]:
    """The mapping the spec's ``evaluate`` receives (the evaluate contract)."""
    bench = {
        "name": c["benchmark"], "corruptions": list(task.corruptions), "severities": list(task.severities),
        "setting": task.setting, "num_examples": c["num_examples"], "batch_size": c["batch_size"],
        "seed": task.seed, "cache_dir": str(Path(c["cache_dir"]).resolve() / "benchmark"),
    }  # fmt: skip
    if c["root"]:
        bench["root"] = c["root"]
    if c.get("dirichlet_delta") is not None:
        bench["dirichlet_delta"] = c["dirichlet_delta"]
    if c.get("stream_order", "tttlab") != "tttlab":
        bench["stream_order"] = c["stream_order"]
    cfg = {
        "method": task.spec.name, "out_dir": str(task.part.resolve()), "benchmark": bench,
        "profile": c["profile"], "cache_dir": str(model_cache_dir(task, c)), "seed": task.seed,
        "device": c["device"], "progress": False,
    }  # fmt: skip
    return _deep_merge(cfg, _method_overrides(c, task.spec.name))


# ----------------------------------------------------------------------------------------------------------
# running


def _child_env(c: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONUNBUFFERED"] = "1"
    # a part folder is compare's own: a stale part (edited code: another model cache_dir in the evaluate's
    # config) runs again in it, and the latest record per domain wins (task_records)
    env[APPEND_ENV] = "1"
    threads = c["threads"] or max(1, (os.cpu_count() or 1) // max(1, c["jobs"]))
    if c["threads"] or c["jobs"] > 1:
        for var in (
            "OMP_NUM_THREADS",
            "MKL_NUM_THREADS",
            "OPENBLAS_NUM_THREADS",
            "TTTLAB_CORRUPTION_THREADS",
        ):
            env.setdefault(var, str(threads))
        if threads == 1 and "XLA_FLAGS" not in env:
            env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return env


def _clip(line: str, limit: int = 300) -> str:
    """``line`` up to ``limit`` characters, cut at a space and marked `` ...`` when longer (the failed-run line
    cut a long error mid-word, e.g. a list of known keys at "dirichlet_del", as if that were the message)."""
    if len(line) <= limit:
        return line
    head = line[:limit]
    return (head.rsplit(" ", 1)[0] if " " in head else head) + " ..."


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    text = text.replace("\r", "\n")
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


def run_task(task: Task, c: dict[str, Any], stop: threading.Event | None = None) -> Task:
    """Run one task's evaluate in a subprocess; set its status, seconds, error and stderr tail."""
    part = task.part
    part.mkdir(parents=True, exist_ok=True)
    cfg = evaluate_config(task, c)
    job = part / "compare_job.json"
    result = part / "compare_result.json"
    result.unlink(missing_ok=True)
    atomic_write_json(job, {"evaluate": task.spec.evaluate, "config": cfg, "code": task.fingerprint})
    cmd = [c["python"] or sys.executable, "-c", RUNNER, str(job), str(result), str(os.getpid())]
    task.started = time.perf_counter()
    task.status = "running"
    with open(part / "stdout.log", "wb") as out, open(part / "stderr.log", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=_child_env(c), start_new_session=True)
        timeout = c["timeout_s"]
        try:
            while True:
                try:
                    proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if stop is not None and stop.is_set():
                    _kill(proc)
                    task.error = "interrupted"
                    break
                if timeout and time.perf_counter() - task.started > timeout:
                    _kill(proc)
                    task.error = f"timed out after {timeout:g} s (config key timeout_s)"
                    break
        except BaseException:
            _kill(proc)
            raise
    task.seconds = time.perf_counter() - task.started
    task.returncode = proc.returncode
    info: dict[str, Any] = {}
    if result.exists():
        try:
            info = json.loads(result.read_text())
        except json.JSONDecodeError:
            info = {}
    ok = proc.returncode == 0 and not task.error and bool(info)
    if ok:
        status = {
            "ok": True,
            "records": info.get("records"),
            "seconds": task.seconds,
            "code": task.fingerprint,
        }
        atomic_write_json(part / "compare_status.json", status)
        df = task_records(task, c)
        have = {(r.corruption, int(r.severity)) for r in df[df["metric"] == "accuracy"].itertuples()
                if r.severity is not None and not _isna(r.severity)}  # fmt: skip
        missing = [d for d in task.todo if d not in have]
        if missing:
            ok = False
            task.error = (f"evaluate returned {info.get('records')} but no accuracy records for "
                          f"{', '.join(f'{a}-{b}' for a, b in missing[:4])}{' ...' if len(missing) > 4 else ''}")  # fmt: skip
    elif not task.error:
        last = _tail(part / "stderr.log", 1)
        task.error = f"exit status {proc.returncode}" + (f": {_clip(last)}" if last else "")
    if not ok:
        atomic_write_json(
            part / "compare_status.json", {"ok": False, "error": task.error, "code": task.fingerprint}
        )
    task.stderr_tail = "" if ok else _tail(part / "stderr.log")
    task.status = "ok" if ok else "failed"
    return task


def _isna(v) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _kill(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


def run_tasks(tasks: Sequence[Task], c: dict[str, Any], echo=print) -> None:
    """Run the pending tasks, ``jobs`` at a time; the first task of each subpackage goes before its
    siblings (they reuse the models it caches), and the first tasks of all subpackages go first.  A progress bar counts tasks and shows the running ones."""
    pending = [t for t in tasks if t.status == "pending"]
    if not pending:
        return
    from tqdm.auto import tqdm

    first: dict[str, Task] = {}
    for t in pending:
        first.setdefault(t.spec.package, t)
    jobs = max(1, int(c["jobs"]))
    stop = threading.Event()
    running: dict[Task, threading.Thread] = {}
    # the first task of every subpackage first (they train the models, in parallel), then their siblings
    heads = set(map(id, first.values()))
    queue = [t for t in pending if id(t) in heads] + [t for t in pending if id(t) not in heads]
    bar = tqdm(total=len(pending), desc="methods", unit="run", disable=not c["progress"] or None,
               dynamic_ncols=True)  # fmt: skip

    def ready(t: Task) -> bool:
        head = first[t.spec.package]
        return head is t or head.status in ("ok", "failed")

    # a worker that ends sets `finished`: the loop below starts the next task at once instead of at its next
    # 0.2 s tick (with many short evaluates the ticks were most of a comparison's time)
    finished = threading.Event()
    done: set[Task] = set()

    def worker(t: Task) -> None:
        try:
            run_task(t, c, stop)
        except Exception as exc:  # noqa: BLE001 - a task's failure must not stop the others
            t.status, t.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            done.add(t)
            finished.set()

    import signal

    previous = None
    if threading.current_thread() is threading.main_thread():
        # a terminated comparison (SIGTERM: CI, timeout) kills its evaluates too, as Ctrl-C does; they run
        # in sessions of their own and would outlive it
        def terminate(signum, frame):
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, terminate)
    try:
        while queue or running:
            finished.clear()
            for t, th in list(running.items()):
                if t in done:
                    th.join()
                    del running[t]
                    bar.update(1)
                    mark = "ok" if t.status == "ok" else f"FAILED ({t.error})"
                    msg = f"{t.label}: {mark} in {t.seconds:.0f} s"
                    bar.write(msg) if not bar.disable else echo(msg)
            while queue and len(running) < jobs:
                nxt = next((t for t in queue if ready(t)), None)
                if nxt is None:
                    break
                queue.remove(nxt)
                th = threading.Thread(target=worker, args=(nxt,), daemon=True)
                nxt.status, nxt.started = "running", time.perf_counter()
                th.start()
                running[nxt] = th
            now = time.perf_counter()
            bar.set_postfix_str(
                ", ".join(f"{t.spec.name} {now - t.started:.0f}s" for t in running), refresh=True
            )
            if running or queue:
                finished.wait(0.2)  # a worker's end, or the bar's refresh
    except BaseException:
        stop.set()
        for th in running.values():
            th.join(timeout=10)
        raise
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------------------
# results


def collect(tasks: Sequence[Task], c: dict[str, Any]):
    """One row per method x setting x seed x domain with ``accuracy``, ``n``, ``wall_time_s`` and
    ``s_per_image`` (the record's, or ``wall_time_s / n``); exactly what ``results.csv`` holds."""
    import pandas as pd

    rows = []
    wanted = {(cr, s) for cr in c["corruptions"] for s in c["severities"]}
    for t in tasks:
        df = task_records(t, c)
        if len(df) == 0:
            continue
        acc = df[df["metric"] == "accuracy"]
        spi = df[df["metric"] == "s_per_image"]
        spi_by = {
            (r.corruption, int(r.severity)): float(r.value) for r in spi.itertuples() if not _isna(r.severity)
        }
        for r in acc.itertuples():
            if _isna(r.severity):
                continue
            dom = (r.corruption, int(r.severity))
            if dom not in wanted:
                continue
            n = None if _isna(r.n) else int(r.n)
            wall = None if _isna(r.wall_time_s) else float(r.wall_time_s)
            s = spi_by.get(dom, (wall / n) if wall is not None and n else math.nan)
            rows.append({
                "method": t.spec.name, "package": t.spec.package, "framework": t.spec.framework,
                "setting": t.setting, "seed": t.seed, "corruption": dom[0], "severity": dom[1],
                "accuracy": float(r.value), "n": n, "wall_time_s": wall, "s_per_image": s,
                "model": None if _isna(r.model) else r.model,
            })  # fmt: skip
    cols = ["method", "package", "framework", "setting", "seed", "corruption", "severity", "accuracy", "n",
            "wall_time_s", "s_per_image", "model"]  # fmt: skip
    df = pd.DataFrame(rows, columns=cols)
    order = {m: i for i, m in enumerate(dict.fromkeys(t.spec.name for t in tasks))}
    corder = {cr: i for i, cr in enumerate(c["corruptions"])}
    if len(df):
        df = df.assign(_m=df["method"].map(order), _c=df["corruption"].map(corder))
        df = df.sort_values(["_m", "setting", "seed", "_c", "severity"]).drop(columns=["_m", "_c"])
    return df.reset_index(drop=True)


def summarize(results, c: dict[str, Any]):
    """The table: one row per method x setting; per corruption the mean accuracy over severities and
    seeds; ``mean`` over corruptions (seed-wise, then averaged), ``std`` its sample std over seeds,
    ``seeds`` their count, ``s_per_image`` the mean of the rows' ``s_per_image``, ``delta`` the gain of
    ``mean`` over the subpackage's baseline in the same setting.  Accuracies are fractions."""
    import numpy as np
    import pandas as pd

    corrs = list(c["corruptions"])
    out = []
    if len(results) == 0:
        return pd.DataFrame(columns=["method", "package", "setting", *corrs, "mean", "std", "seeds",
                                     "s_per_image", "delta", "n", "images"])  # fmt: skip
    for (method, setting), g in results.groupby(["method", "setting"], sort=False):
        row: dict[str, Any] = {"method": method, "package": g["package"].iloc[0], "setting": setting}
        per_corr = g.groupby(["seed", "corruption"])["accuracy"].mean().unstack("corruption")
        for cr in corrs:
            row[cr] = float(per_corr[cr].mean()) if cr in per_corr.columns else math.nan
        complete = per_corr.reindex(columns=corrs).dropna(axis=0, how="any")
        seed_means = complete.mean(axis=1)
        row["mean"] = float(seed_means.mean()) if len(seed_means) else math.nan
        row["std"] = float(seed_means.std(ddof=1)) if len(seed_means) > 1 else math.nan
        row["seeds"] = int(len(seed_means))
        spi = g["s_per_image"].astype("float64")
        row["s_per_image"] = float(spi.mean()) if spi.notna().any() else math.nan
        row["n"] = int(g["n"].fillna(0).sum()) if g["n"].notna().any() else None
        row["images"] = int(g["n"].median()) if g["n"].notna().any() else None  # per domain
        out.append(row)
    table = pd.DataFrame(out)
    table["delta"] = np.nan
    for i, row in table.iterrows():
        base = (c.get("baselines") or {}).get(row["package"])
        if not base or base == row["method"]:
            continue
        ref = table[(table["method"] == base) & (table["setting"] == row["setting"])]
        if len(ref):
            table.loc[i, "delta"] = row["mean"] - float(ref["mean"].iloc[0])
    return table


def _fmt(v, scale: float = 100.0, digits: int = 1, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v * scale:+.{digits}f}" if sign else f"{v * scale:.{digits}f}"


def _fmt_cost(v) -> str:
    """Seconds per image as milliseconds with 3 significant digits, trailing zeros kept (1.20, 12.0, 120),
    so that a column of them lines up; no exponent for slow methods (1234 ms stays 1234)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    ms = v * 1000
    if ms <= 0 or not math.isfinite(ms):
        return f"{ms:g}"
    return f"{ms:.{max(0, 2 - math.floor(math.log10(ms)))}f}"


def _row_label(row, several_settings: bool) -> str:
    return f"{row['method']} · {row['setting']}" if several_settings else str(row["method"])


def table_rows(
    table, c: dict[str, Any], short: bool = False, images: bool | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the table (accuracy in %, one decimal): shared by print and report.

    ``images``: add the column of images per corruption (None: only when the methods differ in it or it
    is not ``num_examples``)."""
    several = len(c["setting"]) > 1
    corrs = list(c["corruptions"])
    if images is None:  # when the methods saw different numbers of images, or not the title's number
        images = len(table) > 0 and (
            table["images"].nunique(dropna=False) > 1 or table["images"].iloc[0] != c["num_examples"]
        )
    header = ["method", *[SHORT_NAMES.get(cr, cr) if short else cr for cr in corrs], "mean",
              "Δ" if short else "Δ baseline", "ms/img" if short else "ms/image"]  # fmt: skip
    header += ["n/corr" if short else "images"] if images else []
    rows = []
    for _, row in table.iterrows():
        mean = _fmt(row["mean"])
        if row["seeds"] > 1 and not math.isnan(row["std"]):
            mean += f" ± {_fmt(row['std'])}"
        rows.append([_row_label(row, several), *[_fmt(row[cr]) for cr in corrs], mean,
                     _fmt(row["delta"], sign=True), _fmt_cost(row["s_per_image"])])  # fmt: skip
        if images:
            rows[-1].append("—" if row["images"] is None or _isna(row["images"]) else str(int(row["images"])))
    return header, rows


def format_table(table, c: dict[str, Any], width: int | None = None) -> str:
    """The table as text: a rich table when rich is installed, aligned plain text otherwise."""
    header, rows = table_rows(table, c, short=True)
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        lines = [
            "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
        ]
        lines.append("  ".join("-" * w for w in widths))
        for r in rows:
            lines.append(
                "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
            )
        return "\n".join([f"accuracy (%) on {_bench_title(c)}", *lines])
    import io

    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0,
                     style="bold" if h == "mean" else None)  # fmt: skip
    for r in rows:
        t.add_row(*r)
    buf = io.StringIO()
    # as wide as the table needs (rich would squeeze the columns to a narrower console)
    need = sum(max(len(h), *(len(r[k]) for r in rows)) + 3 for k, h in enumerate(header)) if rows else 80
    console = Console(file=buf, width=width or max(80, need + 4), force_terminal=False, color_system=None)
    console.print(t)
    return f"accuracy (%) on {_bench_title(c)}\n" + buf.getvalue().rstrip()


def _bench_title(c: dict[str, Any]) -> str:
    sev = ",".join(map(str, c["severities"]))
    n = "all" if c["num_examples"] is None else c["num_examples"]
    return (f"{c['benchmark']} severity {sev}, {n} images per corruption, setting {'/'.join(c['setting'])}"
            f"{_correlation(c)}, profile {c['profile']}, seeds {c['seeds']}")  # fmt: skip


def _correlation(c: dict[str, Any]) -> str:
    """``", label-correlated (dirichlet_delta=...)"`` for a non-i.i.d. comparison and ``", stream_order
    mariodoebler"`` for streams in that order, else nothing."""
    delta = c.get("dirichlet_delta")
    order = c.get("stream_order", "tttlab")
    return ("" if delta is None else f", label-correlated (dirichlet_delta={delta:g})") + (
        "" if order == "tttlab" else f", stream_order {order}"
    )


def write_plots(results, table, c: dict[str, Any], out: Path) -> list[Path]:
    """``heatmap`` (method x corruption, + mean) and ``bars`` (mean accuracy, s/image beside it)."""
    import pandas as pd

    from .plots import plot_bars, plot_heatmap

    if len(results) == 0:
        return []
    several = len(c["setting"]) > 1
    lab = results.apply(lambda r: f"{r['method']} · {r['setting']}" if several else r["method"], axis=1)
    heat = pd.DataFrame({"method": lab, "corruption": results["corruption"], "value": results["accuracy"],
                         "metric": "accuracy"})  # fmt: skip
    corder = {cr: i for i, cr in enumerate(c["corruptions"])}
    heat = heat.assign(_c=heat["corruption"].map(corder)).sort_values("_c", kind="stable").drop(columns="_c")
    labels = list(dict.fromkeys(_row_label(r, several) for _, r in table.iterrows()))
    heat = heat.assign(_m=heat["method"].map({m: i for i, m in enumerate(labels)}))
    heat = heat.sort_values(["_m"], kind="stable").drop(columns="_m")
    paths = [
        plot_heatmap(
            heat,
            out / "heatmap",
            metric="accuracy",
            title=f"accuracy (%) on {c['benchmark']}, severity {','.join(map(str, c['severities']))}",
        )
    ]
    # one bar row per method x seed: the bar is the mean over seeds, the error bar their std
    g = results.assign(label=lab)
    per_seed = g.groupby(["label", "seed", "corruption"], sort=False)["accuracy"].mean().groupby(
        ["label", "seed"], sort=False).mean().reset_index()  # fmt: skip
    costs = {_row_label(r, several): r["s_per_image"] for _, r in table.iterrows()}
    bars = pd.DataFrame({"method": per_seed["label"], "value": per_seed["accuracy"], "metric": "accuracy",
                         "s_per_image": per_seed["label"].map(costs)})  # fmt: skip
    if bars["s_per_image"].isna().all():
        bars = bars.drop(columns="s_per_image")
    paths.append(plot_bars(bars, out / "bars", metric="accuracy", cost="s_per_image"))
    return paths


def highlights(table, c: dict[str, Any]) -> list[str]:
    """A few sentences read off the table: the best mean, who gains or loses against their subpackage's
    baseline (and at what cost), and the largest gain on a single corruption."""
    if len(table) == 0 or table["mean"].isna().all():
        return []
    several = len(c["setting"]) > 1
    lines = []
    best = table.loc[table["mean"].idxmax()]
    lines.append(f"Best mean accuracy: {_row_label(best, several)} ({_fmt(best['mean'])}%).")
    gains = table[table["delta"].notna()].sort_values("delta", ascending=False)
    if len(gains):

        def fewer_images(r):
            """'; N images per corruption against the baseline's M' where the two saw other image sets."""
            base = table[(table["method"] == (c.get("baselines") or {}).get(r["package"]))
                         & (table["setting"] == r["setting"])]  # fmt: skip
            mine, theirs = r.get("images"), base["images"].iloc[0] if len(base) and "images" in base else None
            if not (_isna(mine) or _isna(theirs)) and mine != theirs:
                # per-image methods see the first images of the draw only: not the baseline's image set
                return f"; {int(mine)} images per corruption against the baseline's {int(theirs)}"
            return ""

        def item(r):
            text = f"{_row_label(r, several)} {_fmt(r['delta'], sign=True)} ({_fmt_cost(r['s_per_image'])} ms/image"
            return text + fewer_images(r) + ")"

        up = [item(r) for _, r in gains.iterrows() if r["delta"] > 0.0005]
        down = [item(r) for _, r in gains.iterrows() if r["delta"] < -0.0005]
        flat = [_row_label(r, several) for _, r in gains.iterrows() if abs(r["delta"]) <= 0.0005]
        if up:
            lines.append(
                "Better than their subpackage's baseline (points of mean accuracy): " + ", ".join(up) + "."
            )
        if down:
            lines.append("Worse than their baseline: " + ", ".join(down) + ".")
        if flat:
            lines.append("No change: " + ", ".join(flat) + ".")
        top = None
        for _, r in gains.iterrows():
            base = table[(table["method"] == (c.get("baselines") or {}).get(r["package"]))
                         & (table["setting"] == r["setting"])].iloc[0]  # fmt: skip
            for cr in c["corruptions"]:
                d = r[cr] - base[cr]
                if not math.isnan(d) and (top is None or d > top[0]):
                    top = (d, r, cr, base)
        if top is not None and top[0] > 0:
            d, r, cr, base = top
            lines.append(f"Largest gain on one corruption: {_row_label(r, several)} on {cr}, "
                         f"{_fmt(base[cr])}% -> {_fmt(r[cr])}% ({_fmt(d, sign=True)}{fewer_images(r)}).")  # fmt: skip
    lines += _missing_baselines(table, c)
    return lines


def _missing_baselines(table, c: dict[str, Any]) -> list[str]:
    """Why a row's gain column is empty when its subpackage's baseline was not among the methods (e.g.
    ``'methods=[torch_ttt.tent,torch_ttt.bn]'``): one sentence per subpackage naming the method to add."""
    baselines = c.get("baselines") or {}
    chosen = [str(m) for m in (c.get("methods") or [])]
    run = set(table["method"])
    lines = []
    for package, rows in table.groupby("package", sort=True):
        base = baselines.get(package)
        if not base or base in run:
            continue
        names = ", ".join(sorted(dict.fromkeys(rows["method"])))
        if any(fnmatch.fnmatchcase(base, m) for m in chosen):  # chosen, but it failed or has no records
            why = "has no results (see its run)"
        else:
            why = "was not among the methods (add it)"
        lines.append(f"No gain column for {names}: their baseline {base} {why}.")
    return lines


def severity_table(results, c: dict[str, Any]) -> list[str]:
    """Markdown lines: per method (x setting) the mean accuracy over corruptions at each severity (and
    over seeds), from the same rows as ``results.csv``."""
    several = len(c["setting"]) > 1
    sevs = list(c["severities"])
    lines = ["Mean accuracy (%) over corruptions per severity:", "",
             "| method | " + " | ".join(f"severity {s}" for s in sevs) + " |",
             "| --- " + "| ---: " * len(sevs) + "|"]  # fmt: skip
    for (method, setting), g in results.groupby(["method", "setting"], sort=False):
        per = g.groupby(["seed", "severity"])["accuracy"].mean().groupby("severity").mean()
        label = f"{method} · {setting}" if several else method
        lines.append(f"| {label} | " + " | ".join(_fmt(per.get(s, math.nan)) for s in sevs) + " |")
    return [*lines, ""]


def _gradual_note(c: dict[str, Any]) -> str:
    """What a ``gradual`` stream visited, for the report's first sentence (its columns show only the configured
    severities): one severity stands for all five (tttlab.core.benchmark)."""
    if "gradual" not in c["setting"]:
        return ""
    up = sorted(c["severities"]) if len(c["severities"]) > 1 else [1, 2, 3, 4, 5]
    path = up + up[-2::-1]
    if c.get("stream_order") == "mariodoebler" and len(c["severities"]) > 1:  # each given one, once
        path = list(c["severities"])
    visits = ", ".join(map(str, path))
    return (f" The `gradual` stream visits severities {visits} of each corruption in turn; the table shows "
            f"the records at severity {', '.join(map(str, c['severities']))}.")  # fmt: skip


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def write_report(
    out: Path, c: dict[str, Any], tasks, table, unavailable, command: str, plots, results=None
) -> Path:
    header, rows = table_rows(table, c, images=True)
    lines = [f"# Test-time methods compared on {c['benchmark']}", ""]
    lines += [
        f"Accuracy (%) per corruption at severity {', '.join(map(str, c['severities']))}, "
        f"{'all' if c['num_examples'] is None else c['num_examples']} images per corruption, "
        f"setting {', '.join(c['setting'])}{_correlation(c)}, profile `{c['profile']}`, "
        f"seed(s) {', '.join(map(str, c['seeds']))}.{_gradual_note(c)} "
        "`mean` is the mean over corruptions"
        + (" (± sample standard deviation over seeds)" if len(c["seeds"]) > 1 else "")
        + "; `Δ baseline` its gain over the baseline of the same subpackage (points); `ms/image` the "
        "adaptation + prediction time per image in milliseconds; `images` the images per corruption (and seed).",
        "",
    ]
    notes = highlights(table, c)
    if notes:
        lines += [*(f"- {n}" for n in notes), ""]
    if rows:
        best = {}
        for j in range(1, len(c["corruptions"]) + 2):  # the corruptions and the mean
            vals = [float(r[j].split(" ")[0]) for r in rows if r[j] != "—"]
            best[j] = max(vals) if vals else None
        lines.append("| " + " | ".join(header) + " |")
        lines.append("| --- " + "| ---: " * (len(header) - 1) + "|")
        for r in rows:
            cells = [f"**{v}**" if j in best and v != "—" and float(v.split(" ")[0]) == best[j]
                     and len(rows) > 1 else _md_escape(v) for j, v in enumerate(r)]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    else:
        lines += ["No method produced results.", ""]
    if results is not None and len(results) and len(c["severities"]) > 1:
        lines += severity_table(results, c)
    for p in plots:
        lines += [f"![{p.stem}]({p.name})", ""]
    failed = [t for t in tasks if t.status == "failed"]
    if failed:
        lines += ["## Failed", ""]
        for t in failed:
            lines += [f"### {t.label}", "", f"{t.error}; log: `{t.part / 'stderr.log'}`", ""]
            if t.stderr_tail:
                lines += ["```", t.stderr_tail, "```", ""]
    if unavailable:
        lines += ["## Not run", ""]
        for names, message in group_unavailable(unavailable):
            lines.append(f"- {', '.join(f'`{n}`' for n in names)}: {message}")
        lines.append("")
    lines += ["## Runs", "", "| method | setting | seed | status | seconds | run directory |",
              "| --- | --- | ---: | --- | ---: | --- |"]  # fmt: skip
    for t in tasks:
        secs = f"{t.seconds:.0f}" if t.status in ("ok", "failed") else "—"
        lines.append(f"| {t.spec.name} | {t.setting} | {t.seed} | {t.status} | {secs} | `{t.root}` |")
    lines += ["", "## Command", "", "```", command, "```", "",
              "Files: `results.csv` (one row per method x setting x seed x domain, from the records), "
              "`summary.csv` (this table, accuracies as fractions), `heatmap.png/.svg`, `bars.png/.svg`.", ""]  # fmt: skip
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def equivalent_command(c: dict[str, Any]) -> str:
    """A ``tttlab-compare`` command line that reproduces this comparison."""

    def v(x):
        if isinstance(x, (list, tuple)):
            return "[" + ",".join(map(str, x)) + "]"
        return "null" if x is None else str(x)

    parts = ["tttlab-compare", f"methods={v(c['methods'])}", f"benchmark={c['benchmark']}",
             f"setting={v(c['setting'])}", f"corruptions={v(c['corruptions'])}", f"severities={v(c['severities'])}",
             f"seeds={v(c['seeds'])}", f"profile={c['profile']}", f"num_examples={v(c['num_examples'])}",
             f"batch_size={c['batch_size']}", f"jobs={c['jobs']}", f"device={c['device']}",
             f"out_dir={c['out_dir']}"]  # fmt: skip
    if c["root"]:
        parts.append(f"root={c['root']}")
    if c.get("dirichlet_delta") is not None:
        parts.append(f"dirichlet_delta={float(c['dirichlet_delta'])!r}")  # every digit: the same stream
    if c.get("stream_order", "tttlab") != "tttlab":
        parts.append(f"stream_order={c['stream_order']}")
    return " ".join(shlex.quote(p) for p in parts)


# ----------------------------------------------------------------------------------------------------------
# the comparison


@dataclass
class Comparison:
    """What :func:`compare` returns."""

    config: dict[str, Any]
    tasks: list[Task]
    unavailable: list[Unavailable]
    results: Any  # DataFrame, one row per method x setting x seed x domain (results.csv)
    table: Any  # DataFrame, one row per method x setting (summary.csv)
    text: str  # the printed table
    out_dir: Path
    report: Path | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> list[Task]:
        return [t for t in self.tasks if t.status == "failed"]


def prepare_benchmark(c: dict[str, Any], echo=print) -> None:
    """Generate the corrupted domains once, into ``<cache_dir>/benchmark``, for every evaluate to read."""
    from .benchmark import make_benchmark

    if c["benchmark"] not in ("mnist_c", "digits_c"):
        return
    t0 = time.perf_counter()
    # 'gradual' with one severity streams all five (1..5..1): generate those too, not only the given one,
    # or every gradual evaluate corrupts severities 1-4 itself (jobs of them at once).  The setting is not
    # part of the cache's key, so the other settings read the same files.
    gradual = "gradual" in _as_list(c.get("setting", []), "setting")
    for seed in c["seeds"]:
        bench = make_benchmark(
            c["benchmark"], corruptions=c["corruptions"], severities=c["severities"], batch_size=c["batch_size"],
            num_examples=c["num_examples"], seed=seed, cache_dir=Path(c["cache_dir"]).resolve() / "benchmark",
            setting="gradual" if gradual else "reset_each_shift",
        )  # fmt: skip
        for d in bench.domains:
            bench.domain_dataset(d)
    if time.perf_counter() - t0 > 2:
        echo(f"corrupted {len(bench.domains)} domains x {len(c['seeds'])} seed(s) "
             f"in {time.perf_counter() - t0:.0f} s")  # fmt: skip


#: device names only one framework takes (the rest, cpu / cuda / cuda:N / gpu / auto, every method takes)
_FRAMEWORK_DEVICES = {"tpu": "jax", "mps": "torch"}


def check_device_for(device: str, specs) -> None:
    """``device=tpu`` is a JAX device and ``device=mps`` a torch one: with a method of the other framework
    among ``specs``, a ConfigError naming them, before any run (each of those runs would fail on its own)."""
    only = _FRAMEWORK_DEVICES.get(str(device))
    if only is None:
        return
    others = [s.name for s in specs if s.framework not in (only, "numpy")]  # numpy methods take no device
    if others:
        raise ConfigError(
            f"config key 'device'={device!r} is a {only} device, but {', '.join(others)} "
            f"{'run' if len(others) > 1 else 'runs'} on another framework; use device=cpu, cuda, cuda:N or auto, "
            f"or choose only {only} methods"
        )


#: Run by :func:`check_device_present` in a subprocess of its own (argv[1]: torch or jax): prints one JSON line,
#: ``{"found": {platform: devices}, "about": "<framework version, what it sees>"}``.  Only the subprocess
#: imports the framework: the comparison itself imports none.
DEVICE_PROBE = """\
import json, sys
framework = sys.argv[1]
if framework == "torch":
    import torch
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = getattr(torch.backends, "mps", None)
    found = {"cuda": cuda, "mps": int(bool(mps is not None and mps.is_available()))}
    about = "torch " + torch.__version__ + ("" if torch.version.cuda else ", built without CUDA")
else:
    import jax
    found = {}
    for platform in ("gpu", "tpu"):
        try:
            found[platform] = len(jax.devices(platform))
        except Exception:
            found[platform] = 0
    about = "jax " + jax.__version__ + ", devices: " + ", ".join(sorted({d.platform for d in jax.devices()}))
print(json.dumps({"found": found, "about": about}))
"""

#: what each framework must find for a ``device`` value: ``{framework: {device name: platform}}``; the other
#: values (cpu, auto; torch's gpu, which falls back to the CPU) every machine serves
_DEVICE_PLATFORMS = {
    "torch": {"cuda": "cuda", "mps": "mps"},
    "jax": {"cuda": "gpu", "gpu": "gpu", "tpu": "tpu"},
}
_PLATFORM_NAMES = {"cuda": "CUDA", "gpu": "GPU", "tpu": "TPU", "mps": "MPS"}


def _device_need(device: str, framework: str) -> tuple[str, int] | None:
    """``(platform, devices needed)`` that ``device`` asks of ``framework``; None when any machine serves it."""
    name, _, index = str(device).partition(":")
    platform = _DEVICE_PLATFORMS.get(framework, {}).get(name)
    return None if platform is None else (platform, int(index) + 1 if index else 1)


def probe_devices(frameworks, c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What each framework finds on this machine, each asked in a subprocess of its own (the evaluates' Python
    and environment, ``CUDA_VISIBLE_DEVICES`` included), all at once: ``{framework: {"found": {platform:
    devices}, "about": str}}``.  A framework that cannot be imported, or whose probe fails or hangs, is left
    out (its evaluates then say what is wrong)."""
    procs = {}
    for fw in sorted(set(frameworks)):
        try:
            procs[fw] = subprocess.Popen(
                [c.get("python") or sys.executable, "-c", DEVICE_PROBE, fw], stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, env=_child_env(c), text=True,
            )  # fmt: skip
        except OSError:
            continue
    out: dict[str, dict[str, Any]] = {}
    for fw, proc in procs.items():
        try:
            stdout, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            continue
        lines = stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            try:
                out[fw] = json.loads(lines[-1])
            except json.JSONDecodeError:
                continue
    return out


def device_problems(device: str, specs, found: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per framework whose methods ``device`` cannot run here (``found``: :func:`probe_devices`), what it
    finds and which methods need it; empty when every method can run."""
    problems = []
    for fw in sorted({s.framework for s in specs}):
        need = _device_need(device, fw)
        if need is None or fw not in found:
            continue
        platform, count = need
        have = int((found[fw].get("found") or {}).get(platform, 0))
        if have >= count:
            continue
        names = ", ".join(s.name for s in specs if s.framework == fw)
        what = _PLATFORM_NAMES.get(platform, platform)
        seen = f"no {what} device" if have == 0 else f"only {have} {what} device{'s' if have > 1 else ''}"
        problems.append(f"{fw} finds {seen} here ({found[fw].get('about', '?')}), which {names} would run on")
    return problems


def check_device_present(c: dict[str, Any], specs) -> None:
    """``device=cuda`` (``cuda:N``, JAX's ``gpu`` / ``tpu``, torch's ``mps``) on a machine whose frameworks
    find no such device: one ConfigError naming the device and what the machine has, before any run (each
    evaluate would fail on its own, one error per method).  The frameworks are asked in subprocesses
    (:data:`DEVICE_PROBE`), only for a device that needs a look and only for the frameworks of ``specs``."""
    frameworks = {s.framework for s in specs if _device_need(c["device"], s.framework) is not None}
    if not frameworks:
        return
    problems = device_problems(c["device"], specs, probe_devices(frameworks, c))
    if problems:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpu = str(c["device"]).partition(":")[0] in ("cuda", "gpu")
        env = f" (CUDA_VISIBLE_DEVICES={visible!r})" if gpu and visible is not None else ""
        raise ConfigError(
            f"config key 'device'={c['device']!r}, but {'; '.join(problems)}{env}; use device=cpu or "
            "device=auto, or run on a machine that has the device"
        )


def compare(config: Mapping[str, Any] | None = None, *, overrides: Sequence[str] = (), command: str | None = None,
            strict: bool | None = None, echo=print) -> Comparison:  # fmt: skip
    """Run a comparison (see the module docstring) and write its files; returns a :class:`Comparison`.

    ``config``: keys of ``conf/compare.yaml`` (or a full config from :func:`load_config`); ``overrides``:
    Hydra ``key=value`` strings.  ``strict``: unknown method names are errors (default: when ``methods``
    was given rather than the demo set).
    """
    config = dict(config or {})
    if "profiles" in config and "baselines" in config and not overrides:
        c = check_config(dict(config))
    else:
        c = load_config(overrides, config)
    if strict is None:
        strict = "methods" in config or any(o.split("=", 1)[0].lstrip("-+") == "methods" for o in overrides)
    out = Path(c["out_dir"])
    specs, unavailable = resolve_methods(c["methods"], strict=strict)
    known = sorted(
        {s.name for s in installed_methods()[0]} | {s.name for s in specs} | {u.name for u in unavailable}
    )
    for pattern in c.get("overrides") or {}:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in known):
            # a method's short name ('overrides={tent:{...}}'), which `methods` takes, first
            short = [n for n in known if n.endswith(f".{pattern}")]
            close = short[:1] or difflib.get_close_matches(pattern, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"config key 'overrides.{pattern}' matches no method{hint} (its keys would be ignored; methods: "
                f"{', '.join(known)})"
            )
    # a misspelt baseline of an installed subpackage left every gain of that subpackage blank ("—")
    installed_packages = {s.package for s in installed_methods()[0]} | {s.package for s in specs}
    for package, name in (c.get("baselines") or {}).items():
        if package in installed_packages and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"config key 'baselines.{package}'={name!r} is no installed method{hint} (methods of "
                f"{package}: {', '.join(n for n in known if n.startswith(package + '.'))})"
            )
    check_device_for(c["device"], specs)
    tasks = plan(c, specs)
    # a device this machine lacks: one error now, not one failed run per method
    check_device_present(c, [s for s in specs if any(t.spec is s and t.status == "pending" for t in tasks)])
    # the folders only once the methods are known to be good: a mistyped name leaves no out_dir behind
    for key in ("out_dir", "cache_dir"):
        try:
            Path(c[key]).mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # no permission, a read-only or special file system
            raise ConfigError(
                f"config key {key!r}={c[key]!r}: cannot create this directory ({exc})"
            ) from None
    for names, message in group_unavailable(unavailable):
        echo(f"skipping {', '.join(names)}: {message}")
    if not specs:
        echo("no method to run: install a subpackage (tttlab-compare --list shows what is installed)")
    todo = [t for t in tasks if t.status == "pending"]
    if specs:
        echo(f"{len(specs)} method(s) x {len(c['setting'])} setting(s) x {len(c['seeds'])} seed(s) on "
             f"{_bench_title(c)}: {len(todo)} run(s) to do, {len(tasks) - len(todo)} already done")  # fmt: skip
    remove_stale_temps(out)  # e.g. a results.csv whose write a killed compare left behind
    atomic_write_text(out / "compare.yaml", _yaml(c))
    if todo:
        prepare_benchmark(c, echo)
    run_tasks(tasks, c, echo)
    results = collect(tasks, c)
    table = summarize(results, c)
    files = []
    for frame, name in ((results, "results.csv"), (table, "summary.csv")):
        with atomic_path(out / name) as tmp:  # a unique temp name: two compares on one out_dir do not clash
            frame.to_csv(tmp, index=False)
    files += [out / "results.csv", out / "summary.csv"]
    plots = []
    try:
        plots = write_plots(results, table, c, out)
    except Exception as exc:  # noqa: BLE001 - a plotting problem must not lose the table
        echo(f"could not draw the plots: {type(exc).__name__}: {exc}")
    files += plots
    if command is None:
        command = (
            " ".join(shlex.quote(a) for a in sys.argv) if sys.argv and sys.argv[0] else equivalent_command(c)
        )
    if command != equivalent_command(c):
        command = f"{command}\n# equivalent to:\n{equivalent_command(c)}"
    report = write_report(out, c, tasks, table, unavailable, command, plots, results=results)
    text = format_table(table, c) if len(table) else "no results"
    return Comparison(c, tasks, unavailable, results, table, text, out, report, [report, *files])


def _yaml(c: dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(c))


def list_text() -> str:
    from . import registry

    lines = []
    specs, problems = installed_methods()
    for s in specs:
        about = s.description or s.paper
        about = _clip(about, 96)  # at most 100 characters, cut at a space (it was cut mid-word: "offl...")
        lines.append(f"{s.name:40s} {s.framework:6s} {about}")
    installed = {s.package for s in specs}
    for pkg in registry.KNOWN_PACKAGES:
        if pkg in problems:
            lines.append(f"{pkg + '.*':40s} broken: {problems[pkg]}")
        elif pkg not in installed:
            lines.append(f"{pkg + '.*':40s} not installed: {registry.missing_package_message(pkg)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "tttlab-compare") -> int:
    """CLI: Hydra-style ``key=value`` overrides of ``conf/compare.yaml`` (``--key value`` also works).

    Exit status: 0 when every run succeeded, 1 when some failed (their results are still reported),
    2 on a configuration error or when nothing could run, 141 when standard output was closed under it
    (``| head``), as every tttlab command (:data:`tttlab.core.cli.CLOSED_STDOUT_STATUS`)."""
    try:
        return _main(argv, prog)
    except BrokenPipeError:  # `tttlab-compare --help | head`: the reader left; no traceback
        from .cli import CLOSED_STDOUT_STATUS, _leave_closed_stdout, _stdout_closed

        if not _stdout_closed():  # another pipe's error is a bug: its traceback
            raise
        _leave_closed_stdout()  # Python's exit-time flush too
        return CLOSED_STDOUT_STATUS


def _main(argv: Sequence[str] | None, prog: str) -> int:
    from .errors import TTTLabError

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.split("How it runs")[0].rstrip())
        print(f"\nconfiguration ({prog} key=value ...):\n")
        from importlib import resources

        print(resources.files("tttlab.core.conf").joinpath("compare.yaml").read_text())
        return 0
    if "--list" in argv:
        print(list_text())
        return 0
    command = " ".join([prog, *(shlex.quote(a) for a in argv)])
    try:
        result = compare(overrides=argv, command=command)
    except TTTLabError as exc:  # one line, as every tttlab command (tttlab.core.cli.user_errors)
        print(f"{prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print()
    print(result.text)
    for line in highlights(result.table, result.config):
        print(line)
    for t in result.failed:
        print(f"FAILED {t.label}: {t.error} (log: {t.part / 'stderr.log'})")
    print(f"\nreport: {result.report}")
    if not len(result.table):
        return 2
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
