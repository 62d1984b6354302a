"""Maths and behaviour of the pi-net primitives, PiSGD and the finite sampled nets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tttlab.core.errors import InvalidInputError, TTTLabError
from tttlab.pilimit import (
    FinPiMLP,
    InfMLP,
    InfPiLinear,
    PiSGD,
    f02,
    pi_layer_closed_form,
    v_prime,
    v_transform,
)
from tttlab.pilimit.functional import PiLinearChunked, PiLinearReference, pi_update_norm
from tttlab.pilimit.optim import CosineLR, MultiStepLR


def _rows(M=17, r=6, r_out=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(M, r_out, generator=g, dtype=dtype)
    B = torch.randn(M, r, generator=g, dtype=dtype)
    B = B / B.norm(dim=1, keepdim=True)
    Amult = torch.rand(M, generator=g, dtype=dtype) - 0.5
    return A, Amult, B


def test_v_transform_closed_form_and_derivatives():
    c = torch.linspace(-0.99, 0.99, 201, dtype=torch.float64, requires_grad=True)
    v = v_transform(c)
    # V(c) = E[relu(u) relu(v)]: V(1) = 1/2, V(0) = 1/(2 pi), V(-1) = 0
    ends = v_transform(torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64))
    assert torch.allclose(ends, torch.tensor([0.5, 1 / (2 * math.pi), 0.0], dtype=torch.float64))
    (dv,) = torch.autograd.grad(v.sum(), c)
    assert torch.allclose(dv, v_prime(c.detach()), atol=1e-12)
    assert torch.allclose(v.detach() - c.detach() * dv, f02(c.detach()), atol=1e-12)
    assert torch.autograd.gradcheck(v_transform, (c[5:-5].detach().clone().requires_grad_(),))
    # the closed form's autograd derivative, and a finite one at |c| = 1 (where sqrt' is infinite)
    from tttlab.pilimit.functional import _v

    (dv2,) = torch.autograd.grad(_v(c).sum(), c)
    assert torch.allclose(dv, dv2, atol=1e-10)
    e = torch.tensor([-1.0, 1.0], dtype=torch.float64, requires_grad=True)
    (de,) = torch.autograd.grad(v_transform(e).sum(), e)
    assert torch.allclose(de, torch.tensor([0.0, 0.5], dtype=torch.float64))


def test_v_transform_is_relu_kernel_monte_carlo():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400_000, 2, generator=g, dtype=torch.float64)
    for c in (-0.7, 0.0, 0.5):
        u, w = z[:, 0], c * z[:, 0] + math.sqrt(1 - c * c) * z[:, 1]
        mc = (torch.relu(u) * torch.relu(w)).mean()
        assert abs(mc.item() - v_transform(torch.tensor(c)).item()) < 5e-3


@pytest.mark.parametrize("fn", [PiLinearChunked, PiLinearReference])
@pytest.mark.parametrize("chunk", [None, 5])
def test_custom_backward_gradcheck_and_closed_form(fn, chunk):
    A, Amult, B = _rows()
    g = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    anchor = torch.zeros(0, requires_grad=True)

    def f(x):
        return fn.apply(x, anchor, A, Amult, B, chunk, None)

    assert torch.autograd.gradcheck(f, (g,), eps=1e-6, atol=1e-7)
    out = f(g)
    ref = pi_layer_closed_form(g, A, Amult, B)
    assert torch.allclose(out, ref, atol=1e-12)
    w = torch.randn_like(out)
    (g1,) = torch.autograd.grad((out * w).sum(), g)
    (g2,) = torch.autograd.grad((ref * w).sum(), g)
    assert torch.allclose(g1, g2, atol=1e-12)


def test_pi_update_norm_is_function_norm():
    """tr(A^T V(B B^T) A) = E_z |sum_i A_i relu(B_i z)|^2 (Monte Carlo)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, 5, generator=g, dtype=torch.float64)
    b = b / b.norm(dim=1, keepdim=True)
    z = torch.randn(300_000, 5, generator=g, dtype=torch.float64)
    mc = ((torch.relu(z @ b.T) @ a) ** 2).sum(1).mean().sqrt()
    assert abs(pi_update_norm(a, b).item() - mc.item()) / mc.item() < 1e-2


