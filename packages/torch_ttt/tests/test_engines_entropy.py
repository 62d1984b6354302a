"""The maths of the entropy-style engines (TENT, EATA, DeYO, MEMO) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tttlab.core.errors import InvalidInputError, TTTLabError
from tttlab.torch_ttt import get_engine
from tttlab.torch_ttt.engine.deyo_engine import deyo_weights, patch_shuffle, plpd
from tttlab.torch_ttt.engine.eata_engine import UPSTREAM_E_MARGIN, eata_selection, update_model_probs
from tttlab.torch_ttt.norm import (
    batch_statistics,
    entropy,
    marginal_entropy,
    norm_affine_parameters,
    prior_mixed_statistics,
)


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(3), nn.Flatten(),
        nn.Linear(36, 5),
    )  # fmt: skip
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 1, 12, 12) * 0.5)
    return m.eval()


def plain_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 5)).eval()


def x_batch(n: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 12, 12, generator=g) * 2 + 0.5


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def entropy64(logits: torch.Tensor) -> torch.Tensor:
    p = logits.double().softmax(-1)
    return -(p * p.log()).sum(-1)


# -- TENT --------------------------------------------------------------------------------------------
def test_tent_predicts_with_test_batch_statistics_after_its_step():
    m = bn_model()
    x = x_batch()
    with torch.no_grad():
        train_stats = m(x)
        with batch_statistics(m):
            test_stats = m(x)
    engine = get_engine("tent")(m, {"num_steps": 0}).eval()
    out0, _ = engine(x)
    assert torch.equal(out0, test_stats) and not torch.allclose(out0, train_stats, atol=1e-3)
    engine.optimization_parameters.update(num_steps=1, reset="per_domain", lr=0.01)
    out1, loss = engine(x)
    with torch.no_grad(), batch_statistics(m):
        adapted = m(x)
    assert torch.equal(out1, adapted) and not torch.allclose(out1, test_stats)
    assert torch.allclose(loss.double(), entropy64(test_stats).mean(), atol=1e-5)  # the loss before the step


def test_tent_without_normalisation_layers_is_an_error():
    with pytest.raises(TTTLabError, match="normalisation"):
        get_engine("tent")(plain_model())
    for name in ("eata", "deyo"):
        with pytest.raises(InvalidInputError, match="normalisation"):
            get_engine(name)(plain_model())


def test_tent_adapts_a_layernorm_model_on_a_single_image():
    """Batch size 1 is a TENT setting for GroupNorm/LayerNorm models (the DeYO and SAR papers' bs1 runs):
    the engine takes one Adam step on the entropy of that image and predicts; only BatchNorm models need 2
    samples.  Reference: Adam's first step moves each parameter by ``lr * g / (|g| + eps)``."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(144, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5)).eval()
    x = x_batch(1)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    norm = m[2]
    loss_before = entropy(m(x)).mean()
    grads = torch.autograd.grad(loss_before, [norm.weight, norm.bias])
    with torch.no_grad():
        stepped = dict(ref)
        stepped["2.weight"] = norm.weight - 1e-2 * grads[0] / (grads[0].abs() + 1e-8)
        stepped["2.bias"] = norm.bias - 1e-2 * grads[1] / (grads[1].abs() + 1e-8)
        twin = nn.Sequential(nn.Flatten(), nn.Linear(144, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5))
        twin.load_state_dict(stepped)
        expected = twin.eval()(x)
    engine = get_engine("tent")(m, {"lr": 1e-2}).eval()
    out, loss = engine(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, loss_before.detach())  # the loss of the step, before the update
    assert same(state(m), ref), "reset per batch restores the LayerNorm parameters"
    with pytest.raises(InvalidInputError, match="batch of size 0"):
        get_engine("tent")(bn_model()).eval()(x_batch(1)[:0])


@pytest.mark.parametrize("predict_before_update", [False, True])
def test_tent_on_one_image_uses_its_spatial_batch_statistics(predict_before_update):
    """Batch size 1 on a conv-BN model (the SAR paper's TENT setting, the official code's behaviour): the
    BatchNorm2d normalises with the image's statistics over its spatial positions, exactly as PyTorch's
    train-mode BatchNorm2d; the step is one Adam step on the entropy of that forward."""
    m = bn_model()
    x = x_batch(1, seed=3)
    ref = state(m)
    bn = m[1]
    with torch.enable_grad():
        h = m[0](x).detach()
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        w = bn.weight.detach().clone().requires_grad_()
        b = bn.bias.detach().clone().requires_grad_()

        def by_hand(w, b):
            y = (h - mean) / torch.sqrt(var + bn.eps) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
            return m[5](m[4](m[3](m[2](y))))

        logits_before = by_hand(w, b)
        loss_before = entropy(logits_before).mean()
        loss_before.backward()
        opt = torch.optim.Adam([w, b], lr=1e-3)
        opt.step()
    with torch.no_grad():
        m.train()
        torch.testing.assert_close(m(x), logits_before.detach(), rtol=1e-5, atol=1e-6)  # PyTorch agrees
        m.load_state_dict(ref)
        m.eval()
        expected = logits_before.detach() if predict_before_update else by_hand(w, b)
    engine = get_engine("tent")(m, {"lr": 1e-3}, predict_before_update=predict_before_update).eval()
    out, loss = engine(x)
    torch.testing.assert_close(loss, loss_before.detach())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(by_hand(w, b), logits_before, atol=1e-6)  # the step changed the prediction
    assert same(state(m), ref), "reset per batch restores the BatchNorm parameters"
    engine.optimization_parameters["reset"] = "never"
    engine(x)
    torch.testing.assert_close(bn.weight, w.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bn.bias, b.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(bn.running_mean, ref["1.running_mean"])  # running statistics untouched
    assert torch.equal(bn.running_var, ref["1.running_var"])


# -- EATA --------------------------------------------------------------------------------------------
def hand_fisher(m: nn.Module, batches) -> dict[str, torch.Tensor]:
    bn = m[1]
    total = {"weight": torch.zeros(4, dtype=torch.float64), "bias": torch.zeros(4, dtype=torch.float64)}
    for x in batches:
        with batch_statistics(m):
            out = m(x)
        loss = nn.functional.cross_entropy(out, out.argmax(-1))
        gw, gb = torch.autograd.grad(loss, [bn.weight, bn.bias])
        total["weight"] += gw.double() ** 2
        total["bias"] += gb.double() ** 2
    return {k: v / len(batches) for k, v in total.items()}


def test_eata_fisher_calibration_and_regulariser():
    m = bn_model()
    batches = [x_batch(8, seed=s) for s in (20, 21, 22)]
    expected = hand_fisher(m, batches)
    engine = get_engine("eata")(m, fisher_alpha=3.0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat(batches), torch.zeros(24, dtype=torch.long)), batch_size=8
    )
    fishers = engine.compute_fishers(loader)  # a DataLoader of (x, y) batches (upstream raised here)
    assert set(fishers) == {"model.1.weight", "model.1.bias"}
    assert torch.allclose(fishers["model.1.weight"][0].double(), expected["weight"], rtol=1e-4, atol=1e-10)
    assert torch.allclose(fishers["model.1.bias"][0].double(), expected["bias"], rtol=1e-4, atol=1e-10)
    assert all(p.grad is None for p in m.parameters()), "calibration leaves .grad alone"
    assert engine.compute_fishers(batches).keys() == fishers.keys()  # a plain list of tensors works too
    assert engine.fisher_regularizer().item() == 0.0
    with torch.no_grad():
        m[1].weight[0] += 0.5
    reg = engine.fisher_regularizer()
    f_w0 = engine.fishers["model.1.weight"][0][0]
    assert reg.item() > 0 and torch.allclose(reg, 3.0 * f_w0 * 0.25)
    # upstream-style keys (the model's own parameter names) are understood too
    upstream_keys = {k.removeprefix("model."): v for k, v in engine.fishers.items()}
    other = get_engine("eata")(m, fisher_alpha=3.0, fishers=upstream_keys)
    assert torch.equal(other.fisher_regularizer(), reg)
    with pytest.raises(InvalidInputError, match="no batches"):
        engine.compute_fishers([])


def test_eata_fisher_calibration_on_single_images():
    """Batches of one image calibrate a conv-BN model (spatial statistics, as the adaptation); on
    ``mnist_bn`` (a BatchNorm1d on the flat fc1 features) a batch of one is a clear error naming that layer,
    raised before any gradient is taken."""
    from tttlab.torch_ttt.models import MnistBNNet

    m = bn_model()
    batches = [x_batch(1, seed=s) for s in (40, 41, 42)]
    fishers = get_engine("eata")(m).compute_fishers(batches)
    expected = hand_fisher(m, batches)
    assert torch.allclose(fishers["model.1.weight"][0].double(), expected["weight"], rtol=1e-4, atol=1e-10)
    assert torch.allclose(fishers["model.1.bias"][0].double(), expected["bias"], rtol=1e-4, atol=1e-10)
    torch.manual_seed(0)
    mnist = MnistBNNet().eval()
    engine = get_engine("eata")(mnist)
    with pytest.raises(
        InvalidInputError, match=r"Fisher calibration batch: BatchNorm layer 'bn3' \(BatchNorm1d\)"
    ):
        engine.compute_fishers([torch.randn(2, 1, 28, 28), torch.randn(1, 1, 28, 28)])
    assert engine.fishers is None and all(p.grad is None for p in mnist.parameters())


@pytest.mark.parametrize("name", ["tent", "eata", "deyo", "sar", "bn"])
def test_mnist_bn_refuses_a_single_image_before_any_update(name):
    """``mnist_bn`` normalises its flat fc1 features with a BatchNorm1d: one image gives it one value per
    channel (PyTorch's train-mode BatchNorm1d raises ValueError); the engines say which layer, its input
    shape and what it needs, and nothing in the model changes; a last batch of 2 adapts as before."""
    from tttlab.torch_ttt.models import MnistBNNet

    torch.manual_seed(0)
    mnist = MnistBNNet().eval()
    ref = state(mnist)
    engine = get_engine(name)(mnist, {"num_steps": 0 if name == "bn" else 1, "reset": "never"}).eval()
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(InvalidInputError, match=r"'bn3' \(BatchNorm1d\) gets an input of shape \(1, 64\)"):
        engine(x[:1])
    assert same(state(mnist), ref)
    out, _ = engine(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_eata_loss_is_weighted_entropy_plus_regulariser():
    m = bn_model()
    engine = get_engine("eata")(m, e_margin=10.0, fisher_alpha=5.0).eval()
    engine.compute_fishers([x_batch(8, seed=30)])
    with torch.no_grad():
        m[1].bias += 0.1
    x = x_batch()
    with torch.no_grad(), batch_statistics(m):
        ent = entropy64(m(x))
    expected = (ent * torch.exp(-(ent - 10.0))).mean() + engine.fisher_regularizer().double()
    with engine.inference_context():
        loss = engine.adapt_loss(x)
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    assert engine.last_selected == 8 and engine.current_model_probs.shape == (5,)


def test_eata_selection_hand_case():
    ent = torch.tensor([0.1, 0.3, 0.9, 0.2])
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]])
    # entropy filter only (no moving average yet)
    assert eata_selection(ent, probs, None, 0.5, 0.05).tolist() == [True, True, False, True]
    # cosines to m = (1, 0, 0): 1, 0, 0, 0.6 -> |cos| < 0.7 keeps samples 1 and 3 (2 fails the entropy test)
    m = torch.tensor([1.0, 0.0, 0.0])
    assert eata_selection(ent, probs, m, 0.5, 0.7).tolist() == [False, True, False, True]
    assert eata_selection(ent, probs, m, 0.5, 0.5).tolist() == [False, True, False, False]
    assert eata_selection(ent, probs, m, 0.5, None).tolist() == [True, True, False, True]
    # moving average: first mean, then 0.9 m + 0.1 mean, unchanged by an empty selection
    first = update_model_probs(None, probs[:2])
    assert torch.equal(first, torch.tensor([0.5, 0.5, 0.0]))
    assert torch.allclose(update_model_probs(first, probs[2:3]), torch.tensor([0.45, 0.45, 0.1]))
    assert update_model_probs(first, probs[:0]) is first and update_model_probs(None, probs[:0]) is None


