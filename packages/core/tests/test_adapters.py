"""torch / jax adapters (skipped in the core-only environment, which has neither)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tttlab.core.data import ArrayDataset
from tttlab.core.errors import InvalidInputError


def images(n=4, c=3):
    return np.random.default_rng(0).integers(0, 256, size=(n, 8, 10, c), dtype=np.uint8)


def test_torch_to_tensor_layout_and_normalisation():
    torch = pytest.importorskip("torch")
    from tttlab.core import torch as T

    x = images()
    t = T.to_tensor(x, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert t.shape == (4, 3, 8, 10) and t.dtype == torch.float32
    want = (x.transpose(0, 3, 1, 2).astype(np.float32) / 255 - 0.5) / 0.25
    assert np.allclose(t.numpy(), want, atol=1e-6)
    with pytest.raises(InvalidInputError, match="NaN"):
        T.to_tensor(np.full((1, 4, 4, 1), np.nan, np.float32))
    with pytest.raises(InvalidInputError, match=r"\(4, 4\)"):
        T.to_tensor(np.zeros((4, 4), np.uint8))
    # bad-input audit: 0..255 floats were taken as [0, 1] images, std 0 gave inf silently
    with pytest.raises(InvalidInputError, match=r"\[0, 255\]"):
        T.to_tensor(x.astype(np.float32))
    with pytest.raises(InvalidInputError, match="std > 0"):
        T.to_tensor(x, mean=(0.5,) * 3, std=(0.0, 1.0, 1.0))
    assert T.to_tensor(x.astype(np.float32) / 255).shape == (4, 3, 8, 10)


def test_torch_loader_and_distributed_sampler_cover_dataset():
    pytest.importorskip("torch")
    from tttlab.core import torch as T

    ds = ArrayDataset(images(10, 1), np.arange(10))
    seen = [int(y) for _, ys in T.make_loader(ds, 4, shuffle=True, seed=3) for y in ys]
    assert sorted(seen) == list(range(10))
    again = [int(y) for _, ys in T.make_loader(ds, 4, shuffle=True, seed=3) for y in ys]
    assert seen == again


def test_jax_shard_on_two_host_devices():
    pytest.importorskip("jax")
    code = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import numpy as np, jax
        from tttlab.core import jax as J
        from tttlab.core.errors import InvalidInputError
        mesh = J.data_mesh()
        assert mesh.shape["data"] == 2, mesh
        x = np.arange(4 * 2 * 2 * 1, dtype=np.uint8).reshape(4, 2, 2, 1)
        xs = J.shard(J.to_float(x), mesh)
        assert len(xs.addressable_shards) == 2
        assert xs.addressable_shards[0].data.shape == (2, 2, 2, 1)
        assert np.allclose(np.asarray(xs), x / 255.0)
        try:
            J.shard(np.zeros((3, 1)), mesh)
        except InvalidInputError as e:
            assert "3" in str(e)
        else:
            raise SystemExit("odd batch accepted")
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_resolve_device_names_what_it_refuses(monkeypatch):
    """One device check for every torch subpackage (it replaced four local copies)."""
    torch = pytest.importorskip("torch")
    from tttlab.core.errors import ConfigError
    from tttlab.core.torch import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"device='gpu0': expected cpu, cuda, cuda:N or auto"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("gpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"device='cuda:1', but torch finds no CUDA device; use device=cpu"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:0") == torch.device(
        "cuda:0"
    )
    with pytest.raises(ConfigError, match=r"device='cuda:1', but only 1 CUDA device\(s\) exist"):
        resolve_device("cuda:1")


def test_amp_and_compile_options_are_checked_and_autocast_is_bf16_only_when_asked():
    """The shared ``amp`` / ``compile`` checks and the autocast context of every torch entry point."""
    torch = pytest.importorskip("torch")
    from tttlab.core.errors import ConfigError
    from tttlab.core.torch import autocast, check_amp, check_compile

    assert [check_amp(v) for v in (None, "none", "BF16 ", "bf16")] == ["none", "none", "bf16", "bf16"]
    for bad in ("fp16", "bfloat16", True, 16):
        with pytest.raises(ConfigError, match=r"train.amp=.*expected one of \['none', 'bf16'\]"):
            check_amp(bad, "train.amp")
    assert check_compile(True) is True and check_compile(False) is False and check_compile(None) is False
    assert check_compile("reduce-overhead") == "reduce-overhead"
    w, x = torch.ones(4, 4), torch.ones(2, 4)
    with autocast("cpu", "bf16"):
        assert (x @ w).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "none"):
        assert (x @ w).dtype == torch.float32
    with pytest.raises(ConfigError, match="amp='fp16'"):
        autocast("cpu", "fp16")


@pytest.mark.parametrize(
    "value, expected",
    [(False, None), (None, None), (True, {}), ("default", {"mode": "default"}),
     ("reduce-overhead", {"mode": "reduce-overhead"}), ("max-autotune", {"mode": "max-autotune"}),
     ("max-autotune-no-cudagraphs", {"mode": "max-autotune-no-cudagraphs"})],
)  # fmt: skip
def test_compile_kwargs_maps_a_config_value_to_torch_compile_arguments(value, expected):
    """false/None: not compiled; true: torch's default mode with no ``mode`` argument (what ``compile: true``
    always meant); a torch.compile mode's name: that mode."""
    pytest.importorskip("torch")
    from tttlab.core.torch import compile_kwargs

    assert compile_kwargs(value) == expected


