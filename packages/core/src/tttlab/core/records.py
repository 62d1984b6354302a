"""Run directories and results records: one schema for every method and framework.

A run directory holds ``config.yaml``, ``records.jsonl`` (append-only, one JSON object per line, flushed
and fsync'ed per record so a killed run loses at most the line being written), ``stats.json`` (training
curves, written atomically), ``checkpoints/`` and ``env.json``.  :func:`load_records` reads any number of
run directories or JSONL files into one ``pandas.DataFrame``; a torn last line (a writer killed
mid-record) is skipped with a warning, a malformed line anywhere else is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._io import atomic_write_json, atomic_write_text
from .errors import InvalidInputError

#: field -> allowed Python types (None always allowed except for the required fields)
SCHEMA: dict[str, tuple[type, ...]] = {
    "method": (str,), "package": (str,), "framework": (str,), "model": (str,), "dataset": (str,),
    "corruption": (str,), "severity": (int,), "setting": (str,), "step": (int,), "metric": (str,),
    "value": (int, float), "n": (int,), "seed": (int,), "wall_time_s": (int, float),
    "git_sha": (str,), "config_hash": (str,), "extra": (dict,),
}  # fmt: skip
REQUIRED = ("method", "metric", "value")
COLUMNS = tuple(SCHEMA)


def validate_record(record: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(record) - set(SCHEMA))
    if unknown:
        raise InvalidInputError(f"unknown record fields {unknown}; the schema has {list(SCHEMA)}")
    for key in REQUIRED:
        if record.get(key) is None:
            raise InvalidInputError(f"record lacks required field {key!r}: {dict(record)}")
    out = {}
    for key in COLUMNS:
        value = record.get(key)
        if value is not None:
            if hasattr(value, "item") and not isinstance(value, dict):  # numpy / torch / jax scalars
                value = value.item()
            types = SCHEMA[key]
            if isinstance(value, bool) or not isinstance(value, types):
                if float in types and isinstance(value, int):
                    pass
                else:
                    raise InvalidInputError(
                        f"record field {key!r}={value!r} has type {type(value).__name__}; expected "
                        f"{' or '.join(t.__name__ for t in types)}"
                    )
        out[key] = value
    return out


def git_sha(path=None) -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def config_hash(cfg: Any) -> str:
    """Stable 12-hex-digit hash of a (nested) mapping or OmegaConf config."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def environment() -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for dist in ("tttlab-core", "numpy", "torch", "jax", "flax", "optax", "timm", "open-clip-torch"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(), "packages": versions, "git_sha": git_sha(), "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip


class RecordWriter:
    """Append validated records to a JSONL file; each line is flushed and fsync'ed."""

    def __init__(self, path, defaults: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.defaults = dict(defaults or {})
        unknown = set(self.defaults) - set(SCHEMA)
        if unknown:
            raise InvalidInputError(f"unknown record fields {sorted(unknown)} in defaults")
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, **fields) -> dict[str, Any]:
        record = validate_record({**self.defaults, **fields})
        self._file.write(json.dumps(record, sort_keys=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        return record

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RunDir:
    """A run directory: ``config.yaml``, ``records.jsonl``, ``stats.json``, ``checkpoints/``, ``env.json``."""

    def __init__(self, path, config: Any = None, *, rank: int = 0):
        self.path = Path(path)
        self.rank = rank
        self.checkpoints = self.path / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        if rank == 0 and config is not None:
            self.write_config(config)
        if rank == 0 and not (self.path / "env.json").exists():
            atomic_write_json(self.path / "env.json", environment())

    @property
    def records_path(self) -> Path:
        return self.path / ("records.jsonl" if self.rank == 0 else f"records-rank{self.rank}.jsonl")

    def write_config(self, config: Any) -> None:
        try:
            from omegaconf import OmegaConf

            text = OmegaConf.to_yaml(config if OmegaConf.is_config(config) else OmegaConf.create(config))
        except ImportError:  # pragma: no cover
            text = json.dumps(config, indent=2, default=str)
        atomic_write_text(self.path / "config.yaml", text)

    def writer(self, **defaults) -> RecordWriter:
        return RecordWriter(self.records_path, defaults)

    def write_stats(self, stats: Mapping[str, Any]) -> None:
        atomic_write_json(self.path / "stats.json", stats)

    def read_stats(self) -> dict[str, Any]:
        p = self.path / "stats.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def records(self):
        return load_records(self.path)


def _jsonl_files(source) -> list[Path]:
    p = Path(source)
    if p.is_dir():
        return sorted(p.glob("records*.jsonl"))
    if p.exists():
        return [p]
    raise InvalidInputError(f"{p} is neither a run directory nor a records file")


def read_jsonl(path) -> list[dict[str, Any]]:
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    out = []
    complete = lines[:-1]  # text after the last newline is a torn (unterminated) record, if any
    if lines[-1].strip():
        warnings.warn(f"{path}: skipping a torn last record (a writer stopped mid-line)", stacklevel=2)
    for i, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{path}:{i}: malformed record: {exc}") from exc
    return out


def load_records(*sources, **filters):
    """Records of run directories / JSONL files as a DataFrame with the schema's columns.

    ``filters`` keep rows whose column equals the value (or is in the value if a list/tuple/set).
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for source in sources:
        if isinstance(source, (list, tuple)):
            rows += [r for s in source for f in _jsonl_files(s) for r in read_jsonl(f)]
        else:
            rows += [r for f in _jsonl_files(source) for r in read_jsonl(f)]
    df = pd.DataFrame(rows, columns=list(COLUMNS)) if rows else pd.DataFrame(columns=list(COLUMNS))
    for key, value in filters.items():
        if key not in df.columns:
            raise InvalidInputError(f"cannot filter on {key!r}; columns are {list(df.columns)}")
        df = df[df[key].isin(value)] if isinstance(value, (list, tuple, set)) else df[df[key] == value]
    return df.reset_index(drop=True)


def merge_records(run_dir, world_size: int | None = None, remove: bool = True) -> Path:
    """Append every ``records-rank<r>.jsonl`` of a run directory to ``records.jsonl`` (rank order)."""
    run_dir = Path(run_dir)
    parts = sorted(run_dir.glob("records-rank*.jsonl"), key=lambda p: int(p.stem.split("rank")[1]))
    if world_size is not None and len(parts) != world_size - 1:
        raise InvalidInputError(
            f"{run_dir}: expected {world_size - 1} rank files, found {[p.name for p in parts]}"
        )
    target = run_dir / "records.jsonl"
    with open(target, "a", encoding="utf-8") as out:
        for part in parts:
            for record in read_jsonl(part):
                out.write(json.dumps(record) + "\n")
        out.flush()
        os.fsync(out.fileno())
    if remove:
        for part in parts:
            part.unlink()
    return target


def done_keys(df, keys: Iterable[str]) -> set[tuple]:
    """The distinct ``keys`` tuples present in ``df`` (what a resumed run need not recompute)."""
    keys = list(keys)
    if df is None or len(df) == 0:
        return set()
    return {tuple(r) for r in df[keys].itertuples(index=False, name=None)}
