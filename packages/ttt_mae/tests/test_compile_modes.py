"""``compile`` accepts a torch.compile mode: from the Hydra-composed configs to ``torch.compile`` (a recorder).

``compile: true`` keeps its meaning (torch's default mode: ``mode=None``) and, like ``false``, the config
hashes it had before modes were accepted (the hashes below were computed on main before the change).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from tttlab.core.errors import ConfigError
from tttlab.core.records import config_hash
from tttlab.core.testing import CompileRecorder, record_torch_compile
from tttlab.ttt_mae import cli
from tttlab.ttt_mae import evaluate as E
from tttlab.ttt_mae.common import compose, register_configs

#: ``config_hash`` of ``compose(<entry>, None, {"compile": value})`` for pretrain, probe, ttt, baseline, and
#: of ``evaluate.eval_config(profile="smoke", compile=value)``, before ``compile`` accepted modes.  Another
#: change to these configs' defaults changes them too: recompute them then, on the commit before it.
ENTRIES = ("pretrain", "probe", "ttt", "baseline")
MAIN_HASHES = {
    # the evaluate hashes recomputed after 577979a gave evaluate its own default out_dir per method
    False: (["2a1ca051248a", "7d760f471fef", "c387410804c2", "42c34cee3383"], "9d026db00039"),
    True: (["189c496641eb", "c4c407b390a8", "92426c0bf09d", "6a5cedd76538"], "c73d4c7db803"),
}


def hydra_compose(entry: str, overrides: list[str]) -> dict:
    """The config exactly as the ``tttlab-ttt-mae-<entry>`` command's ``@hydra.main`` composes it."""
    from hydra import compose as compose_config
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("tttlab.ttt_mae.conf", version_base=None):
        cfg = compose_config(config_name=entry, overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def compile_modes(monkeypatch) -> CompileRecorder:
    """``torch.compile`` replaced by core's recorder (the modes it was given, how often the "compiled"
    functions ran); the guard-skipping stance of the batched path is a no-op (nothing is really compiled)."""
    recorded = record_torch_compile(monkeypatch)
    monkeypatch.setattr(torch.compiler, "set_stance", lambda *a, **kw: contextlib.nullcontext())
    return recorded


@pytest.mark.parametrize("value, mode", [("true", None), ("reduce-overhead", "reduce-overhead")])
def test_compile_value_reaches_torch_compile_as_its_mode(tmp_path, smoke_cache, compile_modes, value, mode):
    """The ttt command (one image at a time: the MAE loss and the prediction; group_size=2: the batched
    step and prediction), the baseline command (the prediction) and pretrain (the model), composed by Hydra
    with ``compile=<value>``: every torch.compile call gets ``mode=<value>`` (None for ``true``) and the
    compiled functions run."""
    pre, probe = E.trained_model("smoke", smoke_cache, 0, "cpu", False)
    common = ["+experiment=smoke_ttt", f"resume_model={pre}", f"resume_finetune={probe}",
              "benchmark.corruptions=[fog]", "benchmark.num_examples=2", "steps_per_example=1", "batch_size=2",
              "logging.progress=false", f"compile={value}"]  # fmt: skip
    for entry, extra, compiled in (("ttt", [], 2), ("ttt", ["group_size=2"], 2), ("baseline", [], 1)):
        compile_modes.reset()
        cfg = hydra_compose(entry, [*common, f"out_dir={tmp_path / entry / str(len(extra))}", *extra])
        cli.execute(entry, cfg)
        assert compile_modes == [mode] * compiled and compile_modes.calls > 0, (entry, extra)
    compile_modes.clear()
    cfg = hydra_compose("pretrain", ["+experiment=smoke_pretrain", f"out_dir={tmp_path / 'pretrain'}",
                                     "epochs=1", "data.num_examples=32", "batch_size=16",
                                     "logging.progress=false", f"compile={value}"])  # fmt: skip
    cli.execute("pretrain", cfg)
    assert compile_modes == [mode]


def test_a_bad_compile_value_is_a_config_error_before_anything_is_written(tmp_path, compile_modes):
    allowed = r"expected true or false, or a torch.compile mode: one of \['default', 'reduce-overhead'"
    for entry in ENTRIES:
        extra = {"pretrain": [], "probe": ["finetune=/nonexistent/p.pth"],
                 "ttt": ["resume_model=/nonexistent/mae.pth"], "baseline": ["resume_model=/nonexistent/m.pth"]}  # fmt: skip
        cfg = hydra_compose(entry, [f"out_dir={tmp_path / entry}", "compile=fast", *extra[entry]])
        with pytest.raises(ConfigError, match=rf"^compile='fast'; {allowed}"):
            cli.execute(entry, cfg)
    with pytest.raises(ConfigError, match=rf"^compile='fast'; {allowed}"):  # before training the cached model
        E.run(method="ttt_mae.ttt", profile="smoke", out_dir=str(tmp_path / "eval"),
              cache_dir=str(tmp_path / "cache"), compile="fast")  # fmt: skip
    assert list(tmp_path.iterdir()) == [] and compile_modes == []


def test_compile_false_and_true_keep_their_config_hashes():
    for value, (entries, evaluate) in MAIN_HASHES.items():
        assert [config_hash(compose(e, None, {"compile": value})) for e in ENTRIES] == entries
        assert config_hash(E.eval_config(profile="smoke", compile=value)) == evaluate
