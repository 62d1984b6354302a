"""Methods of every installed subpackage, discovered through the entry-point group ``tttlab.methods``.

Rule: a subpackage declares ``[project.entry-points."tttlab.methods"] <pkg> = "tttlab.<pkg>.specs:SPECS"``
where ``specs`` is a tiny module that imports nothing but ``tttlab.core.registry`` and defines
:class:`MethodSpec` objects (a list, or one spec).  Specs hold only strings, so listing methods imports no
framework; ``evaluate`` names the ``module:function`` the comparison tool runs in a subprocess.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata

from .errors import InvalidInputError, UnknownNameError

GROUP = "tttlab.methods"

#: Subpackages the project ships: distribution -> folder, for install hints.
KNOWN_PACKAGES: dict[str, str] = {
    "torch_ttt": "tttlab-torch-ttt", "ttt_mae": "tttlab-ttt-mae", "memo_tpt": "tttlab-memo-tpt",
    "pilimit": "tttlab-pilimit", "mttt_jax": "tttlab-mttt-jax",
}  # fmt: skip


@dataclass(frozen=True)
class MethodSpec:
    name: str  # "<package>.<method>", e.g. "torch_ttt.tent"
    package: str  # folder name under packages/, e.g. "torch_ttt"
    framework: str  # "torch" | "jax"
    evaluate: str  # "module:function" run by the comparison tool
    paper: str = ""
    description: str = ""

    def __post_init__(self):
        for field, value in asdict(self).items():
            if not isinstance(value, str):
                raise InvalidInputError(f"MethodSpec.{field} must be a string, got {type(value).__name__}")
        if ":" not in self.evaluate:
            raise InvalidInputError(f"MethodSpec.evaluate={self.evaluate!r}; expected 'module:function'")


_registered: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Register a spec in this process (tests, notebooks)."""
    if not isinstance(spec, MethodSpec):
        raise InvalidInputError(f"register() takes a MethodSpec, got {type(spec).__name__}")
    _registered[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _registered.pop(name, None)


def _from_entry_points() -> dict[str, MethodSpec]:
    out: dict[str, MethodSpec] = {}
    for ep in metadata.entry_points(group=GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 - one broken subpackage must not hide the others
            warnings.warn(f"skipping methods of entry point {ep.name} = {ep.value}: {exc!r}", stacklevel=2)
            continue
        specs = obj() if callable(obj) and not isinstance(obj, MethodSpec) else obj
        specs = [specs] if isinstance(specs, MethodSpec) else list(specs)
        for spec in specs:
            if not isinstance(spec, MethodSpec):
                raise InvalidInputError(
                    f"entry point {ep.name} = {ep.value} yields {spec!r}, not a MethodSpec"
                )
            out[spec.name] = spec
    return out


def list_methods(package: str | None = None, framework: str | None = None) -> list[MethodSpec]:
    specs = {**_from_entry_points(), **_registered}
    out = [s for s in specs.values() if (package is None or s.package == package)]
    return sorted((s for s in out if framework is None or s.framework == framework), key=lambda s: s.name)


def get_method(name: str) -> MethodSpec:
    specs = {s.name: s for s in list_methods()}
    if name in specs:
        return specs[name]
    package = name.split(".", 1)[0]
    if package in KNOWN_PACKAGES and not any(s.package == package for s in specs.values()):
        raise UnknownNameError(f"method {name!r}: {missing_package_message(package)}")
    close = difflib.get_close_matches(name, list(specs), n=3)
    hint = f"; did you mean {close}?" if close else ""
    raise UnknownNameError(f"unknown method {name!r}{hint} installed methods: {sorted(specs)}")


def missing_package_message(package: str) -> str:
    dist = KNOWN_PACKAGES.get(package, f"tttlab-{package}")
    return (
        f"the subpackage {dist} is not installed; install it with "
        f"`pip install -c constraints.txt -e packages/{package}` (from the repository root)"
    )
