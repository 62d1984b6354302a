"""SAR's maths against hand computations: the SAM step, the two entropy filters, the model recovery, the
steps that update nothing, the excluded top layers and the official learning-rate rule.

The hand computations run on a float64 copy of the model (``hand_sar``): entropy filter at ``theta``,
``eps = rho * g / (||g|| + 1e-12)``, filter again at ``theta + eps`` among the first filter's samples, the
gradient there applied to ``theta`` by SGD with momentum 0.9 (first step: ``theta - lr * g'``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tttlab.core.errors import ConfigError, InvalidInputError
from tttlab.torch_ttt import get_engine
from tttlab.torch_ttt.engine.sar_engine import (
    RESNET_TOP_LAYERS,
    VIT_BASE_TOP_LAYERS,
    sam_perturbation,
    update_ema,
    upstream_lr,
)
from tttlab.torch_ttt.norm import batch_statistics, norm_affine_parameters


def bn_model(seed: int = 3, sharpness: float = 20.0) -> nn.Module:
    """conv-BN-ReLU-pool-linear, 5 classes, BatchNorm running statistics set; the linear layer scaled by
    ``sharpness`` so that the entropies spread over [0, ln 5] (a random model's sit near ln 5)."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(3), nn.Flatten(),
        nn.Linear(36, 5),
    )  # fmt: skip
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 1, 12, 12) * 0.5)
        m[5].weight.mul_(sharpness)
    return m.eval()


def gn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    with torch.no_grad():
        m[5].weight.mul_(40.0)
    return m.eval()


