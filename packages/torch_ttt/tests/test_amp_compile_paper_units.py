"""Cheap unit checks of amp=bf16, engine.compile() and the CIFAR-10-C profile (from a mutation audit).

Each check closes a hole the broader tests left open (they pass on a plausible bug):

* the loss reductions (entropies, NT-Xent, covariance, masked MSE, ActMAD's alignment) compute in
  float32 from bfloat16 inputs, under autocast too: equal to the float32 computation on the upcast
  inputs (a bfloat16 reduction differs by ~1e-2, a bfloat16 pixel count of masked MSE rounds 301 to 300);
* the output-based engines (TENT, EATA, DeYO, MEMO) adapt from a bfloat16-output model exactly as from
  the same outputs given in float32, and their state (EATA's moving average) stays float32;
* ``eager()`` restores the compiled call (also after an exception), so an engine whose adaptation runs
  eagerly (IT3) still predicts through the compiled model; BN with prior-mixed statistics is "none";
* ``engine_defaults`` fills ``engine.optimization`` values left null but never overrides given ones;
* calibration images of ``wrn28_10`` are CIFAR-10 *train* images in [0, 1] (no mean/std), read from
  ``calibration.root`` before ``benchmark.root`` (checked against the pickles read here directly);
* a checkpoint without BatchNorm counters loads them as 0 (what torch's own loader leaves).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from tttlab.core import testing
from tttlab.torch_ttt import evaluate as E
from tttlab.torch_ttt import get_engine
from tttlab.torch_ttt.heads import covariance
from tttlab.torch_ttt.models import model_info
from tttlab.torch_ttt.norm import entropy, marginal_entropy
from tttlab.torch_ttt.precision import eager, is_compiled

BF16 = torch.bfloat16


def _bf16(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(BF16)


def _masked_mse_case():
    from tttlab.torch_ttt.engine.masked_ttt_engine import masked_mse

    pred, target = (
        _bf16(1, 1, 20, 20),
        torch.randn(1, 1, 20, 20, generator=torch.Generator().manual_seed(3)),
    )
    mask = torch.zeros(1, 1, 20, 20, dtype=torch.bool)
    mask.view(-1)[:301] = True  # 301 masked pixels: not a bfloat16 number (it rounds to 300)
    return masked_mse, (pred, target, mask), (pred.float(), target, mask)


def _nt_xent_case():
    from tttlab.torch_ttt.engine.ttt_pp_engine import nt_xent

    f = _bf16(6, 2, 24, scale=1.0)
    return nt_xent, (f,), (f.float(),)


CASES = {
    "entropy": lambda: (entropy, (_bf16(8, 10),), (_bf16(8, 10).float(),)),
    "marginal_entropy": lambda: (
        marginal_entropy,
        (_bf16(4, 8, 10),),
        (_bf16(4, 8, 10).float(),),
    ),
    "covariance": lambda: (
        covariance,
        (_bf16(16, 12, scale=1.0),),
        (_bf16(16, 12, scale=1.0).float(),),
    ),
    "nt_xent": _nt_xent_case,
    "masked_mse": _masked_mse_case,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_reductions_compute_in_float32_from_bfloat16_inputs(case):
    """Under bfloat16 autocast with bfloat16 inputs (what amp=bf16 feeds them), the result is float32 and
    equals the float32 computation on the same values outside autocast."""
    fn, low, full = CASES[case]()
    want = fn(*full)
    with torch.autocast("cpu", dtype=BF16):
        got = fn(*low)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_actmad_alignment_of_bfloat16_features_is_the_float32_alignment():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)).eval()
    engine = get_engine("actmad")(model, features_layer_names=["0", "1"])
    engine.compute_statistics([(torch.randn(32, 6), None)])
    feats = [_bf16(8, 16, seed=1, scale=1.0), _bf16(8, 16, seed=2, scale=1.0)]
    want = engine.alignment_loss([f.float() for f in feats])
    with torch.autocast("cpu", dtype=BF16):
        got = engine.alignment_loss(feats)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


class OutNet(nn.Module):
    """conv-BN -> pooled -> fc; ``low=True`` returns its logits in bfloat16 (as an autocast forward),
    ``low=False`` the same values in float32."""

    def __init__(self, low: bool):
        super().__init__()
        self.low = low
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        out = self.fc(nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)).to(BF16)
        return out if self.low else out.float()


@pytest.mark.parametrize("name", ["tent", "eata", "deyo", "sar", "memo"])
def test_output_based_engines_adapt_from_bfloat16_logits_as_from_float32_ones(name):
    kwargs = {"eata": {"e_margin": 10.0, "d_margin": -1.0}, "deyo": {"e_margin": 10.0, "plpd_thresh": -2.0,
              "patch_len": 2}, "sar": {"e_margin": 10.0}, "memo": {"n_augmentations": 3}}.get(name, {})  # fmt: skip
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    results = []
    for low in (True, False):
        torch.manual_seed(0)
        model = OutNet(low).eval()
        engine = get_engine(name)(model, {"num_steps": 1, "lr": 0.05, "reset": "never"}, **kwargs).eval()
        torch.manual_seed(5)
        outs = [engine(x) for _ in range(2)]
        state = {n: t.detach().clone() for n, t in engine.state_dict().items()}
        results.append((outs, state, engine))
    (lo_outs, lo_state, lo_engine), (hi_outs, hi_state, _) = results
    for (o1, l1), (o2, l2) in zip(lo_outs, hi_outs):
        assert l1.dtype == torch.float32
        torch.testing.assert_close(o1.float(), o2, rtol=0, atol=0)
        torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    for k in hi_state:
        if "low" in k:
            continue
        torch.testing.assert_close(lo_state[k], hi_state[k], rtol=0, atol=0, msg=k)
    floats = [v for v in vars(lo_engine).values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert all(v.dtype == torch.float32 for v in floats), "engine state in bfloat16"


def test_eager_context_restores_the_compiled_call_even_after_an_error(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = nn.Linear(2, 2)
    model.compile()
    compiled = model._compiled_call_impl
    with eager(model):
        assert not is_compiled(model)
    assert model._compiled_call_impl is compiled
    with pytest.raises(RuntimeError), eager(model):
        raise RuntimeError("boom")
    assert model._compiled_call_impl is compiled
    with eager(model, enabled=False):
        assert is_compiled(model)


@pytest.fixture
def compiled_calls(monkeypatch) -> list:
    """``torch.compile`` replaced by a stand-in that runs the function eagerly and appends to the returned
    list at every call of a compiled function (which forwards went through "the compiled model")."""
    calls: list = []

    def fake_compile(fn, **kw):
        def run(*a, **k):
            calls.append(1)
            return fn(*a, **k)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def test_an_eagerly_adapting_engine_stays_compiled_for_its_prediction(compiled_calls):
    """IT3 adapts eagerly (hooks) under engine.compile(): after adapting in eval and train mode the model
    is still compiled, and each prediction goes through the compiled call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    engine = get_engine("ittt")(model, features_layer_name="2", example_input=torch.randn(2, 6),
                                optimization_parameters={"num_steps": 1}).eval()  # fmt: skip
    engine.compile()
    x = torch.randn(4, 6)
    for _ in range(2):
        engine(x)
        assert is_compiled(model), "eager() left the model uncompiled"
    assert len(compiled_calls) == 2, "one compiled prediction forward per call"
    engine.train()
    engine(x)
    assert is_compiled(model)


