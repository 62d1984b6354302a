"""tttlab-compare's answers to command lines that Hydra accepts but that do not mean what the user wrote:
a method's override with dots in its name, a deleted key, a profile row that is no mapping, a comma list,
a subpackage or a space-separated list as a method, a missing interpreter.  Each is one ConfigError /
UnknownNameError line naming the key and what is expected, before anything runs (no subprocess here)."""

from __future__ import annotations

import sys

import pytest

from tttlab.core import compare as cmp
from tttlab.core import registry
from tttlab.core.errors import ConfigError, UnknownNameError


@pytest.fixture
def fake_methods():
    """Two methods of a package ``fakemsg`` and one of a long-named package (no subprocess runs them)."""
    names = ["fakemsg.alpha", "fakemsg.beta", "a_long_package_name.tiny"]
    for name in names:
        registry.register(dict(name=name, package=name.split(".")[0], framework="numpy",
                               evaluate="compare_fake_methods:run"))  # fmt: skip
    yield names
    for name in names:
        registry.unregister(name)


def _refused(argv) -> str:
    with pytest.raises(ConfigError) as info:
        cmp.load_config(argv)
    return str(info.value)


def test_a_method_override_given_with_dots_says_how_per_method_overrides_are_given(capsys, tmp_path):
    """``overrides.torch_ttt.tent=3`` was taken as ``{torch_ttt: {tent: 3}}`` and then refused with "did you
    mean 'torch_ttt.bn'?" (misleading: the user named tent).  The line gives the mapping form the README
    documents, with the method and the keys the user wrote."""
    assert cmp.main(["overrides.torch_ttt.tent=3", f"out_dir={tmp_path / 'out'}"]) == 2
    assert capsys.readouterr().err == (
        "tttlab-compare: error: ConfigError: overrides.torch_ttt.tent=3: Hydra splits a key at its dots, so no "
        "method is named here; give a method's evaluate keys as one mapping under its name or glob, quoted: "
        "'overrides={torch_ttt.tent:{KEY:3}}' with KEY one of its evaluate keys, nested keys as mappings (e.g. "
        "'overrides={torch_ttt.tent:{engine:{optimization:{num_steps:3}}}}')\n"
    )
    assert not (tmp_path / "out").exists()
    line = _refused(["overrides.torch_ttt.tent.engine.optimization.num_steps=2"])
    assert line.endswith(": 'overrides={torch_ttt.tent:{engine:{optimization:{num_steps:2}}}}'")
    # the form the line gives is the one that works: the keys reach that method only
    c = cmp.load_config(["overrides={torch_ttt.tent:{engine:{optimization:{num_steps:2}}}}"])
    assert cmp._method_overrides(c, "torch_ttt.tent") == {"engine": {"optimization": {"num_steps": 2}}}
    assert cmp._method_overrides(c, "torch_ttt.bn") == {}
    # a profile's overrides, and a glob (Hydra's lexer refused the '*' with no remedy)
    line = _refused(["profiles.quick.overrides.torch_ttt.memo.benchmark.num_examples=8"])
    assert line.endswith(": 'profiles.quick.overrides={torch_ttt.memo:{benchmark:{num_examples:8}}}'")
    assert _refused(["overrides.*.progress=false"]).endswith(": 'overrides={*:{progress:false}}'")
    assert cmp.load_config(["overrides={*:{progress:false}}"])["overrides"] == {"*": {"progress": False}}


def test_a_method_override_given_whole_after_a_dotted_name_is_put_under_the_method_as_it_is():
    """``overrides.torch_ttt.tent={engine:{...}}``: the value is already the method's keys; the line said to give
    ``{torch_ttt.tent:{KEY:{engine:{...}}}}``, which compare takes with a key 'KEY' that the method refuses."""
    given = "{engine:{optimization:{num_steps:3}}}"
    line = _refused([f"overrides.torch_ttt.tent={given}"])
    assert line.endswith(f": 'overrides={{torch_ttt.tent:{given}}}'"), line
    remedy = line.rsplit(": ", 1)[1].strip("'")
    c = cmp.load_config([remedy])
    assert cmp._method_overrides(c, "torch_ttt.tent") == {"engine": {"optimization": {"num_steps": 3}}}
    line = _refused(["profiles.quick.overrides.torch_ttt.memo={benchmark:{num_examples:8}}"])
    assert line.endswith(": 'profiles.quick.overrides={torch_ttt.memo:{benchmark:{num_examples:8}}}'"), line


