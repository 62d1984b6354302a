"""MEMO: runs on BatchNorm and BN-free models, the BN prior, episodic restores, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tttlab.core.errors import InvalidInputError
from tttlab.torch_ttt import get_engine
from tttlab.torch_ttt.engine.memo_engine import affine_grid, augmix_geometric
from tttlab.torch_ttt.norm import prior_mixed_statistics


def bn_model():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 5)
    )
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 1, 16, 16))
    return m.eval()


def plain_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 5)).eval()


def x_batch(n=3):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("make", [bn_model, plain_model])
@pytest.mark.parametrize("per_sample", [True, False])
def test_memo_adapts_and_restores(make, per_sample):
    m = make()
    before = snapshot(m)
    engine = get_engine("memo")(m, n_augmentations=4, per_sample=per_sample, seed=0)
    engine.eval()
    x = x_batch()
    out, loss = engine(x)
    assert out.shape == (3, 5) and torch.isfinite(loss) and loss.item() > 0
    assert all(torch.equal(before[k], m.state_dict()[k]) for k in before), "episodic: restored exactly"
    engine.optimization_parameters["num_steps"] = 0
    out0, _ = engine(x)
    ctx = prior_mixed_statistics(m, 16.0) if make is bn_model else torch.no_grad()
    with torch.no_grad(), ctx:
        ref = torch.cat([m(x[i : i + 1]) for i in range(3)]) if per_sample else m(x)
    assert torch.allclose(out0, ref, atol=1e-6)
    assert not torch.allclose(out, out0), "one step changes the prediction"


def test_bn_prior_mixes_source_and_test_statistics():
    m = bn_model()
    bn = m[1]
    x = torch.randn(8, 1, 16, 16) * 3 + 1
    feats = m[0](x)
    with torch.no_grad(), prior_mixed_statistics(m, 16.0):
        got = bn(feats)
    w = 16.0 / 17.0
    mean = w * bn.running_mean + (1 - w) * feats.mean((0, 2, 3))
    var = w * bn.running_var + (1 - w) * feats.var((0, 2, 3), unbiased=True)  # unbiased, as the MEMO code
    expected = (feats - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    expected = expected * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    assert torch.allclose(got, expected, atol=1e-5)
    assert not hasattr(bn, "forward") or "forward" not in bn.__dict__, "the patch is removed afterwards"


def test_memo_deterministic_with_seed_and_views_shape():
    outs = []
    for _ in range(2):
        engine = get_engine("memo")(bn_model(), n_augmentations=4, seed=3).eval()
        outs.append(engine(x_batch())[0])
    assert torch.equal(outs[0], outs[1])
    v = augmix_geometric(x_batch(2), 5, torch.Generator().manual_seed(0))
    assert v.shape == (5, 2, 1, 16, 16) and torch.isfinite(v).all()
    with pytest.raises(InvalidInputError, match="n_augmentations"):
        get_engine("memo")(bn_model(), n_augmentations=0)


@pytest.mark.parametrize("size", [(6, 1, 28, 28), (3, 3, 9, 13), (2, 1, 1, 5)])
def test_affine_grid_is_torchs(size):
    """Same products and sums in the same order as torch's bmm (bit for bit on the x86 CPUs measured;
    a BLAS that fuses multiply-adds may differ in the last bit, hence the tolerance)."""
    theta = torch.randn(size[0], 2, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.affine_grid(theta, list(size), align_corners=False)
    torch.testing.assert_close(affine_grid(theta, size), expected, rtol=0, atol=1e-6)


def _reference_prior_bn(bn: nn.BatchNorm2d | nn.BatchNorm1d, x: torch.Tensor, n: float) -> torch.Tensor:
    """The MEMO code's BatchNorm prior, written out: the test statistics are what ``F.batch_norm`` stores
    in fresh running buffers with momentum 1 (batch mean, unbiased variance, no autograd history), mixed
    with the source buffers by N/(N+1), then an eval-mode ``F.batch_norm``."""
    est_mean = torch.zeros_like(bn.running_mean)
    est_var = torch.ones_like(bn.running_var)
    F.batch_norm(x, est_mean, est_var, None, None, True, 1.0, bn.eps)
    w = n / (n + 1)
    mean = w * bn.running_mean + (1 - w) * est_mean
    var = w * bn.running_var + (1 - w) * est_var
    return F.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)


@pytest.mark.parametrize("dims", [2, 1])
def test_memo_bn_prior_statistics_are_unbiased_constants_as_the_memo_code(dims):
    # Regression: the prior used the biased batch variance and let gradients flow through the batch
    # statistics; the MEMO code reads them from F.batch_norm's running-buffer update (unbiased, no grad).
    torch.manual_seed(0)
    if dims == 2:
        conv, bn = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)
        x = torch.randn(4, 1, 6, 6)
    else:
        conv, bn = nn.Linear(5, 3), nn.BatchNorm1d(3)
        x = torch.randn(4, 5)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    model = nn.Sequential(conv, bn).eval()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}

    def loss_and_grads(fn):
        out = fn()
        loss = (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
        return out.detach(), torch.autograd.grad(loss, [conv.weight, bn.weight, bn.bias])

    with prior_mixed_statistics(model, 16.0):
        out, grads = loss_and_grads(lambda: model(x))
    ref_out, ref_grads = loss_and_grads(lambda: _reference_prior_bn(bn, conv(x), 16.0))
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():  # running buffers untouched
        assert torch.equal(v, buffers[k]), k


# -- the geometric AugMix views' distribution (mutation audit: nothing checked the ranges of the random
#    warps or that the chain weights sum to one) ----------------------------------------------------------
def test_random_affine_stays_within_the_documented_ranges():
    """Rotation +-30 degrees, shear +-0.3, translation +-0.15, zoom 0.9-1.1, read back from the matrices
    ``[[cos/z, -sin/z + shear, tx], [sin/z, cos/z, ty]]``; the draws reach near the bounds."""
    import math

    from tttlab.torch_ttt.engine.memo_engine import _random_affine

    theta = _random_affine(4000, torch.Generator().manual_seed(0), "cpu", torch.float64)
    sin_z, cos_z = theta[:, 1, 0], theta[:, 1, 1]
    angle = torch.atan2(sin_z, cos_z) * 180 / math.pi
    zoom = 1 / torch.hypot(sin_z, cos_z)
    shear = theta[:, 0, 1] + sin_z
    torch.testing.assert_close(theta[:, 0, 0], cos_z)  # the same zoom on both axes
    for values, bound in ((angle, 30.0), (zoom - 1, 0.1), (shear, 0.3), (theta[:, 0, 2], 0.15),
                          (theta[:, 1, 2], 0.15)):  # fmt: skip
        assert values.abs().max() <= bound + 1e-9
        assert values.abs().max() > 0.95 * bound and values.min() < 0 < values.max()


def test_views_of_a_constant_image_are_that_constant():
    """Warps of a constant image fill with its value and the chains are mixed with weights summing to one
    (Dirichlet), so every view of a constant image is the same constant."""
    x = torch.full((3, 1, 9, 9), 0.7)
    x[1] = -1.25
    v = augmix_geometric(x, 6, torch.Generator().manual_seed(0))
    assert v.shape == (6, 3, 1, 9, 9)
    torch.testing.assert_close(v, x.expand_as(v), rtol=0, atol=1e-5)


def test_memo_per_image_step_and_prediction_equal_the_memo_code_written_out():
    """Per image, as the MEMO code's ``adapt_single`` / ``test_single`` (fresh weights for every image):
    V views through BatchNorm mixed with the prior (N = 16: weight 16/17 on the running statistics, 1/17 on
    the views' mean and unbiased variance, constants for autograd), the entropy of the views' average
    distribution, one plain SGD step on every parameter, then the image alone through the adapted network
    with the same prior over its own statistics."""
    import copy
    import math

    num_views, lr, w = 6, 0.05, 16 / 17

    def views(x, generator):  # fixed views, so both sides see the same ones
        return torch.stack([torch.roll(x, v - 2, dims=3) * (1 + 0.1 * v) for v in range(num_views)])

    def forward_with_prior(net, x):
        h = net[0](x)
        with torch.no_grad():
            mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), correction=1)
        bn = net[1]
        h = F.batch_norm(h, w * bn.running_mean + (1 - w) * mean, w * bn.running_var + (1 - w) * var,
                         bn.weight, bn.bias, False, 0.0, bn.eps)  # fmt: skip
        return net[4](net[3](net[2](h)))

    x = x_batch(3)
    want = []
    for image in x.split(1):
        net = copy.deepcopy(bn_model())
        log_p = forward_with_prior(net, views(image, None)[:, 0]).log_softmax(-1)
        average = log_p.logsumexp(0) - math.log(num_views)
        (-(average.exp() * average).sum()).backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= lr * p.grad
            want.append(forward_with_prior(net, image))
    model = bn_model()
    before = snapshot(model)
    engine = get_engine("memo")(
        model, {"lr": lr, "momentum": 0.0}, augmentations=views, n_augmentations=num_views
    )
    got, _ = engine.eval()(x)
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(got, model(x), atol=1e-3)  # the prior and the step both act
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # reset after each image
