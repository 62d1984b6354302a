"""Details of MEMO, TPT and the ensemble that the other tests did not pin down (found by a hand-made
mutation audit: each test here fails on a plausible one-line bug that the rest of the suite let through)."""

import copy
import re

import pytest
import torch
import torch.nn as nn

from tttlab.core.errors import ConfigError
from tttlab.memo_tpt.ensemble import Ensemble, combine, ensemble_loss
from tttlab.memo_tpt.losses import bn_prior, marginal_entropy, select_confident
from tttlab.memo_tpt.memo import Memo
from tttlab.memo_tpt.tpt import TPT

NAMES = ["zero", "one", "two", "three", "four"]


@torch.no_grad()
def test_bn_prior_keeps_source_statistics_for_one_value_per_channel():
    """A BatchNorm that sees one value per channel (BatchNorm1d on a batch of 1) has no batch variance: it
    keeps its source statistics (= eval mode) instead of a nan variance."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(1, 4)
    with bn_prior(net, 16 / 17):
        out = net(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, net(x))


def test_memo_reset_starts_a_fresh_adamw(bn_net, image):
    """The reset gives a fresh optimizer: with AdamW (moments, step count), the second image's result does
    not depend on the first image (episodic, order-free)."""
    rng = torch.Generator().manual_seed(5)
    other = (torch.rand(40, 48, 3, generator=rng) * 255).to(torch.uint8).numpy()
    kw = dict(n_augmentations=8, size=16, seed=0, optimizer="adamw", lr=0.05, weight_decay=0.0)
    a = Memo(copy.deepcopy(bn_net), **kw)
    a(other)
    assert a.optimizer.state  # AdamW moments exist after a step
    b = Memo(copy.deepcopy(bn_net), **kw)
    b.generator.set_state(a.generator.get_state())  # the same views for the second image
    out_a, out_b = a(image), b(image)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    a.reset()
    assert not a.optimizer.state


def test_tpt_keeps_the_step_0_selection_for_later_steps(tiny_clip, image):
    """TPT selects the confident views with the initial prompt and tunes on those same views at every step
    (upstream's ``selected_idx`` from step 0), here 3 steps with an lr large enough to change the ranking."""
    kw = dict(n_views=24, selection=0.25, tts=3, lr=0.5, seed=3)
    tpt = TPT(tiny_clip, NAMES, **kw)
    views = tpt.views(image)
    ref = TPT(copy.deepcopy(tiny_clip), NAMES, **{**kw, "tts": 0})
    with torch.no_grad():
        feats = ref.image_features(views)
        sel0 = select_confident(ref.logits_from(feats), 0.25)
    opt = torch.optim.AdamW([ref.prompts.ctx], lr=0.5, weight_decay=0.01)
    reselected = []
    for _ in range(3):
        logits = ref.logits_from(feats)
        reselected.append(set(select_confident(logits.detach(), 0.25).tolist()))
        loss = marginal_entropy(logits[sel0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(r != set(sel0.tolist()) for r in reselected)  # the test can tell the two rules apart
    tpt.adapt(views)
    torch.testing.assert_close(tpt.prompts.ctx, ref.prompts.ctx)


def test_ensemble_weights_are_constants_in_the_backward():
    """Seed 002 computes the entropy weights under no_grad: the gradient flows through the members'
    log-probabilities only."""
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    z2 = (torch.randn(4, 5, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    temps = [1.3, 0.6]
    m, w = combine([z1, z2], temps)
    got = torch.autograd.grad(ensemble_loss(m), [z1, z2])
    lps = [((torch.logsumexp(z, 0) - torch.log(torch.tensor(float(len(z))))) / t).log_softmax(-1)
           for z, t in zip((z1, z2), temps)]  # fmt: skip
    m_ref = sum(wi.detach() * lp for wi, lp in zip(w, lps))
    want = torch.autograd.grad(-(m_ref.exp() * m_ref).sum(), [z1, z2])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_ensemble_predicts_on_the_members_original_views(tiny_clip, bn_net, image):
    """After the adaptation step, the prediction combines every member's logits of its single original view
    (MEMO: its clean test view; TPT: views[0]), not of the augmented views."""
    tpt = TPT(tiny_clip, NAMES, n_views=8, selection=0.5)
    memo = Memo(bn_net, n_augmentations=8, size=16, top_k=0.5, optimizer="sgd", lr=0.1)
    temps = [1.55, 0.7]
    out = Ensemble([memo, tpt], temps)(image)
    with torch.no_grad():
        want, _ = combine([memo.logits(memo.original(image)), tpt.logits(tpt.original(image))], temps)
    torch.testing.assert_close(out[0], want)


def test_views_are_flipped_about_half_of_the_time():
    """RandomHorizontalFlip of the augmented views: with a full-image crop (scale 1 of a square image) every
    view is the image or its mirror and both occur; ``flip=False`` never mirrors."""
    from tttlab.memo_tpt import augment as A

    img = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = img.permute(2, 0, 1).float() / 255
    kw = dict(include_original=False, augmix_views=False, scale=(1.0, 1.0))
    views = A.make_views(img.numpy(), 24, 32, generator=torch.Generator().manual_seed(1), **kw)
    plain = [torch.allclose(v, x, atol=1.01 / 255) for v in views]
    mirrored = [torch.allclose(v, x.flip(-1), atol=1.01 / 255) for v in views]
    assert all(a != b for a, b in zip(plain, mirrored))
    assert 4 <= sum(mirrored) <= 20
    views = A.make_views(img.numpy(), 8, 32, generator=torch.Generator().manual_seed(1), flip=False, **kw)
    assert all(torch.allclose(v, x, atol=1.01 / 255) for v in views)


def test_memo_include_original_puts_the_clean_view_first(bn_net, image):
    """Seed 002's EasyMemo adapts on its data loader's list: the clean test view (Resize(256) + CenterCrop, the
    view it predicts on) followed by ``augs - 1`` crops, the loss over all of them.  ``include_original``: the
    same B views (the clean one first, then the B - 1 crops the generator would draw), the same loss."""
    kw = dict(size=16, seed=3, augmentation="cut", optimizer="sgd", lr=0.1)
    a = Memo(copy.deepcopy(bn_net), n_augmentations=8, include_original=True, **kw)
    b = Memo(copy.deepcopy(bn_net), n_augmentations=7, **kw)
    views = a.views(image)
    assert views.shape == (8, 3, 16, 16)
    torch.testing.assert_close(views[:1], b.original(image), rtol=0, atol=0)
    crops = b.views(image)
    torch.testing.assert_close(views[1:], crops, rtol=0, atol=0)
    # adapt: the marginal entropy over the clean view and the crops (fresh draws: reset both generators)
    a.generator.manual_seed(3)
    b.generator.manual_seed(3)
    (loss,) = a.adapt(image)
    with torch.no_grad():
        want = marginal_entropy(b.logits(torch.cat([b.original(image), b.views(image)])))
    assert abs(loss - float(want)) < 1e-6
    one = Memo(copy.deepcopy(bn_net), n_augmentations=1, include_original=True, **kw)
    torch.testing.assert_close(one.views(image), one.original(image), rtol=0, atol=0)


def test_ensemble_keeps_a_tpt_member_s_step_0_selection(tiny_clip, image):
    """Over several ensemble steps a TPT member tunes on the views it selected at step 0 (TPT's and seed 002's
    ``EasyTPT.selected_idx``, which its ensemble loop keeps), not a re-selection with the updated prompt."""
    kw = dict(n_views=24, selection=0.25, lr=0.5, seed=3)
    tpt = TPT(tiny_clip, NAMES, **kw)
    ref = TPT(copy.deepcopy(tiny_clip), NAMES, **kw)
    views = ref.views(image)  # the views the ensemble's member draws (same seed)
    with torch.no_grad():
        sel0 = ref.select(ref.logits(views))
    reselected = []
    for _ in range(3):
        z = ref.logits(views)
        reselected.append(set(ref.select(z.detach()).tolist()))
        m, _ = combine([z[sel0]], [0.7])
        ref.optimizer.zero_grad()
        ensemble_loss(m).backward()
        ref.optimizer.step()
    assert any(r != set(sel0.tolist()) for r in reselected)  # the test tells the two rules apart
    Ensemble([tpt], [0.7], steps=3)(image)
    torch.testing.assert_close(tpt.prompts.ctx, ref.prompts.ctx)


def test_simple_ensemble_combines_the_members_selected_views_unadapted(tiny_clip, bn_net, image):
    """Seed 002's "simple ensemble" (``Ensemble.forward``'s ``prediction_no_back``): after a reset, every
    member's logits of its confidence-selected views (TPT: selected with the initial prompt; MEMO: its
    top-k), combined with the members' temperatures in member order, no backward; argmax of that m.  Not the
    original views (the adapted ensemble's prediction) and not all views."""
    temps = [1.55, 0.7]
    mk = dict(n_augmentations=8, size=16, top_k=0.25, optimizer="sgd", lr=0.1, seed=1)
    tk = dict(n_views=8, selection=0.25, seed=2)
    memo, tpt = Memo(copy.deepcopy(bn_net), **mk), TPT(copy.deepcopy(tiny_clip), NAMES, **tk)
    out = Ensemble([memo, tpt], temps, simple=True)(image)
    ref_memo, ref_tpt = Memo(copy.deepcopy(bn_net), **mk), TPT(copy.deepcopy(tiny_clip), NAMES, **tk)
    with torch.no_grad():
        zm, zt = ref_memo.logits(ref_memo.views(image)), ref_tpt.logits(ref_tpt.views(image))
        want, _ = combine([zm[ref_memo.select(zm)], zt[ref_tpt.select(zt)]], temps)
        every, _ = combine([zm, zt], temps)
        swapped, _ = combine([zm[ref_memo.select(zm)], zt[ref_tpt.select(zt)]], temps[::-1])
    torch.testing.assert_close(out[0], want)
    assert (out[0] - every).abs().max() > 1e-3 and (out[0] - swapped).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(align_steps=2), "members[1] (TPT): align_steps=2"),
        (dict(ensemble=True), "members[1] (TPT): ensemble=True"),
    ],
)
def test_ensemble_refuses_a_tpt_member_s_own_modes(tiny_clip, bn_net, kw, needle):
    """The ensemble steps a TPT member's prompt on the combined loss: it never ran the member's visual
    alignment (``align_steps``) or its view-ensemble mode, and took both silently (seed 002's Ensemble
    also leaves its ensemble step unaligned: the reset after a member's own predict restores the visual
    encoder).  Both are a ConfigError naming the value now (the CLI's ``models[i].`` form:
    test_errors_and_runs.py)."""
    memo = Memo(bn_net, n_augmentations=4, size=16, optimizer="sgd", lr=0.1)
    own = TPT(tiny_clip, NAMES, n_views=4, selection=0.5, seed=0, **kw)
    with pytest.raises(ConfigError, match=re.escape(needle) + ".*expected"):
        Ensemble([memo, own], [1.55, 0.7])
    with pytest.raises(ConfigError, match=re.escape(needle.replace("[1]", "[0]"))):
        Ensemble([own], [0.7], simple=True)


@pytest.mark.parametrize("value", ["false", "yes", 1, None])
def test_memo_include_original_must_be_a_bool(bn_net, value):
    """``include_original`` reached ``bool()``: the string "false" (a config written by hand, or an
    override Hydra leaves a string) turned the clean view on; anything but true/false is a ConfigError."""
    with pytest.raises(ConfigError, match=rf"include_original={value!r}; expected true or false"):
        Memo(copy.deepcopy(bn_net), n_augmentations=4, size=16, include_original=value)
    assert (
        Memo(copy.deepcopy(bn_net), n_augmentations=4, size=16, include_original=False).include_original
        is False
    )


@torch.no_grad()
def test_memo_predicts_the_clean_view_under_the_bn_prior(bn_net, image):
    """MEMO's prediction normalises with the BN prior too (upstream's test_single sets the same
    prior = N / (N + 1) as adapt_single), not with the running statistics: with no step the logits are the
    single clean view's under p * running + (1 - p) * that view's own (unbiased) statistics, p = 16 / 17,
    written out by hand here (a predict() in eval-mode BatchNorm fails it; of the rest of test_methods,
    test_memo_details, test_paper_profiles and test_evaluate, only the evaluate contract's proxy noticed)."""
    from tttlab.memo_tpt import augment as A

    memo = Memo(bn_net, n_augmentations=4, size=16, steps=0, optimizer="sgd", lr=0.1, seed=0)
    x = (A.original_view(image, 16, resize=18, interpolation="bilinear") - memo.mean) / memo.std
    h = bn_net.conv(x)  # (1, 8, 16, 16): statistics over the 256 positions of the one view
    n = h[0, 0].numel()
    mean = h.sum((0, 2, 3)) / n
    var = ((h - mean[None, :, None, None]) ** 2).sum((0, 2, 3)) / (n - 1)
    p = 16 / 17
    bn = bn_net.bn
    mixed_mean, mixed_var = p * bn.running_mean + (1 - p) * mean, p * bn.running_var + (1 - p) * var
    hand = (h - mixed_mean[None, :, None, None]) / torch.sqrt(mixed_var[None, :, None, None] + bn.eps)
    hand = hand * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    ref = bn_net.fc(torch.relu(hand).mean((2, 3)))
    out = memo(image)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert memo.prior == pytest.approx(16 / 17)
    assert not torch.allclose(out, bn_net(x), atol=1e-4), "eval-mode BatchNorm gives other logits"


def test_the_tiny_clip_is_logged_as_trained_or_cached_not_as_a_random_initialisation(tmp_path, caplog):
    """The proxy commands logged 'CLIP tiny-mnist: random initialisation (no pretrained file given)' before
    training the tiny CLIP, and again before loading it from the cache (with nothing saying it was loaded)."""
    import logging

    from tttlab.memo_tpt import tiny_clip
    from tttlab.memo_tpt.models import build_clip

    p = tiny_clip.PROFILES["smoke"]

    def build():
        return build_clip("tiny-mnist", config=tiny_clip.clip_config(p))

    with caplog.at_level(logging.INFO, logger="tttlab.memo_tpt"):
        trained, path = tiny_clip._cached(
            "tiny_clip", p, 0, tmp_path, lambda *a, **k: build().eval(), build, False
        )
        cached, again = tiny_clip._cached("tiny_clip", p, 0, tmp_path, None, build, False)
    assert again == path and path.is_file()
    for a, b in zip(trained.state_dict().values(), cached.state_dict().values()):
        assert torch.equal(a, b)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "random initialisation" in m], messages
    assert messages[-1] == f"tiny_clip from the cache: {path}"
