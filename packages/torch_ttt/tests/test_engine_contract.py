"""The engine contract, checked on every registered engine (one parametrized module, timm-style).

Each engine wraps the same tiny BatchNorm CNN on 1x16x16 inputs.  An engine whose module does not exist
yet is skipped, so its checks switch on by themselves when it lands.  Checked for every engine:
``num_steps=0`` is exactly the wrapped model's prediction (under test-batch statistics for bn/tent/eata/
deyo/sar, MEMO's prior-mixed statistics for memo); one step changes the adapted parameters and nothing else of
``model.state_dict()`` (running statistics included); ``reset()`` restores bit for bit; ``per_batch``
leaves the engine as it was; ``per_domain`` carries the state over calls until ``reset()``; runs repeat
exactly under ``torch.manual_seed``; auxiliary heads exist before the first call; train mode returns
``(outputs, loss)`` with a graph; NaN inputs, too-small batches and unknown settings are ``TTTLabError``s.

The exactness checks also run with ``engine.amp = "bf16"`` (the ``amp`` parameter): the forwards then run
under bfloat16 autocast (checked on an activation's dtype), ``num_steps=0`` equals the model's forward
under the same autocast, resets stay bit for bit, runs repeat exactly, and the parameters and optimizer
state stay float32.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os

import pytest
import torch
from torch import nn

from tttlab.core.errors import ConfigError, TTTLabError
from tttlab.torch_ttt import ENGINE_MODULES, EngineRegistry, get_engine
from tttlab.torch_ttt.norm import batch_statistics, prior_mixed_statistics

ALL_ENGINES = EngineRegistry.names()
#: engines that never change the model (no adapted parameters)
STATIC = {"source", "bn"}
#: engines that compute statistics over the samples of the test batch: a batch of one is an error
NEEDS_BATCH_STATS = {"actmad", "ttt_pp"}
#: engines whose prediction uses test-batch BatchNorm statistics
BATCH_STATS_PREDICTION = {"bn", "tent", "eata", "deyo", "sar"}
#: engines with an auxiliary head / decoder that must exist from construction
HEADED = {"ttt", "ttt_pp", "ittt", "masked_ttt"}
#: engines whose train-mode self-supervised loss is a constant (no graph)
NO_TRAIN_LOSS = {"source", "bn", "actmad"}
#: ``engine.amp`` values the exactness checks run with
AMPS = ["none", "bf16"]


class TinyNet(nn.Module):
    """conv-BN-ReLU x2 -> pooled 32 features -> fc1 (16) -> fc (5 classes)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(32, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.relu(self.fc1(self.pool(x).flatten(1))))


def tiny_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet().train()
    with torch.no_grad():  # non-trivial running statistics, different from any test batch's
        for _ in range(3):
            model(torch.randn(16, 1, 16, 16) * 0.5 + 0.2)
    return model.eval()


def x_batch(n: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g) * 1.5 - 0.3


def require(name: str) -> type:
    if importlib.util.find_spec(f"tttlab.torch_ttt.engine.{ENGINE_MODULES[name]}") is None:
        pytest.skip(f"engine {name!r} is not implemented yet")
    return get_engine(name)


def _accepted(cls, **candidates):
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in candidates.items() if k in params}


def make_engine(name: str, settings: dict | None = None, seed: int = 0, amp: str = "none"):
    """``(engine, model)`` for ``name`` on a fresh tiny model; every filter opened so a step happens."""
    cls = require(name)
    model = tiny_model(seed)
    settings = dict(settings or {})
    x = x_batch()
    if name in ("source", "bn", "tent"):
        engine = cls(model, settings)
    elif name == "eata":
        engine = cls(model, settings, e_margin=10.0, d_margin=2.0)
    elif name == "deyo":
        engine = cls(model, settings, e_margin=10.0, plpd_thresh=-2.0)
    elif name == "sar":
        engine = cls(model, settings, e_margin=10.0)
    elif name == "memo":
        engine = cls(model, settings, n_augmentations=3)
    elif name == "actmad":
        engine = cls(model, features_layer_names=["bn1", "fc1"], optimization_parameters=settings)
    elif name == "masked_ttt":
        extra = _accepted(cls, example_input=x, image_shape=(1, 16, 16))
        engine = cls(model, features_layer_name="conv2", optimization_parameters=settings, **extra)
    else:  # ttt, ttt_pp, ittt
        layer = "conv2" if name == "ttt" else "fc1"
        extra = _accepted(cls, example_input=x)
        engine = cls(model, features_layer_name=layer, optimization_parameters=settings, **extra)
    if hasattr(engine, "compute_statistics"):  # TTT++ / ActMAD: reference statistics from training data
        engine.compute_statistics([(x_batch(16, seed=s), None) for s in (11, 12)])
    if amp != "none":
        engine.amp = amp
    return engine.eval(), model