def test_bn_with_prior_mixed_statistics_compiles_nothing(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = OutNet(False).eval()
    engine = get_engine("bn")(model, prior_strength=0.5)
    engine.compile()
    assert not engine.compiled_prediction and E.compiled_forwards(engine) == "none"
    plain = get_engine("bn")(OutNet(False).eval())
    plain.compile()
    assert E.compiled_forwards(plain) == "all"


def test_engine_defaults_fill_only_what_the_command_line_leaves_null():
    presets = {"tent": {"kwargs": {"predict_before_update": True},
                        "optimization": {"lr": 1e-3, "num_steps": 1, "optimizer_name": "adam"}}}  # fmt: skip
    given = {
        "name": "tent",
        "kwargs": {"predict_before_update": False},
        "optimization": {"lr": 0.02},
    }
    c = E.eval_config({"engine_defaults": presets, "engine": given})
    opt = c["engine"]["optimization"]
    assert (opt["lr"], opt["num_steps"], opt["optimizer_name"]) == (0.02, 1, "adam")
    assert c["engine"]["kwargs"] == {"predict_before_update": False}


def _cifar_train_pickles(root, n):
    folder = root / "cifar-10-batches-py"
    data, labels = [], []
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data.append(d[b"data"])
        labels += list(d[b"labels"])
    images = np.concatenate(data).reshape(-1, 3, 32, 32)[:n]
    return torch.from_numpy(images).float() / 255.0, torch.tensor(labels[:n])


def test_wrn_calibration_images_are_raw_cifar10_train_images_from_calibration_root(
    tmp_path,
):
    testing.make_cifar10(tmp_path / "cal", n_train=10, n_test=10, seed=1)
    testing.make_cifar10(tmp_path / "bench", n_train=10, n_test=10, seed=2)
    c = {"calibration": {"root": str(tmp_path / "cal")}, "benchmark": {"root": str(tmp_path / "bench")},
         "engine": {"name": "eata"}}  # fmt: skip
    x, y = E.calibration_images(c, model_info("wrn28_10"), 7)
    want_x, want_y = _cifar_train_pickles(tmp_path / "cal", 7)
    assert x.shape == (7, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x, want_x, rtol=0, atol=1e-7)
    assert torch.equal(y, want_y)
    c["calibration"]["root"] = None  # falls back to the benchmark's root
    x2, _ = E.calibration_images(c, model_info("wrn28_10"), 7)
    torch.testing.assert_close(x2, _cifar_train_pickles(tmp_path / "bench", 7)[0], rtol=0, atol=1e-7)


def test_checkpoint_without_counters_loads_them_as_zero(tmp_path):
    from tttlab.torch_ttt.checkpoints import load_pretrained
    from tttlab.torch_ttt.wide_resnet import WideResNet

    torch.manual_seed(0)
    sd = WideResNet(depth=10, widen_factor=1).state_dict()
    torch.save({k: v for k, v in sd.items() if "num_batches" not in k}, tmp_path / "old.pt")
    loaded = load_pretrained("wrn28_10", tmp_path / "old.pt", depth=10, widen_factor=1).state_dict()
    counters = [v for k, v in loaded.items() if k.endswith("num_batches_tracked")]
    assert counters and all(int(v) == 0 for v in counters)


def test_records_name_what_compile_compiled_through_run(tmp_path, monkeypatch):
    """evaluate.run with compile=true (torch.compile replaced by a counting pass-through) on a small
    pretrained WRN (model_checkpoint): every record's extra says compile true, amp none and
    compiled_forwards "all"."""
    from tttlab.core.records import read_jsonl
    from tttlab.torch_ttt.wide_resnet import WideResNet

    testing.make_cifar10_c(tmp_path / "data", corruptions=("fog",), n_per_severity=4)
    torch.manual_seed(0)
    torch.save(WideResNet(depth=10, widen_factor=1).state_dict(), tmp_path / "w.pt")
    cfg = {"engine": "source", "device": "cpu", "logging": {"progress": False},
           "model_checkpoint": {"name": "wrn28_10", "path": str(tmp_path / "w.pt"),
                                "kwargs": {"depth": 10, "widen_factor": 1}},
           "benchmark": {"name": "cifar10_c", "root": str(tmp_path / "data"), "corruptions": ["fog"],
                         "severities": [5], "setting": "episodic", "batch_size": 2, "num_examples": 4}}  # fmt: skip
    calls = []

    def fake_compile(fn, **kw):
        calls.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    rows = read_jsonl(E.run({**cfg, "compile": True, "out_dir": str(tmp_path / "compiled")}))
    assert calls, "torch.compile was not called"
    assert {(r["extra"]["amp"], r["extra"]["compile"], r["extra"]["compiled_forwards"]) for r in rows} == {
        ("none", True, "all")
    }
    assert {r["corruption"] for r in rows if r["metric"] == "accuracy"} == {"fog"}


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn1(self.conv1(x))).mean((2, 3)))


