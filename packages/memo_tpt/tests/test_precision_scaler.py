"""TPT's fp16 mode steps through its GradScaler (mutation audit: a TPT without the scaler, i.e. fp16 steps
whose small gradients underflow, passed every earlier test; fp16 needs CUDA, so the scaler is spied on here
with the mode forced on the CPU, where a CUDA GradScaler disables itself and the step is the plain one)."""

import warnings

import pytest
import torch

from tttlab.memo_tpt import tpt as tpt_module
from tttlab.memo_tpt.tpt import TPT

NAMES = ["zero", "one", "two", "three", "four"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in needs the CUDA scaler disabled")
def test_fp16_tuning_steps_through_the_grad_scaler(tiny_clip, image, monkeypatch):
    want = TPT(tiny_clip, NAMES, n_views=8, selection=0.5, tts=2, seed=0)
    calls = []
    for name in ("scale", "step", "update"):
        real = getattr(torch.amp.GradScaler, name)

        def spy(self, *a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.amp.GradScaler, name, spy)
    monkeypatch.setattr(tpt_module, "resolve_amp", lambda amp, device, method: "fp16")
    monkeypatch.setattr(
        tpt_module,
        "autocast",
        lambda mode, device: torch.autocast("cpu", enabled=False),
    )
    with warnings.catch_warnings():  # the CUDA scaler on a CPU-only machine warns and disables itself
        warnings.simplefilter("ignore")
        got = TPT(tiny_clip, NAMES, n_views=8, selection=0.5, tts=2, seed=0, amp="fp16")
    assert isinstance(got.scaler, torch.amp.GradScaler) and got.precision == "fp16"
    out = got(image)
    assert calls == ["scale", "step", "update"] * 2
    # the disabled scaler leaves the step as it is: the same logits as the float32 TPT
    torch.testing.assert_close(out, want(image))
