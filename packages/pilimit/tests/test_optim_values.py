"""PiSGD's update rule, value by value, where the training-equivalence tests cannot see a mistake (they
compare two nets trained by the same optimizer): global clipping, weight decay of Amult before the append
(new rows carry exactly ``-lr_g``), and the bias group holding every bias (input and pi-layers) with its
own lr multiplier.  Added by a mutation audit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tttlab.pilimit import InfMLP, PiSGD
from tttlab.pilimit.functional import pi_update_norm


def _batch(b=6, d=12, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randint(0, k, (b,), generator=g)


def _trained_net(seed=0):
    """An InfMLP after one step (non-zero readout, so every layer and bias gets a gradient)."""
    torch.manual_seed(seed)
    net = InfMLP(12, 5, r=8, depth=2, bias_alpha=0.5)
    opt = PiSGD(net, lr=1.0)
    x, y = _batch(seed=1)
    F.cross_entropy(net(x), y).backward()
    opt.step()
    opt.zero_grad()
    return net


def _update_norms(net):
    norms = [net.input_layer.A.grad.norm()]
    norms += [p.grad.norm() for p in (net.input_layer.bias, *(layer.bias for layer in net.pi_layers))]
    norms += [pi_update_norm(*layer.pi_grad()) for layer in net.pi_layers]
    return torch.stack([n.double() for n in norms])


def test_global_clip_leaves_a_frozen_readout_out_of_the_norm():
    """last_layer_lr_mult = 0 (every MAML experiment): the readout updates nothing, and both upstreams leave
    its weight gradient out of the global norm (pilimit_orig InfPiMLP.gclip(exclude_last_layer=...) and
    GClipWrapper, pilimit_lib MetaInfSGD and GClipWrapper).  Ours included it, so the other updates were
    clipped by a larger norm.  Infinite net: the readout's pi rows; finite/muP: its weight."""
    net = _trained_net()
    x, y = _batch(seed=2)
    F.cross_entropy(net(x), y).backward()
    before = _update_norms(net)  # input A, 4 biases, 2 hidden pi-layers, readout pi-layer (last)
    others, readout = before[:-1], before[-1]
    assert readout > 0.1 * others.norm()  # the readout's gradient is not negligible
    gclip = 0.1 * others.norm().item()
    PiSGD(net, lr=1.0, last_layer_lr_mult=0.0, gclip=gclip)._clip()
    after = _update_norms(net)
    assert after[:-1].norm().item() == pytest.approx(gclip, rel=1e-4)
    torch.testing.assert_close(
        after[:-1], others * (gclip / (others.norm().item() + 1e-6)), rtol=1e-4, atol=0
    )
    # a trained readout (mult != 0) stays in the norm, and per-parameter clipping is unchanged
    net2 = _trained_net()
    F.cross_entropy(net2(x), y).backward()
    PiSGD(net2, lr=1.0, last_layer_lr_mult=1.0, gclip=gclip)._clip()
    assert _update_norms(net2).norm().item() == pytest.approx(gclip, rel=1e-4)

    torch.manual_seed(0)
    fin = InfMLP(12, 5, r=8, depth=1, bias_alpha=0.5).sample(32, gaussian_init=True)
    F.cross_entropy(fin(x), y).backward()
    grads = [p.grad.clone() for p in fin.parameters() if p.grad is not None and p.numel()]
    readout_w = fin.weights[-1].grad.clone()
    rest = torch.stack(
        [g.norm() for g in grads if g.shape != readout_w.shape or not torch.equal(g, readout_w)]
    )
    assert len(rest) == len(grads) - 1
    gclip = 0.1 * rest.norm().item()
    lr = 0.5
    w0 = [w.detach().clone() for w in fin.weights]
    PiSGD(fin, lr=lr, last_layer_lr_mult=0.0, gclip=gclip, gproj=False).step()
    coef = gclip / (rest.norm().item() + 1e-6)
    torch.testing.assert_close(fin.weights[0].detach(), w0[0] - lr * coef * grads[0], rtol=1e-5, atol=1e-7)
    assert torch.equal(fin.weights[-1].detach(), w0[-1])  # lr 0: the readout stays


def test_global_clipping_scales_every_update_by_one_factor_to_norm_gclip():
    net = _trained_net()
    x, y = _batch(seed=2)
    F.cross_entropy(net(x), y).backward()
    before = _update_norms(net)
    total = before.norm().item()
    gclip = 0.1 * total
    opt = PiSGD(net, lr=1.0, gclip=gclip, gclip_per_param=False)
    opt._clip()
    after = _update_norms(net)
    assert after.norm().item() == pytest.approx(gclip, rel=1e-4)
    # one common factor gclip / (total + 1e-6), not a per-tensor one
    assert torch.allclose(after, before * (gclip / (total + 1e-6)), rtol=1e-4)
    # below the threshold nothing changes
    net2 = _trained_net()
    F.cross_entropy(net2(x), y).backward()
    b2 = _update_norms(net2)
    PiSGD(net2, lr=1.0, gclip=10 * total, gclip_per_param=False)._clip()
    assert torch.equal(_update_norms(net2), b2)


