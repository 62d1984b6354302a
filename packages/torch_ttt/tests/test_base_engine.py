"""The engine protocol on the engines that exist: settings validation, reset policies, exact restores,
TENT's test-batch statistics, BN, source."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from tttlab.core.errors import ConfigError, InvalidInputError, TTTLabError
from tttlab.torch_ttt import OptimizationParameters, Reset, get_engine
from tttlab.torch_ttt.norm import batch_statistics, entropy, marginal_entropy


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    m.train()
    with torch.no_grad():
        for _ in range(3):  # give the BN layer non-trivial running statistics
            m(torch.randn(16, 1, 8, 8))
    return m.eval()


def ln_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5)
    ).eval()


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def x_batch(n: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g) * 2 + 0.5


def test_optimization_parameters_validate():
    p = OptimizationParameters({"num_steps": 2, "copy_model": False})
    assert p["num_steps"] == 2 and p["reset"] is Reset.NEVER and p["optimizer_name"] == "adam"
    p["reset"] = "per_domain"
    assert p["reset"] is Reset.PER_DOMAIN
    with pytest.raises(ConfigError, match="num_step"):
        p["num_step"] = 1
    with pytest.raises(ConfigError, match="optimizer_name"):
        p["optimizer_name"] = "rmsprop"
    with pytest.raises(ConfigError, match="reset"):
        p["reset"] = "sometimes"
    with pytest.raises(ConfigError, match="num_steps"):
        OptimizationParameters({"num_steps": -1})
    # torch-ttt's copy_model default is the *string* "True": ported scripts pass it as such
    assert OptimizationParameters({"copy_model": "True"})["reset"] is Reset.PER_BATCH
    assert OptimizationParameters({"copy_model": "false"})["reset"] is Reset.NEVER
    with pytest.raises(ConfigError, match=r"copy_model='yes': expected True or False"):
        OptimizationParameters({"copy_model": "yes"})
    # values torch's optimizers would reject deep inside (or accept: NaN, a negative decay) are named here
    for key, value in (("lr", float("nan")), ("lr", float("inf")), ("lr", True), ("momentum", "abc"),
                       ("weight_decay", -1), ("betas", [2.0]), ("betas", (1.5, 0.9))):  # fmt: skip
        with pytest.raises(ConfigError, match=f"{key} must be .*got {re.escape(repr(value))}"):
            OptimizationParameters({key: value})
    with pytest.raises(ConfigError, match=r"must be a mapping.*\[1, 2\]"):
        OptimizationParameters([1, 2])


def test_nesterov_sgd_the_official_actmad_step():
    """The official ActMAD step is SGD with Nesterov momentum 0.9 and weight decay 5e-4 (also the official
    TENT code's SGD option): ``nesterov=True`` takes it.  Reference, written out for two steps on the
    BatchNorm affine parameters (TENT's loss): ``g = grad + wd p; v = mu v + g; p -= lr (g + mu v)``."""
    x = x_batch()
    lr, mu, wd = 0.05, 0.9, 5e-4
    ref = bn_model()
    params = [ref[1].weight, ref[1].bias]
    velocity = [torch.zeros_like(p) for p in params]
    with batch_statistics(ref):
        for _ in range(2):
            logp = ref(x).log_softmax(-1)
            grads = torch.autograd.grad(-(logp.exp() * logp).sum(-1).mean(), params)
            with torch.no_grad():
                for p, g, v in zip(params, grads, velocity):
                    g = g + wd * p
                    v.mul_(mu).add_(g)
                    p.sub_(lr * (g + mu * v))
    settings = {"optimizer_name": "sgd", "lr": lr, "momentum": mu, "weight_decay": wd, "nesterov": True}
    m = bn_model()
    engine = get_engine("tent")(m, {**settings, "num_steps": 2, "reset": "never"}).eval()
    engine(x)
    torch.testing.assert_close(m[1].weight, ref[1].weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m[1].bias, ref[1].bias, rtol=1e-6, atol=1e-7)
    plain = bn_model()
    get_engine("tent")(plain, {**settings, "nesterov": False, "num_steps": 2, "reset": "never"}).eval()(x)
    assert not torch.allclose(plain[1].weight, ref[1].weight, rtol=1e-6, atol=1e-7), "heavy-ball differs"
    assert OptimizationParameters()["nesterov"] is False
    with pytest.raises(ConfigError, match="nesterov must be True or False"):
        OptimizationParameters({"nesterov": "yes"})
    with pytest.raises(ConfigError, match="nesterov=True needs optimizer_name='sgd'"):
        get_engine("tent")(bn_model(), {"nesterov": True}).eval()(x)  # Adam


def test_the_evaluate_config_check_refuses_bad_optimizer_settings_without_building_an_optimizer(monkeypatch):
    """``eval_config`` refuses a bad combination (nesterov with Adam, or without momentum) and a bad value
    with the messages the engine gives, before any model or data, and builds no optimizer for the check:
    torch's first optimizer of a process imports torch._dynamo (~2 s of every evaluate's start-up)."""
    from tttlab.torch_ttt import evaluate as E

    def no_optimizer(*args, **kwargs):
        raise AssertionError("the config check built an optimizer")

    for cls in ("Adam", "AdamW", "SGD"):
        monkeypatch.setattr(torch.optim, cls, no_optimizer)
    ok = E.eval_config({"engine": "tent"}, ["engine.optimization.optimizer_name=sgd",
                                            "engine.optimization.momentum=0.9", "engine.optimization.nesterov=true"])  # fmt: skip
    assert ok["engine"]["optimization"]["nesterov"] is True
    for overrides, needle in (
        (["engine.optimization.nesterov=true"], "nesterov=True needs optimizer_name='sgd' and momentum > 0, "
                                                "got optimizer_name='adam'"),
        (["engine.optimization.optimizer_name=sgd", "engine.optimization.momentum=0",
          "engine.optimization.nesterov=true"], "got optimizer_name='sgd', momentum=0"),
        (["engine.optimization.lr=-1"], "engine.optimization.lr must be a number >= 0, got -1"),
        (["engine.optimization.optimizer_name=lbfgs"], "engine.optimization.optimizer_name='lbfgs'; expected one"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(needle)):
            E.eval_config({"engine": "tent"}, overrides)


def test_tent_uses_test_batch_statistics_and_restores_exactly():
    m = bn_model()
    before = state(m)
    engine = get_engine("tent")(m)
    engine.eval()
    x = x_batch()
    engine.optimization_parameters["num_steps"] = 0
    out0, _ = engine(x)
    with torch.no_grad(), batch_statistics(m):
        expected = m(x)
    assert torch.equal(out0, expected)
    assert not torch.allclose(out0, m(x)), "training statistics would give a different output"
    engine.optimization_parameters["num_steps"] = 1
    out1, loss = engine(x)
    assert loss.item() > 0 and not torch.allclose(out1, out0)
    assert same(before, state(m)), "per_batch reset restores every tensor bit for bit"


def test_tent_step_changes_only_norm_affine_parameters():
    m = bn_model()
    before = state(m)
    engine = get_engine("tent")(m, {"reset": "per_domain"})
    engine.eval()
    engine(x_batch())
    after = state(m)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1.weight", "1.bias"}
    engine.reset()
    assert same(before, state(m))


def test_reset_policies():
    x = x_batch()
    outs = {}
    for policy in ("per_batch", "per_domain", "never"):
        m = bn_model()
        engine = get_engine("tent")(m, {"reset": policy, "lr": 1e-2})
        engine.eval()
        first, _ = engine(x)
        second, _ = engine(x)
        outs[policy] = (first, second)
        if policy == "per_batch":
            assert torch.equal(first, second), "each batch starts from the source model"
        else:
            assert not torch.equal(first, second), "adaptation carries over to the next batch"
    assert torch.equal(outs["per_domain"][1], outs["never"][1])


def test_deterministic_under_seed():
    outs = []
    for _ in range(2):
        engine = get_engine("tent")(bn_model(3), {"num_steps": 2})
        engine.eval()
        outs.append(engine(x_batch(seed=4))[0])
    assert torch.equal(outs[0], outs[1])


def test_tent_on_layernorm_model():
    m = ln_model()
    before = state(m)
    engine = get_engine("tent")(m, {"reset": "per_domain"})
    engine.eval()
    engine(x_batch())
    after = state(m)
    assert {k for k in before if not torch.equal(before[k], after[k])} == {"2.weight", "2.bias"}


def test_bad_inputs():
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    with pytest.raises(InvalidInputError, match="normalisation"):
        get_engine("tent")(plain)
    with pytest.raises(InvalidInputError, match="BatchNorm"):
        get_engine("bn")(plain)
    engine = get_engine("tent")(bn_model())
    engine.eval()
    with pytest.raises(InvalidInputError, match="NaN"):
        engine(torch.full((4, 1, 8, 8), float("nan")))
    with pytest.raises(InvalidInputError, match="batch of size 0"):
        engine(x_batch(n=1)[:0])
    with pytest.raises(TTTLabError, match="unknown engine"):
        get_engine("tnet")
    # MEMO's built-in augmentations need a float NCHW batch: not a traceback from grid_sample or torch.cat
    memo = get_engine("memo")(bn_model(), {"num_steps": 1}).eval()
    for bad in (x_batch().to(torch.uint8), x_batch()[0], x_batch()[:0], x_batch().numpy()):
        with pytest.raises(InvalidInputError, match=r"float \(N, C, H, W\)"):
            memo(bad)


def test_bn_and_source_engines():
    m = bn_model()
    before = state(m)
    x = x_batch()
    out, _ = get_engine("bn")(m).eval()(x)
    with torch.no_grad(), batch_statistics(m):
        assert torch.equal(out, m(x))
    assert same(before, state(m))
    src = get_engine("source")(m).eval()
    with torch.no_grad():
        assert torch.equal(src(x)[0], m(x))
    src.train()
    outputs, loss = src(x)
    assert loss.item() == 0.0 and outputs.shape == (8, 5)


def test_entropy_helpers_match_float64_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 6) * 3  # 4 views, 3 samples, 6 classes
    p = logits.double().softmax(-1)
    ent = -(p * p.log()).sum(-1)
    assert torch.allclose(entropy(logits), ent.float(), atol=1e-5)
    avg = p.mean(0)
    assert torch.allclose(marginal_entropy(logits), (-(avg * avg.log()).sum(-1)).float(), atol=1e-5)


@pytest.mark.parametrize("optimizer_name", ["adam", "sgd"])
def test_kept_optimizer_after_reset_steps_like_a_fresh_one(optimizer_name):
    """reset() keeps the optimizer object and clears its state: the next batch equals a fresh engine's,
    and only the adapted parameters ever hold gradients (autograd computes no others)."""
    settings = {"reset": "per_domain", "lr": 1e-2, "num_steps": 2, "optimizer_name": optimizer_name}
    x1, x2 = x_batch(seed=1), x_batch(seed=2)
    m = bn_model()
    engine = get_engine("tent")(m, settings).eval()
    engine(x1)
    opt = engine.optimizer
    engine.reset()
    out, _ = engine(x2)
    assert engine.optimizer is opt, "the optimizer is reused across resets"
    fresh = get_engine("tent")(bn_model(), settings).eval()
    assert torch.equal(out, fresh(x2)[0])
    assert all(p.grad is None for p in m.parameters()), "no stale gradients on any parameter"
    engine.optimization_parameters["lr"] = 5e-3
    engine(x2)
    assert engine.optimizer is not opt and engine.optimizer.param_groups[0]["lr"] == 5e-3


def _norm_cnn(seed: int = 0) -> nn.Module:
    """BatchNorm and LayerNorm, so TENT adapts both kinds of affine parameters."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16),
        nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5),
    ).train()  # fmt: skip
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 1, 8, 8))
    return m.eval()


def _tent_by_hand(model: nn.Module, batches, settings: dict, steps: int) -> list[torch.Tensor]:
    """TENT as the paper states it, written out: per batch ``steps`` optimizer steps on the mean softmax
    entropy under test-batch BatchNorm statistics, then the prediction; one optimizer for the stream."""
    from tttlab.torch_ttt.norm import norm_affine_parameters

    params = [p for _, p in norm_affine_parameters(model)]
    if settings["optimizer_name"] == "sgd":
        opt = torch.optim.SGD(params, lr=settings["lr"], momentum=settings["momentum"])
    else:
        opt = torch.optim.Adam(params, lr=settings["lr"])
    outs = []
    for x in batches:
        for _ in range(steps):
            with batch_statistics(model):
                logits = model(x)
            loss = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad(), batch_statistics(model):
            outs.append(model(x))
    return outs


@pytest.mark.parametrize(
    "settings",
    [{"optimizer_name": "sgd", "lr": 0.5, "momentum": 0.9}, {"optimizer_name": "adam", "lr": 0.05}],
    ids=["sgd_momentum", "adam"],
)
def test_tent_equals_a_hand_written_loop_over_steps_and_batches(settings):
    """Three steps per batch, two batches under ``per_domain``: the engine's predictions and parameters
    equal the hand loop's (so the step count, the loss's mean, SGD's momentum and the optimizer state kept
    across batches all reach the optimisation; the contract tests only compare 0 and 1 step)."""
    import copy

    from tttlab.torch_ttt.norm import norm_affine_parameters

    model = _norm_cnn()
    reference = copy.deepcopy(model)
    engine = get_engine("tent")(model, {**settings, "num_steps": 3, "reset": "per_domain"}).eval()
    batches = [x_batch(seed=1), x_batch(seed=2)]
    got = [engine(x)[0] for x in batches]
    want = _tent_by_hand(reference, batches, {"momentum": 0.0, **settings}, steps=3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    for (name, p), (_, q) in zip(norm_affine_parameters(model), norm_affine_parameters(reference)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    fresh = dict(norm_affine_parameters(_norm_cnn()))
    moved = max((p - fresh[n]).abs().max().item() for n, p in norm_affine_parameters(model))
    assert moved > 1e-2, "the steps should move the weights far enough for the comparison to mean something"


def test_reset_after_more_training_returns_to_the_trained_weights():
    """``engine.train()`` drops the snapshot: weights trained after an evaluation are what the next
    evaluation's ``reset()`` restores, not the ones before training (mutation audit)."""
    m = bn_model()
    engine = get_engine("tent")(m, {"reset": "per_domain", "lr": 1e-2}).eval()
    x = x_batch(seed=3)
    engine(x)  # snapshot of the first weights, then adapted
    engine.train()
    with torch.no_grad():  # a training step elsewhere
        m[1].weight.add_(0.5)
        m[1].bias.sub_(0.25)
    trained = state(m)
    engine.eval()
    engine(x)
    assert not same(state(m), trained)
    engine.reset()
    assert same(state(m), trained)


def _prior_bn_by_hand(m, x, n=16.0):
    """The conv-BN-ReLU-linear ``bn_model`` with BN statistics ``N/(N+1) * source + 1/(N+1) * test`` (unbiased
    test variance over batch and positions), in float64."""
    conv, bn, lin = m[0], m[1], m[4]
    with torch.no_grad():
        h = conv(x).double()
        w = n / (n + 1)
        mean = w * bn.running_mean.double() + (1 - w) * h.mean(dim=(0, 2, 3))
        var = w * bn.running_var.double() + (1 - w) * h.var(dim=(0, 2, 3), correction=1)
        y = (h - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
        y = torch.relu(y * bn.weight.double().view(1, -1, 1, 1) + bn.bias.double().view(1, -1, 1, 1))
        return (y.flatten(1) @ lin.weight.double().T + lin.bias.double()).float()


def test_bn_engine_prior_strength_mixes_source_and_unbiased_test_statistics_by_hand():
    """``BNEngine(prior_strength=N)``: mean and variance ``N/(N+1) * source + 1/(N+1) * test`` (unbiased
    test variance), written out on a conv-BN-ReLU-linear model (mutation audit: ignoring the prior and
    normalising with the test batch alone survived)."""
    m = bn_model()
    x = x_batch(seed=4)
    engine = get_engine("bn")(m, prior_strength=16.0).eval()
    got = engine(x)[0]
    want = _prior_bn_by_hand(m, x)
    with torch.no_grad():
        batch_only = get_engine("bn")(m).eval()(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, batch_only, atol=1e-3)


def test_bn_engine_with_a_prior_accepts_a_single_image():
    """Schneider et al.'s prior is for small test batches, down to one image (N=16 at n=1 in the paper):
    ``prior_strength`` lets a batch of one through (its statistics over the spatial positions, unbiased
    variance, mixed with the source ones); test-batch statistics alone take the image's spatial positions,
    as a train-mode BatchNorm2d."""
    m = bn_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = x_batch(seed=4)[:1]
    got = get_engine("bn")(m, prior_strength=16.0).eval()(x)[0]
    want = _prior_bn_by_hand(m, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # running stats untouched
    with torch.no_grad():
        m.train()
        want_batch = m(x)  # PyTorch's own train-mode BatchNorm2d on one image: spatial statistics
        m.load_state_dict(before)  # the forward moved the running statistics
        m.eval()
    torch.testing.assert_close(get_engine("bn")(m).eval()(x)[0], want_batch, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