@contextlib.contextmanager
def runs_in(model: nn.Module, amp: str):
    """Asserts that every forward through ``model.conv1`` inside the block ran in ``amp``'s dtype."""
    dtypes = []
    handle = model.conv1.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    try:
        yield
    finally:
        handle.remove()
    expected = torch.bfloat16 if amp == "bf16" else torch.float32
    assert dtypes and set(dtypes) == {expected}, f"activations in {set(dtypes)}, expected {expected}"


def reference_output(name: str, engine, model: nn.Module, x: torch.Tensor, amp: str = "none") -> torch.Tensor:
    """The wrapped model's own prediction, in the normalisation the engine defines (under ``amp``'s
    autocast, cast back to float32)."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
    if name == "memo":
        prior = float(engine.prior_strength)
        with torch.no_grad(), prior_mixed_statistics(model, prior), autocast:
            if engine.per_sample:
                return torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])]).float()
            return model(x).float()
    ctx = batch_statistics(model) if name in BATCH_STATS_PREDICTION else contextlib.nullcontext()
    with torch.no_grad(), ctx, autocast:
        return model(x).float()


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_keys(a: dict, b: dict) -> set[str]:
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


def model_names(engine) -> set[str]:
    return {n.removeprefix("model.") for n, _ in engine.adapted_parameters() if n.startswith("model.")}


def test_every_upstream_name_is_registered():
    assert set(ALL_ENGINES) == {
        "source", "bn", "ttt", "ttt_pp", "tent", "eata", "memo", "actmad", "deyo", "sar", "ittt", "masked_ttt"
    }  # fmt: skip
    for name in ALL_ENGINES:
        if importlib.util.find_spec(f"tttlab.torch_ttt.engine.{ENGINE_MODULES[name]}") is not None:
            assert get_engine(name).registry_name == name


@pytest.mark.parametrize("amp", AMPS)
@pytest.mark.parametrize("name", ALL_ENGINES)
def test_zero_steps_is_the_model(name, amp):
    engine, model = make_engine(name, {"num_steps": 0}, amp=amp)
    before = clone_state(engine)
    x = x_batch()
    with runs_in(model, amp):
        out, _ = engine(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, reference_output(name, engine, model, x, amp))
    assert not changed_keys(before, clone_state(engine))
    if name in BATCH_STATS_PREDICTION:  # test-batch statistics, not the stored ones
        with torch.no_grad():
            assert not torch.allclose(out, model(x), atol=1e-4)


@pytest.mark.parametrize("amp", AMPS)
@pytest.mark.parametrize("name", ALL_ENGINES)
def test_one_step_changes_the_adapted_parameters_and_nothing_else(name, amp):
    engine, model = make_engine(name, {"num_steps": 1, "lr": 0.05, "reset": "per_domain"}, amp=amp)
    before = clone_state(model)
    torch.manual_seed(0)
    with runs_in(model, amp):
        out, loss = engine(x_batch())
    assert out.dtype == loss.dtype == torch.float32
    changed = changed_keys(before, clone_state(model))
    if name in STATIC:
        assert not changed
    else:
        assert changed, "one step changed nothing"
        assert changed <= model_names(engine), f"changed outside the adapted parameters: {changed}"
        # parameters, snapshot and optimizer state stay float32 under amp
        state = [t for s in engine.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        assert state and all(t.dtype == torch.float32 for t in state if t.is_floating_point())
        assert all(t.dtype == torch.float32 for t in engine._snapshot.values() if t.is_floating_point())
    assert all(p.dtype == torch.float32 and p.grad is None for p in engine.parameters())


@pytest.mark.parametrize("amp", AMPS)
@pytest.mark.parametrize("name", ALL_ENGINES)
def test_per_domain_carries_state_until_reset_restores_bit_for_bit(name, amp):
    engine, model = make_engine(name, {"num_steps": 1, "lr": 0.05, "reset": "per_domain"}, amp=amp)
    before, x = clone_state(engine), x_batch()
    torch.manual_seed(3)
    with runs_in(model, amp):
        first, loss1 = engine(x)
    after_first = clone_state(engine)
    torch.manual_seed(3)
    second, _ = engine(x)
    if name not in STATIC:
        assert changed_keys(before, after_first)
        assert changed_keys(after_first, clone_state(engine)), "the second call started over"
        assert not torch.equal(first, second)
    engine.reset()
    assert not changed_keys(before, clone_state(engine)), "reset is not bit-exact"
    torch.manual_seed(3)
    again, loss_again = engine(x)
    assert torch.equal(again, first) and torch.equal(loss_again, loss1)


@pytest.mark.parametrize("amp", AMPS)
@pytest.mark.parametrize("name", ALL_ENGINES)
def test_per_batch_leaves_the_engine_as_it_was(name, amp):
    engine, model = make_engine(name, {"num_steps": 2, "lr": 0.05, "reset": "per_batch"}, amp=amp)
    engine.optimization_parameters["num_steps"] = 0
    x = x_batch()
    plain, _ = engine(x)
    engine.optimization_parameters["num_steps"] = 2
    before = clone_state(engine)
    with runs_in(model, amp):
        adapted, loss = engine(x)
    assert not changed_keys(before, clone_state(engine))
    assert adapted.shape == plain.shape and torch.isfinite(adapted).all() and torch.isfinite(loss).all()
    if name not in STATIC:
        assert not torch.equal(adapted, plain), "adaptation did not affect the prediction"
    again, _ = engine(x)
    assert not changed_keys(before, clone_state(engine))


@pytest.mark.parametrize("amp", AMPS)
@pytest.mark.parametrize("name", ALL_ENGINES)
def test_deterministic_under_a_seed(name, amp):
    results = []
    for _ in range(2):
        engine, model = make_engine(name, {"num_steps": 1, "reset": "never"}, amp=amp)
        torch.manual_seed(5)
        with runs_in(model, amp):
            outs = [engine(x_batch(seed=s)) for s in (1, 2)]
        results.append(outs)
    for (o1, l1), (o2, l2) in zip(*results):
        assert torch.equal(o1, o2) and torch.equal(l1, l2)


@pytest.mark.parametrize("name", ALL_ENGINES)
def test_heads_exist_before_the_first_call(name):
    engine, model = make_engine(name, {"num_steps": 1})
    params = {id(p) for p in engine.parameters()}
    model_params = {id(p) for p in model.parameters()}
    assert model_params <= params
    if name in HEADED:
        assert params - model_params, "the auxiliary head is missing before the first call"
    optimizer = torch.optim.SGD(engine.parameters(), lr=0.1)  # what a training script does first
    engine.train()
    outputs, loss = engine(x_batch())
    optimizer.zero_grad()
    (outputs.square().mean() + loss).backward()
    optimizer.step()
    engine.eval()
    engine(x_batch())
    assert {id(p) for p in engine.parameters()} == params, "parameters were created after construction"


@pytest.mark.parametrize("name", ALL_ENGINES)
def test_train_mode_returns_outputs_and_loss_with_graph(name):
    engine, model = make_engine(name)
    engine.train()
    assert model.training
    outputs, loss = engine(x_batch())
    assert outputs.shape == (8, 5) and outputs.requires_grad
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and torch.isfinite(loss)
    if name not in NO_TRAIN_LOSS:
        assert loss.requires_grad
        loss.backward()


@pytest.mark.parametrize("name", ALL_ENGINES)
def test_nan_input_is_an_error(name):
    engine, _ = make_engine(name)
    x = x_batch()
    x[2, 0, 3, 4] = float("nan")
    with pytest.raises(TTTLabError, match="NaN"):
        engine(x)


@pytest.mark.parametrize("name", ALL_ENGINES)
def test_batch_of_one(name):
    """A single image: the engines with test-batch BatchNorm statistics normalise over its spatial
    positions (TinyNet's BatchNorm layers are all BatchNorm2d), as a train-mode BatchNorm2d does; only
    statistics over samples (ActMAD, TTT++) need two."""
    engine, _ = make_engine(name, {"num_steps": 1})
    if name in NEEDS_BATCH_STATS:
        with pytest.raises(TTTLabError, match="batch of size 1"):
            engine(x_batch(1))
    else:
        out, loss = engine(x_batch(1))
        assert out.shape == (1, 5) and torch.isfinite(out).all()


class FlatBNNet(nn.Module):
    """TinyNet with a BatchNorm1d on its flat fc1 features: one image gives it one value per channel."""

    def __init__(self):
        super().__init__()
        self.body = tiny_model()
        self.bn_fc = nn.BatchNorm1d(16)

    def forward(self, x):
        b = self.body
        x = torch.relu(b.bn1(b.conv1(x)))
        x = torch.relu(b.bn2(b.conv2(x)))
        return b.fc(torch.relu(self.bn_fc(b.fc1(b.pool(x).flatten(1)))))


@pytest.mark.parametrize("name", sorted(BATCH_STATS_PREDICTION))
@pytest.mark.parametrize("num_steps", [0, 1])
def test_batch_of_one_with_batchnorm1d_on_flat_features_is_refused_before_any_update(name, num_steps):
    """PyTorch's train-mode BatchNorm1d cannot normalise one value per channel: the engine says which layer,
    its input shape and what it needs, before any parameter or buffer changes; a batch of 2 still adapts."""
    torch.manual_seed(0)
    model = FlatBNNet().eval()
    cls = require(name)
    engine = cls(model, {"num_steps": num_steps}).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        TTTLabError, match=r"'bn_fc' \(BatchNorm1d\) gets an input of shape \(1, 16\).*more than one"
    ):
        engine(x_batch(1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    out, _ = engine(x_batch(2))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_ENGINES)
def test_bad_optimization_key_is_a_config_error(name):
    require(name)
    with pytest.raises(ConfigError, match="num_step"):
        make_engine(name, {"num_step": 1})
    engine, _ = make_engine(name)
    with pytest.raises(ConfigError, match="learning_rate"):
        engine.optimization_parameters["learning_rate"] = 0.1
    with pytest.raises(ConfigError):
        engine.optimization_parameters["optimizer_name"] = "lbfgs"


def _adapted(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.adapted_parameters()}


@pytest.mark.parametrize("name", [n for n in ALL_ENGINES if n not in STATIC])
def test_k_steps_in_one_call_equal_k_calls_of_one_step(name):
    """``num_steps=3`` in one call equals three one-step calls with the state (and the optimizer state)
    carried over by ``per_domain``, parameters and prediction, under the same seed: the step count reaches
    the loop (the other checks compare 0 and 1 step only)."""
    x = x_batch(8, seed=5)
    results = []
    for steps, calls in ((3, 1), (1, 3)):
        engine, _ = make_engine(name, {"num_steps": steps, "reset": "per_domain"})
        if name == "memo":
            engine.per_sample = False  # per image, three calls would interleave the images' steps
        before = _adapted(engine)
        torch.manual_seed(123)
        for _ in range(calls):
            out, _ = engine(x)
        results.append((out, _adapted(engine)))
    (out_a, params_a), (out_b, params_b) = results
    assert params_a.keys() == params_b.keys() == before.keys()
    assert any(not torch.equal(before[k], params_a[k]) for k in before), "three steps changed nothing"
    for k in params_a:
        torch.testing.assert_close(params_a[k], params_b[k], rtol=0, atol=1e-6, msg=f"{name}: {k}")
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-5)


def test_truncated_model_equals_the_hooked_forward_and_shares_the_parameters():
    """What ``engine.compile()`` compiles for the features-layer engines (no compilation here): a torch.fx
    copy of the model that returns the layers' outputs, bit for bit those of ``features_only``'s hooked
    forward, stops there, and shares the model's parameters (an in-place update reaches it); a model fx
    cannot trace gives None (its engines then adapt eagerly)."""
    from tttlab.torch_ttt.heads import features_only, truncated_model

    model, x = tiny_model(), x_batch()
    one = truncated_model(model, [model.fc1])
    assert torch.equal(one(x)[0], features_only(model, model.fc1, x))
    assert not hasattr(one, "fc"), "the layers after fc1 are not part of the copy"
    two = truncated_model(model, [model.bn1, model.fc1])
    for got, want in zip(two(x), features_only(model, [model.bn1, model.fc1], x)):
        assert torch.equal(got, want)
    with torch.no_grad():
        model.fc1.bias.add_(1.0)
    assert torch.equal(one(x)[0], features_only(model, model.fc1, x))
    with batch_statistics(model):  # BatchNorm mode switches reach the copy too
        assert torch.equal(one(x)[0], features_only(model, model.fc1, x))

    class Branchy(TinyNet):
        def forward(self, x):
            return super().forward(x if x.sum() > 0 else -x)  # data-dependent: not fx-traceable

    branchy = Branchy().eval()
    assert truncated_model(branchy, [branchy.fc1]) is None


#: the forwards engine.compile() compiles on the tiny BatchNorm CNN (evaluate.compiled_forwards)
COMPILED_FORWARDS = {"memo": "none", "ittt": "prediction"}


@pytest.mark.parametrize("name", ALL_ENGINES)
def test_what_compile_compiles_per_engine(name, monkeypatch):
    """``engine.compile()`` with torch.compile replaced by a pass-through: every engine compiles its
    prediction and adaptation except IT3 (adaptation through a hook: eager) and MEMO on a BatchNorm model
    (prior-mixed statistics replace the layers' forward: nothing compiled), as the README's table says."""
    from tttlab.torch_ttt.evaluate import compiled_forwards

    engine, _ = make_engine(name)
    assert compiled_forwards(engine) == "none"
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    engine.compile()
    assert compiled_forwards(engine) == COMPILED_FORWARDS.get(name, "all")


def test_compile_of_an_untraceable_model_adapts_eagerly(monkeypatch):
    """``engine.compile()`` (torch.compile replaced by a pass-through) on a model fx cannot trace: TTT's
    adaptation runs the eager model (``compiled_features`` False) and gives the eager engine's result."""

    class Branchy(TinyNet):
        def forward(self, x):
            return super().forward(x if x.sum() != 0 else -x)

    def engine_on_branchy():
        torch.manual_seed(0)
        model = Branchy().eval()
        return get_engine("ttt")(model, "fc1", optimization_parameters={"num_steps": 1}).eval()

    eager_out, _ = engine_on_branchy()(x_batch())
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    engine = engine_on_branchy()
    engine.compile()
    assert len(compiled) == 1 and not engine.compiled_features
    out, _ = engine(x_batch())
    assert torch.equal(out, eager_out)


# ----------------------------------------------------------------------------------------------------------
# engine.compile() for real (opt-in: TTTLAB_COMPILE_TESTS=1, as ttt_mae's compile tests).  Every engine on
# the tiny CNN compiled with dynamo + AOTAutograd (backend="aot_eager": torch.compile's graphs without
# inductor's C++ code generation) and, for TENT and TTT, with inductor itself: outputs and adapted
# parameters equal the eager engine's within float tolerance over three batches carried over
# (per_domain), reset() restores bit for bit, the model's state_dict keys are unchanged.  The always-on
# plumbing tests (a torch.compile stand-in) are in test_train_evaluate.py.

compile_test = pytest.mark.skipif(
    not os.environ.get("TTTLAB_COMPILE_TESTS"),
    reason="torch.compile test (10 s - 2 min each on CPU); set TTTLAB_COMPILE_TESTS=1",
)


def _run(engine, seed: int = 4) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    outs = [engine(x_batch(8, seed=s))[0] for s in (1, 2, 3)]
    return outs, {n: p.detach().clone() for n, p in engine.adapted_parameters()}


def _compiled_equals_eager(name: str, **compile_kwargs) -> None:
    settings = {"num_steps": 1, "lr": 0.05, "reset": "per_domain"}
    eager, _ = make_engine(name, settings)
    compiled, model = make_engine(name, settings)
    keys = set(model.state_dict())
    before = clone_state(compiled)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled.compile(**compile_kwargs)
    assert set(model.state_dict()) == keys, "compiling changed the state_dict keys"
    (want, want_params), (got, got_params) = _run(eager), _run(compiled)
    # graphs actually built: the prediction (no_grad) and the adaptation (grad mode; for TTT, TTT++,
    # ActMAD and masked TTT the fx copy truncated after the features layer(s)); none for MEMO on a
    # BatchNorm model (its prior-mixed statistics replace the layers' forward), no adaptation graph for
    # IT3 (its adaptation changes the features layer's output through a hook: eager)
    assert compiled.compiled_features == (name in {"ttt", "ttt_pp", "actmad", "masked_ttt"})
    expected = 0 if not compiled.compiled_prediction else 1
    adapts_compiled = compiled.compiled_adaptation or compiled.compiled_features
    if compiled.compiled_prediction and adapts_compiled and name not in STATIC:
        expected = 2
    assert counters["stats"]["unique_graphs"] == expected
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    for k in want_params:
        torch.testing.assert_close(got_params[k], want_params[k], rtol=1e-4, atol=1e-5)
    compiled.reset()
    assert all(torch.equal(v, before[k]) for k, v in clone_state(compiled).items()), "reset is not exact"


@compile_test
@pytest.mark.parametrize("name", ALL_ENGINES)
def test_compiled_engine_equals_eager_aot_eager(name):
    _compiled_equals_eager(name, backend="aot_eager")


@pytest.mark.slow
@compile_test
@pytest.mark.parametrize("name", ["tent", "ttt"])
def test_compiled_engine_equals_eager_inductor(name):
    _compiled_equals_eager(name)