@pytest.mark.parametrize("apply_mult", [True, False])
def test_amult_decays_before_the_append_and_new_rows_are_minus_lr(apply_mult):
    net = _trained_net()
    lr, wd, last = 0.2, 0.5, 3.0
    opt = PiSGD(net, lr=lr, weight_decay=wd, last_layer_lr_mult=last, apply_lr_mult_to_wd=apply_mult)
    x, y = _batch(b=7, seed=3)
    F.cross_entropy(net(x), y).backward()
    old = [(layer.M, layer.Amult.clone()) for layer in net.pi_layers]
    opt.step()
    for layer, (m, am), mult in zip(net.pi_layers, old, (1.0, 1.0, last)):
        decay = 1 - lr * mult * (wd if apply_mult else wd / mult)
        assert layer.M == m + 7
        assert torch.allclose(layer.Amult[:m], am * decay, rtol=1e-6)
        # the appended rows are this step's: -lr_g, not decayed by this step's weight decay
        assert torch.allclose(layer.Amult[m:], torch.full((7,), -lr * mult), rtol=1e-6)


def test_every_bias_is_in_the_bias_group_with_its_lr_multiplier():
    net = _trained_net()
    biases = [net.input_layer.bias, *(layer.bias for layer in net.pi_layers)]
    opt = PiSGD(net, lr=0.3, bias_lr_mult=0.5, first_layer_lr_mult=2.0, last_layer_lr_mult=4.0)
    (group,) = [g for g in opt.param_groups if g["name"] == "bias"]
    assert {id(p) for p in group["params"]} == {id(b) for b in biases}
    x, y = _batch(seed=4)
    F.cross_entropy(net(x), y).backward()
    before = [(b.detach().clone(), b.grad.clone()) for b in biases]
    assert all(g.abs().max() > 0 for _, g in before)
    opt.step()
    for b, (b0, g) in zip(biases, before):
        assert torch.allclose(b.detach(), b0 - 0.3 * 0.5 * g, atol=1e-7)


def test_finite_readout_bias_uses_last_bias_alpha():
    """A finite net's readout bias is scaled by ``last_bias_alpha`` (not ``bias_alpha``), like the infinite
    net's: with zero features both readouts are exactly ``last_layer_alpha * last_bias_alpha * bias``."""
    torch.manual_seed(0)
    net = InfMLP(12, 5, r=8, depth=1, bias_alpha=0.5, last_bias_alpha=2.0, last_layer_alpha=0.7)
    with torch.no_grad():
        net.output_layer.bias.normal_()
    fin = net.sample(32, seed=1)
    want = 0.7 * 2.0 * net.output_layer.bias.detach()
    with torch.no_grad():
        assert torch.allclose(net.readout(torch.zeros(1, 8))[0], want, atol=1e-6)
        assert torch.allclose(fin.readout(torch.zeros(1, 32))[0], want, atol=1e-6)


@pytest.mark.parametrize("kind", ["finite", "mup"])
@pytest.mark.parametrize("steps", [1, 2])
def test_maml_closed_form_equals_readout_sgd_for_finite_nets(kind, steps):
    """The finite-net inner loop in closed form (kernel ``f . f'``) == plain SGD of the support
    cross-entropy on a copy of the readout weight and bias."""
    import copy

    import numpy as np

    from tttlab.pilimit.maml import adapted_logits, sample_episode

    torch.manual_seed(0)
    inf = InfMLP(16, 3, r=6, depth=1, bias_alpha=0.5, last_bias_alpha=1.5, last_layer_alpha=0.7)
    net = inf.sample(24, seed=2, gaussian_init=kind == "mup")
    with torch.no_grad():
        net.weights[-1].normal_()
        net.biases[-1].normal_()
    rng = np.random.default_rng(0)
    classes = [rng.integers(0, 256, (4, 4, 4), dtype=np.uint8) for _ in range(3)]
    ep = sample_episode(classes, 3, 2, 1, rng)
    step = 0.4
    with torch.no_grad():
        fast, _ = adapted_logits(net, ep, step, steps)
    slow = copy.deepcopy(net)
    w, b = slow.weights[-1], slow.biases[-1]
    with torch.no_grad():
        f = slow.features(ep.xs)
    for _ in range(steps):
        w.grad = b.grad = None
        F.cross_entropy(slow.readout(f), ep.ys).backward()
        with torch.no_grad():
            w -= step * w.grad
            b -= step * b.grad
    with torch.no_grad():
        ref = slow(ep.xq)
    assert torch.allclose(fast, ref, atol=1e-5)