def test_eata_select_weights_and_default_margin():
    engine = get_engine("eata")(bn_model(), e_margin=0.5, d_margin=0.9)
    confident = torch.tensor([[10.0, 0, 0, 0, 0], [0, 10.0, 0, 0, 0]])
    keep, ent, weights, _ = engine.select(torch.cat([confident, torch.zeros(1, 5)]))  # ln 5 > 0.5
    assert keep.tolist() == [0, 1] and torch.allclose(weights, 1 / torch.exp(ent - 0.5))
    default = get_engine("eata")(bn_model())
    assert default.margin(5) == 0.4 * math.log(5) and default.margin(1000) == 0.4 * math.log(1000)
    assert get_engine("eata")(bn_model(), e_margin=UPSTREAM_E_MARGIN).margin(5) == UPSTREAM_E_MARGIN


def test_eata_no_step_without_selected_samples_and_moving_average_reset():
    m = bn_model()
    before = state(m)
    engine = get_engine("eata")(m, {"reset": "per_domain", "lr": 0.1, "optimizer_name": "adam"}, e_margin=0.0)
    engine.eval()(x_batch())
    assert engine.last_selected == 0 and same(before, state(m)), "nothing selected: no step"
    assert engine.current_model_probs is None
    engine.e_margin = 10.0
    engine(x_batch())
    assert engine.last_selected == 8 and engine.current_model_probs is not None
    assert not same(before, state(m))
    engine.reset()
    assert same(before, state(m)) and engine.current_model_probs is None


