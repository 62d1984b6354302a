"""The ``amp`` (bf16 autocast) and ``compile`` (torch.compile) options of train and evaluate."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tttlab.core.errors import CheckpointError, ConfigError
from tttlab.pilimit import InfMLP, precision
from tttlab.pilimit import functional as PF
from tttlab.pilimit import train as T
from tttlab.pilimit.data import load_flat
from tttlab.pilimit.maml import adapted_logits, sample_episode

SMOKE = ["logging.progress=false", "threads=1", "data.num_examples=128", "train.num_test=64"]
MATMULS = {"mm", "addmm", "bmm"}


class OpDtypes(TorchDispatchMode):
    """Records ``(phase, op, output dtype)`` of every aten op run while active."""

    def __init__(self):
        super().__init__()
        self.phase, self.ops = "fwd", set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(first, torch.Tensor):
            self.ops.add((self.phase, func.overloadpacket.__name__, first.dtype))
        return out

    def matmul_dtypes(self, phase):
        return {d for p, op, d in self.ops if p == phase and op in MATMULS}


def _trained(tmp_path, kind, *extra):
    name = "_".join([kind, *extra]).replace("=", "-")
    over = [*SMOKE, f"model.kind={kind}", "model.width=32", f"out_dir={tmp_path / name}", *extra]
    out = T.run(T.train_config("smoke", over))
    net, c, ck = T.load_trained(out)
    return out, net, c, ck


@pytest.mark.parametrize("kind", ["inf", "finite"])
def test_bf16_train_runs_under_autocast_and_stays_close_to_float32(tmp_path, kind, monkeypatch):
    # autocast really on: the matmuls of the training steps ran in bfloat16 (recorded op by op through the
    # real entry point), while parameters, pi rows and gradients stay float32
    rec = OpDtypes()
    real_autocast = precision.autocast
    seen = []

    def recording_autocast(device, amp):
        seen.append(amp)
        return real_autocast(device, amp)

    monkeypatch.setattr(precision, "autocast", recording_autocast)
    with rec:
        out16, net16, c16, ck16 = _trained(tmp_path, kind, "amp=bf16")
    assert "bf16" in seen and torch.bfloat16 in rec.matmul_dtypes("fwd")
    assert all(v.dtype == torch.float32 for v in ck16["model_state"].values() if v.is_floating_point())
    out32, net32, *_ = _trained(tmp_path, kind)
    # close to float32 (2 epochs of 8 steps): >= 95 % equal test predictions, losses within 1 %
    x, _ = load_flat("mnist", "test", num_examples=500)
    with torch.no_grad():
        agree = (net16(x).argmax(1) == net32(x).argmax(1)).float().mean()
    assert agree >= 0.95
    s16, s32 = (json.loads((o / "stats.json").read_text()) for o in (out16, out32))
    assert s16["train_loss"] == pytest.approx(s32["train_loss"], rel=0.01)
    assert s16["train_loss"] != s32["train_loss"]  # bf16 did change the numbers


def test_bf16_runs_every_matmul_in_bfloat16_and_keeps_float32_state():
    """What autocast changes (the list in precision.py): every matrix product, forward and backward (the
    pi-layers' custom backward re-enters the forward's autocast, and their accumulating products are
    out of place under autocast), MAML's kernel and its V transform; not the parameters, rows or
    gradients."""
    for kind in ("inf", "finite"):
        torch.manual_seed(0)
        net = InfMLP(20, 4, r=8, depth=1, chunk_size=16)
        if kind == "finite":
            net = net.sample(32)
        opt = T.PiSGD(net, lr=0.1)
        x, y = torch.randn(6, 20), torch.randint(0, 4, (6,))
        rec = OpDtypes()
        with rec:
            with precision.autocast("cpu", "bf16"):
                loss = F.cross_entropy(net(x).float(), y)
            rec.phase = "bwd"
            loss.backward()
        assert rec.matmul_dtypes("fwd") == {torch.bfloat16}, kind
        assert rec.matmul_dtypes("bwd") == {torch.bfloat16}, kind
        assert loss.dtype == torch.float32
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 for g in grads)
        opt.step()
        assert all(p.dtype == torch.float32 for p in net.parameters())
        if kind == "inf":
            assert {layer.A.dtype for layer in net.pi_layers} == {torch.float32} and net.M == 8 + 6
    # MAML's closed-form readout adaptation
    torch.manual_seed(0)
    net = InfMLP(16, 3, r=6, depth=1)
    rng = np.random.default_rng(1)
    classes = [rng.integers(0, 256, (4, 4, 4), dtype=np.uint8) for _ in range(3)]
    ep = sample_episode(classes, 3, 1, 2, rng)
    rec = OpDtypes()
    with rec, precision.autocast("cpu", "bf16"):
        logits, _ = adapted_logits(net, ep, 0.5, 1)
    assert rec.matmul_dtypes("fwd") == {torch.bfloat16} and ("fwd", "acos", torch.bfloat16) in rec.ops
    with torch.no_grad():
        ref, _ = adapted_logits(net, ep, 0.5, 1)
    assert torch.allclose(logits.float(), ref, atol=0.05)


def test_amp_and_compile_values_are_checked(tmp_path):
    allowed = r"expected one of \['none', 'bf16'\]"
    with pytest.raises(ConfigError, match=r"amp='fp16'; " + allowed):
        T.train_config("smoke", [*SMOKE, "amp=fp16"])
    with pytest.raises(ConfigError, match=r"compile"):
        T.train_config("smoke", [*SMOKE, "compile=maybe"])
    with pytest.raises(ConfigError, match=r"amp='bf16' with model.dtype='float16'"):
        T.train_config("smoke", [*SMOKE, "amp=bf16", "model.dtype=float16"])
    with pytest.raises(ConfigError, match=r"compile=true with model.impl='reference'"):
        T.train_config("smoke", [*SMOKE, "compile=true", "model.impl=reference"])
    T.train_config(
        "smoke", [*SMOKE, "compile=true", "model.impl=reference", "model.kind=finite"]
    )  # no pi-layers
    from tttlab.pilimit.evaluate import run as evaluate

    for key, value, needle in (("amp", "bf17", "amp='bf17'; " + allowed), ("compile", "yes", "compile='yes'; expected true or false")):  # fmt: skip
        with pytest.raises(ConfigError, match=needle):
            evaluate({"train_run": str(tmp_path), key: value, "out_dir": str(tmp_path / "e")})


def test_a_run_resumed_with_another_amp_is_refused(tmp_path):
    T.run(T.train_config("smoke", [*SMOKE, f"out_dir={tmp_path}", "train.stop_after_steps=2"]))
    with pytest.raises(CheckpointError, match=r"\(amp: '<absent>' -> 'bf16'\)"):
        T.run(T.train_config("smoke", [*SMOKE, f"out_dir={tmp_path}", "amp=bf16"]))
    # compile does not change what is computed (beyond float rounding): the run may resume with it
    part = T.training_part(T.train_config("smoke", [*SMOKE, "compile=true"]))
    assert part == T.training_part(T.train_config("smoke", SMOKE))


class Recorder:
    """Stands for ``torch.compile``: records what it was given, returns a counting wrapper."""

    def __init__(self):
        self.targets, self.calls = [], {}

    def __call__(self, fn, **kwargs):
        name = getattr(fn, "__name__", type(fn).__name__)
        self.targets.append((name, getattr(fn, "__self__", None), kwargs))

        def wrapper(*a, **k):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*a, **k)

        return wrapper


@pytest.mark.parametrize("kind", ["inf", "finite"])
def test_compile_plumbing_compiles_the_dominant_work_and_uses_it(tmp_path, kind, monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(torch, "compile", rec)
    built = []
    real_build = T.build_model
    monkeypatch.setattr(T, "build_model", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    out = T.run(T.train_config("smoke", [*SMOKE, f"model.kind={kind}", "model.width=32", "compile=true",
                                         f"out_dir={tmp_path}"]))  # fmt: skip
    if kind == "inf":
        names = {"phi_chunk", "phi_chunk_cached", "grad_chunk", "grad_chunk_recompute"}
        assert {n for n, _, _ in rec.targets} == names
        assert all(kw == {"dynamic": True} for _, _, kw in rec.targets)
        assert rec.calls.get("phi_chunk_cached", 0) > 0 and rec.calls.get("grad_chunk", 0) > 0
        assert rec.calls.get("phi_chunk", 0) > 0  # the no-grad test-set forward
        assert all(layer.kernels is not None for layer in built[0].pi_layers)
    else:
        assert [(n, s) for n, s, _ in rec.targets] == [("features", built[0]), ("readout", built[0])]
        assert rec.calls["features"] >= 16 and rec.calls["readout"] >= 16
    assert T.load_checkpoint(out / "checkpoints" / "last.ckpt")["done"]
    # the evaluate contract compiles the loaded model for its prediction
    from tttlab.pilimit.evaluate import run as evaluate

    rec.calls.clear()
    evaluate({"train_run": str(out), "compile": True, "out_dir": str(tmp_path / "e"), "progress": False,
              "benchmark": {"corruptions": ["fog"], "num_examples": 8}})  # fmt: skip
    assert rec.calls.get("phi_chunk" if kind == "inf" else "features", 0) > 0


def test_compiled_kernels_are_the_eager_chunk_maths():
    """The compile targets (out-of-place chunk functions) compute what the eager in-place loop computes,
    forward (with and without the cache) and backward; run eagerly here (the compiled run is opt-in)."""

    class Eager:
        phi, phi_cached, grad, grad_recompute = (staticmethod(f) for f in (
            PF.phi_chunk, PF.phi_chunk_cached, PF.grad_chunk, PF.grad_chunk_recompute))  # fmt: skip

    torch.manual_seed(0)
    g = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    A, B = torch.randn(23, 4, dtype=torch.float64), torch.randn(23, 6, dtype=torch.float64)
    B = B / B.norm(dim=1, keepdim=True)
    Am = torch.randn(23, dtype=torch.float64)
    for cache_mb in (0.0, 1e-3, 1.0):  # none, some, all chunks cached
        outs = []
        for kernels in (None, Eager()):
            gi = g.detach().clone().requires_grad_()
            anchor = torch.zeros(0, requires_grad=True)
            out = PF.PiLinearChunked.apply(
                gi, anchor, A, Am, B, (7, int(cache_mb * 2**20), kernels), lambda a, b: None
            )
            out.pow(2).sum().backward()
            outs.append((out.detach(), gi.grad))
        assert torch.allclose(outs[0][0], outs[1][0], atol=1e-12)
        assert torch.allclose(outs[0][1], outs[1][1], atol=1e-12)


compile_test = pytest.mark.skipif(
    not os.environ.get("TTTLAB_COMPILE_TESTS"),
    reason="torch.compile test (a cold inductor compile: 10-60 s); set TTTLAB_COMPILE_TESTS=1",
)


@compile_test
@pytest.mark.parametrize("kind", ["inf", "finite"])
def test_compiled_training_equals_eager(tmp_path, kind):
    _, n_eager, _, ck_e = _trained(tmp_path, kind)
    _, n_comp, _, ck_c = _trained(tmp_path, kind, "compile=true")
    for k, v in ck_e["model_state"].items():
        assert torch.allclose(v, ck_c["model_state"][k], rtol=1e-4, atol=1e-5), k
    x, _ = load_flat("mnist", "test", num_examples=200)
    with torch.no_grad():
        assert torch.allclose(n_eager(x), n_comp(x), rtol=1e-4, atol=1e-5)
