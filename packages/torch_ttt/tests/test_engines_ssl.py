"""The self-supervised engines (TTT, TTT++, ActMAD, IT3, masked TTT): the maths each one relies on,
checked against direct computations, plus the adaptation contract on tiny models with and without
BatchNorm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tttlab.core.errors import InvalidInputError
from tttlab.torch_ttt import get_engine
from tttlab.torch_ttt.augment import random_resized_crop_flip, simclr_views
from tttlab.torch_ttt.engine.actmad_engine import ActMADEngine
from tttlab.torch_ttt.engine.base_engine import FeatureHook
from tttlab.torch_ttt.engine.it3_engine import IT3Engine
from tttlab.torch_ttt.engine.masked_ttt_engine import MaskedTTTEngine, mask_patches, masked_mse
from tttlab.torch_ttt.engine.ttt_engine import TTTEngine, rotate_batch
from tttlab.torch_ttt.engine.ttt_pp_engine import TTTPPEngine, nt_xent
from tttlab.torch_ttt.heads import RunningMoments, features_only


class ConvNet(nn.Module):
    """12x12 single-channel images -> 5 classes; optional BatchNorm after the first convolution."""

    def __init__(self, bn: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(8 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.norm(self.conv1(x)))
        x = F.relu(self.conv2(x)).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class TokenNet(nn.Module):
    """Token ids (N, L) -> per-token vocabulary logits (N, L, 20) (a BERT-style masked-LM head)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.mlm = nn.Linear(8, 20)

    def forward(self, input_ids, attention_mask=None):
        return self.mlm(torch.tanh(self.embed(input_ids)))


def images(n: int = 8, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed)) + shift