def _data(n_steps=4, b=8, d=12, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_steps, b, d, generator=g), torch.randint(0, k, (n_steps, b), generator=g)


def _train(net, xs, ys, **opt_kw):
    opt = PiSGD(net, **{"lr": 0.5, **opt_kw})
    losses = []
    for x, y in zip(xs, ys):
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_one_step_appends_batch_rows():
    torch.manual_seed(0)
    net = InfMLP(12, 5, r=8, depth=2, bias_alpha=0.5, last_layer_alpha=0.5)
    xs, ys = _data(1, b=7)
    opt = PiSGD(net, lr=0.3, last_layer_lr_mult=4.0)
    F.cross_entropy(net(xs[0]), ys[0]).backward()
    pending = [layer.pi_grad() for layer in net.pi_layers]
    before = [(layer.A.clone(), layer.B.clone(), layer.Amult.clone()) for layer in net.pi_layers]
    opt.step()
    for layer, (a, b), (A0, B0, Am0), mult in zip(net.pi_layers, pending, before, (1, 1, 4.0)):
        assert layer.M == 8 + 7
        assert (
            torch.equal(layer.A[:8], A0)
            and torch.equal(layer.B[:8], B0)
            and torch.equal(layer.Amult[:8], Am0)
        )
        assert torch.equal(layer.A[8:], a) and torch.equal(layer.B[8:], b)
        assert torch.allclose(layer.B[8:].norm(dim=1), torch.ones(7))
        assert torch.allclose(layer.Amult[8:], torch.full((7,), -0.3 * mult))
    assert all(layer.pi_grad() is None for layer in net.pi_layers)


@pytest.mark.parametrize("chunk", [1, 3, 10])
def test_chunked_equals_unchunked_and_reference(chunk):
    xs, ys = _data(4)
    nets = []
    for impl, cs, cache in (
        ("chunked", chunk, 0.0),
        ("chunked", None, 0.0),
        ("reference", None, 0.0),
        ("chunked", chunk, 64.0),
        ("chunked", chunk, 3 * 2 * 8 * chunk * 4 / 2**20),
    ):
        torch.manual_seed(0)
        nets.append(InfMLP(12, 5, r=8, depth=2, chunk_size=cs, impl=impl, cache_mb=cache))
    kw = dict(weight_decay=1e-2, gclip=0.3, gclip_per_param=True, bias_lr_mult=0.5)
    losses = [_train(n, xs, ys, **kw) for n in nets]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert losses[0] == pytest.approx(losses[2], abs=1e-6)
    assert losses[0] == losses[3] == losses[4]  # the forward cache (whole / 3 chunks) changes nothing
    x = torch.randn(5, 12, requires_grad=True)
    outs = []
    for n in nets:
        out = n(x)
        (gx,) = torch.autograd.grad(out.square().sum(), x)
        outs.append((out.detach(), gx))
        assert n.M == 8 + 4 * 8
    for out, gx in outs[1:]:
        assert torch.allclose(outs[0][0], out, atol=1e-5) and torch.allclose(outs[0][1], gx, atol=1e-5)
    assert torch.equal(outs[0][1], outs[3][1]) and torch.equal(outs[0][1], outs[4][1])


