"""Hydra structured-config schemas shared by every subpackage; unknown keys are errors.

``RunConfig`` (seed, out_dir, device, data, benchmark, logging) is the common part of every
``train.py`` / ``evaluate.py`` config; a subpackage extends it by subclassing (``@dataclass class
TrainConfig(RunConfig): lr: float = 1e-3 ...``).  :func:`validate` merges a dict / YAML / OmegaConf
config into a schema and turns OmegaConf's errors into :class:`~tttlab.core.errors.ConfigError` that
names the key, with a did-you-mean suggestion for a misspelt one, or the value and the expected type.
:func:`to_structured` does the same and returns the dataclass instance.  :func:`register_configs` stores
the schemas in Hydra's ``ConfigStore`` so that a ``conf/*.yaml`` can start with
``defaults: [tttlab_run, _self_]`` and Hydra itself rejects unknown keys.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from .errors import ConfigError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass
class BenchmarkConfig:
    """What ``tttlab.core.benchmark.from_config`` builds: dataset x corruptions x severities x setting."""

    name: str = "mnist_c"  # mnist_c | digits_c | cifar10_c | imagenet_c
    root: str | None = None  # dataset folder (on-disk benchmarks)
    corruptions: Any = "common"  # "common" | "heldout" | "all" | one name | a list of names
    severities: list[int] = field(default_factory=lambda: [5])
    setting: str = "reset_each_shift"  # episodic | reset_each_shift | continual | mixed | gradual
    batch_size: int = 64
    num_examples: int | None = None  # per domain; None: all
    seed: int = 0
    cache_dir: str | None = None
    include_clean: bool = False
    shuffle: bool = True  # False: each domain's images in file order (e.g. Tent's CIFAR-10-C protocol)
    dirichlet_delta: float | None = None  # label-correlated order: null i.i.d., 0 sorted by class, > 0 NOTE's
    stream_order: str = "tttlab"  # tttlab | mariodoebler (that benchmark's domain order and reset points)


@dataclass
class DataConfig:
    """A dataset of ``tttlab.core.data`` (training or source data)."""

    name: str = "mnist"
    root: str | None = None
    split: str = "train"
    batch_size: int = 64
    num_examples: int | None = None


@dataclass
class LoggingConfig:
    progress: bool = True  # progress bars (also off when stderr is not a TTY)
    level: str = "INFO"


@dataclass
class RunConfig:
    seed: int = 0
    out_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | gpu | tpu
    data: DataConfig = field(default_factory=DataConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SCHEMAS: dict[str, type] = {
    "run": RunConfig, "benchmark": BenchmarkConfig, "data": DataConfig, "logging": LoggingConfig,
}  # fmt: skip


def _schema_type(schema) -> type:
    if isinstance(schema, type) and is_dataclass(schema):
        return schema
    if is_dataclass(schema):
        return type(schema)
    raise ConfigError(f"schema must be a dataclass (e.g. RunConfig), got {schema!r}")


def _field_type(cls: type, name: str):
    hints = typing.get_type_hints(cls)
    return hints.get(name)


def _known_keys(schema: type, path: list[str]) -> list[str]:
    """Field names of the (nested) dataclass at ``path`` in ``schema``."""
    cls: Any = schema
    for part in path:
        if not (isinstance(cls, type) and is_dataclass(cls)):
            return []
        if part not in {f.name for f in fields(cls)}:
            return []
        t = _field_type(cls, part)
        cls = next((a for a in typing.get_args(t) if is_dataclass(a)), t) if typing.get_args(t) else t
    return [f.name for f in fields(cls)] if isinstance(cls, type) and is_dataclass(cls) else []


def _full_key(exc) -> str:
    full = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    return str(full) if full is not None else ""


def validate(cfg, schema=RunConfig):
    """Merge ``cfg`` (dict, OmegaConf or a YAML string) into ``schema``; return a typed ``DictConfig``.

    Raises :class:`ConfigError` naming an unknown key (with a suggestion) or a value of the wrong type.
    """
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    cls = _schema_type(schema)
    if cfg is None:
        cfg = {}
    if isinstance(cfg, str):
        try:
            cfg = OmegaConf.create(cfg)
        except Exception as exc:  # noqa: BLE001 - YAML errors have many types
            raise ConfigError(f"config is not valid YAML: {exc}") from None
    if is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = OmegaConf.structured(cfg)
    if not isinstance(cfg, (dict, DictConfig)):
        raise ConfigError(f"a config must be a mapping, got {type(cfg).__name__}: {cfg!r}")
    base = OmegaConf.structured(cls)
    try:
        merged = OmegaConf.merge(base, cfg)
    except ConfigKeyError as exc:
        full = _full_key(exc)
        parts = full.split(".") if full else [str(getattr(exc, "key", "?"))]
        known = _known_keys(cls, parts[:-1])
        close = difflib.get_close_matches(parts[-1], known, n=1, cutoff=0.6)
        hint = f"; did you mean {'.'.join([*parts[:-1], close[0]])!r}?" if close else ""
        where = f" in {'.'.join(parts[:-1])!r}" if len(parts) > 1 else ""
        raise ConfigError(
            f"unknown config key {full!r}{hint} (known keys{where}: {', '.join(known)})"
        ) from None
    except ValidationError as exc:
        full = _full_key(exc)
        value = getattr(exc, "value", None)
        msg = (getattr(exc, "msg", None) or str(exc)).strip().splitlines()[0]
        if not full:
            raise ConfigError(f"invalid config: {msg}") from None
        raise ConfigError(f"config key {full!r} has an invalid value {value!r}: {msg}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    _check_values(merged)
    return merged


def _check_values(cfg) -> None:
    """Checks a type cannot express: severities 1..5, positive sizes, log level names."""
    nodes = {"": cfg}
    for key in ("benchmark", "data", "logging"):
        if key in cfg and hasattr(cfg[key], "keys"):
            nodes[f"{key}."] = cfg[key]
    for prefix, node in nodes.items():
        sev = node.get("severities")
        if sev is not None and "severities" in node:
            sev = list(sev) if hasattr(sev, "__iter__") and not isinstance(sev, str) else [sev]
            if not sev or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 5 for s in sev):
                raise ConfigError(f"config key '{prefix}severities'={sev}: expected severities in 1..5")
        for key in ("batch_size", "num_examples"):
            v = node.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v < 1:
                raise ConfigError(f"config key '{prefix}{key}'={v}: expected a positive integer")
        level = node.get("level") if prefix == "logging." else None
        if isinstance(level, str) and level.upper() not in LOG_LEVELS:
            raise ConfigError(
                f"config key 'logging.level'={level!r}: expected one of {', '.join(LOG_LEVELS)}"
            )


def to_structured(cfg, schema=RunConfig):
    """:func:`validate`, then return an instance of the ``schema`` dataclass (nested ones included)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(validate(cfg, schema))


