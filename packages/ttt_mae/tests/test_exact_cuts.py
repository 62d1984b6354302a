"""The lean MAE loss (``exact_cuts``) against the full one and the upstream-style reference: same losses,
gradients of the trained parameters and per-step predictions up to float rounding, fewer FLOP."""

import functools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tttlab.ttt_mae import model as M
from tttlab.ttt_mae.model import build_model
from tttlab.ttt_mae.reference import ReferenceTTT
from tttlab.ttt_mae.ttt import BatchedTTT, TTTAdapter, TTTSettings, image_generator, trainable_names


def model(decoder_depth=1, fused=True, **kw):
    torch.manual_seed(0)
    m = build_model("mae_vit_smoke_patch7", fused_attn=fused, decoder_depth=decoder_depth, **kw)
    with torch.no_grad():  # a mask token far from zero, so that its gradient path matters
        m.mask_token.normal_(std=0.5)
    return m


def loss_and_grads(m, fn, imgs, noise, names):
    for n, p in m.named_parameters():
        p.requires_grad_(n in names)
        p.grad = None
    loss = fn(imgs, 0.75, noise)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in m.named_parameters() if n in names}


@pytest.mark.parametrize("decoder_depth", [1, 2, 3])  # first block = last block; first and last; and a middle
@pytest.mark.parametrize("mode", ["encoder", "all", "encoder_no_cls_no_msk"])
@pytest.mark.parametrize("one_image", [True, False])
@pytest.mark.parametrize("lookup", [True, False])  # the CPU's embedding look-up; the GPU's broadcast gather
def test_lean_loss_equals_full_loss(decoder_depth, mode, one_image, lookup, monkeypatch):
    monkeypatch.setattr(M, "_take", functools.partial(TAKE, lookup=lookup))
    m = model(decoder_depth)
    names = set(trainable_names(m, mode))
    g = torch.Generator().manual_seed(1)
    n = 6
    imgs = torch.randn(1 if one_image else n, 1, 28, 28, generator=g)
    noise = torch.rand(n, m.num_patches, generator=g)
    full_imgs = imgs.expand(n, -1, -1, -1)
    want, gw = loss_and_grads(m, m.mae_loss, full_imgs, noise, names)
    got, gg = loss_and_grads(m, m.mae_loss_lean, imgs, noise, names)
    assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-6)
    assert gw.keys() == gg.keys() and len(gw) == len(names)
    for k in gw:
        assert gg[k] is not None, k
        scale = gw[k].abs().max().clamp_min(1e-6)
        assert ((gg[k] - gw[k]).abs().max() / scale).item() < 1e-5, k
    # frozen decoder: no gradient reaches it
    assert all(p.grad is None for n, p in m.named_parameters() if n not in names)


TAKE = M._take


def test_take_forms_agree_and_the_device_picks_one(monkeypatch):
    """``_take`` of one row set for n row lists: the look-up (``embedding``, the CPU default) and the broadcast
    gather (other devices: no host sync in its backward) give equal rows and gradients; a non-CPU tensor
    (the meta device stands in for a GPU) never reaches ``embedding``."""
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(9, generator=g)[:5] for _ in range(7)])  # (7, 5), no repeats per row
    out, grads = [], []
    for lookup in (True, False):
        x = torch.randn(1, 9, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = TAKE(x, ids, lookup=lookup)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        out.append(y.detach())
        grads.append(x.grad)
    assert out[0].shape == (7, 5, 4) and torch.equal(out[0], out[1])
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-6) and grads[0].abs().sum() > 0
    looked_up = []
    monkeypatch.setattr(M.F, "embedding", lambda *a, **kw: looked_up.append(1))
    assert TAKE(torch.empty(1, 9, 4, device="meta"), ids.to("meta")).shape == (7, 5, 4)
    assert looked_up == []
    TAKE(torch.zeros(1, 9, 4), ids)
    assert looked_up == [1]


def test_lean_loss_explicit_attention_and_plain_pixels():
    """The explicit softmax attention (the CPU ``vmap`` path) and ``norm_pix_loss=False``."""
    m = model(2, fused=False, norm_pix_loss=False)
    names = set(trainable_names(m, "encoder"))
    g = torch.Generator().manual_seed(2)
    imgs, noise = torch.randn(1, 1, 28, 28, generator=g), torch.rand(5, m.num_patches, generator=g)
    want, gw = loss_and_grads(m, m.mae_loss, imgs.expand(5, -1, -1, -1), noise, names)
    got, gg = loss_and_grads(m, m.mae_loss_lean, imgs, noise, names)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for k in gw:
        assert torch.allclose(gg[k], gw[k], rtol=1e-4, atol=1e-6 * gw[k].abs().max().item()), k


def count_flops(fn, *args):
    fc = FlopCounterMode(display=False)
    with fc:
        fn(*args).backward()
    return fc.get_total_flops()


def test_lean_loss_does_fewer_flops():
    """Counted matrix-product FLOP of one TTT step (forward + backward, ``finetune_mode=encoder``) on the
    MNIST proxy's shape at 32 copies: the lean loss does <= 83 % of the reference's (measured 81.8 %)."""
    torch.manual_seed(0)
    m = build_model("mae_vit_mnist_patch7", fused_attn=False)
    names = set(trainable_names(m, "encoder"))
    for n, p in m.named_parameters():
        p.requires_grad_(n in names)
    x, noise = torch.rand(1, 1, 28, 28), torch.rand(32, m.num_patches)
    ref = count_flops(m.mae_loss, x.expand(32, -1, -1, -1), 0.75, noise)
    lean_one = count_flops(m.mae_loss_lean, x, 0.75, noise)
    lean_views = count_flops(m.mae_loss_lean, x.expand(32, -1, -1, -1).contiguous(), 0.75, noise)
    assert lean_one < lean_views < ref
    assert lean_one / ref < 0.83 and lean_views / ref < 0.88