def test_a_method_override_names_the_method_a_short_name_stands_for(fake_methods):
    """``overrides.alpha.<key>``: the method 'alpha' stands for (as ``methods=[alpha]`` takes it)."""
    line = _refused(["+overrides.alpha.fake.sleep=1"])
    assert line.endswith(": 'overrides={fakemsg.alpha:{fake:{sleep:1}}}'"), line
    # the mapping form with a short name: the did-you-mean is that method (difflib found none for it)
    c = {"methods": ["a_long_package_name.tiny"], "overrides": {"tiny": {"x": 1}}, "out_dir": "unused"}
    with pytest.raises(
        ConfigError, match=r"'overrides.tiny' matches no method; did you mean 'a_long_package_name.tiny'\?"
    ):
        cmp.compare(c, echo=lambda *a: None)


@pytest.mark.parametrize(
    "override, line",
    [
        # the schema's default came back silently: seeds [0], profile full
        ("~seeds", "~seeds: config key 'seeds' cannot be deleted, every comparison needs it (a list of integers "
         ">= 0, e.g. 'seeds=[0,1,2]'); give seeds=VALUE, or leave it out for conf/compare.yaml's value"),
        ("~profile", "~profile: config key 'profile' cannot be deleted, every comparison needs it (smoke, quick or "
         "full); give profile=VALUE, or leave it out for conf/compare.yaml's value"),
        # was "config key 'profile'='full': expected one of []"
        ("~profiles", "~profiles: config key 'profiles' cannot be deleted, every comparison needs it (the profile "
         "table of conf/compare.yaml); give profiles=VALUE, or leave it out for conf/compare.yaml's value"),
        # was Hydra's "Could not delete from config. 'root' does not exist."
        ("~threads", "~threads: compare's keys cannot be deleted; give threads=null for its default (or leave it out)"),
        # taken as a profile row; a TypeError traceback once that profile was chosen
        ("profiles.quick=3", "config key 'profiles.quick'=3: expected a row of the profile table, a mapping with "
         "the keys corruptions, num_examples, batch_size, timeout_s, overrides (e.g. profiles.quick.num_examples=100)"),
        # a misspelt key of a row was ignored
        ("profiles.full.num_exampels=5", "unknown config key 'profiles.full.num_exampels' (did you mean "
         "'profiles.full.num_examples'?) (known keys in 'profiles.full': corruptions, num_examples, batch_size, "
         "timeout_s, overrides)"),
        # an AttributeError traceback when the comparison planned its tasks
        ("profiles.full.overrides=3", "config key 'profiles.full.overrides'=3: expected a mapping of method globs "
         "to evaluate keys"),
        ("profile=quik", "config key 'profile'='quik' (did you mean 'quick'?): expected one of ['full', 'quick', "
         "'smoke']"),
        ("profile=QUICK", "config key 'profile'='QUICK' (did you mean 'quick'?): expected one of ['full', "
         "'quick', 'smoke']"),
        # Hydra: "Ambiguous value for argument 'methods=a,b'" (a sweep)
        ("methods=torch_ttt.tent,torch_ttt.bn", "methods=torch_ttt.tent,torch_ttt.bn: a comma list without "
         "brackets is a Hydra sweep, which compare does not run; give a list in brackets, quoted: "
         "'methods=[torch_ttt.tent,torch_ttt.bn]'"),
        ("profile=quick,full", "profile=quick,full: a comma list without brackets is a Hydra sweep, which "
         "compare does not run; profile takes one value"),
        # a profile row's list key: it said "profiles.quick.corruptions takes one value"
        ("profiles.quick.corruptions=fog,snow", "profiles.quick.corruptions=fog,snow: a comma list without brackets "
         "is a Hydra sweep, which compare does not run; give a list in brackets, quoted: "
         "'profiles.quick.corruptions=[fog,snow]'"),
        # ran no task at all ("no results")
        ("setting=null", "config key 'setting' is empty: name at least one of episodic, reset_each_shift, "
         "continual, mixed, gradual"),
        # was "expected a value or a list of values" (it is a value)
        ("seeds=1.5", "config key 'seeds'=1.5: expected a list of integers >= 0"),
        # refused only when the method ran ('must be a mapping'), taken when it was not chosen
        ("overrides={torch_ttt.tent:3}", "config key 'overrides.torch_ttt.tent'=3: expected a mapping of its "
         "evaluate keys, e.g. 'overrides={torch_ttt.tent:{KEY:3}}'"),
        # was "'list': an override is key=value (or ~key, to delete one)"
        ("list", "'list': an option has two dashes: give --list"),
        ("help", "'help': an option has two dashes: give --help"),
        # every method failed in turn with FileNotFoundError
        ("python=/nonexistent/python3", "config key 'python'='/nonexistent/python3': no such executable; "
         "expected a Python interpreter that has the methods' subpackages (null: this one)"),
    ],
)  # fmt: skip
def test_an_override_with_a_wrong_or_meaningless_result_is_refused(override, line):
    assert _refused([override]) == line


