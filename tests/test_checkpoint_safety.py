"""Every reader of a tttlab checkpoint (a run's own resume files, pi-net files, official weights) loads
tensors and plain containers only: a file that pickles anything else is a CheckpointError, and the
pickled code never runs.  These files are what users pass around (``train_run=...``, ``load_net``)."""

from __future__ import annotations

import importlib
import pathlib
import re

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


def _memo_state_dict(f, p):
    return f(torch.nn.Linear(2, 2), p, "linear")


def _memo_cached_model(f, p):
    """memo_tpt's model cache: a file it wrote, then damaged (``p``'s bytes copied over it)."""
    cache = p.parent / "cache"
    build = lambda: torch.nn.Linear(2, 2)  # noqa: E731
    _, path = f("tiny_clip", {"n": 1}, 0, cache, lambda *a, **k: build(), build, False)
    path.write_bytes(p.read_bytes())
    return f("tiny_clip", {"n": 1}, 0, cache, lambda *a, **k: build(), build, False)


def _damaged(kind: str, path: pathlib.Path) -> None:
    if kind == "random-bytes":
        path.write_bytes(__import__("numpy").random.default_rng(0).bytes(4096))
        return
    if kind == "truncated-archive":  # a zip cut short at a small file: torch's "internal miniz error" text
        torch.save({"format": "tttlab.torch_ttt/1", "model": {"w": torch.zeros(2)}}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return
    torch.save({"format": "tttlab.torch_ttt/1", "model": {"w": torch.arange(4096.0)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if kind == "truncated-half" else data[:-64])


@pytest.mark.parametrize("kind", ["random-bytes", "truncated-half", "truncated-tail", "truncated-archive"])
@pytest.mark.parametrize(
    "module, name, call",
    _readers()
    + [
        ("tttlab.memo_tpt.models", "load_state_dict", _memo_state_dict),
        ("tttlab.memo_tpt.tiny_clip", "_cached", _memo_cached_model),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_corrupt_files_are_named_without_torchs_advice(tmp_path, module, name, call, kind):
    """Random bytes or a truncated checkpoint: one line naming the path and saying it is not a readable
    PyTorch checkpoint, never torch's advice to retry with ``weights_only=False`` (it cannot help)."""
    try:
        reader = getattr(importlib.import_module(module), name)
    except ImportError:
        pytest.skip(f"{module} is not installed in this environment")
    bad = tmp_path / "bad.pth"
    _damaged(kind, bad)
    with pytest.raises(CheckpointError) as info:
        call(reader, bad)
    msg = str(info.value)
    named = re.search(r"(bad\.pth|cache/tiny_clip-\w+\.pt) is not a readable PyTorch checkpoint \(", msg)
    assert named and "\n" not in msg, msg
    assert (
        "weights_only" not in msg.replace(str(tmp_path), "").lower()
        and "file an issue" not in msg
        and "trusted" not in msg
        and "If you are seeing" not in msg  # torch's miniz advice
    ), msg


def test_weights_only_refusal_names_the_global_and_the_setting(tmp_path):
    """A genuine refusal (a pickled class the safe reader does not allow) stays understandable: the class
    and the setting that reads it anyway, or, where there is no such setting, what to save instead."""
    from tttlab.core.torch import read_torch_file

    bad = tmp_path / "args.pth"
    torch.save({"w": torch.zeros(1), "path": pathlib.PurePosixPath("x")}, bad)
    with pytest.raises(
        CheckpointError, match=r"args\.pth pickles .*PurePosixPath.*read it with weights_only=false"
    ):
        read_torch_file(bad)
    with pytest.raises(CheckpointError, match=r"PurePosixPath.*save the tensors alone") as info:
        read_torch_file(bad, option=None)
    assert "weights_only" not in str(info.value).replace(str(tmp_path), "")
