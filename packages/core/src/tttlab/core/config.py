"""Hydra structured-config schemas shared by every subpackage; unknown keys are errors.

``RunConfig`` (seed, out_dir, device, data, benchmark, logging) is the common part of every
``train.py`` / ``evaluate.py`` config; a subpackage extends it by subclassing (``@dataclass class
TrainConfig(RunConfig): lr: float = 1e-3 ...``).  :func:`validate` merges a dict / YAML / OmegaConf
config into a schema and turns OmegaConf's errors into :class:`~tttlab.core.errors.ConfigError` that
names the key, with a did-you-mean suggestion for a misspelt one, or the value and the expected type.
:func:`to_structured` does the same and returns the dataclass instance.  :func:`register_configs` stores
the schemas in Hydra's ``ConfigStore`` so that a ``conf/*.yaml`` can start with
``defaults: [tttlab_run, _self_]`` and Hydra itself rejects unknown keys.  :func:`apply_overrides` applies
a list of command-line overrides (``key=value``, ``+key=value``, ``++key=value``, ``~key``,
``~key=value``) to a config from Python with Hydra's rules, so that a list means what the same flags mean
on a command line.
"""

from __future__ import annotations

import copy
import difflib
import functools
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from .errors import ConfigError, MissingDependencyError, install_command

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


def _key_paths(tree, prefix: str = ""):
    """Every dotted key of the nested mapping ``tree`` (its nodes' and its values'), depth first; keys inside
    lists are not among them (a dotted override cannot name them)."""
    from collections.abc import Mapping

    for k, v in tree.items():
        path = f"{prefix}{k}"
        yield path
        if isinstance(v, Mapping):
            yield from _key_paths(v, path + ".")


def closest_key(tree, key: str) -> str | None:
    """The dotted key of the nested mapping ``tree`` (plain dicts, or an OmegaConf config) that a user most
    likely meant by ``key``, which ``tree`` lacks, for a "did you mean" hint; ``None`` when none is likely.
    In this order: a close name in the node where ``key`` goes (``train.lrr`` -> ``train.lr``), or a
    misspelt node on the way when the rest of the key is there (``engin.name`` -> ``engine.name``); then,
    anywhere in ``tree``, the one key that ends with the dotted ``key`` (``optimization.lr`` ->
    ``engine.optimization.lr``), the one key whose last component is ``key``'s (a bare leaf name: ``progress`` ->
    ``logging.progress``), then the one whose last component is close to it (``progres`` ->
    ``logging.progress``).  None where two keys fit equally (the user has to choose)."""
    from collections.abc import Mapping

    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(tree):  # unresolved: an interpolation or ??? is a value like any other
            tree = OmegaConf.to_container(tree, resolve=False)
    except ImportError:  # pragma: no cover - OmegaConf comes with hydra-core, a core dependency
        pass
    parts = str(key).split(".")
    node, depth = tree, 0
    while depth < len(parts) - 1 and isinstance(node.get(parts[depth]), Mapping):
        node, depth = node[parts[depth]], depth + 1
    paths = list(_key_paths(tree))
    for name in difflib.get_close_matches(parts[depth], [str(k) for k in node], n=1, cutoff=0.6):
        fixed = ".".join([*parts[:depth], name, *parts[depth + 1 :]])
        if fixed in paths:
            return fixed
    if len(parts) > 1:  # a key given without its first nodes: optimization.lr -> engine.optimization.lr
        ends = [path for path in paths if path.endswith("." + key)]
        if len(ends) == 1:
            return ends[0]
    leaf = parts[-1]
    last = {}  # last component -> the paths that end with it
    for path in paths:
        last.setdefault(path.rpartition(".")[2], []).append(path)
    for names in (
        [leaf] if leaf in last else [],
        difflib.get_close_matches(leaf, list(last), n=2, cutoff=0.8),
    ):
        if names:
            found = last[names[0]]
            close_too = len(names) > 1 and difflib.SequenceMatcher(None, leaf, names[1]).ratio() == (
                difflib.SequenceMatcher(None, leaf, names[0]).ratio()
            )
            return found[0] if len(found) == 1 and not close_too else None
    return None


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
        # the keys of the deepest node of the schema on the key's way: a node the schema lacks has none to
        # list (compare passes 'foo.bar=1' as the one key 'foo.bar': "known keys in 'foo': " listed nothing)
        depth = len(parts) - 1
        while depth and not _known_keys(cls, parts[:depth]):
            depth -= 1
        known = _known_keys(cls, parts[:depth])
        close = closest_key(OmegaConf.to_container(base, resolve=False), ".".join(parts))
        hint = f"; did you mean {close!r}?" if close else ""
        where = f" in {'.'.join(parts[:depth])!r}" if depth else ""
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
    "BenchmarkConfig", "DataConfig", "LoggingConfig", "OVERRIDE_FORMS", "RunConfig", "SCHEMAS",
    "apply_overrides", "closest_key", "defaults", "register_configs", "to_structured", "validate",
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

    path = resources.files(package).joinpath(relative)
    if not path.is_file():
        raise ConfigError(f"no config {relative!r} in {package}")
    cfg = copy.deepcopy(_parsed_yaml(path.read_text(encoding="utf-8")))  # the caller's own copy
    for key in ("defaults", "hydra"):
        cfg.pop(key, None)
    return cfg


