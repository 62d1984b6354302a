"""Every reader of a tttlab checkpoint (a run's own resume files, pi-net files, official weights) loads
tensors and plain containers only: a file that pickles anything else is a CheckpointError, and the
pickled code never runs.  These files are what users pass around (``train_run=...``, ``load_net``)."""

from __future__ import annotations

import importlib
import pathlib

import pytest

torch = pytest.importorskip("torch")

from tttlab.core.errors import CheckpointError  # noqa: E402


class _Touch:
    """Unpickling this creates ``path``: the proof that a reader ran pickled code."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def _readers():
    """(package, function name, call) for every loader of a file a user may hand over."""
    return [
        ("tttlab.torch_ttt.train", "load_checkpoint", lambda f, p: f(p)),
        ("tttlab.pilimit.train", "load_checkpoint", lambda f, p: f(p)),
        ("tttlab.pilimit.nets", "load_net", lambda f, p: f(p)),
        ("tttlab.ttt_mae.checkpoint", "read_checkpoint", lambda f, p: f(p, "resume_model")),
        ("tttlab.core.torch", "read_state_dict", lambda f, p: f(p)),
        ("tttlab.core.torch", "read_torch_file", lambda f, p: f(p)),
    ]


@pytest.mark.parametrize("module, name, call", _readers(), ids=lambda v: v if isinstance(v, str) else "")
def test_readers_refuse_pickled_code_without_running_it(tmp_path, module, name, call):
    try:
        reader = getattr(importlib.import_module(module), name)
    except ImportError:
        pytest.skip(f"{module} is not installed in this environment")
    marker = tmp_path / "pickled-code-ran"
    bad = tmp_path / "bad.ckpt"
    torch.save({"format": "tttlab.torch_ttt/1", "model": {"w": torch.zeros(1)}, "evil": _Touch(marker)}, bad)
    with pytest.raises(CheckpointError, match=r"bad\.ckpt"):
        call(reader, bad)
    assert not marker.exists(), f"{module}.{name} unpickled code from the file"
