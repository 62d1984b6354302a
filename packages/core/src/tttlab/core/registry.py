"""Methods of every installed subpackage, discovered through the entry-point group ``tttlab.methods``.

The rule for a subpackage (so that listing methods never imports a framework)::

    # packages/<pkg>/pyproject.toml
    [project.entry-points."tttlab.methods"]
    <pkg> = "tttlab.<pkg>.specs:SPECS"

    # packages/<pkg>/src/tttlab/<pkg>/specs.py -- imports nothing but tttlab.core.registry
    from tttlab.core.registry import MethodSpec
    SPECS = [MethodSpec(name="<pkg>.<method>", package="<pkg>", paper="...", framework="torch",
                        evaluate="tttlab.<pkg>.evaluate:run", description="...")]

``SPECS`` may be one :class:`MethodSpec`, a dict of its fields, a list of either, a ``{name: spec}``
dict, or a zero-argument function returning one of those.  A spec holds only strings; ``evaluate`` names
the ``module:function`` that ``tools/compare.py`` runs in a subprocess of its own.

The ``specs`` module is loaded from its file *without running the subpackage's* ``__init__.py`` (Python
would run it for ``import tttlab.<pkg>.specs``), so a subpackage whose ``__init__`` imports torch or jax
still lists without them.  Hence ``specs.py`` must use absolute imports and must not import its own
package.  An entry point that cannot be loaded is skipped with a warning; the other methods still list.
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, UnknownNameError

GROUP = "tttlab.methods"

#: The subpackages the project ships: folder under ``packages/`` (and import name) -> distribution.
KNOWN_PACKAGES: dict[str, str] = {
    "torch_ttt": "tttlab-torch-ttt", "ttt_mae": "tttlab-ttt-mae", "memo_tpt": "tttlab-memo-tpt",
    "pilimit": "tttlab-pilimit", "mttt_jax": "tttlab-mttt-jax",
}  # fmt: skip
FRAMEWORKS: tuple[str, ...] = ("torch", "jax", "numpy")
_FRAMEWORK_ALIASES = {"pytorch": "torch", "flax": "jax", "np": "numpy"}


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """What the registry knows of a method: strings only, so that it can be listed without a framework."""

    name: str  # "<package>.<method>", e.g. "torch_ttt.tent"
    package: str  # folder under packages/ and import name, e.g. "torch_ttt"
    framework: str  # "torch" | "jax" | "numpy"
    evaluate: str  # "module:function" that tools/compare.py runs in a subprocess
    paper: str = ""  # short citation or bibtex key, e.g. "Wang et al. 2021 (TENT)"
    description: str = ""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str):
                raise InvalidInputError(
                    f"MethodSpec.{f.name} must be a string, got {type(value).__name__} {value!r}"
                )
        for key in ("name", "package", "framework", "evaluate"):
            if not getattr(self, key).strip():
                raise InvalidInputError(f"MethodSpec.{key} must not be empty")
        if any(ch.isspace() for ch in self.name):
            raise InvalidInputError(f"MethodSpec.name={self.name!r} must not contain spaces")
        framework = _FRAMEWORK_ALIASES.get(self.framework.lower(), self.framework.lower())
        if framework not in FRAMEWORKS:
            raise InvalidInputError(f"MethodSpec.framework={self.framework!r}; expected one of {FRAMEWORKS}")
        object.__setattr__(self, "framework", framework)
        module, _, attr = self.evaluate.partition(":")
        if (
            not module
            or not attr
            or not all(p.isidentifier() for p in (*module.split("."), *attr.split(".")))
        ):
            raise InvalidInputError(
                f"MethodSpec.evaluate={self.evaluate!r}; expected 'module:function', e.g. "
                "'tttlab.torch_ttt.evaluate:run'"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MethodSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidInputError(f"unknown MethodSpec field(s) {unknown}; fields are {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_evaluate(self) -> Callable:
        """Import and return the ``evaluate`` function (this imports the method's framework)."""
        module, _, attr = self.evaluate.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj


_registered: dict[str, MethodSpec] = {}


def register(spec: MethodSpec | Mapping[str, Any]) -> MethodSpec:
    """Register a spec in this process (tests, notebooks); it shadows an installed spec of the same name."""
    if isinstance(spec, Mapping):
        spec = MethodSpec.from_dict(spec)
    if not isinstance(spec, MethodSpec):
        raise InvalidInputError(f"register() takes a MethodSpec or a dict of its fields, got {spec!r}")
    _registered[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _registered.pop(name, None)


# ----------------------------------------------------------------------------------------------------------
# entry points


def _find_module_file(module: str) -> Path | None:
    """The file of ``module`` found without importing (or running) any of its parent packages."""
    parts = module.split(".")
    try:
        top = importlib.util.find_spec(parts[0])  # a top-level find_spec runs no package code
    except (ImportError, ValueError):
        return None
    if top is None:
        return None
    if len(parts) == 1:
        return Path(top.origin) if top.origin and top.origin.endswith(".py") else None
    locations = list(top.submodule_search_locations or [])
    for i, part in enumerate(parts[1:], start=1):
        last = i == len(parts) - 1
        found = None
        for loc in locations:
            pkg, mod = Path(loc) / part, Path(loc) / f"{part}.py"
            if last and mod.is_file():
                return mod
            if pkg.is_dir():
                found = pkg
                break
        if found is None:
            return None
        if last:
            init = found / "__init__.py"
            return init if init.is_file() else None
        locations = [str(found)]
    return None


def _load_specs_module(ep) -> Any:
    module, _, attr = ep.value.partition(":")
    module, attr = module.strip(), attr.strip()
    if module in sys.modules:
        obj = sys.modules[module]
    else:
        path = _find_module_file(module)
        if path is None:  # e.g. a zip import: fall back to a normal import
            return ep.load()
        name = f"_tttlab_method_specs.{ep.name}"
        spec = importlib.util.spec_from_file_location(name, path)
        obj = importlib.util.module_from_spec(spec)
        sys.modules[name] = obj
        try:
            spec.loader.exec_module(obj)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def _as_specs(obj: Any, where: str) -> list[MethodSpec]:
    if callable(obj) and not isinstance(obj, (MethodSpec, Mapping, type)):
        obj = obj()
    if isinstance(obj, MethodSpec):
        return [obj]
    if isinstance(obj, Mapping):
        if "name" in obj and all(isinstance(v, str) for v in obj.values()):
            return [MethodSpec.from_dict(obj)]
        out = []
        for name, value in obj.items():  # {name: spec or fields}
            spec = value if isinstance(value, MethodSpec) else MethodSpec.from_dict({"name": name, **value})
            if spec.name != name:
                raise InvalidInputError(f"{where}: key {name!r} holds the spec named {spec.name!r}")
            out.append(spec)
        return out
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        return [s for item in obj for s in _as_specs(item, where)]
    raise InvalidInputError(f"{where} yields {obj!r}; expected MethodSpec objects or dicts of their fields")


def _from_entry_points() -> dict[str, MethodSpec]:
    out: dict[str, MethodSpec] = {}
    for ep in metadata.entry_points(group=GROUP):
        where = f"entry point {ep.name} = {ep.value}"
        try:
            specs = _as_specs(_load_specs_module(ep), where)
        except Exception as exc:  # noqa: BLE001 - one broken subpackage must not hide the others
            warnings.warn(f"skipping the methods of {where}: {exc!r}", stacklevel=3)
            continue
        for spec in specs:
            if spec.name in out and out[spec.name] != spec:
                warnings.warn(f"method {spec.name!r} is declared twice; {where} wins", stacklevel=3)
            out[spec.name] = spec
    return out


# ----------------------------------------------------------------------------------------------------------
# queries


def list_methods(package: str | None = None, framework: str | None = None) -> list[MethodSpec]:
    """Installed (entry points) and registered methods, sorted by name; imports no framework."""
    specs = {**_from_entry_points(), **_registered}
    return sorted(
        (
            s
            for s in specs.values()
            if (package is None or s.package == package) and (framework is None or s.framework == framework)
        ),
        key=lambda s: s.name,
    )


def method_names() -> list[str]:
    return [s.name for s in list_methods()]


def get_method(name: str) -> MethodSpec:
    """The spec called ``name`` (or the one spec whose name ends with ``.<name>``).

    Unknown names raise :class:`UnknownNameError` listing the installed methods; a method of a known
    subpackage that is not installed names the install command instead.
    """
    specs = {s.name: s for s in list_methods()}
    if name in specs:
        return specs[name]
    suffix = [s for n, s in specs.items() if isinstance(name, str) and n.endswith("." + name)]
    if len(suffix) == 1:
        return suffix[0]
    known = ", ".join(sorted(specs)) or "none (install a subpackage)"
    package = str(name).split(".", 1)[0]
    if package in KNOWN_PACKAGES and not any(s.package == package for s in specs.values()):
        raise UnknownNameError(
            f"method {name!r}: {missing_package_message(package)}. Installed methods: {known}"
        )
    if len(suffix) > 1:
        raise UnknownNameError(f"method {name!r} is ambiguous: {sorted(s.name for s in suffix)}")
    close = difflib.get_close_matches(str(name), list(specs), n=3)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    raise UnknownNameError(f"unknown method {name!r}{hint}; installed methods: {known}")


def missing_package_message(name: str) -> str:
    """How to install the subpackage of ``name`` (a package folder, a distribution or a method name)."""
    name = str(name)
    by_dist = {d: p for p, d in KNOWN_PACKAGES.items()}
    package = by_dist.get(name, name.split(".", 1)[0])
    if package not in KNOWN_PACKAGES:
        return (
            f"{name!r} belongs to no known subpackage; the project ships {', '.join(KNOWN_PACKAGES)} "
            "(pip install -c constraints.txt -e packages/<name>)"
        )
    return (
        f"the subpackage {KNOWN_PACKAGES[package]} is not installed; install it from the repository root "
        f"with `pip install -c constraints.txt -e packages/{package}`"
    )