@functools.lru_cache(maxsize=512)
def _parsed_yaml(text: str) -> Any:
    """``text`` read as OmegaConf reads YAML, unresolved, once per distinct text (a file read again is parsed
    again only if it changed): the commands compose from the same files over and over (torch_ttt's
    ``eval_config`` reads two per call; parsing took ~15 ms a file).  Never mutate the result: copy it."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(text), resolve=False)


#: The override forms :func:`apply_overrides` takes: Hydra's command-line forms for config values (config
#: groups, their ``@package`` and sweeps are a command line's business, not a config's).
OVERRIDE_FORMS = "key=value, +key=value, ++key=value, ~key, ~key=value"


def _override_parser():
    """Hydra's override parser.  ``hydra-core`` is a dependency of ``tttlab-core`` (every environment of
    the Makefile, the core-only one included, has it); it is imported here, on first use, so that importing
    :mod:`tttlab.core.config` stays cheap.  Where it is missing anyway (a broken install) the error is a
    :class:`~tttlab.core.errors.MissingDependencyError` giving the install command."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
    except ImportError as exc:
        raise MissingDependencyError(
            "override lists are read with Hydra's override parser, but 'hydra' is not installed; "
            f"install it with: {install_command('tttlab-core')}"
        ) from exc
    return OverridesParser.create()


def _quoting_hint(override: str) -> str:
    """For a list value whose items hold ``=`` unquoted (``train_overrides=[data.num_examples=10]``, which
    Hydra's grammar, on the command line too, reads only quoted), the same override with its items quoted."""
    import re

    m = re.fullmatch(r"([^=\[\]]+=)\[(.*)\]", override)
    if m is None or "=" not in m.group(2):
        return ""
    items = [i.strip() for i in m.group(2).split(",")]
    quoted = ",".join(i if i[:1] in "'\"" else f"'{i}'" for i in items)
    return f"; quote list items that hold '=', as on the command line: {m.group(1)}[{quoted}]"


def parse_override(override: str):
    """``override`` read by Hydra's grammar (a ``hydra`` ``Override``); a ``ConfigError`` naming it when it
    is malformed, a group's ``@package`` or a sweep (``a=1,2``: several runs)."""
    if not isinstance(override, str):
        raise ConfigError(f"override {override!r}: expected a string, one of {OVERRIDE_FORMS}")
    parser = _override_parser()
    from hydra.errors import HydraException

    try:
        parsed = parser.parse_override(override.strip())
    except HydraException as exc:  # a grammar error: one line naming the override
        raise ConfigError(
            f"override {override!r}: {str(exc).splitlines()[0]}; expected one of {OVERRIDE_FORMS}"
            + _quoting_hint(override.strip())
        ) from None
    if parsed.package is not None:
        raise ConfigError(
            f"override {override!r}: a config group's package; expected one of {OVERRIDE_FORMS}"
        )
    if parsed.is_sweep_override():
        raise ConfigError(
            f"override {override!r}: a sweep (several values: several runs), which one config cannot hold; "
            "quote a value that holds a comma (key='a,b') or give a list (key=[a,b])"
        )
    return parsed


def apply_overrides(config, overrides, schema=None):
    """``config`` (a mapping or an OmegaConf config, left as it is) with the command-line ``overrides``
    applied in order, as Hydra applies them to the config it composed; returns an OmegaConf ``DictConfig``.

    Each override is read by Hydra's override grammar, so its value is what the same flag gives on a Hydra
    command line (``a=`` the empty string, ``a=01`` the string ``'01'``, ``a=yes`` a string, ``a=[1,2]`` a
    list, ``a={b: 1}`` a mapping merged into what is there, ``a=null`` None, quotes kept off).  The forms
    (:data:`OVERRIDE_FORMS`), with Hydra's rules:

    * ``key=value`` sets ``key`` (a dotted path; a list's item by its index, ``severities.0=3``);
    * ``+key=value`` adds ``key``: refused when it already holds a value (a mapping or list value is merged
      in, as Hydra does), since ``+`` would not change it there;
    * ``++key=value`` adds or sets it;
    * ``~key`` deletes ``key`` and ``~key=value`` deletes it only if its value is ``value``; the key must hold
      a value at that point (not missing, not null).

    ``schema`` (the dataclass the command's config is composed on, e.g. ``RunConfig``): Hydra's composed
    config holds the schema's defaults under the YAML, so a key the YAML does not set but the schema does is
    "already set" for ``+key``, and a field of a nested schema dataclass (``model.width``) cannot be deleted
    (Hydra: "does not support deletion"; a top-level field can, and an entry of a mapping-typed field,
    ``dict[str, Any]``, can).  Refusals are a ``ConfigError``
    naming the override (and, for a malformed one, the accepted forms).

    Two differences from Hydra, on purpose: a plain ``key=value`` for a key the config does not hold is added,
    not refused, as the callers' configs are the shipped YAML files (Hydra's holds the schema's keys, in
    struct mode); the schema's validation (:func:`validate`) then refuses an unknown key with a
    did-you-mean.  And ``~key.<index>`` deletes a list's item, where Hydra 1.3 fails with a ``TypeError``.
    Config groups (``experiment=...``) are the callers' arguments, not overrides here."""
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.create(config if config is not None else {})  # a copy: the caller's config unchanged
    defaults_of = _SchemaDefaults(schema)
    for override in overrides or ():
        parsed = parse_override(override)
        key, value = parsed.key_or_group, parsed.value()
        if parsed.is_delete():
            _delete(cfg, key, value, override, defaults_of)
            continue
        if parsed.is_add() and not isinstance(value, (dict, list)):
            current = _current(cfg, key, defaults_of)
            if current is not None:
                raise ConfigError(
                    f"override {override!r}: cannot add {key!r}, it is already set (to {_plain(current)!r}); "
                    f"drop the + to change it, or write ++ to add or change it"
                )
        try:
            with open_dict(cfg):
                OmegaConf.update(cfg, key, value, merge=True, force_add=True)
        except (OmegaConfBaseException, ValueError, TypeError, IndexError) as exc:  # a list's item by a name
            raise ConfigError(f"override {override!r}: {str(exc).splitlines()[0]}") from None
    return cfg