@pytest.mark.parametrize("bad", ["fast", "yes", "true", "Reduce-Overhead", 1, 0, 1.0, ["default"]])
def test_compile_kwargs_refuses_anything_else_naming_key_value_and_allowed_values(bad):
    pytest.importorskip("torch")
    from tttlab.core.errors import ConfigError
    from tttlab.core.torch import COMPILE_MODES, check_compile, compile_kwargs

    allowed = re.escape(str(list(COMPILE_MODES)))
    for check in (compile_kwargs, check_compile):
        with pytest.raises(
            ConfigError, match=rf"^train\.compile={re.escape(repr(bad))}; expected true or false, .*{allowed}"
        ):
            check(bad, "train.compile")


def test_weights_from_elsewhere_are_unwrapped_checked_and_completed(tmp_path):
    """core.torch's state-dict reader and check, shared by torch_ttt's pretrained models and memo_tpt's
    weight loader: containers and ``module.`` prefixes, absent BatchNorm counters filled, mismatches named."""
    torch = pytest.importorskip("torch")
    from tttlab.core.errors import CheckpointError
    from tttlab.core.torch import check_state_dict, read_state_dict, state_dict_from

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    own = model.state_dict()
    saved = {"epoch": 3, "model": {"module." + k: v for k, v in own.items() if "num_batches" not in k}}
    torch.save(saved, tmp_path / "w.pt")
    state = check_state_dict(model, read_state_dict(tmp_path / "w.pt"), "w.pt", "the test net")
    assert set(state) == set(own) and state["1.num_batches_tracked"].item() == 0
    model.load_state_dict(state)  # strict
    bad = {**state, "0.weight": torch.zeros(2, 4), "extra.bias": torch.zeros(1)}
    del bad["1.bias"]
    with pytest.raises(
        CheckpointError,
        match=r"does not fit the test net .*1 key\(s\) missing from the file: 1\.bias.*"
        r"1 key\(s\) the model does not have: extra\.bias.*0\.weight: checkpoint \(2, 4\) vs model \(2, 3\)",
    ):
        check_state_dict(model, bad, "w.pt", "the test net")
    with pytest.raises(CheckpointError, match="x.pt: holds a mapping with keys epoch"):
        state_dict_from({"epoch": 3}, "x.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pt")


def test_torch_file_reader_allows_listed_classes_only_and_names_the_opt_in(tmp_path):
    """``read_torch_file``: classes in ``allow`` are read safely, any other pickled object is refused with
    an error naming it and the caller's ``option``; ``weights_only=False`` reads everything (no silent
    fallback); a directory, an HTML page and garbage are errors naming the path."""
    import argparse
    import fractions

    torch = pytest.importorskip("torch")
    from tttlab.core.errors import CheckpointError
    from tttlab.core.torch import read_state_dict, read_torch_file

    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, tmp_path / "ns.pt")
    with pytest.raises(
        CheckpointError, match=r"ns\.pt pickles .*argparse\.Namespace.*read it with my\.key=false"
    ):
        read_torch_file(tmp_path / "ns.pt", option="my.key=false")
    got = read_torch_file(tmp_path / "ns.pt", allow=[argparse.Namespace])
    assert got["args"].lr == 0.1 and torch.equal(got["w"], torch.ones(2))
    torch.save({"args": argparse.Namespace(lr=fractions.Fraction(1, 3))}, tmp_path / "frac.pt")
    with pytest.raises(CheckpointError, match=r"fractions\.Fraction"):
        read_torch_file(tmp_path / "frac.pt", allow=[argparse.Namespace])
    # read_state_dict names its caller's option too (torch_ttt: model_checkpoint.weights_only=false)
    with pytest.raises(
        CheckpointError, match=r"ns\.pt pickles .*argparse\.Namespace.*read it with my\.key=false"
    ):
        read_state_dict(tmp_path / "ns.pt", option="my.key=false")
    assert read_torch_file(tmp_path / "frac.pt", weights_only=False)["args"].lr == fractions.Fraction(1, 3)
    with pytest.raises(CheckpointError, match=r"resume_model .* is a directory"):
        read_torch_file(tmp_path, what="resume_model")
    (tmp_path / "page.pt").write_text("<!DOCTYPE html><html>sign in</html>")
    with pytest.raises(CheckpointError, match=r"page\.pt is an HTML page"):
        read_torch_file(tmp_path / "page.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(CheckpointError, match=r"junk\.pt is not a readable PyTorch checkpoint"):
        read_torch_file(tmp_path / "junk.pt", weights_only=False)