def defaults(schema=RunConfig) -> dict[str, Any]:
    """The schema's defaults as a plain dict."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(_schema_type(schema)))


def register_configs(schemas: dict[str, type] | None = None, prefix: str = "tttlab_") -> list[str]:
    """Store schemas in Hydra's ``ConfigStore``: ``tttlab_run`` and the groups ``benchmark``, ``data``,
    ``logging`` (``tttlab_benchmark`` ...), or ``schemas`` {name: dataclass}.  Returns the stored names."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    stored = []
    for name, node in (schemas or SCHEMAS).items():
        cls = _schema_type(node)
        if name in ("benchmark", "data", "logging"):
            cs.store(group=name, name=f"{prefix}{name}", node=cls)
            stored.append(f"{name}/{prefix}{name}")
        else:
            cs.store(name=f"{prefix}{name}", node=cls)
            stored.append(f"{prefix}{name}")
    return stored


__all__ = [
    "BenchmarkConfig", "DataConfig", "LoggingConfig", "RunConfig", "SCHEMAS", "defaults",
    "register_configs", "to_structured", "validate",
]  # fmt: skip


def to_plain(cfg) -> dict[str, Any]:
    """A plain, resolved ``dict`` of an OmegaConf node, a dataclass instance or any mapping (``None`` -> {})."""
    if cfg is None:
        return {}
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    return dict(cfg)


def config_diff(old: Any, new: Any) -> list[str]:
    """The dotted keys where two nested config mappings differ, as ``"key: old -> new"`` lines (sorted; a
    key missing on one side shows ``<absent>``).  For the messages that refuse to resume a run directory
    written by another config."""

    def flat(d, prefix=""):
        if isinstance(d, dict):
            return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        return {prefix[:-1]: d}

    a, b = flat(old), flat(new)
    missing = "<absent>"
    return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}" for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]  # fmt: skip


def package_yaml(package: str, relative: str) -> dict[str, Any]:
    """A YAML file shipped in ``package`` (e.g. ``"tttlab.torch_ttt.conf"``), unresolved, without its
    ``defaults`` and ``hydra`` keys: for composing a subpackage's config without Hydra (also inside a
    running Hydra app)."""
    from importlib import resources

    from omegaconf import OmegaConf

    path = resources.files(package).joinpath(relative)
    if not path.is_file():
        raise ConfigError(f"no config {relative!r} in {package}")
    cfg = OmegaConf.to_container(OmegaConf.create(path.read_text(encoding="utf-8")), resolve=False)
    for key in ("defaults", "hydra"):
        cfg.pop(key, None)
    return cfg
