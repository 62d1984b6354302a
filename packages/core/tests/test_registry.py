"""The registry lists string-only specs without importing frameworks; unknown names list the known ones."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tttlab.core import registry
from tttlab.core.errors import InvalidInputError, UnknownNameError


@pytest.fixture
def demo_spec():
    spec = registry.register(
        registry.MethodSpec(
            name="demo.noop",
            package="demo",
            paper="nobody 2024",
            framework="PyTorch",
            evaluate="demo.evaluate:run",
            description="does nothing",
        )  # fmt: skip
    )
    yield spec
    registry.unregister("demo.noop")


def test_register_list_get(demo_spec):
    assert demo_spec.framework == "torch"  # alias normalised
    assert registry.get_method("demo.noop") is demo_spec
    assert registry.get_method("noop") is demo_spec  # unique suffix
    assert demo_spec in registry.list_methods(package="demo")
    assert demo_spec in registry.list_methods(framework="torch")
    assert demo_spec not in registry.list_methods(framework="jax")
    assert registry.MethodSpec.from_dict(demo_spec.to_dict()) == demo_spec
    with pytest.raises(
        UnknownNameError, match=r"\(did you mean 'demo.noop'\?\); installed methods: .*demo.noop"
    ):
        registry.get_method("demo.nop")


def test_spec_validation():
    with pytest.raises(InvalidInputError, match="module:function"):
        registry.MethodSpec(name="x", package="x", framework="torch", evaluate="nocolon")
    with pytest.raises(InvalidInputError, match="framework"):
        registry.MethodSpec(name="x", package="x", framework="tensorflow", evaluate="a.b:c")
    with pytest.raises(InvalidInputError, match="paper must be a string"):
        registry.MethodSpec(name="x", package="x", framework="jax", evaluate="a.b:c", paper=3)
    with pytest.raises(InvalidInputError, match="unknown MethodSpec field"):
        registry.register({"name": "x", "package": "x", "framework": "jax", "evaluate": "a:b", "lr": "1"})


def test_missing_package_message():
    msg = registry.missing_package_message("pilimit")
    assert "tttlab-pilimit" in msg and "pip install -c constraints.txt -e packages/pilimit" in msg
    assert registry.missing_package_message("tttlab-mttt-jax").endswith("-e packages/mttt_jax`")
    if not any(s.package == "pilimit" for s in registry.list_methods()):
        with pytest.raises(UnknownNameError, match="-e packages/pilimit"):
            registry.get_method("pilimit.inf_mlp")


FAKE_INIT = "import sys\nsys.modules['FAKE_FRAMEWORK'] = sys  # stands for `import torch`\n"
FAKE_SPECS = textwrap.dedent("""
    from tttlab.core.registry import MethodSpec
    SPECS = [MethodSpec(name="fakepkg.a", package="fakepkg", framework="torch", evaluate="fakepkg.ev:run"),
             {"name": "fakepkg.b", "package": "fakepkg", "framework": "jax", "evaluate": "fakepkg.ev:run"}]
""")
LIST = textwrap.dedent("""
    import sys
    from tttlab.core import registry
    names = [s.name for s in registry.list_methods()]
    print(",".join(names))
    print(",".join(m for m in ("torch", "jax", "flax", "FAKE_FRAMEWORK") if m in sys.modules))
""")


def test_listing_in_subprocess_imports_no_framework(tmp_path):
    # an installed subpackage whose __init__ imports its "framework": listing must not run it
    site = tmp_path / "site"
    (site / "fakepkg").mkdir(parents=True)
    (site / "fakepkg" / "__init__.py").write_text(FAKE_INIT)
    (site / "fakepkg" / "specs.py").write_text(FAKE_SPECS)
    dist = site / "fakepkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tttlab.methods]\nfakepkg = fakepkg.specs:SPECS\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", LIST], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    names, imported = res.stdout.split("\n")[:2]
    assert {"fakepkg.a", "fakepkg.b"} <= set(names.split(","))
    assert imported == ""  # neither torch nor jax, nor the fake package's __init__


def test_broken_entry_point_is_skipped_with_a_warning(tmp_path):
    site = tmp_path / "site"
    dist = site / "brokenpkg-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenpkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tttlab.methods]\nbrokenpkg = brokenpkg.specs:SPECS\n")
    code = (
        "import warnings\nfrom tttlab.core import registry\nwith warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always'); registry.list_methods()\nprint([str(x.message) for x in w])"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "skipping the methods of entry point brokenpkg" in res.stdout


def test_missing_dependency_names_the_checkout_install_command():
    """The subpackages are not on a package index: the message gives the editable install from the folder."""
    from tttlab.core.errors import MissingDependencyError, require

    with pytest.raises(MissingDependencyError) as err:
        require("tttlab_no_such_module", "photos", "tttlab-memo-tpt")
    msg = str(err.value)
    assert "'tttlab_no_such_module'" in msg
    assert "pip install -c constraints.txt -e 'packages/memo_tpt[photos]'" in msg


def test_require_names_only_the_module_it_was_asked_for_as_missing(tmp_path, monkeypatch):
    """``require(module, reason=...)``: the message starts with the reason; a module that is installed but lacks
    one of its own dependencies is that dependency's ``ModuleNotFoundError`` (installing ``module`` again would
    not help), never a MissingDependencyError about ``module``."""
    from tttlab.core.errors import MissingDependencyError, require

    with pytest.raises(MissingDependencyError) as err:
        require(
            "tttlab_no_such_module.sub",
            reason="the thing needs tttlab_no_such_module, which is not installed",
        )
    assert str(err.value) == (
        "the thing needs tttlab_no_such_module, which is not installed; install it with: pip install -c "
        "constraints.txt -e packages/core  (from the tttlab repository root)"
    )
    (tmp_path / "tttlab_half_installed.py").write_text("import tttlab_its_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as err:
        require("tttlab_half_installed", reason="never said")
    assert not isinstance(err.value, MissingDependencyError)
    assert err.value.name == "tttlab_its_missing_dependency"


def test_lazy_exports_load_a_name_on_first_use_and_list_each_once(tmp_path, monkeypatch):
    """``lazy.lazy_exports``: the package's names import their module (relative to the package, or absolute) on
    first use (not before), are kept in the package's globals, ``dir()`` lists each once, loaded or not, and an unknown name is an AttributeError."""
    import importlib

    pkg = tmp_path / "tttlab_lazy_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from tttlab.core.lazy import lazy_exports\n"
        "__getattr__, __dir__ = lazy_exports(globals(), {'thing': '.sub', 'other': '.sub', 'dumps': 'json'})\n"
    )
    (pkg / "sub.py").write_text("thing = object()\nother = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("tttlab_lazy_pkg", "tttlab_lazy_pkg.sub"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    package = importlib.import_module("tttlab_lazy_pkg")
    assert "tttlab_lazy_pkg.sub" not in sys.modules
    assert dir(package).count("thing") == 1
    assert package.thing is sys.modules["tttlab_lazy_pkg.sub"].thing
    assert "thing" in vars(package) and dir(package).count("thing") == 1 and "other" in dir(package)
    import json

    assert package.dumps is json.dumps  # an absolute module name: a re-export
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        _ = package.nothing