# -- DeYO --------------------------------------------------------------------------------------------
def test_plpd_and_weights_hand_case():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    destroyed = torch.tensor([[0.3, 0.5, 0.2], [0.2, 0.2, 0.6]])
    assert torch.allclose(plpd(probs, destroyed), torch.tensor([0.4, 0.0]))
    ent, values = torch.tensor([0.5, 1.0]), torch.tensor([0.4, 0.0])
    expected = 2.0 * torch.exp(-(ent - 0.8)) + 3.0 * torch.exp(values)
    assert torch.allclose(deyo_weights(ent, values, 0.8, 2.0, 3.0), expected)
    assert torch.equal(deyo_weights(ent, values, 0.8, 0.0, 0.0), torch.ones(2))


def test_patch_shuffle_permutes_patches():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    y = patch_shuffle(x, 4, torch.Generator().manual_seed(0))

    def patches(t):  # (B, 16 patches, 3*2*2 values)
        return t.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 12)

    px, py = patches(x), patches(y)
    assert not torch.equal(x, y)
    for b in range(2):  # same patches, other order
        assert torch.equal(px[b][px[b, :, 0].argsort()], py[b][py[b, :, 0].argsort()])
    assert torch.equal(patch_shuffle(x, 1), x)
    odd = torch.randn(2, 1, 10, 10)
    assert patch_shuffle(odd, 4).shape == odd.shape
    with pytest.raises(InvalidInputError, match="NCHW"):
        patch_shuffle(torch.randn(4, 10), 2)