def test_training_deterministic_under_seed():
    xs, ys = _data(4)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        net = InfMLP(12, 5, r=8, depth=2, chunk_size=4)
        losses = _train(net, xs, ys, weight_decay=1e-3, gclip=0.5)
        runs.append((losses, net.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_state_dict_roundtrip_with_grown_rows():
    xs, ys = _data(3)
    torch.manual_seed(0)
    net = InfMLP(12, 5, r=8, depth=1)
    _train(net, xs, ys)
    state = net.state_dict()
    assert state["hidden.0.A"].shape == (8 + 24, 8) and state["output_layer.A"].shape == (8 + 24, 5)
    torch.manual_seed(1)
    other = InfMLP(12, 5, r=8, depth=1)
    other.load_state_dict(state)
    assert other.M == net.M
    x = torch.randn(4, 12)
    assert torch.equal(other(x), net(x))


def test_weight_decay_with_and_without_multiplier():
    torch.manual_seed(0)
    for apply in (True, False):
        net = InfMLP(12, 5, r=8, depth=1)
        old = net.output_layer.Amult.clone()
        A0 = net.input_layer.A.detach().clone()
        opt = PiSGD(net, lr=0.1, weight_decay=0.5, last_layer_lr_mult=4.0, first_layer_lr_mult=0.5,
                    apply_lr_mult_to_wd=apply)  # fmt: skip
        xs, ys = _data(1)
        F.cross_entropy(net(xs[0]), ys[0]).backward()
        gA = net.input_layer.A.grad.clone()
        opt.step()
        decay_last = 1 - 0.1 * 4.0 * 0.5 if apply else 1 - 0.1 * 0.5
        decay_first = 1 - 0.1 * 0.5 * 0.5 if apply else 1 - 0.1 * 0.5
        assert torch.allclose(net.output_layer.Amult[:8], old * decay_last)
        assert torch.allclose(net.input_layer.A.detach(), A0 * decay_first - 0.05 * gA, atol=1e-7)


def test_per_param_clipping_bounds_each_update():
    torch.manual_seed(0)
    net = InfMLP(12, 5, r=8, depth=2)
    opt = PiSGD(net, lr=1.0, gclip=1e-3, gclip_per_param=True)
    xs, ys = _data(2)
    _train(net, xs[:1], ys[:1], lr=1.0)  # readout non-zero
    F.cross_entropy(net(xs[1]), ys[1]).backward()
    opt._clip()
    for layer in net.pi_layers:
        assert pi_update_norm(*layer.pi_grad()).item() <= 1e-3 * (1 + 1e-4)
    assert net.input_layer.A.grad.norm().item() <= 1e-3 * (1 + 1e-4)


def test_schedules():
    net = InfMLP(4, 2, r=2, depth=0)
    opt = PiSGD(net, lr=1.0)
    ms = MultiStepLR(opt, [2, 4], 0.15)
    lrs = []
    for _ in range(5):
        ms.step()
        lrs.append(opt.lr)
    assert lrs == pytest.approx([1.0, 0.15, 0.15, 0.0225, 0.0225])
    opt2 = PiSGD(net, lr=2.0)
    cs = CosineLR(opt2, total_steps=4)
    seq = []
    for _ in range(4):
        cs.step()
        seq.append(opt2.lr)
    assert seq == pytest.approx([2 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(1, 5)])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_storage_close_to_float32(dtype):
    xs, ys = _data(3)
    res = []
    for dt in ("float32", dtype):
        torch.manual_seed(0)
        net = InfMLP(12, 5, r=8, depth=2, dtype=dt, chunk_size=5)
        res.append(_train(net, xs, ys))
        assert net.output_layer.Amult.dtype == torch.float32
    assert res[0] == pytest.approx(res[1], abs=2e-2)


# ----------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("r", [0, -3, 2.5, "8", True])
def test_bad_r(r):
    with pytest.raises(TTTLabError, match="r="):
        InfMLP(12, 5, r=r, depth=1)


@pytest.mark.parametrize("width", [0, -1, 3.5, "64", None])
def test_bad_width(width):
    net = InfMLP(12, 5, r=4, depth=1)
    with pytest.raises(InvalidInputError, match="width="):
        FinPiMLP(net, width)


def test_input_dimension_mismatch():
    net = InfMLP(12, 5, r=4, depth=1)
    with pytest.raises(InvalidInputError, match=r"\(batch, 12\)"):
        net(torch.randn(3, 13))
    with pytest.raises(InvalidInputError, match="12"):
        net.sample(16)(torch.randn(3, 11))
    with pytest.raises(InvalidInputError, match="pi-layer input"):
        InfPiLinear(4)(torch.randn(3, 5))


def test_nan_gradients_raise_before_any_change():
    torch.manual_seed(0)
    net = InfMLP(12, 5, r=4, depth=1)
    opt = PiSGD(net, lr=0.1)
    x = torch.randn(3, 12)
    x[0, 0] = float("nan")
    F.cross_entropy(net(x), torch.tensor([0, 1, 2])).backward()
    M = net.M
    with pytest.raises(InvalidInputError, match="non-finite"):
        opt.step()
    assert net.M == M


# ----------------------------------------------------------------------------------------------------------
# finite nets sampled from the infinite one


def test_finite_nets_approach_infinite_net_with_width():
    torch.manual_seed(0)
    inf = InfMLP(12, 5, r=12, depth=1, bias_alpha=0.5, last_layer_alpha=0.5)
    xs, ys = _data(6)
    xt = torch.randn(32, 12)
    # step 0 of a sampled net: sample from an infinite net that has trained (non-zero readout)
    trained = InfMLP(12, 5, r=12, depth=1, bias_alpha=0.5, last_layer_alpha=0.5)
    trained.load_state_dict(inf.state_dict())
    _train(trained, xs[:3], ys[:3])
    with torch.no_grad():
        ref0 = trained(xt)
    init = InfMLP(12, 5, r=12, depth=1, bias_alpha=0.5, last_layer_alpha=0.5)
    init.load_state_dict(inf.state_dict())
    inf_losses = _train(inf, xs, ys)
    with torch.no_grad():
        ref = inf(xt)
    step0, after = [], []
    for width in (256, 1024, 4096):
        e0, ek = [], []
        for seed in range(3):
            with torch.no_grad():
                e0.append((trained.sample(width, seed=seed)(xt) - ref0).abs().mean().item())
            fin = init.sample(width, seed=seed)
            # identical loss at step 0 (zero readout), then close
            losses = _train(fin, xs, ys)
            assert losses[0] == pytest.approx(inf_losses[0], abs=1e-6)
            with torch.no_grad():
                ek.append(abs(losses[-1] - inf_losses[-1]) + (fin(xt) - ref).abs().mean().item())
        step0.append(sum(e0) / 3)
        after.append(sum(ek) / 3)
    assert step0[0] > step0[1] > step0[2]
    assert after[0] > after[1] > after[2]
    assert step0[2] < 0.3 * step0[0] and after[2] < 0.5 * after[0]


def test_gproj_keeps_gradient_in_omega_span_and_mup_differs():
    torch.manual_seed(0)
    inf = InfMLP(12, 5, r=6, depth=1)
    fin = inf.sample(64)
    xs, ys = _data(1)
    F.cross_entropy(fin(xs[0]), ys[0]).backward()
    fin.project_gradients_()
    om = fin.omega1
    g = fin.weights[1].grad
    assert torch.allclose(om @ torch.linalg.lstsq(om, g).solution, g, atol=1e-5)
    mup = inf.sample(64, gaussian_init=True)
    w = mup.weights[1]
    assert abs(w.std().item() - (2 / 64) ** 0.5) < 0.05


@pytest.mark.parametrize("width", [4, 8, 16])
def test_gproj_is_the_identity_when_width_at_most_r(width):
    """Omega (width x r) spans R^width when width <= r: Gproj must leave gradients unchanged (upstream skips
    it); the formula with inv(Omega^T Omega) of a singular matrix scaled them by up to ~90x."""
    torch.manual_seed(0)
    inf = InfMLP(12, 5, r=16, depth=1)
    fin = inf.sample(width, seed=1)
    with torch.no_grad():
        fin.weights[2].normal_()  # a non-zero readout, so that every layer gets a gradient
    xs, ys = _data(1)
    F.cross_entropy(fin(xs[0]), ys[0]).backward()
    before = [p.grad.clone() for p in fin.weights[:2]]
    assert all(g.abs().max() > 0 for g in before)
    fin.project_gradients_()
    for p, g in zip(fin.weights[:2], before):
        assert torch.equal(p.grad, g)
    assert torch.isfinite(fin.gcovinv0).all()


def test_save_load_net_files(tmp_path):
    from tttlab.core.errors import CheckpointError
    from tttlab.pilimit import load_net, save_net

    xs, ys = _data(3)
    torch.manual_seed(0)
    net = InfMLP(12, 5, r=8, depth=2, bias_alpha=0.5)
    _train(net, xs, ys)
    save_net(tmp_path / "inf.pt", net)
    back = load_net(tmp_path / "inf.pt", chunk_size=3)
    x = torch.randn(4, 12)
    assert back.M == net.M == 8 + 24 and torch.allclose(back(x), net(x), atol=1e-6)
    fin = net.sample(32, seed=2)
    _train(fin, xs, ys)
    save_net(tmp_path / "fin.pt", fin)
    fback = load_net(tmp_path / "fin.pt")
    assert torch.equal(fback(x), fin(x))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_net(tmp_path / "bad.pt")
