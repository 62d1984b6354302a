"""Hydra structured-config schemas shared by every subpackage; unknown keys are errors.

``RunConfig`` (seed, out_dir, device, data, benchmark, logging) is the common part of every
``train.py``/``evaluate.py`` config.  :func:`validate` merges a dict / OmegaConf config into a schema and
turns OmegaConf's errors into :class:`~tttlab.core.errors.ConfigError` naming the key (with a
did-you-mean suggestion) or the bad value.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from .errors import ConfigError


@dataclass
class BenchmarkConfig:
    name: str = "mnist_c"
    root: str | None = None
    corruptions: Any = "common"  # a subset name ("common", "heldout", "all") or a list of names
    severities: list = field(default_factory=lambda: [5])
    setting: str = "reset_each_shift"
    batch_size: int = 64
    num_examples: int | None = None
    seed: int = 0
    cache_dir: str | None = None
    include_clean: bool = False


@dataclass
class DataConfig:
    name: str = "mnist"
    root: str | None = None
    split: str = "train"
    batch_size: int = 64
    num_examples: int | None = None


@dataclass
class LoggingConfig:
    progress: bool = True
    level: str = "INFO"


@dataclass
class RunConfig:
    seed: int = 0
    out_dir: str = "runs/default"
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _known_keys(schema, path: list[str]):
    obj = schema
    for part in path:
        if not is_dataclass(obj):
            return []
        types = {f.name: f for f in fields(obj)}
        if part not in types:
            return []
        default = (
            types[part].default_factory() if callable(types[part].default_factory) else types[part].default
        )
        obj = default
    return [f.name for f in fields(obj)] if is_dataclass(obj) else []


def validate(cfg, schema=RunConfig):
    """Merge ``cfg`` (dict or OmegaConf) into the structured ``schema``; return a typed OmegaConf."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    base = OmegaConf.structured(schema)
    try:
        return OmegaConf.merge(base, cfg)
    except ConfigKeyError as exc:
        key = getattr(exc, "key", None) or str(exc)
        full = getattr(exc, "full_key", None) or str(key)
        parts = str(full).split(".")
        known = _known_keys(schema if isinstance(schema, type) else type(schema), parts[:-1])
        close = difflib.get_close_matches(parts[-1], known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown config key {full!r}{hint} expected one of {known}") from None
    except ValidationError as exc:
        raise ConfigError(f"invalid config value: {exc.msg if hasattr(exc, 'msg') else exc}") from None


def to_structured(cfg, schema=RunConfig):
    return validate(cfg, schema)


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (``defaults: [base_run]`` etc.)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_run", node=RunConfig)
    cs.store(group="benchmark", name="base_benchmark", node=BenchmarkConfig)
