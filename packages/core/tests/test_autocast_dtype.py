"""core.torch.autocast asks for bfloat16 on every device type (mutation audit: an autocast without the dtype
is bfloat16 on the CPU, so the CPU-only test passed, but float16 without a GradScaler on CUDA)."""

import pytest

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(("device", "kind"), [("cpu", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda")])
def test_autocast_is_bfloat16_on_every_device_type(device, kind, monkeypatch):
    from tttlab.core.torch import autocast

    seen = []
    monkeypatch.setattr(torch, "autocast", lambda device_type, **kw: seen.append((device_type, kw)) or "ctx")
    assert autocast(device, "bf16") == "ctx" and seen == [(kind, {"dtype": torch.bfloat16})]
    seen.clear()
    with autocast(torch.device(device), "none"):
        pass
    assert seen == []
