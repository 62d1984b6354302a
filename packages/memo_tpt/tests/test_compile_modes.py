"""``compile`` accepts a torch.compile mode: from the Hydra-composed configs to ``torch.compile`` (a recorder).

``compile: true`` keeps its meaning (torch's default mode, no ``mode`` argument) and, like ``false``, the
config hashes it had before modes were accepted (the hashes below were computed on main before the change).
"""

from __future__ import annotations

import pytest
import torch

from tttlab.core.errors import ConfigError
from tttlab.core.records import config_hash
from tttlab.core.testing import CompileRecorder, record_torch_compile
from tttlab.memo_tpt import evaluate as E
from tttlab.memo_tpt import main as M
from tttlab.memo_tpt import tiny_clip as T

#: ``config_hash`` of the Hydra-composed tpt, memo, ensemble configs (as ``run_paper`` writes them) and of
#: ``evaluate.eval_config(method="memo_tpt.memo")``, both with ``out_dir="runs/x"`` (explicit: the defaults
#: moved since) and ``compile`` false / true, computed on 07e05d4, before ``compile`` accepted modes.  Another change to these
#: configs' defaults changes them too: recompute them then, on the commit before it.
MAIN_HASHES = {
    False: (["acd49942deb7", "3539f96ce8c4", "5c595ba92f53"], "850e746752e7"),
    True: (["56ac7e06eac1", "4c67fc2afa58", "2cb09786a2d2"], "799ace693b0f"),
}


def hydra_cfg(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module("tttlab.memo_tpt.conf", version_base=None):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    """A model cache whose tiny models are built untrained (the plumbing, not the accuracy, is tested)."""
    from tttlab.memo_tpt.models import build_clip

    monkeypatch.setattr(T, "train_cnn", lambda p, *a, **kw: T.MnistCNN(p["channels"]).eval())
    monkeypatch.setattr(
        T, "train_clip", lambda p, *a, **kw: build_clip("tiny-mnist", config=T.clip_config(p)).eval()
    )
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def compile_modes(monkeypatch) -> CompileRecorder:
    """``torch.compile`` replaced by core's recorder: the modes it was given, and how often the "compiled"
    functions ran (``calls``)."""
    return record_torch_compile(monkeypatch)


@pytest.mark.parametrize("value, mode", [("true", None), ("reduce-overhead", "reduce-overhead")])
def test_compile_value_reaches_torch_compile_as_its_mode(
    tmp_path, cache, compile_modes, monkeypatch, value, mode
):
    """The memo and tpt commands (Hydra, ``+experiment=smoke``: the mnist_c proxy, 2 x 4 images, untrained
    tiny models) with
    ``compile=<value>``: MEMO's classifier and TPT's image encoder + text path go through torch.compile with
    ``mode=<value>`` (none for ``true``) and run; the tiny trainers' ``compile`` the same way."""
    for name, compiled in (("memo", 1), ("tpt", 2)):
        compile_modes.reset()
        cfg = hydra_cfg(name, ["+experiment=smoke", f"out_dir={tmp_path / name}", f"cache_dir={cache}",
                               f"compile={value}"])  # fmt: skip
        M.run_paper(cfg)
        assert compile_modes == [mode] * compiled and compile_modes.calls > 0, name
    compile_modes.reset()
    p = {**T.CNN_PROFILES["smoke"], "steps": 1, "num_train": 32}
    monkeypatch.undo()  # the real trainer, with the recorder again
    monkeypatch.setattr(torch, "compile", compile_modes)
    T.train_cnn(p, compile=True if value == "true" else value)
    assert compile_modes == [mode] and compile_modes.calls == 1


def test_a_bad_compile_value_is_a_config_error_before_anything_is_written(tmp_path, compile_modes):
    allowed = r"expected true or false, or a torch.compile mode: one of \['default', 'reduce-overhead'"
    for name in ("memo", "tpt"):
        cfg = hydra_cfg(name, ["+experiment=smoke", f"out_dir={tmp_path / name}",
                               f"cache_dir={tmp_path / 'cache'}", "compile=fast"])  # fmt: skip
        with pytest.raises(ConfigError, match=rf"^compile='fast'; {allowed}"):
            M.run_paper(cfg)
    with pytest.raises(ConfigError, match=rf"^compile='fast'; {allowed}"):
        E.run(method="memo_tpt.tpt", profile="smoke", out_dir=str(tmp_path / "eval"),
              cache_dir=str(tmp_path / "cache"), compile="fast")  # fmt: skip
    with pytest.raises(ConfigError, match=rf"^compile='fast'; {allowed}"):
        T.load_or_train_cnn("smoke", tmp_path / "cache", compile="fast")
    assert list(tmp_path.iterdir()) == [] and compile_modes == []


def test_compile_false_and_true_keep_their_config_hashes():
    for value, (paper, evaluate) in MAIN_HASHES.items():
        names = ("tpt", "memo", "ensemble")
        # with an explicit out_dir: the paper commands' default out_dir now holds a hash of the config
        overrides = [f"compile={str(value).lower()}", "out_dir=runs/x"]
        got = [config_hash(M._plain(hydra_cfg(n, overrides))) for n in names]
        assert got == paper
        assert config_hash(E.eval_config(method="memo_tpt.memo", out_dir="runs/x", compile=value)) == evaluate