def test_deyo_loss_hand_case():
    m = bn_model()
    x = x_batch()
    engine = get_engine("deyo")(
        m, e_margin=10.0, plpd_thresh=-2.0, ent_norm=0.7, reweight_ent=1.0, reweight_plpd=2.0,
        generator=torch.Generator().manual_seed(4),
    ).eval()  # fmt: skip
    with torch.no_grad(), batch_statistics(m):
        out = m(x)
        shuffled = m(patch_shuffle(x, 4, torch.Generator().manual_seed(4)))
    ent = entropy64(out)
    values = plpd(out.double().softmax(-1), shuffled.double().softmax(-1))
    expected = (ent * (torch.exp(-(ent - 0.7)) + 2.0 * torch.exp(values))).mean()
    with engine.inference_context():
        loss = engine.adapt_loss(x)
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    assert engine.last_selected == (8, 8)


def test_deyo_filters_and_defaults():
    m = bn_model()
    before = state(m)
    engine = get_engine("deyo")(m, {"reset": "per_domain", "lr": 0.1}, e_margin=10.0, plpd_thresh=1.0)
    engine.eval()(x_batch())
    assert engine.last_selected == (8, 0) and same(before, state(m)), "PLPD filter keeps nothing: no step"
    engine.plpd_thresh = -2.0
    engine(x_batch())
    assert engine.last_selected == (8, 8) and not same(before, state(m))
    engine.reset()
    assert same(before, state(m))
    e_margin, ent_norm = get_engine("deyo")(bn_model()).margins(1000)
    assert e_margin == 0.5 * math.log(1000) and ent_norm == 0.4 * math.log(1000)
    # one kept sample on a BatchNorm model: the whole batch is shuffled, no error
    one = get_engine("deyo")(bn_model(), e_margin=10.0, plpd_thresh=-2.0).eval()
    x = x_batch(4)
    ents = entropy(one.predict(x))
    one.e_margin = float(ents.min()) + 1e-6
    with one.inference_context():
        one.adapt_loss(x)
    assert one.last_selected == (1, 1)


