"""``compile`` accepts a torch.compile mode: from the Hydra-composed config to ``torch.compile`` (a recorder).

``compile: true`` keeps its meaning (torch's default mode, no ``mode`` argument) and, like ``false``, the
config hashes it had before modes were accepted (the hashes below were computed on main before the change).
"""

from __future__ import annotations

import pytest

from tttlab.core.errors import ConfigError
from tttlab.core.records import config_hash
from tttlab.core.testing import CompileRecorder, record_torch_compile
from tttlab.pilimit import evaluate as E
from tttlab.pilimit import train as T

SMALL = ["logging.progress=false", "threads=1", "data.num_examples=32", "train.num_test=16", "train.epochs=1"]

#: ``config_hash`` of ``train_config("smoke", ["compile=<value>"])``, of its training part (the checkpoint
#: and model-cache identity) and of the evaluate contract's config ``{"compile": value, "out_dir":
#: "runs/x"}`` (an explicit out_dir: its default moves), before ``compile`` accepted modes.  Another change
#: to these configs' defaults changes them too: recompute them then, on the commit before it.
MAIN_HASHES = {
    # the whole config's hash moved with optim.gclip_drop_with_lr (2026-12-01; was 7ef9f6bbdc88 / 1e441efc1bfd)
    # and again with model.first/second_layer_init_alpha (2026-12-01; was d0505e6fc1b2 / ebc9c140d595) and
    # with model.readout_zero_init (2026-12-01; was 614f14dfb9e3 / 0db92bd3d597) and with the eval section
    # (eval.checkpoint, eval.val_fraction; 2026-12-01; was a5460ab08605 / 82a12f15a135): every key of the schema is
    # in it.  The training part, the resume and model-cache key, leaves them out at their defaults and did not
    # move; nor did the evaluate contract's config.  The training part is pinned at run semantics 1
    # (training_part(c, semantics=1)): since 2026-12-01 the identity also holds train.SEMANTICS, which
    # moved every identity on purpose (test_run_semantics)
    False: ("6d188a662c2d", "242710fc9e24", "6f93ea1b8401"),
    True: ("81b30aa0b28a", "242710fc9e24", "753758b20e73"),
}


def hydra_compose(overrides: list[str]) -> dict:
    """The config exactly as ``tttlab-pilimit-train``'s ``@hydra.main`` composes it."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    T.register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="tttlab.pilimit.conf", version_base=None):
        cfg = compose("config", overrides=overrides)
    GlobalHydra.instance().clear()
    return T.to_dict(cfg)


@pytest.fixture
def compile_modes(monkeypatch) -> CompileRecorder:
    """``torch.compile`` replaced by core's recorder: the modes it was given, and how often the "compiled"
    functions ran (``calls``)."""
    return record_torch_compile(monkeypatch)


@pytest.mark.parametrize("value, mode", [("true", None), ("reduce-overhead", "reduce-overhead")])
def test_compile_value_reaches_torch_compile_as_its_mode(tmp_path, compile_modes, value, mode):
    """tttlab-pilimit-train's config (Hydra, ``+experiment=smoke``, shrunk) with ``compile=<value>``: the
    infinite net's 4 chunk kernels and the finite net's features/readout go through torch.compile with
    ``mode=<value>`` (none for ``true``) and run; the evaluate contract compiles the loaded model the same
    way."""
    for kind, compiled in (("inf", 4), ("finite", 2)):
        compile_modes.reset()
        cfg = hydra_compose(["+experiment=smoke", *SMALL, f"model.kind={kind}", "model.width=32",
                             f"out_dir={tmp_path / kind}", f"compile={value}"])  # fmt: skip
        out = T.run(cfg)
        assert compile_modes == [mode] * compiled and compile_modes.calls > 0, kind
    compile_modes.reset()
    E.run({"train_run": str(out), "compile": True if value == "true" else value, "out_dir": str(tmp_path / "e"),
           "progress": False, "benchmark": {"corruptions": ["fog"], "num_examples": 4}})  # fmt: skip
    assert compile_modes == [mode, mode] and compile_modes.calls > 0


def test_a_bad_compile_value_is_a_config_error_before_anything_is_written(tmp_path, compile_modes):
    allowed = r"expected true or false, or a torch.compile mode: one of \['default', 'reduce-overhead'"
    cfg = hydra_compose(["+experiment=smoke", f"out_dir={tmp_path / 'train'}", "compile=fast"])
    with pytest.raises(ConfigError, match=rf"^compile='fast'; {allowed}"):
        T.run(cfg)
    with pytest.raises(ConfigError, match=rf"^compile='fast'; {allowed}"):
        E.run({"out_dir": str(tmp_path / "eval"), "cache_dir": str(tmp_path / "cache"), "compile": "fast"})
    assert list(tmp_path.iterdir()) == [] and compile_modes == []


def test_compile_false_and_true_keep_their_config_hashes():
    for value, (train, part, evaluate) in MAIN_HASHES.items():
        tc = T.train_config("smoke", [f"compile={str(value).lower()}"])
        assert (config_hash(tc), config_hash(T.training_part(tc, semantics=1))) == (train, part)
        assert config_hash(E._config({"compile": value, "out_dir": "runs/x"}, {})) == evaluate