@pytest.mark.parametrize("name", ["memo", "bn"])
def test_prior_mixed_batchnorm_never_runs_the_compiled_model(name, compiled_calls):
    """MEMO / BN with prior-mixed statistics replace the BatchNorm layers' forward, which a compiled graph
    would not see: under engine.compile() (a counting stand-in) neither the adaptation nor the prediction
    goes through the compiled call, as compiled_forwards "none" says."""
    torch.manual_seed(0)
    model = _BNNet().eval()
    if name == "memo":
        engine = get_engine("memo")(model, {"num_steps": 1}, n_augmentations=2, prior_strength=16)
    else:
        engine = get_engine("bn")(model, prior_strength=0.5)
    engine.compile()
    assert E.compiled_forwards(engine) == "none"
    engine.eval()(torch.rand(2, 1, 8, 8))
    assert compiled_calls == [], "the compiled model ran under prior-mixed BatchNorm statistics"


def test_wrn_engine_inputs_and_registered_layers():
    """The example images evaluate.py builds the heads from have the WRN's (N, C, H, W) shape, and the
    registry hooks the documented layers (last stage for the TTT family, three stages + final BN for
    ActMAD)."""
    info = model_info("wrn28_10")
    assert tuple(E.example_images(info).shape) == (2, 3, 32, 32)
    assert info.features_layer == "block3" and info.actmad_layers == (
        "block1",
        "block2",
        "block3",
        "bn1",
    )


def test_stream_images_are_normalised_with_the_evaluated_models_constants():
    """make_stream scales to [0, 1] and applies the model's registry normalisation: the MNIST models get
    (x - 0.1307) / 0.3081 of exactly the images a model without normalisation gets."""
    import dataclasses

    c = E.eval_config({"engine": "source"}, ["benchmark.num_examples=4", "benchmark.batch_size=4",
                                             "benchmark.corruptions=[gaussian_noise]", "benchmark.setting=episodic"])  # fmt: skip
    mnist = model_info("mnist_bn")
    raw_info = dataclasses.replace(mnist, input_mean=None, input_std=None)
    (norm,) = list(E.make_stream(c, E.init_distributed(), mnist)[0])
    (raw,) = list(E.make_stream(c, E.init_distributed(), raw_info)[0])
    assert raw.x.shape == (4, 1, 28, 28) and 0.0 <= float(raw.x.min()) and float(raw.x.max()) <= 1.0
    torch.testing.assert_close(norm.x, (raw.x - 0.1307) / 0.3081, rtol=1e-6, atol=1e-6)
    assert torch.equal(norm.y, raw.y)