# -- MEMO --------------------------------------------------------------------------------------------
def fixed_views(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Three deterministic views per image: (3, N, C, H, W)."""
    return torch.stack([x, x.flip(-1), 0.5 * x.roll(2, dims=-2)])


def test_marginal_entropy_matches_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, 7, generator=g) * 5
    p = logits.double().softmax(-1).mean(0)
    expected = -(p * p.log()).sum(-1)
    assert torch.allclose(marginal_entropy(logits).double(), expected, atol=1e-6)
    extreme = torch.tensor([[[1000.0, 0.0]], [[0.0, 1000.0]]])  # two confident, opposite views
    assert torch.allclose(marginal_entropy(extreme), torch.tensor([math.log(2)]))


@pytest.mark.parametrize("make", [bn_model, plain_model])
def test_memo_loss_is_mean_marginal_entropy(make):
    m = make()
    x = x_batch(3)
    engine = get_engine("memo")(m, augmentations=fixed_views, per_sample=False).eval()
    views = fixed_views(x).reshape(9, 1, 12, 12)
    ctx = prior_mixed_statistics(m, 16.0) if make is bn_model else torch.no_grad()
    with torch.no_grad(), ctx:
        logits = m(views).reshape(3, 3, 5).double()
    p = logits.softmax(-1).mean(0)
    expected = (-(p * p.log()).sum(-1)).mean()
    with engine.inference_context():
        loss = engine.adapt_loss(x)
    assert torch.allclose(loss.double(), expected, atol=1e-6)


@pytest.mark.parametrize("make", [bn_model, plain_model])
@pytest.mark.parametrize("per_sample", [True, False])
def test_memo_runs_and_restores(make, per_sample):
    m = make()
    before = state(m)
    x = x_batch(3)
    engine = get_engine("memo")(m, {"lr": 0.05}, n_augmentations=4, per_sample_bn=per_sample, seed=0)
    out, loss = engine.eval()(x)
    assert out.shape == (3, 5) and torch.isfinite(loss) and loss.item() > 0
    assert same(before, state(m)), "episodic by default: restored exactly"
    engine.optimization_parameters["num_steps"] = 0
    assert not torch.allclose(engine(x)[0], out), "the step changed the prediction"


def test_memo_bn_prior_strength_16():
    m = bn_model()
    x = x_batch(4)
    engine = get_engine("memo")(m, {"num_steps": 0}, per_sample=False).eval()
    assert engine.prior_strength == 16
    out, _ = engine(x)
    bn = m[1]
    feats = m[0](x)
    w = 16.0 / 17.0
    mean = w * bn.running_mean + (1 - w) * feats.mean((0, 2, 3))
    var = w * bn.running_var + (1 - w) * feats.var((0, 2, 3), unbiased=True)  # unbiased, as the MEMO code
    with torch.no_grad():
        normed = (feats - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
        h = normed * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
        expected = m[5](m[4](m[3](m[2](h))))
        train_stats, test_stats = m(x), None
        with batch_statistics(m):
            test_stats = m(x)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, train_stats, atol=1e-4) and not torch.allclose(out, test_stats, atol=1e-4)


def test_augmix_views():
    from tttlab.torch_ttt.memo_augment import AUGMIX_OPS, _equalize, augmix

    x = x_batch(3) * 0.7 - 1.0
    v = augmix(x, 5, torch.Generator().manual_seed(0))
    assert v.shape == (5, 3, 1, 12, 12) and torch.isfinite(v).all()
    assert torch.equal(v, augmix(x, 5, torch.Generator().manual_seed(0)))
    lo, hi = x.amin((1, 2, 3)), x.amax((1, 2, 3))  # every view stays in its image's own range
    assert (v.amin((2, 3, 4)) >= lo - 1e-5).all() and (v.amax((2, 3, 4)) <= hi + 1e-5).all()
    for op in AUGMIX_OPS:  # each operation alone runs and changes some image
        assert not torch.equal(
            augmix(x, 2, torch.Generator().manual_seed(1), ops=(op,)), x.expand(2, -1, -1, -1, -1)
        )
    u = torch.zeros(1, 1, 4, 4)
    u[0, 0, 0, :2], u[0, 0, 1] = 0.5, 1.0  # 10 pixels at 0, 2 at 0.5, 4 at 1
    eq = _equalize(u)
    assert torch.allclose(eq[0, 0, 0, :2], torch.tensor([1 / 3, 1 / 3])) and (eq[0, 0, 1] == 1).all()
    assert (eq[0, 0, 2:] == 0).all(), "equal pixels stay equal (the background is not spread)"
    with pytest.raises(ValueError, match="unknown AugMix"):
        augmix(x, 2, ops=("blur",))


def test_memo_augmentation_options():
    m = bn_model()
    x = x_batch(2)
    out, loss = get_engine("memo")(m, augmentations="augmix", n_augmentations=3, seed=0).eval()(x)
    assert out.shape == (2, 5) and torch.isfinite(loss)

    def n_view_fn(x, n_views, generator=None):
        return x.unsqueeze(0).repeat(n_views, 1, 1, 1, 1)

    engine = get_engine("memo")(m, augmentations=n_view_fn, n_augmentations=4).eval()
    assert engine.views(x).shape == (4, 2, 1, 12, 12)
    per_image = get_engine("memo")(m, augmentations=lambda img: img.flip(-1), n_augmentations=3).eval()
    assert torch.equal(per_image.views(x)[1], x.flip(-1))
    with pytest.raises(InvalidInputError, match="augmentations"):
        get_engine("memo")(m, augmentations="cutout")
    bad = get_engine("memo")(m, augmentations=lambda x, g: x).eval()
    with pytest.raises(InvalidInputError, match="views shaped"):
        bad(x)


#: the engines with ``predict_before_update`` and settings under which every sample adapts
PREDICT_BEFORE_UPDATE = {
    "tent": {},
    "eata": {"e_margin": 10.0},
    "deyo": {"e_margin": 10.0, "plpd_thresh": -1.0},
    "sar": {"e_margin": 10.0},
}


@pytest.mark.parametrize("name", sorted(PREDICT_BEFORE_UPDATE))
def test_predict_before_update_returns_the_adaptation_forward_without_a_second_pass(name, monkeypatch):
    """``predict_before_update=True``: the batch's prediction is the logits of the forward that computed its
    loss (before the update), with one model forward fewer than the default; the kept logits are
    dropped when the batch is done, also when it fails half-way."""
    x = x_batch()
    with torch.no_grad(), batch_statistics(m := bn_model()):
        test_stats = m(x)
    forwards, outs = {}, {}
    for before in (True, False):
        m = bn_model()
        engine = get_engine(name)(m, {"lr": 0.1}, predict_before_update=before, **PREDICT_BEFORE_UPDATE[name])
        engine.eval()
        calls = []
        handle = m.register_forward_hook(lambda mod, args, out, calls=calls: calls.append(out.shape[0]))
        outs[before], _ = engine(x)
        handle.remove()
        forwards[before] = len(calls)
        assert engine._adapt_outputs is None
    assert torch.equal(outs[True], test_stats), "the logits of the forward that computed the loss"
    assert not torch.equal(outs[False], test_stats), "the default predicts after the update"
    assert forwards[True] == forwards[False] - 1, "no prediction pass"

    def failing_step(*a, real=engine.adapt_step, **kw):
        real(*a, **kw)
        raise RuntimeError("half-way")

    engine.predict_before_update = True
    monkeypatch.setattr(engine, "adapt_step", failing_step)
    with pytest.raises(RuntimeError, match="half-way"):
        engine(x)
    assert engine._adapt_outputs is None  # a later batch never sees this batch's logits


def test_predict_before_update_takes_only_true_or_false():
    """``+engine.kwargs.predict_before_update=maybe`` (a string from the command line) was kept as given and
    read as true: the evaluation ran with the official codes' prediction and recorded 'maybe'.  Every engine
    with the option refuses a non-bool at construction (a ConfigError naming it), and on a later assignment."""
    from tttlab.core.errors import ConfigError

    for name in sorted(PREDICT_BEFORE_UPDATE):
        for bad in ("maybe", "false", 1, None):
            with pytest.raises(ConfigError, match=r"^predict_before_update=.*: expected True or False$"):
                get_engine(name)(bn_model(), predict_before_update=bad)
        engine = get_engine(name)(bn_model(), predict_before_update=True)
        assert engine.predict_before_update is True
        with pytest.raises(ConfigError, match="predict_before_update='no'"):
            engine.predict_before_update = "no"
        assert engine.predict_before_update is True


@pytest.mark.parametrize("name", sorted(PREDICT_BEFORE_UPDATE))
def test_predict_before_update_with_several_steps_returns_the_last_steps_forward_as_the_official_code(name):
    """With ``num_steps=2`` the official TENT/EATA/DeYO loop (``for _ in range(steps): outputs =
    forward_and_adapt(x)``) returns the logits of the second step's forward: the model after ONE update.
    So ``predict_before_update=True`` with 2 steps must equal the after-update prediction of the same engine
    with 1 step, and must not be the logits before any update."""
    x = x_batch()
    with torch.no_grad(), batch_statistics(m := bn_model()):
        before_any_update = m(x)
    outs = {}
    for steps, before in ((2, True), (1, False)):
        kwargs = dict(PREDICT_BEFORE_UPDATE[name])
        if name == "deyo":  # the same patch permutations in both runs
            kwargs["generator"] = torch.Generator().manual_seed(3)
        engine = get_engine(name)(
            bn_model(), {"lr": 0.1, "num_steps": steps}, predict_before_update=before, **kwargs
        )
        outs[steps], _ = engine.eval()(x)
    torch.testing.assert_close(outs[2], outs[1], rtol=0, atol=0)
    assert not torch.allclose(outs[2], before_any_update, atol=1e-4), (
        "the first step's logits (before any update)"
    )


# -- several batches, state carried over (continual) -------------------------------------------------
def _reference_copy(model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    """The model as the TENT/EATA/DeYO code configures it: train mode, BatchNorm without running statistics
    (so always the batch's), only the BatchNorm affine parameters trainable."""
    import copy

    ref = copy.deepcopy(model).train().requires_grad_(False)
    params = []
    for layer in ref.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.track_running_stats, layer.running_mean, layer.running_var = False, None, None
            layer.requires_grad_(True)
            params += [layer.weight, layer.bias]
    return ref, params


def _stream_model() -> nn.Module:
    """A BatchNorm net whose confident predictions vary across classes, so EATA's redundancy filter and
    DeYO's PLPD filter keep some samples and reject others over the stream."""
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(128, 10))
    with torch.no_grad():
        m[1].running_mean.normal_(), m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5), m[1].bias.normal_()
        m[4].weight.mul_(6.0)
    return m.eval()


