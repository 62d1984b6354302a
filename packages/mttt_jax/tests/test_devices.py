"""evaluate.resolve_devices picks the GPU ``cuda:N`` names (mutation audit: an index that was checked but not
applied, i.e. every GPU instead of the N-th, passed every test on this CPU-only machine)."""

import pytest

from tttlab.core.errors import ConfigError
from tttlab.mttt_jax import evaluate as E


def test_cuda_index_picks_that_gpu_and_gpu_picks_all(monkeypatch):
    gpus = ["gpu0", "gpu1", "gpu2"]
    monkeypatch.setattr(E.jax, "devices", lambda backend=None: gpus if backend == "gpu" else ["cpu0"])
    assert E.resolve_devices("cuda:1") == ["gpu1"] and E.resolve_devices("cuda:0") == ["gpu0"]
    assert E.resolve_devices("cuda") == gpus == E.resolve_devices("gpu")
    assert E.resolve_devices("cpu") == ["cpu0"]
    with pytest.raises(ConfigError, match=r"device='cuda:3', but JAX finds 3 GPU\(s\) here"):
        E.resolve_devices("cuda:3")