def test_the_overrides_that_mean_something_still_work():
    """Deleting ``overrides``/``baselines`` means none; a repeated setting runs once (it ran twice, into one
    folder); a deleted profile that is not chosen is gone; the interpreter by name."""
    c = cmp.load_config(["~overrides", "~baselines", "setting=[continual,episodic,continual]", "~profiles.quick",
                         f"python={sys.executable}"])  # fmt: skip
    assert c["overrides"] == {} and c["baselines"] == {}
    assert c["setting"] == ["continual", "episodic"]
    assert sorted(c["profiles"]) == ["full", "smoke"]
    # a comma escaped for Hydra is part of one value (it was refused as a sweep: "out_dir takes one value")
    assert cmp.load_config(["out_dir=runs/a\\,b"])["out_dir"] == "runs/a,b"


def test_a_subpackage_or_a_space_separated_list_as_a_method_says_what_to_write(fake_methods):
    """``methods=fakemsg`` (a subpackage) said "did you mean 'fakemsg.alpha'"; ``'methods=[a b]'`` and a quoted
    list (one name holding a list) did-you-meant its first name."""
    with pytest.raises(UnknownNameError) as info:
        cmp.resolve_methods(["fakemsg"], strict=True)
    assert str(info.value) == (
        "'fakemsg' is a subpackage, not a method: fakemsg.* runs all its methods (fakemsg.alpha, fakemsg.beta), "
        "or name one"
    )
    with pytest.raises(UnknownNameError) as info:
        cmp.resolve_methods(cmp.load_config(["methods=[fakemsg.alpha fakemsg.beta]"])["methods"], strict=True)
    assert str(info.value) == (
        "unknown method 'fakemsg.alpha fakemsg.beta': one name holding a list; give the methods as a list, names "
        "separated by commas, the whole argument quoted for the shell: 'methods=[fakemsg.alpha,fakemsg.beta]'"
    )
    # Hydra's quotes make one string of a list ('methods="[a,b]"', 'methods="a,b"')
    for given in ('methods="[fakemsg.alpha,fakemsg.beta]"', 'methods="fakemsg.alpha,fakemsg.beta"'):
        with pytest.raises(UnknownNameError, match=r": 'methods=\[fakemsg.alpha,fakemsg.beta\]'$"):
            cmp.resolve_methods(cmp.load_config([given])["methods"], strict=True)
    assert [s.name for s in cmp.resolve_methods(["fakemsg.*"], strict=True)[0]] == [
        "fakemsg.alpha",
        "fakemsg.beta",
    ]


def test_a_home_folder_is_the_users_home(monkeypatch, tmp_path):
    """``out_dir=~/runs`` unexpanded (zsh, sh) was Hydra's "LexerNoViableAltException: out_dir=~/runs"; quoted
    for Hydra (``out_dir="~/runs"``) compare made a folder named '~' in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _refused(["out_dir=~/runs"]) == (
        "'out_dir=~/runs': the shell left '~' unexpanded (zsh and sh expand it only at the start of a word); give "
        "out_dir=$HOME/runs or the full path"
    )
    c = cmp.load_config(['out_dir="~/runs"', 'cache_dir="~/cache"'])
    assert (c["out_dir"], c["cache_dir"]) == (str(tmp_path / "runs"), str(tmp_path / "cache"))
    assert cmp.load_config(['out_dir="~/runs"'])["cache_dir"] == str(tmp_path / "runs" / "cache")
