"""The readout's initialisation: zero (``pilimit_lib``, the MAML commands' ``--readout-zero-init``) or
``pilimit_orig``'s ``InfPiMLP`` default, used by its CIFAR-10 / ImageNet scripts: the r initial rows of
the output layer drawn ``A ~ N(0, 1)`` times ``M^-1`` (M = r), Amult 1.  ``paper_cifar10_finite`` is a
``pilimit_orig`` command: its finite net is sampled from that non-zero readout."""

from __future__ import annotations

import pytest
import torch

from tttlab.pilimit import InfMLP
from tttlab.pilimit import train as T


def _pair(r=200, d_out=10):
    torch.manual_seed(3)
    zero = InfMLP(20, d_out, r=r, depth=1, bias_alpha=0.5)
    torch.manual_seed(3)
    orig = InfMLP(20, d_out, r=r, depth=1, bias_alpha=0.5, readout_zero_init=False)
    return zero, orig


def test_orig_readout_is_r_rows_of_variance_one_over_r_squared_from_the_same_draw():
    zero, orig = _pair()
    A = orig.output_layer.A
    assert orig.output_layer.M == 200 and torch.equal(orig.output_layer.Amult, torch.ones(200))
    assert float(zero.output_layer.A.abs().max()) == 0.0
    # the same random stream: every other tensor is the same, so the readout is the zero net's draw x 1/r
    for (name, a), (_, b) in zip(zero.state_dict().items(), orig.state_dict().items()):
        if name != "output_layer.A":
            assert torch.equal(a, b), name
    z = A * 200  # back to N(0, 1): 2,000 draws
    assert abs(float(z.mean())) < 0.08 and abs(float(z.std()) - 1.0) < 0.06
    x = torch.randn(4, 20)
    with torch.no_grad():
        assert float(zero(x).abs().max()) == 0.0 and float(orig(x).abs().max()) > 0.0


def test_paper_cifar10_finite_samples_the_orig_readout_and_the_others_keep_zero():
    small = {"model.r": 8, "model.width": 64, "model.dtype": "float32"}
    over = ["data.root=/d", *(f"{k}={v}" for k, v in small.items())]
    c = T.train_config("paper_cifar10_finite", over)
    assert c["model"]["readout_zero_init"] is False
    net = T.build_model(c, 12, 10, "cpu")
    torch.manual_seed(int(c["seed"]))
    inf = InfMLP(12, 10, r=8, depth=1, bias_alpha=4.0, first_layer_alpha=0.125, last_layer_alpha=0.5,
                 readout_zero_init=False)  # fmt: skip
    # readout = n^-1/2 (Amult A)^T relu(Omega_L B^T)^T (pilimit_orig's sampling) of the non-zero A
    want = (
        64**-0.5
        * (inf.output_layer.A * inf.output_layer.Amult[:, None]).T
        @ torch.relu(net.omega1 @ inf.output_layer.B.T).T
    )
    torch.testing.assert_close(net.weights[-1].detach(), want)
    assert float(net.weights[-1].detach().abs().max()) > 0
    for experiment, over in (("paper_cifar10", ["data.root=/d"]), ("mnist", []), ("smoke", [])):
        c = T.train_config(experiment, over)
        assert c["model"]["readout_zero_init"] is True
        # the default stays out of the training part: runs and cached models keep their identity
        assert "readout_zero_init" not in T.training_part(c)["model"]
    assert (
        T.training_part(T.train_config("paper_cifar10_finite", ["data.root=/d"]))["model"][
            "readout_zero_init"
        ]
        is False
    )


@pytest.mark.parametrize("kind", ["inf", "finite"])
def test_maml_readout_zero_init_false_draws_orig_scale_for_every_kind(kind):
    """``maml.readout_zero_init=false`` (meta/train.py without --readout-zero-init): pilimit_orig's 1/r scale,
    also under a finite net sampled from it (the readout was drawn r^-1/2 and only for infinite nets)."""
    over = ["maml.readout_zero_init=false", "model.r=100", f"model.kind={kind}", "model.width=32"]
    c = T.train_config("maml_mnist", over)
    net = T.build_model(c, 28 * 28, 5, "cpu")
    if kind == "inf":
        z = net.output_layer.A * 100
        assert abs(float(z.std()) - 1.0) < 0.1
    else:
        assert float(net.weights[-1].detach().abs().max()) > 0
    zero = T.build_model(T.train_config("maml_mnist", over[1:]), 28 * 28, 5, "cpu")
    last = zero.output_layer.A if kind == "inf" else zero.weights[-1]
    assert float(last.detach().abs().max()) == 0.0