def test_finite_preactivations_are_the_infinite_representation_seen_through_omega():
    """Sampling (pilimit_orig's formulas): the finite input layer's pre-activations are exactly
    ``n^-1/2 Omega_0 g_0`` of the infinite net's ``g_0`` (biases with ``bias_alpha`` included), and a hidden
    layer's approach ``n^-1/2 Omega_1 g_1`` as the width grows (its bias sampled through the same Omega)."""
    torch.manual_seed(0)
    net = InfMLP(12, 5, r=8, depth=1, bias_alpha=0.5, first_layer_alpha=1.5)
    with torch.no_grad():
        net.input_layer.bias.normal_()
        net.hidden[0].bias.normal_()
    x = torch.randn(4, 12)
    with torch.no_grad():
        g0 = net.input_layer(x) * 1.5
        g1 = net.features(x)
    errs = []
    for n in (256, 4096):
        fin = net.sample(n, seed=3)
        with torch.no_grad():
            h0 = F.linear(x, fin.weights[0], fin._bias(0)) * fin.first_layer_alpha
            assert torch.allclose(h0, n**-0.5 * g0 @ fin.omega0.T, rtol=1e-4, atol=1e-5)
            h1 = F.linear(torch.relu(h0), fin.weights[1], fin._bias(1))
            want = n**-0.5 * g1 @ fin.omega1.T
            errs.append(((h1 - want).norm() / want.norm()).item())
    assert errs[1] < 0.5 * errs[0] and errs[1] < 0.1, errs


def test_forward_cache_keeps_chunks_up_to_its_budget():
    """The chunked forward keeps ``(sqrt(1-q^2), acos(-q))`` of its first chunks for the backward while
    they fit in ``cache_bytes`` (none when the budget is 0), so the backward does not recompute them."""
    from tttlab.pilimit.functional import _normalise, chunked_forward

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(40, 3, generator=g), torch.randn(40, 6, generator=g)
    B = B / B.norm(dim=1, keepdim=True)
    gbar, s = _normalise(torch.randn(5, 6, generator=g))
    per_chunk = 2 * 5 * 10 * 4  # two float32 (batch x chunk) tensors
    for budget, kept in ((0, 0), (2 * per_chunk, 2), (2 * per_chunk + 1, 2), (10**6, 4)):
        cache: list = []
        chunked_forward(gbar, s, A, torch.ones(40), B, 10, budget, cache)
        assert len(cache) == kept, budget


@pytest.mark.parametrize("kind", ["inf", "finite"])
def test_meta_gradient_is_the_sum_over_episodes(kind):
    """Upstream's MAML (both libraries, infinite and finite) runs one backward per task into one gradient
    buffer and never divides by the number of tasks: the outer gradient is the sum of the episodes'
    gradients (one backward per episode, accumulated here by hand), not their mean (8x smaller at
    meta-batch 8: the same meta-lr made a step 8x shorter whenever the clip was not active)."""
    import numpy as np

    from tttlab.pilimit.maml import adapted_logits, meta_loss, sample_episode

    torch.manual_seed(0)
    inf = InfMLP(16, 3, r=6, depth=1, bias_alpha=0.5, last_bias_alpha=0.0)
    net = inf if kind == "inf" else inf.sample(24, seed=2)
    rng = np.random.default_rng(0)
    classes = [rng.integers(0, 256, (5, 4, 4), dtype=np.uint8) for _ in range(4)]
    eps = [sample_episode(classes, 3, 1, 2, rng) for _ in range(3)]
    first = net.input_layer.A if kind == "inf" else net.weights[0]

    per_episode = []
    for ep in eps:
        first.grad = None
        F.cross_entropy(adapted_logits(net, ep, 0.5)[0], ep.yq).backward()
        per_episode.append(first.grad.clone())
    if kind == "inf":
        net.zero_pi_grad()
    first.grad = None
    loss, _ = meta_loss(net, eps, 0.5, 1)
    loss.backward()
    want = torch.stack(per_episode).sum(0)
    assert want.abs().max() > 0
    torch.testing.assert_close(first.grad, want, rtol=1e-5, atol=1e-7)
    # the reported meta-train loss is the mean: the sum / the number of episodes
    with torch.no_grad():
        means = [F.cross_entropy(adapted_logits(net, ep, 0.5)[0], ep.yq) for ep in eps]
    assert float(loss.detach()) == pytest.approx(float(sum(means)), rel=1e-6)