@pytest.mark.parametrize("single_crop", [True, False])
@pytest.mark.parametrize("mode", ["encoder", "encoder_no_cls_no_msk"])
def test_fast_paths_with_cuts_equal_reference(norm, settings, images, single_crop, mode):
    """Per-step predictions and losses of the loop and batched paths (exact cuts on) equal the
    upstream-style reference (full loss, deepcopy, plain SGD, explicit attention); the trained weights
    after adaptation too."""
    s = settings(single_crop=single_crop, finetune_mode=mode)
    ref = ReferenceTTT(model(2, fused=False), TTTSettings(**{**s.__dict__, "foreach": False}))
    loop = TTTAdapter(model(2), s)
    batched = BatchedTTT(model(2), s)
    assert s.exact_cuts
    xs = images(3)
    gens = [image_generator(0, 0, i) for i in range(3)]
    got_b = batched.adapt(xs, gens, norm)
    for i, x in enumerate(xs):
        r = ref.adapt(x, image_generator(0, 0, i), norm)
        o = loop.adapt(x, image_generator(0, 0, i), norm)
        assert r.predictions == o.predictions == got_b[i].predictions
        assert r.losses == pytest.approx(o.losses, rel=1e-5, abs=1e-6)
        assert r.losses == pytest.approx(got_b[i].losses, rel=1e-5, abs=1e-6)
    # the last image's adapted weights: reference clone vs the loop's model
    ref_p = dict(ref.clone.named_parameters())
    for n, p in loop.model.named_parameters():
        assert torch.allclose(p, ref_p[n], rtol=1e-4, atol=1e-6), n


def test_cuts_off_is_the_full_loss(norm, settings, images):
    """``exact_cuts=False`` keeps the full loss (the benchmark's 'before' rows): equal to the cut path."""
    xs = images(2)
    gens = [image_generator(0, 3, i) for i in range(2)]
    on = BatchedTTT(model(), settings(single_crop=True)).adapt(xs, gens, norm)
    off_s = settings(single_crop=True, exact_cuts=False)
    off = BatchedTTT(model(), off_s).adapt(xs, [image_generator(0, 3, i) for i in range(2)], norm)
    calls = []
    a = TTTAdapter(model(), off_s)
    assert a._loss == a.model.mae_loss
    a.model.mae_loss_lean = lambda *args: calls.append(1)  # never called with the cuts off
    loop_off = [a.adapt(x, image_generator(0, 3, i), norm) for i, x in enumerate(xs)]
    assert not calls
    for p, q, r in zip(on, off, loop_off):
        assert p.predictions == q.predictions == r.predictions
        assert p.losses == pytest.approx(q.losses, rel=1e-5, abs=1e-6)
        assert q.losses == pytest.approx(r.losses, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mask_ratio", [0.5, 0.9])
def test_lean_loss_one_copy_and_other_mask_ratios(mask_ratio):
    """One copy (n = 1: no sharing) and other kept/masked splits."""
    m = model(2)
    names = set(trainable_names(m, "encoder"))
    g = torch.Generator().manual_seed(3)
    for n in (1, 3):
        imgs, noise = torch.randn(1, 1, 28, 28, generator=g), torch.rand(n, m.num_patches, generator=g)
        want, gw = loss_and_grads(m, lambda x, r, z: m.mae_loss(x, mask_ratio, z), imgs.expand(n, -1, -1, -1),
                                  noise, names)  # fmt: skip
        got, gg = loss_and_grads(m, lambda x, r, z: m.mae_loss_lean(x, mask_ratio, z), imgs, noise, names)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        for k in gw:
            assert torch.allclose(gg[k], gw[k], rtol=1e-4, atol=1e-6 * gw[k].abs().max().item()), (n, k)


def test_token_major_attention_is_softmax_attention():
    """softmax(q k^T / sqrt(hd)) v in the (B, T, H, hd) layout, queries fewer than keys too."""
    from tttlab.ttt_mae.model import _token_major_attention

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, t, 2, 8, generator=g) for t in (4, 7, 7))
    want = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
    got = _token_major_attention(q, k, v, 8**-0.5)
    assert torch.allclose(got, want.transpose(1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoder_depth", [1, 2])
def test_token_major_blocks_equal_timm_blocks(decoder_depth):
    """``token_major_max_tokens`` (the compiled CPU path's attention for the encoder's 5 kept tokens, or
    for every block) changes neither the lean loss, nor the trained parameters' gradients, nor the
    logits, beyond float rounding."""
    m = model(decoder_depth, fused=False)
    names = set(trainable_names(m, "encoder"))
    g = torch.Generator().manual_seed(4)
    imgs, noise = torch.randn(1, 1, 28, 28, generator=g), torch.rand(6, m.num_patches, generator=g)
    test = torch.randn(3, 1, 28, 28, generator=g)
    want, gw = loss_and_grads(m, m.mae_loss_lean, imgs, noise, names)
    with torch.no_grad():
        logits = m.eval().classify(test)
    for tokens in (8, 100):  # the encoder's blocks only (1 + 4 kept tokens); every block
        m.train().token_major_max_tokens = tokens
        got, gg = loss_and_grads(m, m.mae_loss_lean, imgs, noise, names)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        for k in gw:
            assert torch.allclose(gg[k], gw[k], rtol=1e-4, atol=1e-6 * gw[k].abs().max().item()), (tokens, k)
        with torch.no_grad():
            assert torch.allclose(m.eval().classify(test), logits, rtol=1e-5, atol=1e-5)
