"""amp reaches every pilimit path that runs a forward outside the training step, and the evaluate contract's
cached model (mutation audit: the evaluate contract's prediction and the transfer features left in float32,
and a cached model trained without the evaluation's amp, passed every earlier test)."""

import pytest
import torch

from tttlab.pilimit import evaluate as E
from tttlab.pilimit import train as T
from tttlab.pilimit.nets import InfMLP


def _autocast_spy(net, seen):
    net.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_evaluate_contract_predicts_under_amp(tmp_path, monkeypatch, amp):
    torch.manual_seed(0)
    net, seen = InfMLP(784, 10, r=6, depth=1), []
    _autocast_spy(net, seen)
    tc = {"train": {"task": "classify"}, "data": {"name": "mnist"},
          "model": {"kind": "inf", "dtype": "float32", "impl": "chunked"}}  # fmt: skip
    monkeypatch.setattr(T, "load_trained", lambda run_dir, device=None: (net, tc, {"done": True}))
    E.run({"train_run": str(tmp_path / "run"), "amp": amp, "out_dir": str(tmp_path / "e"), "progress": False,
           "benchmark": {"corruptions": ["fog"], "num_examples": 8}})  # fmt: skip
    assert seen and set(seen) == {amp == "bf16"}


def test_the_cached_model_is_trained_with_the_evaluations_amp(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(T, "run", lambda tc: trained.append(tc))
    paths = {}
    for amp in ("none", "bf16"):
        c = E._config(
            {"method": "pilimit.inf_pinet", "cache_dir": str(tmp_path), "amp": amp, "progress": False}, {}
        )
        paths[amp] = E.training_run(c)
    assert [tc["amp"] for tc in trained] == ["none", "bf16"] and paths["none"] != paths["bf16"]


def test_the_cached_model_is_trained_on_one_thread_whatever_the_evaluation_uses(tmp_path, monkeypatch):
    """The weights depend on the thread count (summation order) and the cache key cannot hold it: the
    cached model is trained on 1 thread for every ``threads`` of the evaluation, so they all share it."""
    trained = []
    monkeypatch.setattr(T, "run", lambda tc: trained.append(tc))
    paths = set()
    for threads in (None, 1, 2):
        c = E._config({"method": "pilimit.mup", "cache_dir": str(tmp_path), "threads": threads,
                       "progress": False}, {})  # fmt: skip
        paths.add(E.training_run(c))
    assert [tc["threads"] for tc in trained] == [1, 1, 1] and len(paths) == 1


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_transfer_features_run_under_amp(amp):
    torch.manual_seed(0)
    net, seen = InfMLP(20, 4, r=6, depth=1), []
    real = net.features
    net.features = lambda x: seen.append(torch.is_autocast_enabled("cpu")) or real(x)
    f = T._features(net, torch.randn(7, 20), 3, "cpu", amp)
    assert f.dtype == torch.float64 and f.shape[0] == 7 and seen == [amp == "bf16"] * 3