@pytest.mark.parametrize("name", ["tent", "eata", "deyo"])
def test_a_continual_stream_equals_the_official_loop_batch_for_batch(name):
    """Four batches without reset: predictions (the official logits, before each batch's update) and final
    affine parameters equal the official per-batch loop written out (TENT: Adam; EATA: SGD with momentum,
    moving average, redundancy filter and Fisher term; DeYO: SGD with momentum, patch shuffle, PLPD filter),
    so the optimizer state, EATA's moving average and the parameters carry over exactly as there."""
    batches = [
        torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(20 + i)) * 2 for i in range(4)
    ]
    ref, params = _reference_copy(_stream_model())
    log_c = math.log(10)
    if name == "tent":
        engine = get_engine("tent")(_stream_model(), {"reset": "never"}, predict_before_update=True)
        opt = torch.optim.Adam(params, lr=1e-3)
    else:
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if name == "eata":
        e0, eps, alpha = 0.5 * log_c, 0.6, 50.0
        engine = get_engine("eata")(_stream_model(), {"reset": "never", "lr": 0.05}, e_margin=e0, d_margin=eps,
                                    fisher_alpha=alpha, predict_before_update=True)  # fmt: skip
        calibration = [
            torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(9 + i)) for i in range(3)
        ]
        engine.compute_fishers(calibration)
        fisher = {n: torch.zeros_like(p) for n, p in ref.named_parameters() if p.requires_grad}
        theta0 = {n: p.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}
        for xb in calibration:  # squared gradients of the pseudo-label cross-entropy, averaged over batches
            out = ref(xb)
            grads = torch.autograd.grad(nn.functional.cross_entropy(out, out.argmax(1)), params)
            for n, g in zip(fisher, grads):
                fisher[n] += g.square() / len(calibration)
        average = None
    if name == "deyo":
        engine = get_engine("deyo")(_stream_model(), {"reset": "never", "lr": 0.05}, plpd_thresh=-0.05,
                                    patch_len=2, predict_before_update=True)  # fmt: skip
    engine.eval()
    kept = []
    for i, x in enumerate(batches):
        torch.manual_seed(100 + i)  # DeYO's permutations come from the global generator in both
        logits = ref(x)
        ent = entropy(logits)
        if name == "tent":
            loss = ent.mean()
        elif name == "eata":
            keep = ent.detach() < e0
            probs = logits.detach().softmax(1)
            if average is not None:
                keep &= nn.functional.cosine_similarity(probs, average.unsqueeze(0)).abs() < eps
            if keep.any():
                mean_p = probs[keep].mean(0)
                average = mean_p if average is None else 0.9 * average + 0.1 * mean_p
            loss = (ent[keep] * torch.exp(-(ent[keep].detach() - e0))).mean()
            loss = loss + alpha * sum((fisher[n] * (p - theta0[n]) ** 2).sum() for n, p in ref.named_parameters()
                                      if p.requires_grad)  # fmt: skip
            kept.append(int(keep.sum()))
        else:
            keep = ent.detach() < 0.5 * log_c
            images = x[keep]  # each 4 x 4 image as a 2 x 2 grid of 2 x 2 patches, the patches permuted
            tiles = images.reshape(-1, 3, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(-1, 4, 3, 2, 2)
            order = torch.argsort(torch.rand(tiles.shape[0], 4), dim=1)
            tiles = tiles[torch.arange(tiles.shape[0]).unsqueeze(1), order]
            shuffled = tiles.reshape(-1, 2, 2, 3, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(-1, 3, 4, 4)
            with torch.no_grad():
                p_shuffled = ref(shuffled).softmax(1)
            p = logits.detach()[keep].softmax(1)
            label = p.argmax(1, keepdim=True)
            diff = (p.gather(1, label) - p_shuffled.gather(1, label)).squeeze(1)
            ent_kept, ok = ent[keep][diff > -0.05], diff > -0.05
            weights = torch.exp(-(ent_kept.detach() - 0.4 * log_c)) + torch.exp(diff[ok])
            loss = (ent_kept * weights).mean()
            kept.append(int(ok.sum()))
        if name == "tent" or kept[-1]:  # the official code skips the step when no sample is kept
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.manual_seed(100 + i)
        out, _ = engine(x)
        torch.testing.assert_close(out, logits.detach(), rtol=1e-5, atol=1e-5)
        if name != "tent":
            assert (engine.last_selected if name == "eata" else engine.last_selected[1]) == kept[-1]
    if name != "tent":  # the filters keep some samples and reject others over the stream
        assert 0 < sum(kept) < 16 * len(batches), kept
    adapted = dict(engine.adapted_parameters())
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(adapted[f"model.{n}"], p, rtol=1e-5, atol=1e-6)


# -- the reduction: a mean, not a sum (Adam's update hardly sees the scale; one plain SGD step does) ------
SGD = {"optimizer_name": "sgd", "lr": 0.2, "momentum": 0.0, "num_steps": 1, "reset": "never"}


def hand_sgd_step(model: nn.Module, x: torch.Tensor, loss_of, lr: float = SGD["lr"]):
    """``(loss, {name: parameter after one plain SGD step})`` on a float64 copy of ``model``, BatchNorm with the
    batch's statistics, the norm affine parameters moved by ``-lr * grad(loss_of(logits))``."""
    import copy

    twin = copy.deepcopy(model).double()
    named = dict(norm_affine_parameters(twin))
    with batch_statistics(twin):
        loss = loss_of(twin(x.double()))
    grads = torch.autograd.grad(loss, list(named.values()))
    return loss.detach(), {n: (p - lr * g).detach() for (n, p), g in zip(named.items(), grads)}


def assert_step(engine, loss: torch.Tensor, expected_loss: torch.Tensor, expected: dict) -> None:
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-7)
    got = dict(engine.adapted_parameters())
    assert got.keys() == expected.keys()
    for n, p in got.items():
        torch.testing.assert_close(p.double(), expected[n], rtol=1e-5, atol=1e-7, msg=n)


def between(values: torch.Tensor, k: int) -> float:
    """A threshold between the ``k``-th and ``k+1``-th smallest of ``values``, far from both."""
    v = values.sort().values
    assert float(v[k] - v[k - 1]) > 1e-3, "the premise: a gap to put the threshold in"
    return float(v[k - 1] + v[k]) / 2


def test_tent_step_follows_the_batch_mean_entropy():
    """TENT's loss is the mean entropy of the batch (the official ``softmax_entropy(x).mean(0)``): the
    reported loss is it, and one plain SGD step moves the affine parameters by ``-lr`` times its gradient
    (a sum would move them 8 times as far; the continual test's Adam barely sees the scale)."""
    m, x = bn_model(), x_batch()
    expected_loss, expected = hand_sgd_step(m, x, lambda logits: entropy64(logits).mean())
    engine = get_engine("tent")(m, SGD).eval()
    _, loss = engine(x)
    assert_step(engine, loss, expected_loss, expected)


def test_eata_step_follows_the_weighted_mean_over_the_kept_samples_only():
    """EATA's loss is the mean over the *kept* samples of ``H / exp(H - e_margin)`` (the official
    ``entropys.mul(coeff).mean(0)`` after the filter), not a sum nor a mean over the whole batch: with 6 of
    8 samples kept, the reported loss and one plain SGD step equal the hand ones (no Fisher term)."""
    m, x = bn_model(), x_batch()
    with torch.no_grad(), batch_statistics(m):
        e0 = between(entropy64(m(x)), 6)

    def loss_of(logits):
        ent = entropy64(logits)
        keep = ent.detach() < e0
        return (ent[keep] * torch.exp(-(ent[keep].detach() - e0))).mean()

    expected_loss, expected = hand_sgd_step(m, x, loss_of)
    engine = get_engine("eata")(m, SGD, e_margin=e0, d_margin=None).eval()
    _, loss = engine(x)
    assert engine.last_selected == 6 and not engine.fishers
    assert_step(engine, loss, expected_loss, expected)


def test_eata_train_mode_loss_is_the_weighted_mean_over_the_kept_samples():
    m, x = bn_model(), x_batch()
    with torch.no_grad(), batch_statistics(m):
        e0 = between(entropy64(m(x)), 6)
    outputs, loss = get_engine("eata")(m, e_margin=e0).train()(x)
    ent = entropy64(outputs.detach())
    keep = ent < e0
    assert int(keep.sum()) == 6 and loss.requires_grad
    torch.testing.assert_close(loss.double(), (ent[keep] * torch.exp(-(ent[keep] - e0))).mean(), rtol=1e-5,
                               atol=1e-7)  # fmt: skip


def test_deyo_step_follows_the_weighted_mean_over_the_samples_both_filters_keep():
    """DeYO's loss is the mean over the samples kept by the entropy *and* the PLPD filter of
    ``H * (exp(-(H - ent_norm)) + exp(PLPD))`` (the official ``entropys.mul(coeff).mean(0)``): with 3 of 8
    kept by PLPD, the reported loss and one plain SGD step equal the hand ones."""
    m, x = bn_model(), x_batch()
    with torch.no_grad(), batch_statistics(m):
        out = m(x)
        shuffled = m(patch_shuffle(x, 4, torch.Generator().manual_seed(4)))
    values = plpd(out.softmax(-1), shuffled.softmax(-1))
    thresh = between(values, 5)
    keep = values > thresh

    def loss_of(logits):
        ent = entropy64(logits)[keep]
        return (ent * (torch.exp(-(ent.detach() - 0.7)) + torch.exp(values[keep].double()))).mean()

    expected_loss, expected = hand_sgd_step(m, x, loss_of)
    engine = get_engine("deyo")(m, SGD, e_margin=10.0, plpd_thresh=thresh, ent_norm=0.7,
                                generator=torch.Generator().manual_seed(4)).eval()  # fmt: skip
    _, loss = engine(x)
    assert engine.last_selected == (8, 3)
    assert_step(engine, loss, expected_loss, expected)