def conv_net(bn: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = ConvNet(bn)
    if bn:
        net.train()
        with torch.no_grad():
            for i in range(3):
                net(images(16, seed=100 + i))
    return net.eval()


def make_engine(name: str, net: nn.Module, **settings):
    """Each engine on ConvNet with its typical layer; statistics from a training-like batch."""
    opt = {"num_steps": 1, "lr": 1e-2, **settings}
    if name == "ttt":
        engine = TTTEngine(net, "conv2", optimization_parameters=opt)
    elif name == "ttt_pp":
        engine = TTTPPEngine(net, "fc1", optimization_parameters=opt)  # global RNG: torch.manual_seed
        engine.compute_statistics([images(16, seed=5)])
    elif name == "actmad":
        engine = ActMADEngine(net, ["conv1", "fc1"], optimization_parameters=opt)
        engine.compute_statistics([(images(16, seed=5), None)])
    elif name == "ittt":
        engine = IT3Engine(net, "fc1", optimization_parameters=opt)
    else:
        engine = MaskedTTTEngine(net, features_layer_name="conv2", optimization_parameters=opt)
    return engine.eval()


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


ENGINES = ["ttt", "ttt_pp", "actmad", "ittt", "masked_ttt"]


# -- the adaptation contract, on a plain and a BatchNorm model -------------------------------------
@pytest.mark.parametrize("bn", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("name", ENGINES)
def test_adaptation_contract(name, bn):
    net = conv_net(bn)
    engine = make_engine(name, net, num_steps=0)
    assert get_engine(name) is type(engine)
    x = images(8, seed=1, shift=0.7)
    with torch.no_grad():
        expected = net(x)
    assert torch.equal(engine(x)[0], expected)  # num_steps=0: exactly the wrapped model

    before_engine = snapshot(engine)
    adapted = {name for name, _ in engine.adapted_parameters()}
    engine.optimization_parameters.update(num_steps=1, reset="per_domain")
    outputs, loss = engine(x)
    assert torch.isfinite(loss) and loss.item() != 0
    after = snapshot(engine)
    changed = {k for k in before_engine if not torch.equal(before_engine[k], after[k])}
    assert changed and changed <= adapted, f"changed outside the adapted parameters: {changed - adapted}"
    with torch.no_grad():
        assert torch.equal(outputs, net(x)), "the prediction is the adapted model's"
    engine.reset()
    restored = snapshot(engine)
    assert all(torch.equal(before_engine[k], restored[k]) for k in before_engine)

    engine.optimization_parameters["reset"] = "per_batch"  # episodic: two calls agree bit for bit
    torch.manual_seed(3)
    first = engine(x)[0]
    torch.manual_seed(3)
    assert torch.equal(first, engine(x)[0])
    assert all(torch.equal(before_engine[k], v) for k, v in snapshot(engine).items())


@pytest.mark.parametrize("name", ENGINES)
def test_heads_exist_before_first_call_and_are_trained(name):
    net = conv_net(bn=True)
    engine = make_engine(name, net)
    head_names = [n for n, _ in engine.named_parameters() if not n.startswith("model.")]
    if name == "actmad":
        assert head_names == []
        return
    assert head_names, "the auxiliary head must exist at construction"
    optimizer = torch.optim.Adam(engine.parameters(), lr=1e-2)  # built before the first call
    heads = {n: p.detach().clone() for n, p in engine.named_parameters() if n in head_names}
    engine.train()
    x = images(8, seed=2)
    kwargs = {"target": F.one_hot(torch.arange(8) % 5, 5).float()} if name == "ittt" else {}
    outputs, ssl = engine(x, **kwargs)
    assert outputs.shape == (8, 5)
    (F.cross_entropy(outputs, torch.arange(8) % 5) + 0.35 * ssl).backward()
    optimizer.step()
    params = dict(engine.named_parameters())
    assert all(not torch.equal(heads[n], params[n]) for n in head_names if params[n].grad is not None)
    assert sum(params[n].grad is not None for n in head_names) >= 2


def test_bad_layer_names_list_the_available_ones():
    net = conv_net()
    for make in (
        lambda: TTTEngine(net, "conv9"),
        lambda: TTTPPEngine(net, "conv9"),
        lambda: ActMADEngine(net, ["conv1", "conv9"]),
        lambda: IT3Engine(net, "conv9"),
        lambda: MaskedTTTEngine(net, features_layer_name="conv9"),
    ):
        with pytest.raises(InvalidInputError, match=r"available layers.*fc1"):
            make()
    with pytest.raises(InvalidInputError, match="feature_shape"):
        TTTEngine(net, "norm")  # an Identity: its output shape is unknown without a dry run
    engine = TTTEngine(net, "norm", example_input=images(2))
    assert engine.angle_head[0].in_channels == 4


# -- TTT ---------------------------------------------------------------------------------------------
def test_rotations_are_exact_and_labelled():
    x = images(3)
    r, labels = rotate_batch(x, "expand")
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for k in range(4):
        block = r[3 * k : 3 * k + 3]
        assert torch.equal(torch.rot90(block, 4 - k if k else 0, dims=(2, 3)), x)
    y = x
    for _ in range(4):
        y = torch.rot90(y, 1, dims=(2, 3))
    assert torch.equal(y, x)
    gen = torch.Generator().manual_seed(0)
    r, labels = rotate_batch(images(16), "rand", generator=gen)
    again, labels_again = rotate_batch(images(16), "rand", generator=torch.Generator().manual_seed(0))
    assert torch.equal(r, again) and torch.equal(labels, labels_again) and len(set(labels.tolist())) > 1
    for i, k in enumerate(labels.tolist()):
        assert torch.equal(r[i], torch.rot90(images(16)[i], k, dims=(1, 2)))
    r, labels = rotate_batch(images(64), "rand", generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(labels, minlength=4).tolist()
    assert len(counts) == 4 and min(counts) >= 6, f"all four rotations are drawn, about equally: {counts}"
    with pytest.raises(InvalidInputError, match="square"):
        rotate_batch(torch.zeros(2, 1, 4, 6))


def test_rotation_labels_are_the_official_flip_transpose_rotations():
    """Label k is the official TTT code's rotation k (``utils/rotation.py``, on a CHW image): 1 = flip the
    width axis then swap height and width, 2 = flip both axes, 3 = swap then flip the width axis; so a
    rotation head trained with the official labels reads ours the same way (1 and 3 are not swapped)."""
    official = {
        0: lambda img: img,
        1: lambda img: img.flip(2).transpose(1, 2),
        2: lambda img: img.flip(2).flip(1),
        3: lambda img: img.transpose(1, 2).flip(2),
    }
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    rotated, labels = rotate_batch(x, "expand")
    want = torch.stack([official[int(k)](img) for k, img in zip(labels, x.repeat(4, 1, 1, 1))])
    assert torch.equal(rotated, want)
    rotated, labels = rotate_batch(x.repeat(8, 1, 1, 1), "rand", generator=torch.Generator().manual_seed(2))
    assert len(set(labels.tolist())) == 4
    want = torch.stack([official[int(k)](img) for k, img in zip(labels, x.repeat(8, 1, 1, 1))])
    assert torch.equal(rotated, want)


def test_ttt_early_exit_features_equal_full_forward_and_skip_later_layers():
    net = conv_net(bn=True)
    engine = TTTEngine(net, "conv2")
    x = images(4)
    calls = []
    handle = net.fc2.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        with FeatureHook(net.conv2) as hook:
            net(x)
        assert len(calls) == 1
        early = engine._features_only(x)
    handle.remove()
    assert len(calls) == 1, "layers after the features layer must not run"
    assert torch.equal(early, hook.output)


def test_ttt_single_forward_equals_two_forwards_without_batchnorm():
    net = conv_net(bn=False)
    for rotation_type in ("expand", "rand"):
        engine = TTTEngine(net, "fc1", rotation_type=rotation_type).train()
        x = images(6)
        engine.generator = torch.Generator().manual_seed(1)
        outputs, loss = engine(x)
        engine.generator = torch.Generator().manual_seed(1)
        rotated, labels = rotate_batch(x, rotation_type, engine.generator)
        with FeatureHook(net.fc1) as hook:
            net(rotated)
        reference = F.cross_entropy(engine.angle_head(hook.output), labels)
        torch.testing.assert_close(outputs, net(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


# -- TTT++ -------------------------------------------------------------------------------------------
def test_nt_xent_matches_direct_formula():
    z = torch.randn(5, 2, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = F.normalize(torch.cat([z[:, 0], z[:, 1]]), dim=1)
    total = 0.0
    for i in range(10):
        positive = (i + 5) % 10
        sims = [float(rows[i] @ rows[j]) / 0.07 for j in range(10) if j != i]
        log_denominator = torch.logsumexp(torch.tensor(sims, dtype=torch.float64), 0)
        total += -(float(rows[i] @ rows[positive]) / 0.07 - float(log_denominator))
    torch.testing.assert_close(nt_xent(z), torch.tensor(total / 10, dtype=torch.float64))


@pytest.mark.parametrize("temperature", [0.5, 0.2])
def test_contrastive_loss_keeps_supcons_temperature_over_base_temperature_factor(temperature):
    """The TTT++ code (``SupConLoss(temperature=0.5)``) and torch-ttt's ``ContrastiveLoss`` multiply the
    NT-Xent by ``temperature / base_temperature`` with base 0.07: at the official 0.5 the contrastive term is
    7.1 times the plain NT-Xent, which sets its weight against the alignment terms."""
    from tttlab.torch_ttt.engine.ttt_pp_engine import ContrastiveLoss

    z = torch.randn(6, 2, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = F.normalize(torch.cat([z[:, 0], z[:, 1]]), dim=1)
    per_anchor = []
    for i in range(12):
        others = [j for j in range(12) if j != i]
        log_denominator = torch.logsumexp(torch.stack([rows[i] @ rows[j] / temperature for j in others]), 0)
        positive = (i + 6) % 12
        per_anchor.append(-(temperature / 0.07) * (rows[i] @ rows[positive] / temperature - log_denominator))
    reference = torch.stack(per_anchor).mean()
    torch.testing.assert_close(ContrastiveLoss(temperature=temperature)(z), reference)
    torch.testing.assert_close(nt_xent(z, temperature), reference)
    plain = ContrastiveLoss(temperature=temperature, base_temperature=temperature)(z)
    torch.testing.assert_close(plain, reference * 0.07 / temperature)
    assert torch.equal(ContrastiveLoss()(z), nt_xent(z, 0.07, True, 0.07))  # the default: factor exactly 1
    with pytest.raises(InvalidInputError, match="base_temperature"):
        ContrastiveLoss(base_temperature=0.0)
    with pytest.raises(InvalidInputError, match="temperature"):
        ContrastiveLoss(temperature=-0.5)


def test_running_moments_equal_the_concatenated_batch():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 6, generator=g) * 3 + 1 for n in (5, 1, 9)]
    full = torch.cat(parts).double()
    acc, cov_acc = RunningMoments(), RunningMoments(covariance=True)
    for p in parts:
        acc.update(p)
        cov_acc.update(p)
    torch.testing.assert_close(acc.mean, full.mean(0))
    torch.testing.assert_close(acc.var, full.var(0))
    torch.testing.assert_close(cov_acc.cov, torch.cov(full.T))


def test_ttt_pp_alignment_is_zero_on_the_statistics_batch_and_positive_when_shifted():
    net = conv_net(bn=True)
    for layer in ("fc1", "conv2"):  # vector features and pooled feature maps
        engine = TTTPPEngine(net, layer).eval()
        x = images(16, seed=5)
        engine.compute_statistics([x[:7], x[7:]])
        with torch.no_grad():
            same = engine.alignment_loss(features_only(net, engine.target_module, x))
            shifted = engine.alignment_loss(
                features_only(net, engine.target_module, images(16, seed=6, shift=2.0))
            )
        assert same.item() < 1e-10
        assert shifted.item() > 1e-4


def test_ttt_pp_train_forwards_accumulate_the_statistics():
    net = conv_net(bn=False)
    engine = TTTPPEngine(net, "fc1", generator=torch.Generator().manual_seed(0))
    batches = [images(6, seed=s) for s in (1, 2)]
    engine.train()
    with torch.no_grad():
        for b in batches:
            engine(b)
    engine.eval()  # the accumulated statistics become the reference
    accumulated = (engine.reference_mean, engine.reference_cov, engine.reference_c_cov)
    engine.compute_statistics(batches)
    for a, b in zip(accumulated, (engine.reference_mean, engine.reference_cov, engine.reference_c_cov)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_statistics_engines_refuse_to_adapt_without_statistics():
    net = conv_net()
    for engine in (TTTPPEngine(net, "fc1").eval(), ActMADEngine(net, "fc1").eval()):
        with pytest.raises(InvalidInputError, match="compute_statistics"):
            engine(images(4))


def test_simclr_views_are_seeded_per_image_and_keep_shape():
    x = images(4)
    a = simclr_views(x, generator=torch.Generator().manual_seed(0))
    b = simclr_views(x, generator=torch.Generator().manual_seed(0))
    assert a.shape == (8, 1, 12, 12) and torch.equal(a, b)
    assert not torch.allclose(a[:4], a[4:])
    full = random_resized_crop_flip(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    torch.testing.assert_close(full, x, rtol=1e-5, atol=1e-5)  # the whole image, unflipped: identity


# -- ActMAD ------------------------------------------------------------------------------------------
def test_actmad_loss_zero_on_its_statistics_batch_and_positive_when_shifted():
    net = conv_net(bn=True)
    engine = ActMADEngine(net, ["conv1", "conv2", "fc1"]).eval()
    x = images(16, seed=5)
    engine.compute_statistics([x[:5], x[5:]])
    assert [tuple(m.shape) for m in engine.reference_mean] == [(4, 12, 12), (8, 6, 6), (16,)]  # pixel-wise
    with torch.no_grad():
        assert engine.adapt_loss(x).item() < 1e-5
        assert engine.adapt_loss(images(16, seed=6, shift=1.5)).item() > 1e-2
    engine.optimization_parameters.update(num_steps=1, reset="never", lr=1e-3)
    shifted = images(16, seed=6, shift=1.5)
    losses = [engine(shifted)[1].item() for _ in range(5)]
    assert losses[-1] < losses[0]


def test_actmad_stops_after_the_deepest_layer():
    net = conv_net()
    engine = ActMADEngine(net, ["conv2", "conv1"])
    calls = []
    handle = net.fc1.register_forward_hook(lambda *a: calls.append(1))
    engine._layer_outputs(images(3))
    handle.remove()
    assert calls == []


# -- IT3 ---------------------------------------------------------------------------------------------
def test_it3_training_scheme_and_shapes():
    net = conv_net(bn=False)
    engine = IT3Engine(net, "conv2")  # 2-D outputs embedded into 4-D features (per-channel offset)
    assert isinstance(engine.embeder[0], nn.Linear) and engine.embeder[0].in_features == 5
    engine.train()
    x, target = images(6), F.one_hot(torch.arange(6) % 5, 5).float()
    y0, loss = engine(x, target=target)
    assert y0.shape == (6, 5)
    torch.testing.assert_close(y0, net(x), rtol=1e-5, atol=1e-6)
    emb = engine.embeder(target)
    handle = net.conv2.register_forward_hook(lambda m, a, out: out + emb[:, :, None, None])
    y1 = net(x)
    handle.remove()
    torch.testing.assert_close(loss, F.mse_loss(y1, target), rtol=1e-5, atol=1e-7)
    with pytest.raises(InvalidInputError, match="output_shape"):
        IT3Engine(
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(200, 3), nn.Conv1d(1, 1, 1)), "0"
        )(images(2))


def test_it3_idempotence_loss_decreases_on_a_fixed_batch():
    net = conv_net(bn=True)
    engine = IT3Engine(
        net, "fc1", optimization_parameters={"num_steps": 1, "lr": 1e-2, "reset": "never"}
    ).eval()
    x = images(8, seed=4, shift=1.0)
    losses = [engine(x)[1].item() for _ in range(8)]
    assert losses[-1] < losses[0]


# -- masked TTT --------------------------------------------------------------------------------------
def test_patch_masks_are_whole_patches_of_a_fixed_count():
    x = images(5)
    masked, mask = mask_patches(x, 4, 0.5, mask_value=-3.0, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (5, 1, 12, 12)
    grid = mask.view(5, 3, 4, 3, 4)
    assert torch.equal(grid.amin(dim=(2, 4)), grid.amax(dim=(2, 4)))  # constant within each patch
    assert grid[:, :, 0, :, 0].sum(dim=(1, 2)).tolist() == [9 - int(9 * 0.5)] * 5  # MAE: 5 of 9
    assert torch.equal(masked[mask.expand_as(x)], torch.full((int(mask.sum()),), -3.0))
    assert torch.equal(masked[~mask.expand_as(x)], x[~mask.expand_as(x)])


def test_masked_loss_depends_only_on_masked_pixels():
    net = conv_net(bn=True)
    engine = MaskedTTTEngine(net, features_layer_name="conv2", mask_prob=0.5).eval()
    x = images(4)
    engine.generator = torch.Generator().manual_seed(0)
    _, mask = engine.mask(x)
    # (1) the loss ignores the reconstruction and the target outside the mask
    pred = torch.randn_like(x)
    noise = torch.randn_like(x) * (~mask)
    assert torch.equal(masked_mse(pred, x, mask), masked_mse(pred + noise, x + 2 * noise, mask))
    # (2) end to end: the model only sees the visible pixels, so changing the masked ones changes only the target
    x2 = torch.where(mask, x + 5.0, x)
    engine.generator = torch.Generator().manual_seed(0)
    masked2, mask2 = engine.mask(x2)
    engine.generator = torch.Generator().manual_seed(0)
    masked1, _ = engine.mask(x)
    assert torch.equal(mask, mask2) and torch.equal(masked1, masked2)
    with torch.no_grad():
        engine.generator = torch.Generator().manual_seed(0)
        loss2 = engine.adapt_loss(x2)
        recon = engine.reconstruct(features_only(net, engine.target_module, masked1), (12, 12))
    assert recon.shape == x.shape
    torch.testing.assert_close(loss2, masked_mse(recon, x2, mask))


def test_masked_ttt_token_mode():
    torch.manual_seed(0)
    net = TokenNet().eval()
    engine = MaskedTTTEngine(
        net, 0, "mlm", mask_prob=1.0, skip_tokens=[1, 2], optimization_parameters={"num_steps": 1}
    )
    assert engine.decoder is None and list(engine.parameters()) == list(net.parameters())
    ids = torch.randint(1, 20, (3, 7), generator=torch.Generator().manual_seed(0))
    masked, mask = engine._mask_tokens(ids)
    assert torch.equal(mask, (ids != 1) & (ids != 2)) and (masked[mask] == 0).all()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        reference = net(**batch)
    engine.optimization_parameters["num_steps"] = 0
    assert torch.equal(engine(batch)[0], reference)
    engine.optimization_parameters["num_steps"] = 1
    out, loss = engine(batch)
    assert out.shape == (3, 7, 20) and loss.item() > 0
    with pytest.raises(InvalidInputError, match="integer input_ids"):
        engine.adapt_loss(torch.randn(3, 7))


def test_statistics_and_heads_follow_the_engine_to_another_dtype():
    net = conv_net(bn=True)
    actmad, ttt_pp = ActMADEngine(net, ["conv1", "fc1"]), TTTPPEngine(net, "fc1")
    for engine in (actmad, ttt_pp):
        engine.compute_statistics([images(8, seed=5)])
    for engine in (actmad, ttt_pp):
        engine.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in actmad.reference_mean + actmad.reference_var)
    assert ttt_pp.reference_cov.dtype == torch.float64
    assert actmad.adapt_loss(images(8, seed=5).double()).item() < 1e-5
    head = TTTEngine(net, "conv2").angle_head  # built on the model's (now float64) dtype
    assert next(head.parameters()).dtype == torch.float64


def test_it3_rejects_a_target_of_the_wrong_shape():
    engine = IT3Engine(conv_net(), "fc1").train()
    with pytest.raises(InvalidInputError, match="one-hot"):
        engine(images(4), target=torch.arange(4))


def _with_embedding(net, layer, emb, x):
    handle = layer.register_forward_hook(lambda m, a, out: out + emb)
    try:
        return net(x)
    finally:
        handle.remove()


def test_it3_softmax_feedback_feeds_and_compares_probabilities():
    """``feedback="softmax"`` (a logit classifier, as the official notebooks feed probabilities back): the
    embedder gets ``softmax(f(x, 0))``, the idempotence loss compares the two passes' probabilities, the
    training loss compares ``softmax(f(x, y))`` with the one-hot ``y``; gradients as the written-out loss."""
    net = conv_net(bn=False)
    engine = IT3Engine(net, "fc1", feedback="softmax").eval()
    x = images(6, seed=3)
    params = list(net.parameters())
    got = engine.adapt_loss(x)
    p0 = net(x).softmax(1)
    p1 = _with_embedding(net, net.fc1, engine.embeder(p0), x).softmax(1)
    want = F.mse_loss(p1, p0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)
    # differs from the raw-output loss on the same model (the default, torch-ttt's)
    raw = IT3Engine(net, "fc1").eval()
    raw.embeder.load_state_dict(engine.embeder.state_dict())
    assert abs(raw.adapt_loss(x).item() - got.item()) > 1e-3
    engine.train()
    labels = torch.arange(6) % 5
    target = engine.label_target(labels)
    torch.testing.assert_close(target, F.one_hot(labels, 5).float())
    y0, loss = engine(x, target=target)
    torch.testing.assert_close(y0, net(x), rtol=1e-5, atol=1e-6)
    p_y = _with_embedding(net, net.fc1, engine.embeder(target), x).softmax(1)
    torch.testing.assert_close(loss, F.mse_loss(p_y, target), rtol=1e-5, atol=1e-8)
    with pytest.raises(InvalidInputError, match="feedback"):
        IT3Engine(net, "fc1", feedback="probs")
    with pytest.raises(InvalidInputError, match="integers"):
        engine.label_target(target)


def test_it3_adapts_the_model_not_the_embedder_and_predicts_f_x_0():
    """torch-ttt: the optimizer holds the model's parameters only (the jointly trained embedder stays as
    trained) and the prediction after the steps is the adapted model's plain forward ``f(x, 0)``."""
    net = conv_net(bn=False)
    engine = IT3Engine(net, "fc1", optimization_parameters={"num_steps": 2, "lr": 1e-2, "reset": "never"})
    engine.eval()
    before_model = {k: v.clone() for k, v in net.state_dict().items()}
    before_emb = {k: v.clone() for k, v in engine.embeder.state_dict().items()}
    x = images(6, seed=5, shift=1.0)
    out, _ = engine(x)
    assert any(not torch.equal(before_model[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(before_emb[k], v) for k, v in engine.embeder.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(out, net(x))


# -- the losses against their formulas, written out in float64 (mutation audit: the zero-at-the-statistics
#    and positive-when-shifted checks above let a wrong normaliser, an L2 for an L1 or a detached target
#    through) ------------------------------------------------------------------------------------------
def _hand_cov(a: torch.Tensor) -> torch.Tensor:
    c = a - a.mean(0, keepdim=True)
    return c.T @ c / (a.shape[0] - 1)


def test_ttt_pp_alignment_loss_is_the_coral_and_mean_formula():
    """``scale_cov * ||C_s - C_t||_F^2 / (4 d^2) + scale_mu * mean((mu_s - mu_t)^2)`` on the features and,
    with the ``scale_c_*`` weights, on the contrastive head's projections (distinct weights, so a swap
    shows)."""
    net = conv_net(bn=True)
    engine = TTTPPEngine(net, "fc1", scale_cov=0.3, scale_mu=0.7, scale_c_cov=0.2, scale_c_mu=0.05).eval()
    engine.compute_statistics([images(16, seed=5)])
    with torch.no_grad():
        f = features_only(net, engine.target_module, images(12, seed=6, shift=1.0))
        got = engine.alignment_loss(f)
        proj = engine.contrastive_head(f)
    want = 0.0
    for a, mu, cov, s_mu, s_cov in (
        (f, engine.reference_mean, engine.reference_cov, 0.7, 0.3),
        (proj, engine.reference_c_mean, engine.reference_c_cov, 0.05, 0.2),
    ):
        a, mu, cov = a.double(), mu.double(), cov.double()
        d = a.shape[1]
        want += s_cov * float(((cov - _hand_cov(a)) ** 2).sum()) / (4 * d * d)
        want += s_mu * float(((mu - a.mean(0)) ** 2).mean())
    assert want > 1e-3
    assert got.item() == pytest.approx(want, rel=1e-4)


def test_actmad_loss_is_the_l1_distance_of_means_and_variances():
    """Sum over layers of ``mean|mu - mu_clean| + mean|var - var_clean|`` (element-wise statistics over the
    batch, unbiased variances): ActMAD's L1, not a squared distance."""
    net = conv_net(bn=True)
    engine = ActMADEngine(net, ["conv1", "fc1"]).eval()
    engine.compute_statistics([(images(16, seed=5), None)])
    x = images(12, seed=6, shift=1.0)
    with torch.no_grad():
        got = engine.adapt_loss(x)
        feats = features_only(net, [net.conv1, net.fc1], x)
    want = 0.0
    for f, mu, var in zip(feats, engine.reference_mean, engine.reference_var):
        f = f.double()
        want += float((f.mean(0) - mu.double()).abs().mean()) + float((f.var(0) - var.double()).abs().mean())
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_masked_mse_is_the_mean_over_masked_pixels_and_channels():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    _, mask = mask_patches(target, 4, 0.5, generator=torch.Generator().manual_seed(1))
    sel = mask.expand_as(target)
    want = ((pred - target)[sel].double() ** 2).mean()
    assert 0 < int(sel.sum()) < sel.numel()
    torch.testing.assert_close(masked_mse(pred, target, mask).double(), want, rtol=1e-6, atol=0)


def test_it3_idempotence_gradient_flows_through_both_applications():
    """``d/dtheta distance(f(x, f(x, 0)), f(x, 0))`` with the graph through the target ``f(x, 0)`` and the
    embedded prediction, as torch-ttt's formulation (no stop-gradient, no anchor copy)."""
    net = conv_net(bn=False)
    engine = IT3Engine(net, "fc1").eval()
    x = images(6, seed=3)
    params = list(net.parameters())
    got = torch.autograd.grad(engine.adapt_loss(x), params)
    y0 = net(x)
    emb = engine.embeder(y0)
    handle = net.fc1.register_forward_hook(lambda m, a, out: out + emb)
    try:
        y1 = net(x)
    finally:
        handle.remove()
    want = torch.autograd.grad(F.mse_loss(y1, y0), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def _fc1_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with FeatureHook(net.fc1) as hook:
        net(x)
    return hook.output


def test_it3_frozen_anchor_never_changes_and_its_loss_is_the_mnist_notebooks():
    """``anchor="frozen"`` (the official MNIST notebook's test time): the second pass runs the *trained*
    network's layers after the features layer on the adapted network's features plus the embedded
    ``s(f(x, 0))``; only the adapted model moves.  After three SGD steps the anchor (weights and BatchNorm
    buffers) is still the trained model, and the loss and its gradients are the hand-written
    ``mse(softmax(F.fc2(relu(h + emb(s0)))), s0)`` with ``h``, ``s0`` from the adapted network."""
    import copy

    net = conv_net(bn=True)
    trained = copy.deepcopy(net)
    opt = {"num_steps": 3, "lr": 5e-2, "optimizer_name": "sgd", "momentum": 0.0, "reset": "never"}
    engine = IT3Engine(net, "fc1", feedback="softmax", anchor="frozen", optimization_parameters=opt).eval()
    x = images(6, seed=4, shift=1.0)
    engine(x)
    anchor = engine.anchor_model
    assert anchor is not None and anchor is not net and not anchor.training
    assert all(not p.requires_grad for p in anchor.parameters())
    for key, value in trained.state_dict().items():  # parameters and BatchNorm buffers as trained
        assert torch.equal(anchor.state_dict()[key], value), key
    moved = [k for k, v in net.state_dict().items() if not torch.equal(trained.state_dict()[k], v)]
    assert {"conv1.weight", "fc1.weight", "fc2.weight"} <= set(moved)  # before and after the features
    assert not any(k.startswith("_anchor") for k in engine.state_dict())  # not saved with the engine

    params = list(net.parameters())
    got = engine.adapt_loss(x)
    got_grads = torch.autograd.grad(got, params)
    h = _fc1_features(net, x)
    s0 = net(x).softmax(1)
    want = F.mse_loss(trained.fc2(F.relu(h + engine.embeder(s0))).softmax(1), s0)
    want_grads = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)
    # not torch-ttt's single network (the same by-hand loss with the adapted fc2 in the second pass)
    single = F.mse_loss(net.fc2(F.relu(h + engine.embeder(s0))).softmax(1), s0)
    assert abs(single.item() - want.item()) > 1e-3 * want.item() > 0
    with torch.no_grad():  # another step leaves the anchor as it was
        before = {k: v.clone() for k, v in anchor.state_dict().items()}
    engine(x)
    assert engine.anchor_model is anchor
    assert all(torch.equal(before[k], v) for k, v in anchor.state_dict().items())


def test_it3_frozen_anchor_gradient_differs_from_the_single_network_at_the_first_step():
    """At the first step both variants see the same weights and the same loss value, but the frozen copy
    passes no gradient to the layers after the features layer through the second pass: only the first
    pass's ``f(x, 0)`` reaches them."""
    net = conv_net(bn=False)
    x = images(6, seed=3)
    params = list(net.parameters())
    single = IT3Engine(net, "fc1", feedback="softmax").eval()
    frozen = IT3Engine(net, "fc1", embeder=single.embeder, feedback="softmax", anchor="frozen").eval()
    frozen.take_snapshot()
    a, b = single.adapt_loss(x), frozen.adapt_loss(x)
    torch.testing.assert_close(a, b)
    ga, gb = torch.autograd.grad(a, params), torch.autograd.grad(b, params)
    fc2 = [i for i, p in enumerate(params) if p is net.fc2.weight][0]
    assert not torch.allclose(ga[fc2], gb[fc2])


def test_it3_frozen_anchor_follows_reset_and_retraining():
    """Reset per batch restores the model to the anchor's weights; after ``engine.train()`` (weights about
    to change) the anchor is dropped and the next adaptation copies the new weights."""
    net = conv_net(bn=False)
    engine = IT3Engine(net, "fc1", anchor="frozen", optimization_parameters={"num_steps": 2, "lr": 1e-2})
    engine.eval()
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    engine(images(4, seed=1, shift=1.0))
    assert all(torch.equal(trained[k], v) for k, v in net.state_dict().items())  # per-batch reset
    assert all(torch.equal(trained[k], v) for k, v in engine.anchor_model.state_dict().items())
    engine.train()
    assert engine.anchor_model is None
    with torch.no_grad():
        net.fc2.bias.add_(0.5)  # "more training"
    engine.eval()(images(4, seed=2, shift=1.0))
    torch.testing.assert_close(engine.anchor_model.fc2.bias, trained["fc2.bias"] + 0.5)
    with pytest.raises(InvalidInputError, match="anchor='ema'; expected one of"):
        IT3Engine(net, "fc1", anchor="ema")


@pytest.mark.parametrize(
    "size, prob, count",
    [(12, 0.75, 7), (12, 0.3, 3), (16, 0.75, 12), (10, 0.75, 7), (12, 0.01, 1), (12, 0.5, 5), (28, 0.6, 30),
     (28, 0.75, 37)],
)  # fmt: skip
def test_masked_patch_count_is_maes(size, prob, count):
    """MAE's count, all but ``int(L * (1 - mask_prob))`` of the ``L`` patches (``random_masking``'s
    ``len_keep``), at least one: 0.75 of 9 is 7, not the floor 6; 0.5 of 9 is 5 and 0.6 of 49 is 30, where
    rounding gave 4 and 29; MNIST's 7x7 grid of 4-pixel patches at 0.75: 37.  A 10x10 image has a
    ceil-divided 3x3 grid."""
    x = torch.randn(3, 1, size, size, generator=torch.Generator().manual_seed(0))
    _, mask = mask_patches(x, 4, prob, generator=torch.Generator().manual_seed(0))
    cells = -(-size // 4)
    padded = torch.zeros(3, 1, cells * 4, cells * 4, dtype=torch.bool)
    padded[:, :, :size, :size] = mask
    per_patch = padded.view(3, cells, 4, cells, 4)[:, :, 0, :, 0]
    assert per_patch.sum(dim=(1, 2)).tolist() == [count] * 3


def test_masked_ttt_train_loss_reconstructs_from_the_masked_images():
    """Without BatchNorm the train-mode forward runs clean and masked images in one batch; its loss must be
    the masked images' reconstruction loss, the one ``adapt_loss`` computes with the same mask."""
    net = conv_net(bn=False)
    engine = MaskedTTTEngine(net, features_layer_name="conv2", mask_prob=0.5)
    x = images(4, seed=2)
    engine.train()
    engine.generator = torch.Generator().manual_seed(0)
    outputs, train_loss = engine(x)
    torch.testing.assert_close(outputs, net(x), rtol=1e-5, atol=1e-6)
    engine.eval()
    engine.generator = torch.Generator().manual_seed(0)
    masked, mask = engine.mask(x)
    recon = engine.reconstruct(features_only(net, engine.target_module, masked), (12, 12))
    torch.testing.assert_close(train_loss, masked_mse(recon, x, mask), rtol=1e-5, atol=1e-7)


def test_masked_token_loss_is_cross_entropy_on_the_masked_tokens_only():
    torch.manual_seed(0)
    net = TokenNet().eval()
    engine = MaskedTTTEngine(net, 0, "mlm", mask_prob=0.4, optimization_parameters={"num_steps": 1})
    ids = torch.randint(1, 20, (4, 9), generator=torch.Generator().manual_seed(1))
    engine.generator = torch.Generator().manual_seed(2)
    masked, mask = engine._mask_tokens(ids)
    assert 0 < int(mask.sum()) < mask.numel()
    engine.generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        got = engine.adapt_loss(ids)
        want = F.cross_entropy(net(masked)[mask], ids[mask])
    torch.testing.assert_close(got, want)


def test_ttt_pp_contrastive_loss_pairs_the_two_views_of_each_image():
    """View-major features ``(2N, ...)``: row ``i`` and row ``N + i`` are the two views of image ``i``; the
    loss is NT-Xent of the head's projections paired that way (mutation audit: pairing neighbouring rows
    survived)."""
    net = conv_net()
    engine = TTTPPEngine(net, "fc1").eval()
    vf = torch.randn(10, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = engine.contrastive_head(vf)
        want = nt_xent(torch.stack([z[:5], z[5:]], dim=1))
        got = engine.contrastive_loss(vf)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["ttt_pp", "actmad"])
def test_statistics_of_a_train_mode_model_are_its_eval_statistics(name):
    """``compute_statistics`` runs the model in eval mode whatever its mode: a model left in train mode
    after training gives the same reference statistics and keeps its BatchNorm running statistics."""
    batches = [images(16, seed=5)]
    refs = []
    for mode in ("eval", "train"):
        net = conv_net(bn=True)
        engine = TTTPPEngine(net, "fc1") if name == "ttt_pp" else ActMADEngine(net, ["conv1", "fc1"])
        net.train(mode == "train")
        before = snapshot(net)
        engine.compute_statistics(batches)
        after = snapshot(net)
        assert all(torch.equal(before[k], after[k]) for k in before), "running statistics changed"
        assert net.training == (mode == "train"), "the model's mode is restored"
        mean = engine.reference_mean if name == "ttt_pp" else engine.reference_mean[0]
        refs.append(mean.clone())
    torch.testing.assert_close(refs[0], refs[1], rtol=0, atol=0)


# -- IT3's options after the official notebooks: distances and the training scheme -----------------------
def _distributions(n: int, k: int, seed: int) -> torch.Tensor:
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3).softmax(1)


def _js_by_hand(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row, float64: ``sum_k p log(p/m) / 2 + sum_k q log(q/m) / 2`` with ``m = (p + q) / 2``."""
    p, q = p.double(), q.double()
    m = (p + q) / 2
    rows = []
    for pi, qi, mi in zip(p, q, m):
        total = sum(a * torch.log(a / c) for a, c in zip(pi, mi) if a > 0)
        total = total + sum(b * torch.log(b / c) for b, c in zip(qi, mi) if b > 0)
        rows.append(total / 2)
    return torch.stack(rows)


def test_js_divergence_is_the_hand_formula_symmetric_zero_on_equal_inputs_and_at_most_ln2():
    from tttlab.torch_ttt.engine.it3_engine import js_divergence

    p, q = _distributions(6, 5, 1), _distributions(6, 5, 2)
    torch.testing.assert_close(js_divergence(p, q).double(), _js_by_hand(p, q).mean(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(js_divergence(p, q), js_divergence(q, p), rtol=0, atol=1e-7)
    assert js_divergence(p, p).abs().item() < 1e-7
    ln2 = torch.log(torch.tensor(2.0))
    disjoint = F.one_hot(torch.tensor([0, 1]), 3).float(), F.one_hot(torch.tensor([2, 0]), 3).float()
    torch.testing.assert_close(js_divergence(*disjoint), ln2)  # the bound, reached; 0 log 0 = 0, finite
    for seed in range(20):
        a, b = _distributions(4, 7, 10 + seed), _distributions(4, 7, 50 + seed)
        assert 0 <= js_divergence(a, b) <= ln2
    # (N, K, H, W): summed over the classes, averaged over the batch and the positions
    p4, q4 = _distributions(2 * 3 * 3, 5, 3), _distributions(2 * 3 * 3, 5, 4)
    as_maps = lambda t: t.reshape(2, 3, 3, 5).permute(0, 3, 1, 2)  # noqa: E731
    torch.testing.assert_close(js_divergence(as_maps(p4), as_maps(q4)), js_divergence(p4, q4))


def test_notebook_js_is_the_notebooks_kl_from_the_midpoint_not_bounded_by_ln2():
    """The notebooks' ``js_div`` takes both Kullback-Leibler terms from the midpoint ``m``: ``sum m log(m/p)
    / 2 + sum m log(m/q) / 2`` per row, averaged over the batch.  Symmetric and zero on equal inputs as the
    Jensen-Shannon divergence, but another number, and above ln 2 on nearly disjoint predictions."""
    from tttlab.torch_ttt.engine.it3_engine import js_divergence, notebook_js

    p, q = _distributions(6, 5, 1), _distributions(6, 5, 2)
    m = ((p + q) / 2).double()
    hand = (0.5 * (m * (m / p.double()).log()).sum(1) + 0.5 * (m * (m / q.double()).log()).sum(1)).mean()
    torch.testing.assert_close(notebook_js(p, q).double(), hand, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(notebook_js(p, q), notebook_js(q, p), rtol=0, atol=1e-7)
    assert notebook_js(p, p).abs().item() < 1e-7
    assert abs(notebook_js(p, q).item() - js_divergence(p, q).item()) > 1e-3
    near = torch.tensor([[1 - 1e-6, 1e-6]]), torch.tensor([[1e-6, 1 - 1e-6]])
    assert (
        notebook_js(*near).item() > 5.0 > torch.log(torch.tensor(2.0)).item() >= js_divergence(*near).item()
    )


def test_it3_distance_option_selects_the_test_time_and_training_distance():
    from tttlab.torch_ttt.engine.it3_engine import js_divergence, notebook_js

    x = images(6, seed=3)
    for name, fn in (("js", js_divergence), ("notebook_js", notebook_js), ("mse", F.mse_loss)):
        net = conv_net()
        engine = IT3Engine(net, "fc1", feedback="softmax", distance=name).eval()
        s0 = net(x).softmax(1)
        emb = engine.embeder(s0)
        handle = net.fc1.register_forward_hook(lambda m, a, out, emb=emb: out + emb)
        try:
            s1 = net(x).softmax(1)
        finally:
            handle.remove()
        torch.testing.assert_close(engine.adapt_loss(x), fn(s1, s0))
        target = F.one_hot(torch.arange(6) % 5, 5).float()  # the torch-ttt training term too
        _, loss = engine.train()(x, target=target)
        assert engine.distance_fn is fn and loss.requires_grad
    with pytest.raises(InvalidInputError, match="distance='kl'; expected one of"):
        IT3Engine(conv_net(), "fc1", distance="kl")
    with pytest.raises(InvalidInputError, match="expected one of them"):
        IT3Engine(conv_net(), "fc1", distance_fn=F.l1_loss, distance="js")


def _reference_first_signals(seed: int, target: torch.Tensor, p: float, neutral: str, n: int):
    """What the notebook scheme feeds the first pass, batch after batch, from a generator seeded ``seed``:
    the truth when ``u > 1 - p`` (the notebooks' ``torch.rand(1) > 0.25``), else the neutral signal."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if torch.rand((), generator=g).item() > 1 - p:
            out.append((target, True))
        elif neutral == "uniform":
            out.append((torch.full_like(target, 1 / target.shape[1]), False))
        else:
            classes = torch.randint(0, target.shape[1], (target.shape[0],), generator=g)
            out.append((F.one_hot(classes, target.shape[1]).float(), False))
    return out


@pytest.mark.parametrize(
    "p, neutral, kwargs",
    [(0.75, "random_class", {}), (0.2, "uniform", {"truth_probability": 0.2, "neutral": "uniform"})],
    ids=["mnist_notebook_defaults", "cifar_notebook"],
)
def test_it3_notebook_scheme_draws_the_truth_with_its_probability_else_the_neutral_signal(p, neutral, kwargs):
    """One draw per batch from the engine's generator: the ground truth with probability 0.75 (MNIST
    notebook, the defaults) or 0.2 (CIFAR notebook), else a one-hot random class per sample (MNIST) or
    the uniform 1/K = 0.1 (CIFAR, 10 classes), exactly the sequence a generator with the same seed gives."""
    target = F.one_hot(torch.arange(8) % 10, 10).float()
    engine = IT3Engine(conv_net(), "fc1", training="notebook", generator=torch.Generator().manual_seed(7),
                       **kwargs)  # fmt: skip
    assert (engine.truth_probability, engine.neutral) == (p, neutral)
    n = 2000
    truths = 0
    for want, want_truth in _reference_first_signals(7, target, p, neutral, n):
        got, truth = engine.first_pass_signal(target)
        assert truth == want_truth and torch.equal(got, want)
        truths += truth
        if not truth:
            torch.testing.assert_close(got.sum(1), torch.ones(8))
            if neutral == "uniform":
                assert torch.all(got == 0.1)
            else:
                assert torch.equal(got.max(1).values, torch.ones(8))
    assert abs(truths / n - p) < 3 * (p * (1 - p) / n) ** 0.5  # the frequency, within 3 sigma
    always = IT3Engine(conv_net(), "fc1", training="notebook", truth_probability=1.0)
    never = IT3Engine(conv_net(), "fc1", training="notebook", truth_probability=0.0)
    assert all(always.first_pass_signal(target)[1] for _ in range(50))
    assert not any(never.first_pass_signal(target)[1] for _ in range(50))


def test_it3_notebook_training_is_the_two_task_losses_through_one_feature_pass():
    """``y1 = f(x, first signal)``, ``y2`` = the layers after fc1 on ``h + emb(softmax(y1))`` with ``h`` the
    first pass's fc1 output; the engine returns ``(y1, CE(y2))`` and the trainer adds ``CE(y1)``: the
    notebooks' ``CE(pass 1) + CE(pass 2)``, gradients through ``softmax(y1)`` into the second pass.  Values
    and gradients (model and embedder) equal the hand computation on batches of both kinds."""
    net = conv_net()
    engine = IT3Engine(net, "fc1", feedback="softmax", training="notebook",
                       generator=torch.Generator().manual_seed(3)).train()  # fmt: skip
    labels = torch.arange(6) % 5
    target = F.one_hot(labels, 5).float()
    params = list(net.parameters()) + list(engine.embeder.parameters())
    kinds = set()
    for i, (first, truth) in enumerate(_reference_first_signals(3, target, 0.75, "random_class", 6)):
        x = images(6, seed=20 + i)
        y1, second = engine(x, target=target)
        assert engine.last_first_pass_truth == truth
        kinds.add(truth)
        got = torch.autograd.grad(F.cross_entropy(y1, labels) + second, params)
        h = net.fc1(F.relu(net.conv2(F.relu(net.norm(net.conv1(x))))).flatten(1))
        want_y1 = net.fc2(F.relu(h + engine.embeder(first)))
        want_y2 = net.fc2(F.relu(h + engine.embeder(want_y1.softmax(1))))
        torch.testing.assert_close(y1, want_y1)
        torch.testing.assert_close(second, F.cross_entropy(want_y2, labels))
        want = torch.autograd.grad(
            F.cross_entropy(want_y1, labels) + F.cross_entropy(want_y2, labels), params
        )
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert kinds == {True, False}, "both kinds of batches were checked"
    # test time is the engine's usual idempotence loss: the scheme only changes training
    plain = IT3Engine(net, "fc1", embeder=engine.embeder, feedback="softmax").eval()
    x = images(6, seed=9)
    torch.testing.assert_close(engine.eval().adapt_loss(x), plain.adapt_loss(x))


def _bn_chain(seed: int = 0) -> nn.Sequential:
    """BatchNorm before, inside and after a block: 0 conv, 1 BN (``momentum=None``: the cumulative
    average, which reads ``num_batches_tracked``), 4 = (4.0 Linear, 4.1 BN), 6 Linear, 7 BN, 9 the logits."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, stride=2), nn.BatchNorm2d(2, momentum=None), nn.ReLU(), nn.Flatten(),
        nn.Sequential(nn.Linear(72, 8), nn.BatchNorm1d(8)), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8),
        nn.ReLU(), nn.Linear(8, 5),
    )  # fmt: skip


@pytest.mark.parametrize("layer", ["4.0", "4"], ids=["bn_4.1_after_the_features", "bn_4.1_inside_them"])
def test_it3_notebook_training_updates_the_statistics_before_the_features_once(layer):
    """The notebooks compute the layers up to the features once per batch (``f1(x)``) and the layers after
    them twice (``f2`` on both signals): after one training forward in train mode, every BatchNorm buffer
    (running mean / variance, ``num_batches_tracked``) equals that hand computation's on a copy of the
    model, bit for bit: BN 1 (and 4.1 when it is inside the features layer "4") once, the others twice.
    The engine's second pass re-runs the layers before the features; they updated their statistics a
    second time until 2026-12-02.  Outputs, loss and gradients are the hand computation's too."""
    net = _bn_chain().train()
    ref = copy.deepcopy(net)
    x = images(6, seed=1)
    labels = torch.arange(6) % 5
    target = F.one_hot(labels, 5).float()
    engine = IT3Engine(net, layer, feedback="softmax", training="notebook", truth_probability=1.0,
                       example_input=x[:2]).train()  # fmt: skip
    y1, second = engine(x, target=target)
    h = ref[:5](x) if layer == "4" else ref[4][0](ref[:4](x))  # f1, the layers up to the features

    def f2(z):  # the layers after them
        return ref[5:](z if layer == "4" else ref[4][1](z))

    want_y1 = f2(h + engine.embeder(target))
    want_y2 = f2(h + engine.embeder(want_y1.softmax(1)))
    torch.testing.assert_close(y1, want_y1)
    torch.testing.assert_close(second, F.cross_entropy(want_y2, labels))
    emb = list(engine.embeder.parameters())
    grads = torch.autograd.grad(F.cross_entropy(y1, labels) + second, [*net.parameters(), *emb])
    want_grads = torch.autograd.grad(
        F.cross_entropy(want_y1, labels) + F.cross_entropy(want_y2, labels), [*ref.parameters(), *emb]
    )
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    got, want = dict(net.named_buffers()), dict(ref.named_buffers())
    assert got.keys() == want.keys() and len(got) == 9  # 3 BatchNorm layers x 3 buffers
    for name in got:
        assert torch.equal(got[name], want[name]), name
    once = {"1", "4.1"} if layer == "4" else {"1"}
    for bn in ("1", "4.1", "7"):
        assert got[f"{bn}.num_batches_tracked"].item() == (1 if bn in once else 2), bn


class _FailingBatchNorm(nn.BatchNorm2d):
    """A BatchNorm layer that raises right after its ``fail_on``-th call's computation (its running
    statistics already updated), as a forward that breaks part-way through."""

    def __init__(self, channels: int, fail_on: int | None = None):
        super().__init__(channels, momentum=None)
        self.fail_on, self.calls = fail_on, 0

    def forward(self, x):
        out = super().forward(x)
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("boom in the second pass")
        return out


def _norm_buffers(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in net.named_buffers()}


@pytest.mark.parametrize("where", ["inside_a_norm_before_the_features", "in_the_features_layers_injection"])
def test_it3_notebook_second_pass_that_raises_gives_every_buffer_back(where):
    """The notebook scheme's second pass swaps copies into the BatchNorm layers that run before the
    features layer's output is out and gives the layers their own tensors back after each call.  A
    second pass that raises part-way - inside such a layer (after it updated the copies) or in the
    features layer's injection, the features layer itself a BatchNorm whose copies were just updated -
    leaves every layer with its own buffer tensors (the same objects as before the call), holding the
    values of the first pass alone (the hand computation on a copy of the model, bit for bit), and no
    hook behind: the next training call is again the notebooks' computation."""
    net = _bn_chain().train()
    if where == "inside_a_norm_before_the_features":
        net[1] = _FailingBatchNorm(2)
        layer, combine = "4.0", None
    else:
        layer, calls = "7", []

        def combine(features, embedding):  # the first pass's injection works, the second's raises
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("boom in the second pass")
            return features + embedding

    ref = copy.deepcopy(net)
    x, x2 = images(6, seed=1), images(6, seed=2)
    labels = torch.arange(6) % 5
    target = F.one_hot(labels, 5).float()
    engine = IT3Engine(net, layer, combine_fn=combine, feedback="softmax", training="notebook",
                       truth_probability=1.0, example_input=x[:2]).train()  # fmt: skip
    if where == "inside_a_norm_before_the_features":
        net[1].calls, net[1].fail_on = 0, 2  # called once per pass: its second call is the second pass's
    own = _norm_buffers(net)
    with pytest.raises(RuntimeError, match="boom in the second pass"):
        engine(x, target=target)
    if where == "inside_a_norm_before_the_features":
        net[1].fail_on = None
    after = _norm_buffers(net)
    assert after.keys() == own.keys() and len(own) == 9
    assert all(after[n] is own[n] for n in own), "a copy was left in place of a layer's own buffer"
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules()), "a hook was left behind"

    def first_pass(model, inp, signal):  # f(x, signal): the embedding added to the features layer's output
        handle = model.get_submodule(layer).register_forward_hook(
            lambda module, args, out: out + engine.embeder(signal)
        )
        try:
            return model(inp)
        finally:
            handle.remove()

    with torch.no_grad():
        first_pass(ref, x, target)  # the first pass alone: every BatchNorm layer updated once
    want = _norm_buffers(ref)
    for name in own:
        assert torch.equal(after[name], want[name]), name
    # the next call is a whole notebook step again: f1 once, f2 on both signals (by hand on the copy)
    engine(x2, target=target)
    with torch.no_grad():
        feats = FeatureHook(ref.get_submodule(layer))
        with feats:
            y1 = first_pass(ref, x2, target)
        h = feats.output
        tail = ref[5:] if layer == "4.0" else ref[8:]
        pre = [ref[4][1]] if layer == "4.0" else []
        z = h + engine.embeder(y1.softmax(1))
        for m in pre:
            z = m(z)
        tail(z)
    got, want = _norm_buffers(net), _norm_buffers(ref)
    for name in own:
        assert torch.equal(got[name], want[name]), name


class _SharedNormNet(nn.Module):
    """One BatchNorm module called twice, before and after the features layer ``feat``:
    conv -> flatten -> lin -> norm -> relu -> feat -> norm -> relu -> out."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, stride=2)
        self.lin = nn.Linear(72, 8)
        self.norm = nn.BatchNorm1d(8)  # momentum 0.1: the order of the updates shows in the running values
        self.feat = nn.Linear(8, 8)
        self.out = nn.Linear(8, 5)

    def f1(self, x):  # the layers up to the features layer's output
        return self.feat(F.relu(self.norm(self.lin(self.conv(x).flatten(1)))))

    def f2(self, z):  # the layers after it
        return self.out(F.relu(self.norm(z)))

    def forward(self, x):
        return self.f2(self.f1(x))


def test_it3_notebook_training_keeps_a_shared_norms_later_call_of_the_second_pass_only():
    """A BatchNorm module used before and after the features layer: the notebooks compute ``f1(x)`` once
    and ``f2`` on both signals, so the shared layer's running statistics take three updates per batch,
    in that order - ``f1``'s call, ``f2`` of the first pass, ``f2`` of the second - and not the second
    pass's ``f1`` call, which the engine runs again only to reach the features layer.  The buffers equal
    that hand computation's on a copy bit for bit (``num_batches_tracked`` 3, not 4; with momentum 0.1
    the running values depend on which batches were counted and in which order), and so do the outputs
    and the loss."""
    torch.manual_seed(0)
    net = _SharedNormNet().train()
    ref = copy.deepcopy(net)
    x = images(6, seed=1)
    labels = torch.arange(6) % 5
    target = F.one_hot(labels, 5).float()
    engine = IT3Engine(net, "feat", feedback="softmax", training="notebook", truth_probability=1.0,
                       example_input=x[:2]).train()  # fmt: skip
    y1, second = engine(x, target=target)
    h = ref.f1(x)
    want_y1 = ref.f2(h + engine.embeder(target))
    want_y2 = ref.f2(h + engine.embeder(want_y1.softmax(1)))
    torch.testing.assert_close(y1, want_y1)
    torch.testing.assert_close(second, F.cross_entropy(want_y2, labels))
    got, want = _norm_buffers(net), _norm_buffers(ref)
    assert got.keys() == want.keys() == {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
    for name in got:
        assert torch.equal(got[name], want[name]), name
    assert got["norm.num_batches_tracked"].item() == 3


def test_it3_defaults_are_torch_ttts_scheme_bit_for_bit_and_draw_nothing():
    """The new arguments at their defaults change nothing: the same losses, outputs and adapted weights as
    the engine built without them, bit for bit, and torch's global generator is not touched."""
    results = []
    for kwargs in ({}, {"distance": None, "training": "torch_ttt"}):
        net = conv_net(bn=True, seed=2)
        torch.manual_seed(5)
        engine = IT3Engine(net, "fc1", feedback="softmax", optimization_parameters={"num_steps": 2},
                           **kwargs)  # fmt: skip
        rng = torch.get_rng_state()
        y0, loss = engine.train()(images(6, seed=1), target=F.one_hot(torch.arange(6) % 5, 5).float())
        assert torch.equal(rng, torch.get_rng_state())
        out, test_loss = engine.eval()(images(6, seed=2, shift=1.0))
        results.append([y0, loss, out, test_loss, *net.state_dict().values()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    for bad, needle in (
        ({"training": "paper"}, "training='paper'; expected one of"),
        ({"truth_probability": 0.5}, "expected training='notebook'"),
        ({"neutral": "uniform"}, "expected training='notebook'"),
        ({"training": "notebook", "truth_probability": 1.5}, r"truth_probability=1.5; expected a number in \[0, 1\]"),
        ({"training": "notebook", "neutral": "zeros"}, "neutral='zeros'; expected one of"),
    ):  # fmt: skip
        with pytest.raises(InvalidInputError, match=needle):
            IT3Engine(conv_net(), "fc1", **bad)


@pytest.mark.parametrize("neutral", ["uniform", "random_class"])
def test_it3_neutral_test_signal_feeds_the_notebooks_neutral_input_at_test_time(neutral):
    """``test_signal="neutral"`` (with the notebook scheme, whose model never saw "0"): the test-time first
    pass is ``f(x, neutral)`` - the uniform ``1/K`` (CIFAR notebook) or a random class per sample drawn
    from the engine's generator (MNIST notebook) - in the idempotence loss and in the prediction."""
    net = conv_net()
    kwargs = {"training": "notebook", "neutral": neutral, "feedback": "softmax", "test_signal": "neutral"}
    engine = IT3Engine(net, "fc1", generator=torch.Generator().manual_seed(4), **kwargs).eval()
    assert not engine.compiled_prediction
    ref = torch.Generator().manual_seed(4)
    x = images(6, seed=2)

    def neutral_input():
        if neutral == "uniform":
            return torch.full((6, 5), 0.2)
        return F.one_hot(torch.randint(0, 5, (6,), generator=ref), 5).float()

    def with_embedding(signal):
        emb = engine.embeder(signal)
        handle = net.fc1.register_forward_hook(lambda m, a, out: out + emb)
        try:
            return net(x)
        finally:
            handle.remove()

    s0 = with_embedding(neutral_input()).softmax(1)
    torch.testing.assert_close(engine.adapt_loss(x), F.mse_loss(with_embedding(s0).softmax(1), s0))
    with torch.no_grad():
        torch.testing.assert_close(engine.predict(x), with_embedding(neutral_input()))
    assert not torch.allclose(engine.predict(x), net(x), atol=1e-4), "not f(x, 0)"
    with pytest.raises(InvalidInputError, match="expected training='notebook'"):
        IT3Engine(conv_net(), "fc1", test_signal="neutral")
    with pytest.raises(InvalidInputError, match="test_signal='none'; expected one of"):
        IT3Engine(conv_net(), "fc1", training="notebook", test_signal="none")
    assert "test_signal" in IT3Engine.test_time_kwargs