class _SchemaDefaults:
    """The schema's config (``OmegaConf.structured``), built on first use: the defaults Hydra's composed
    config holds where the YAML is silent, and which keys are fields of a dataclass.  ``deleted``: the keys
    the overrides deleted so far (``~key``), whose schema defaults Hydra's composed config no longer holds."""

    def __init__(self, schema) -> None:
        self.schema, self._cfg = schema, None
        self.deleted: set[str] = set()

    def config(self):
        if self.schema is None:
            return None
        if self._cfg is None:
            from omegaconf import OmegaConf

            self._cfg = OmegaConf.structured(_schema_type(self.schema))
        return self._cfg

    def default(self, key: str):
        from omegaconf import OmegaConf

        cfg = self.config()
        parts = key.split(".")
        if any(".".join(parts[:i]) in self.deleted for i in range(1, len(parts) + 1)):
            return None  # deleted by an earlier override: Hydra's config holds no default there any more
        return None if cfg is None else OmegaConf.select(cfg, key, throw_on_missing=False)

    def field_owner(self, key: str) -> str | None:
        """The name of the nested dataclass whose field ``key`` is (None: not one).  OmegaConf refuses to
        delete from a typed node; Hydra opens the root (``open_dict``) for its deletions, so a top-level
        field can go (the schema's default comes back at validation), one below it cannot."""
        from omegaconf import DictConfig, OmegaConf

        cfg = self.config()
        parent, _, last = key.rpartition(".")
        if cfg is None or not parent:
            return None
        node = OmegaConf.select(cfg, parent, throw_on_missing=False)
        owner = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if isinstance(owner, type) and is_dataclass(owner) and last in node:
            return owner.__name__
        return None


_ABSENT = object()


def _current(cfg, key: str, defaults_of: _SchemaDefaults):
    """The value ``key`` has in Hydra's composed config: ``cfg``'s, or the schema's where ``cfg`` lacks it."""
    from omegaconf import OmegaConf

    current = OmegaConf.select(cfg, key, throw_on_missing=False, default=_ABSENT)
    return defaults_of.default(key) if current is _ABSENT else current


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node


def _delete(cfg, key: str, value, override: str, defaults_of: _SchemaDefaults) -> None:
    """Hydra's ``~key`` / ``~key=value`` (``value`` None: any value) on ``cfg``, in place."""
    from omegaconf import OmegaConf, open_dict

    current = _current(cfg, key, defaults_of)
    if current is None:
        raise ConfigError(f"override {override!r}: cannot delete {key!r}, it is not set in the config")
    plain = _plain(current)
    if value is not None and value != plain:
        raise ConfigError(
            f"override {override!r}: cannot delete {key!r}, its value is {plain!r}, not {value!r}"
        )
    owner = defaults_of.field_owner(key)
    if owner is not None:
        raise ConfigError(
            f"override {override!r}: cannot delete {key!r}, a field of the config's schema ({owner}), as on "
            f"the command line; set it instead ({key}=...)"
        )
    defaults_of.deleted.add(key)  # a later +key may add it again, as on the command line
    parent, _, last = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
    if node is None or (OmegaConf.is_dict(node) and last not in node.keys()):
        # only the schema holds the key (a default the YAML leaves alone): nothing to delete here, and
        # validation puts that default back, as after Hydra's deletion from the config it composed on it
        return
    with open_dict(cfg):
        del node[int(last) if OmegaConf.is_list(node) else last]  # a list's item by its index