def ln_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(144, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        m[4].weight.mul_(40.0)
    return m.eval()


def x_batch(n: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 12, 12, generator=g) * 2 + 0.5


def entropy_by_hand(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def batch_entropies(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), batch_statistics(model):
        return entropy_by_hand(model(x).double())


def hand_sar(model, x, margin, rho, lr, steps=1, momentum=0.9, exclude=()):
    """SAR by hand on a float64 copy: ``(adapted copy, [(H at theta, kept 1, H at theta + eps, kept 2,
    loss at theta + eps) per step])``."""
    twin = copy.deepcopy(model).double()
    x = x.double()
    params = [
        p
        for n, p in norm_affine_parameters(twin, prefix="")
        if not any(n.startswith(e + ".") for e in exclude)
    ]
    buffers = [None] * len(params)
    steps_info = []
    for _ in range(steps):
        with batch_statistics(twin):
            ent = entropy_by_hand(twin(x))
        kept1 = ent.detach() < margin
        grads = torch.autograd.grad(ent[kept1].mean(), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        theta = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(rho * g / (norm + 1e-12))
        with batch_statistics(twin):
            ent2 = entropy_by_hand(twin(x))
        kept2 = kept1 & (ent2.detach() < margin)
        loss2 = ent2[kept2].mean()
        grads2 = torch.autograd.grad(loss2, params)
        with torch.no_grad():
            for i, (p, t, g) in enumerate(zip(params, theta, grads2)):
                buffers[i] = g.clone() if buffers[i] is None else momentum * buffers[i] + g
                p.copy_(t - lr * buffers[i])
        steps_info.append((ent.detach(), kept1, ent2.detach(), kept2, float(loss2.detach())))
    return twin, steps_info


def assert_params_close(engine_model: nn.Module, twin: nn.Module, atol: float = 2e-6) -> None:
    got = dict(norm_affine_parameters(engine_model, prefix=""))
    want = dict(norm_affine_parameters(twin, prefix=""))
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-5, atol=atol, msg=k)


# -- one step -------------------------------------------------------------------------------------------
def test_two_sar_steps_equal_sam_steps_by_hand():
    """Every sample kept (E0 above every entropy): ``theta <- theta - lr * m``, ``m`` SGD's momentum buffer of
    the gradients taken at ``theta + rho g / ||g||``; two steps, so the second uses ``0.9 m + g'``.  The
    loss returned is the one at ``theta + eps``; the prediction is the adapted model's.  The SAM step is not
    the plain step: the gradient at the perturbed point differs from the gradient at ``theta``."""
    model, x = bn_model(), x_batch()
    lr, rho = 0.5, 0.5
    twin, info = hand_sar(model, x, margin=10.0, rho=rho, lr=lr, steps=2)
    plain, _ = hand_sar(model, x, margin=10.0, rho=0.0, lr=lr, steps=2)
    engine = get_engine("sar")(model, {"num_steps": 2, "lr": lr, "reset": "never"}, e_margin=10.0, rho=rho)
    out, loss = engine.eval()(x)
    assert_params_close(model, twin)
    with pytest.raises(AssertionError):
        assert_params_close(model, plain)
    assert engine.last_selected == (12, 12)
    torch.testing.assert_close(
        loss.double(), torch.tensor(info[1][4], dtype=torch.float64), rtol=1e-5, atol=0
    )
    with torch.no_grad(), batch_statistics(twin):
        torch.testing.assert_close(out.double(), twin(x.double()), rtol=1e-4, atol=1e-5)
    # the moving average of the two losses at theta + eps, the first one taken as it is
    assert engine.ema == pytest.approx(0.9 * info[0][4] + 0.1 * info[1][4], rel=1e-5)
    assert engine.num_recoveries == 0


def test_filters_keep_exactly_the_samples_under_e0_at_theta_and_again_at_theta_plus_eps():
    """E0 between the 6th and 7th smallest entropies of 12: 6 samples pass at ``theta``; at ``theta + eps``
    some of them rise above E0 (they must leave the loss) and some of the other 6 fall under it (they must
    not enter it: they failed the first filter).  The step equals the hand step with exactly ``kept1 &
    (H(theta + eps) < E0)``, and differs from the steps with either mistake."""
    model, x = bn_model(), x_batch()
    ent = batch_entropies(model, x).sort().values
    margin = float(ent[5] + ent[6]) / 2
    lr, rho = 0.5, 0.2
    twin, [(ent1, kept1, ent2, kept2, _)] = hand_sar(model, x, margin, rho, lr)
    under2 = ent2 < margin
    left = kept1 & ~under2  # under E0 at theta, above at theta + eps
    entered = ~kept1 & under2  # above E0 at theta, under at theta + eps
    assert int(kept1.sum()) == 6 and left.any() and entered.any() and kept2.any(), "the premise"
    assert (ent1 - margin).abs().min() > 1e-3 and (ent2 - margin).abs().min() > 1e-3  # far from float noise
    # (no recovery: the loss at theta + eps, 0.15, is under the default constant 0.2)
    engine = get_engine("sar")(
        model, {"lr": lr, "reset": "never"}, e_margin=margin, rho=rho, reset_constant=None
    )
    engine.eval()(x)
    assert engine.last_selected == (6, int(kept2.sum()))
    assert_params_close(model, twin)

    def hand_step_on(mask_at_theta_eps):
        """the hand step with another choice of the second sample set"""
        other = copy.deepcopy(bn_model()).double()
        params = [p for _, p in norm_affine_parameters(other, prefix="")]
        with batch_statistics(other):
            e = entropy_by_hand(other(x.double()))
        grads = torch.autograd.grad(e[kept1].mean(), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        theta = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(rho * g / (norm + 1e-12))
        with batch_statistics(other):
            e2 = entropy_by_hand(other(x.double()))
        grads2 = torch.autograd.grad(e2[mask_at_theta_eps].mean(), params)
        with torch.no_grad():
            for p, t, g in zip(params, theta, grads2):
                p.copy_(t - lr * g)
        return other

    for wrong in (kept1, under2):  # not re-filtered; re-filtered over the whole batch
        with pytest.raises(AssertionError):
            assert_params_close(model, hand_step_on(wrong))
    assert_params_close(model, hand_step_on(kept2))  # the helper itself reproduces the right step


@pytest.mark.parametrize(
    "make_model, image_seed", [(gn_model, 6), (lambda: ln_model(2), 4)], ids=["groupnorm", "layernorm"]
)
def test_one_image_on_groupnorm_and_layernorm_models_is_the_hand_step(make_model, image_seed):
    """Batch size 1, SAR's headline setting (ResNet-50-GN, ViT-LN): a step on the one image, as by hand."""
    model, x = make_model(), x_batch(1, seed=image_seed)
    assert float(batch_entropies(model, x)[0]) < 0.4 * math.log(5), "the premise: the image is reliable"
    twin, _ = hand_sar(model, x, margin=0.4 * math.log(5), rho=0.05, lr=0.1)
    before = state(model)
    engine = get_engine("sar")(model, {"lr": 0.1, "reset": "never"}, reset_constant=None).eval()
    out, _ = engine(x)
    assert engine.last_selected == (1, 1) and out.shape == (1, 5)
    assert_params_close(model, twin)
    engine.reset()
    assert same(state(model), before)


# -- recovery -------------------------------------------------------------------------------------------
def test_recovery_resets_exactly_to_the_initial_state_when_the_average_drops_under_the_constant():
    """Losses at theta + eps L1 > L2 (the same batch twice, entropy falling): the average is L1 after the
    first step and 0.9 L1 + 0.1 L2 after the second.  With the constant between the two, the first step
    keeps its update and the second returns to the initial state bit for bit (parameters, optimizer state,
    average), so the third call is the first call again."""
    x = x_batch()
    probe = get_engine("sar")(bn_model(), {"lr": 0.5, "reset": "never"}, e_margin=10.0, reset_constant=None)
    _, l1 = probe.eval()(x)
    ema1 = probe.ema
    _, l2 = probe(x)
    ema2 = probe.ema
    assert ema1 == float(l1), "the first value is the loss itself"
    assert ema2 == pytest.approx(update_ema(ema1, float(l2)), rel=1e-12) and ema2 < ema1, "the premise"

    model = bn_model()
    initial = state(model)
    constant = (ema1 + ema2) / 2
    engine = get_engine("sar")(model, {"lr": 0.5, "reset": "never"}, e_margin=10.0, reset_constant=constant)
    first_out, first_loss = engine.eval()(x)
    assert engine.ema == pytest.approx(ema1) and engine.num_recoveries == 0
    assert not same(state(model), initial) and engine.optimizer.state, "the first step stays"
    engine(x)
    assert engine.num_recoveries == 1 and engine.ema is None
    assert same(state(model), initial), "recovery is not exact"
    assert not engine.optimizer.state, "the momentum buffers survive the recovery"
    again_out, again_loss = engine(x)
    assert torch.equal(again_out, first_out) and torch.equal(again_loss, first_loss)
    assert engine.ema == pytest.approx(ema1)


def test_recovery_returns_the_optimizer_to_its_state_at_construction(monkeypatch):
    """The official ``SAR`` saves the model's and the optimizer's ``state_dict`` at construction and a
    recovery loads both back.  Here, after a recovery: the optimizer's ``state_dict`` equals the one it had
    when it was built (no momentum buffer, the same hyper-parameters), the weights equal the saved ones bit
    for bit, and the next step is a fresh optimizer's first step: ``theta0 - lr * g'``, no ``0.9 * buf``
    term (the official code's SAM wrapper restores only its own state, so there the SGD momentum survives
    a recovery: see the module docstring).  The same optimizer object is kept."""
    from tttlab.torch_ttt.engine import base_engine

    built = []
    real = base_engine.build_optimizer

    def recording(params, settings):
        opt = real(params, settings)
        built.append((opt, copy.deepcopy(opt.state_dict())))
        return opt

    monkeypatch.setattr(base_engine, "build_optimizer", recording)
    x = x_batch()
    probe = get_engine("sar")(bn_model(), {"lr": 0.5, "reset": "never"}, e_margin=10.0, reset_constant=None)
    probe.eval()(x)
    ema1 = probe.ema
    probe(x)
    constant = (ema1 + probe.ema) / 2  # the second step's average falls under it, the first's does not
    model = bn_model()
    initial = state(model)
    engine = get_engine("sar")(model, {"lr": 0.5, "reset": "never"}, e_margin=10.0, reset_constant=constant)
    built.clear()
    engine.eval()(x)
    [(optimizer, at_construction)] = built
    assert at_construction["state"] == {} and engine.optimizer is optimizer
    assert optimizer.state_dict()["state"], "the first step left momentum buffers"
    engine(x)
    assert engine.num_recoveries == 1 and engine.optimizer is optimizer and len(built) == 1
    after = optimizer.state_dict()
    assert after["state"] == {} and after["param_groups"] == at_construction["param_groups"]
    assert same(state(model), initial), "the weights are not the saved ones bit for bit"
    twin, _ = hand_sar(model, x, 10.0, rho=0.05, lr=0.5, steps=1)  # one step from theta0, no momentum yet
    engine(x)
    assert engine.num_recoveries == 1
    assert_params_close(model, twin)


def test_no_recovery_while_the_average_stays_above_the_constant():
    model = bn_model()
    initial = state(model)
    engine = get_engine("sar")(model, {"lr": 0.5, "reset": "never"}, e_margin=10.0, reset_constant=0.0)
    for _ in range(3):
        engine.eval()(x_batch())
    assert engine.num_recoveries == 0 and engine.ema is not None and not same(state(model), initial)


def test_reset_starts_the_average_over():
    engine = get_engine("sar")(bn_model(), {"lr": 0.5, "reset": "per_domain"}, e_margin=10.0)
    engine.eval()(x_batch())
    assert engine.ema is not None
    engine.reset()
    assert engine.ema is None


# -- steps that update nothing ----------------------------------------------------------------------------
def test_nothing_is_updated_when_no_sample_passes_the_filter():
    """E0 = 0: no entropy is under it.  No step at all: parameters and SGD momentum buffers as they were
    (the official code would still call SGD's step with zero gradients and move by the momentum buffer),
    the average unchanged, loss 0, the prediction that of the unchanged model."""
    model, x = bn_model(), x_batch()
    engine = get_engine("sar")(
        model, {"lr": 0.5, "reset": "never"}, e_margin=10.0, reset_constant=None
    ).eval()
    engine(x)  # a real step first: momentum buffers and an average exist
    params = state(model)
    momentum = {id(p): s["momentum_buffer"].clone() for p, s in engine.optimizer.state.items()}
    ema = engine.ema
    engine.e_margin = 0.0
    out, loss = engine(x_batch(seed=2))
    assert engine.last_selected == (0, 0) and float(loss) == 0.0
    assert same(state(model), params)
    assert all(torch.equal(s["momentum_buffer"], momentum[id(p)]) for p, s in engine.optimizer.state.items())
    assert engine.ema == ema
    with torch.no_grad(), batch_statistics(model):
        assert torch.equal(out, model(x_batch(seed=2)))
    assert all(p.grad is None for p in model.parameters())


def test_nothing_is_updated_when_no_sample_passes_again_at_the_perturbed_point():
    """E0 between the two smallest entropies: one sample passes at ``theta``; the ascent to ``theta + eps``
    raises its entropy above E0, so the second filter keeps none: back to ``theta`` exactly, no step.
    (Affine parameters off 1 and 0, so that subtracting eps again would not give them back bit for bit.)"""
    model, x = bn_model(), x_batch()
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        model[1].weight.copy_(torch.rand(4, generator=g) + 0.5)
        model[1].bias.copy_(torch.randn(4, generator=g) * 0.3)
    ent = batch_entropies(model, x).sort().values
    margin = float(ent[0] + ent[1]) / 2
    _, [(_, kept1, _, kept2, _)] = hand_sar(model, x, margin, rho=0.5, lr=0.5)
    assert int(kept1.sum()) == 1 and int(kept2.sum()) == 0, "the premise"
    before = state(model)
    engine = get_engine("sar")(model, {"lr": 0.5, "reset": "never"}, e_margin=margin, rho=0.5).eval()
    _, loss = engine(x)
    assert engine.last_selected == (1, 0) and float(loss) == 0.0
    assert same(state(model), before), "theta + eps was not undone bit for bit"
    assert not engine.optimizer.state and engine.ema is None


class ConstantOutput(nn.Module):
    """LayerNorm -> a linear layer with zero weights: the logits are its bias whatever the LayerNorm does,
    so the entropy's gradient w.r.t. the LayerNorm's parameters is exactly zero."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([4.0, 0.0, -1.0]))

    def forward(self, x):
        return self.head(self.norm(x.flatten(1)))


def test_zero_gradient_norm_perturbs_by_zero_and_stays_finite():
    model = ConstantOutput().eval()
    before = state(model)
    # only the LayerNorm adapts
    engine = get_engine("sar")(model, {"lr": 0.5, "reset": "never"}, reset_constant=None).eval()
    out, loss = engine(torch.randn(4, 8))
    expected = entropy_by_hand(model.head.bias.detach().unsqueeze(0))[0]
    assert engine.last_selected == (4, 4) and torch.isfinite(out).all()
    torch.testing.assert_close(loss, expected)
    assert same(state(model), before), "a zero gradient moved the parameters"
    assert engine.ema == pytest.approx(float(expected))
    zero = sam_perturbation([torch.zeros(3), torch.zeros(2)], 0.05)
    assert [t.tolist() for t in zero] == [[0.0] * 3, [0.0] * 2]


def test_sam_perturbation_by_hand():
    """``rho * g / ||g||`` with one norm over all tensors: ``||(3, 4), (12)|| = 13``."""
    eps = sam_perturbation([torch.tensor([3.0, 4.0]), torch.tensor([12.0])], 0.13)
    torch.testing.assert_close(eps[0], torch.tensor([0.03, 0.04]))
    torch.testing.assert_close(eps[1], torch.tensor([0.12]))
    assert update_ema(None, 0.7) == 0.7 and update_ema(0.5, 1.5) == pytest.approx(0.6)


# -- what adapts -----------------------------------------------------------------------------------------
class TwoStage(nn.Module):
    def __init__(self, n_blocks: int = 12):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.layer3 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.Sequential(*[nn.LayerNorm(4) for _ in range(n_blocks)])
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = self.layer4(self.layer3(self.stem(x))).mean((2, 3))
        return self.head(self.norm(self.blocks(h)))


def test_excluded_top_layers_stay_fixed_but_normalise_with_batch_statistics():
    """``exclude`` names modules whose norm layers do not adapt (the official ResNet / ViT-B choices are
    :data:`RESNET_TOP_LAYERS` / :data:`VIT_BASE_TOP_LAYERS`); a name covers its subtree only
    (``blocks.1`` is not ``blocks.10``); the excluded BatchNorm still uses the test batch's statistics."""
    names = lambda e: {n for n, _ in e.adapted_parameters()}  # noqa: E731
    every = names(get_engine("sar")(TwoStage()))
    assert len(every) == 2 * (2 + 12 + 1)
    vit = names(get_engine("sar")(TwoStage(), exclude=VIT_BASE_TOP_LAYERS))
    assert vit == {f"model.blocks.{i}.{w}" for i in range(9) for w in ("weight", "bias")} | {
        f"model.layer{k}.1.{w}" for k in (3, 4) for w in ("weight", "bias")
    }
    assert names(get_engine("sar")(TwoStage(), exclude=["blocks.1"])) == every - {
        "model.blocks.1.weight", "model.blocks.1.bias"
    }  # fmt: skip
    model = TwoStage().eval()
    x = torch.randn(6, 1, 6, 6) * 3 + 1
    with torch.no_grad(), batch_statistics(model):
        reference = model(x)
    before = state(model)
    engine = get_engine("sar")(model, {"lr": 0.5, "num_steps": 0}, e_margin=10.0, exclude=RESNET_TOP_LAYERS)
    out, _ = engine.eval()(x)
    assert torch.equal(out, reference), "layer4's BatchNorm must normalise with the batch's statistics"
    engine.optimization_parameters.update(num_steps=1, reset="never")
    engine(x)
    changed = {k for k, v in state(model).items() if not torch.equal(v, before[k])}
    assert changed and not {k for k in changed if k.startswith("layer4.")}
    assert changed <= {n.removeprefix("model.") for n in names(engine)}


def test_bad_arguments_are_errors_naming_the_value():
    with pytest.raises(ConfigError, match=r"'layer5' is not a module of TwoStage"):
        get_engine("sar")(TwoStage(), exclude=["layer5"])
    with pytest.raises(InvalidInputError, match="leaves no normalisation parameters"):
        get_engine("sar")(TwoStage(), exclude=["layer3", "layer4", "blocks", "norm"])
    with pytest.raises(ConfigError, match="rho must be a number >= 0"):
        get_engine("sar")(TwoStage(), rho=-0.1)
    with pytest.raises(ConfigError, match="reset_constant"):
        get_engine("sar")(TwoStage(), reset_constant=float("nan"))
    with pytest.raises(InvalidInputError, match="normalisation"):
        get_engine("sar")(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    assert get_engine("sar")(TwoStage(), exclude="layer4").exclude == ("layer4",)


def test_default_margin_and_optimizer_are_the_official_ones():
    engine = get_engine("sar")(bn_model())
    assert engine.margin(1000) == pytest.approx(0.4 * math.log(1000))
    assert engine.margin(10) == pytest.approx(0.4 * math.log(10))
    settings = engine.optimization_parameters
    assert (settings["num_steps"], settings["optimizer_name"], settings["lr"], settings["momentum"]) == (
        1, "sgd", 2.5e-4, 0.9
    )  # fmt: skip
    assert (engine.rho, engine.reset_constant, engine.exclude) == (0.05, 0.2, ())


def test_upstream_learning_rates():
    """The official ``main.py``: ResNet-50 (BN/GN) 2.5e-4 from batch 32, else 2.5e-4 * bs / 64 * 2; ViT-B
    1e-3 * bs / 64; SAR doubles either at batch size 1."""
    assert upstream_lr("resnet50", 64) == pytest.approx(2.5e-4)
    assert upstream_lr("resnet50", 32) == pytest.approx(2.5e-4)
    assert upstream_lr("resnet50", 16) == pytest.approx(1.25e-4)
    assert upstream_lr("resnet50", 1) == pytest.approx(1.5625e-5)
    assert upstream_lr("vit_base", 64) == pytest.approx(1e-3)
    assert upstream_lr("vit_base", 1) == pytest.approx(3.125e-5)
    with pytest.raises(ConfigError, match="architecture"):
        upstream_lr("resnet18", 64)
    with pytest.raises(ConfigError, match="batch_size"):
        upstream_lr("vit_base", 0)


def test_train_mode_loss_is_the_filtered_mean_entropy_with_a_graph():
    model, x = bn_model(), x_batch()
    engine = get_engine("sar")(model).train()
    outputs, loss = engine(x)
    ent = entropy_by_hand(outputs.detach().double())
    kept = ent < 0.4 * math.log(5)
    assert kept.any() and not kept.all()
    torch.testing.assert_close(loss.double(), ent[kept].mean(), rtol=1e-5, atol=1e-7)
    assert loss.requires_grad
    engine.e_margin = 0.0
    _, none = engine(x)
    assert float(none.detach()) == 0.0 and none.requires_grad
