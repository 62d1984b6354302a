"""``compile`` accepts a torch.compile mode: from the composed Hydra configs to ``torch.compile`` (a recorder).

``compile: true`` keeps its meaning (torch's default mode, no ``mode`` argument) and, like ``false``, the
config hashes it had before modes were accepted (the hashes below were computed on main before the change).
"""

from __future__ import annotations

import pytest

from tttlab.core.errors import ConfigError
from tttlab.core.records import config_hash, read_jsonl
from tttlab.core.testing import CompileRecorder, record_torch_compile
from tttlab.torch_ttt import evaluate as E
from tttlab.torch_ttt import train as T

#: ``config_hash`` of the composed configs before ``compile`` accepted modes: evaluate.yaml (engine=tent) and
#: the smoke training (train.engine=source, and its training part: the key of cached models).  Another
#: change to these configs' defaults changes them too: recompute them then, on the commit before it.
MAIN_HASHES = {
    ("eval", False): "8804fe7ac972",
    ("eval", True): "62da8855d73b",
    ("train", False): "860155a97662",
    ("train", True): "ceb50f282377",
}


def compose(config_name: str, overrides: list[str]) -> dict:
    """The config exactly as ``@hydra.main`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    T.register_configs()
    E.register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("tttlab.torch_ttt.conf", version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    GlobalHydra.instance().clear()
    return T.to_dict(cfg)


@pytest.fixture
def compile_modes(monkeypatch) -> CompileRecorder:
    """``torch.compile`` replaced by core's recorder: the modes it was given, and how often the "compiled"
    functions ran (``calls``)."""
    return record_torch_compile(monkeypatch)


@pytest.mark.parametrize("value, mode", [("true", None), ("reduce-overhead", "reduce-overhead")])
def test_compile_value_reaches_torch_compile_as_its_mode(tmp_path, compile_modes, value, mode):
    """train.py (smoke, train.engine=source) and evaluate.py (engine=source on that run) composed by Hydra
    with ``compile=<value>``: every torch.compile call gets ``mode=<value>`` (none for ``true``), the
    compiled forwards run, and the records say the value."""
    train = compose("config", ["+experiment=smoke", f"out_dir={tmp_path / 'train'}", "train.engine=source",
                               "eval.enabled=false", "data.num_examples=64", f"compile={value}"])  # fmt: skip
    run_dir = T.run(train)
    assert compile_modes == [mode] and compile_modes.calls == 2, "one compiled forward per training step"
    evaluate = compose("evaluate", ["engine=source", f"train_run={run_dir}", f"out_dir={tmp_path / 'eval'}",
                                    "benchmark.corruptions=[fog]", "benchmark.num_examples=8",
                                    "logging.progress=false", f"compile={value}"])  # fmt: skip
    rows = read_jsonl(E.run(evaluate))
    assert compile_modes == [mode, mode] and compile_modes.calls > 2
    assert {r["extra"]["compile"] for r in rows} == {True if value == "true" else value}


def test_a_bad_compile_value_is_a_config_error_before_anything_is_written(tmp_path, compile_modes):
    train = compose("config", ["+experiment=smoke", f"out_dir={tmp_path / 'train'}", "compile=fast"])
    evaluate = compose("evaluate", [f"out_dir={tmp_path / 'eval'}", f"cache_dir={tmp_path / 'cache'}",
                                    "compile=fast"])  # fmt: skip
    allowed = r"expected true or false, or a torch.compile mode: one of \['default', 'reduce-overhead'"
    with pytest.raises(ConfigError, match=rf"^compile='fast'; {allowed}"):
        T.run(train)
    with pytest.raises(ConfigError, match=rf"^compile='fast'; {allowed}"):
        E.run(evaluate)
    assert list(tmp_path.iterdir()) == [] and compile_modes == []


def test_compile_false_and_true_keep_their_config_hashes():
    for value in (False, True):
        assert (
            config_hash(E.eval_config({"engine": "tent"}, [f"compile={str(value).lower()}"]))
            == (MAIN_HASHES["eval", value])
        )
        train = T.train_config("smoke", ["train.engine=source", f"compile={str(value).lower()}"])
        assert config_hash(train) == MAIN_HASHES["train", value]
