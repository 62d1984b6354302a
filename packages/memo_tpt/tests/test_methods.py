import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tttlab.core.errors import ConfigError
from tttlab.memo_tpt import augment as A
from tttlab.memo_tpt.ensemble import Ensemble, combine
from tttlab.memo_tpt.losses import bn_prior, entropy, marginal_entropy, select_confident
from tttlab.memo_tpt.memo import Memo
from tttlab.memo_tpt.tpt import TPT, tokenizer_for

from .conftest import TINY_CLIP

NAMES = ["zero", "one", "two", "three", "four"]
TINY_RN_CLIP = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=[1, 1, 1, 1], width=8),
    text_cfg=dict(context_length=16, vocab_size=49408, width=16, heads=2, layers=1),
)


# ---------------------------------------------------------------- losses
def test_marginal_entropy_finite_with_an_impossible_class():
    """A class with probability 0 in every view (a -inf logit, e.g. a masked class) adds 0, as upstream's
    clamp of the averaged log-probabilities at finfo.min gives (0 * -inf would be nan).  The value only:
    logsumexp's gradient over an all -inf column is nan here as upstream."""
    z = torch.tensor([[2.0, 0.0, -float("inf")], [0.0, 1.0, -float("inf")]])
    h = marginal_entropy(z)
    assert torch.isfinite(h) and torch.allclose(h, marginal_entropy(z[:, :2]))


def test_marginal_entropy_equals_direct_float64():
    z = torch.randn(64, 10, dtype=torch.float64) * 3
    p = z.softmax(-1).mean(0)
    direct = -(p * p.log()).sum()
    torch.testing.assert_close(marginal_entropy(z).double(), direct, atol=1e-5, rtol=1e-5)


def test_marginal_entropy_stable_for_huge_logits():
    z = torch.tensor([[1e4, 0.0, 0.0], [0.0, 1e4, 0.0]])
    h = marginal_entropy(z)
    assert torch.isfinite(h) and abs(float(h) - np.log(2)) < 1e-5
    z.requires_grad_(True)
    marginal_entropy(z).backward()
    assert torch.isfinite(z.grad).all()


def test_select_confident_picks_lowest_entropy():
    ent_order = torch.tensor([5.0, 0.1, 3.0, 0.0, 8.0, 1.0])  # scale of a one-hot logit: confidence
    z = torch.zeros(6, 4)
    z[:, 0] = ent_order
    idx = select_confident(z, 0.5)
    assert sorted(idx.tolist()) == [0, 2, 4]
    h = entropy(z)
    assert torch.equal(idx, torch.argsort(h)[:3])
    assert select_confident(torch.zeros(64, 3), 0.1).numel() == 6  # TPT: int(64 * 0.1)
    assert select_confident(z, None).tolist() == list(range(6))


@torch.no_grad()
def test_bn_prior_limits(bn_net):
    x = torch.randn(7, 3, 6, 6)
    with bn_prior(bn_net, 1.0):
        src = bn_net(x)
    torch.testing.assert_close(src, bn_net(x))
    with bn_prior(bn_net, 0.0):
        test = bn_net(x)
    h = bn_net.conv(x)
    ref = F.batch_norm(h, h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True), bn_net.bn.weight, bn_net.bn.bias,
                       False, 0.0, bn_net.bn.eps)  # fmt: skip
    torch.testing.assert_close(test, bn_net.fc(torch.relu(ref).mean((2, 3))))
    p = 16 / 17
    with bn_prior(bn_net, p):
        mixed = bn_net(x)
    mean = p * bn_net.bn.running_mean + (1 - p) * h.mean((0, 2, 3))
    var = p * bn_net.bn.running_var + (1 - p) * h.var((0, 2, 3), unbiased=True)
    ref = F.batch_norm(h, mean, var, bn_net.bn.weight, bn_net.bn.bias, False, 0.0, bn_net.bn.eps)
    torch.testing.assert_close(mixed, bn_net.fc(torch.relu(ref).mean((2, 3))))
    assert "forward" not in vars(bn_net.bn)  # patch removed


# ---------------------------------------------------------------- MEMO
def make_memo(net, **kw):
    kw = {"n_augmentations": 8, "size": 16, "seed": 0, "optimizer": "sgd", "lr": 0.1, **kw}
    return Memo(net, **kw)


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_memo_reset_bit_exact(bn_net, image, amp):
    before = copy.deepcopy(bn_net.state_dict())
    memo = make_memo(bn_net, amp=amp)
    memo.adapt(image)
    assert any(not torch.equal(before[k], v) for k, v in bn_net.state_dict().items())
    memo.reset()
    assert all(torch.equal(before[k], v) for k, v in bn_net.state_dict().items())


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_memo_zero_steps_is_plain_model(bn_net, image, amp):
    memo = make_memo(bn_net, steps=0, prior_strength=None, amp=amp)
    x = A.original_view(image, 16, resize=18, interpolation="bilinear")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
        ref = bn_net((x - memo.mean) / memo.std).float()
    torch.testing.assert_close(memo(image), ref)


def test_memo_step_is_marginal_entropy_sgd(bn_net, image):
    """One MEMO step = one SGD step on the marginal entropy of the views under the BN prior."""
    memo = make_memo(bn_net, top_k=0.5)
    ref_net = copy.deepcopy(bn_net)
    views = make_memo(copy.deepcopy(bn_net), top_k=0.5).views(image)  # same seed -> same views
    with bn_prior(ref_net, 16 / 17):
        z = ref_net((views - memo.mean) / memo.std)
    loss = marginal_entropy(z[select_confident(z, 0.5)])
    grads = torch.autograd.grad(loss, list(ref_net.parameters()))
    memo.adapt(image)
    for p, p0, g in zip(bn_net.parameters(), ref_net.parameters(), grads):
        torch.testing.assert_close(p, p0 - 0.1 * g)


def test_memo_clean_view_is_resize_256_center_crop_224(bn_net):
    """MEMO predicts on upstream's te_transforms: Resize(256) (bilinear) + CenterCrop(224), not TPT's
    Resize(224, bicubic); test_resize=224 is the centre crop only (pre-cropped ImageNet-C images)."""
    from PIL import Image
    from torchvision import transforms as T

    rng = np.random.default_rng(3)
    base = np.linspace(0, 255, 300 * 400 * 3).reshape(300, 400, 3)
    photo = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    memo = Memo(bn_net)
    assert memo.test_resize == 256
    ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])(Image.fromarray(photo))
    ours = memo.original(photo)[0]
    assert ours.shape == ref.shape == (3, 224, 224)
    assert (ours - ref).abs().max() <= 1.01 / 255
    crop = Memo(bn_net, test_resize=224).original(photo[:224, :250])[0]
    torch.testing.assert_close(
        crop, T.Compose([T.CenterCrop(224), T.ToTensor()])(Image.fromarray(photo[:224, :250]))
    )
    with pytest.raises(ConfigError):
        Memo(bn_net, test_resize=200)


def test_memo_deterministic_and_class_subset(bn_net, image):
    a = make_memo(copy.deepcopy(bn_net), class_indices=[4, 1])(image)
    b = make_memo(copy.deepcopy(bn_net), class_indices=[4, 1])(image)
    assert a.shape == (1, 2) and torch.equal(a, b)


def test_memo_optimizer_families(bn_net):
    assert make_memo(bn_net, optimizer="auto", lr=None, arch="resnet50").opt_args["name"] == "sgd"
    m = Memo(bn_net, arch="timm:resnext101_32x8d")
    assert m.opt_args == {"name": "adamw", "lr": 1e-5, "weight_decay": 0.01, "momentum": 0.0}
    assert Memo(bn_net, arch="resnet50").opt_args["lr"] == 2.5e-4


# ---------------------------------------------------------------- TPT
def test_context_init_equals_base_prompt_embedding(tiny_clip):
    tpt = TPT(tiny_clip, NAMES, base_prompt="a photo of a")
    tok = tokenizer_for(tiny_clip)
    ids = torch.tensor(tok.encode("a photo of a"))
    assert tpt.prompts.n_ctx == 4 == len(ids)
    torch.testing.assert_close(tpt.prompts.ctx.detach(), tiny_clip.token_embedding(ids))
    csc = TPT(tiny_clip, NAMES, class_specific_context=True)
    assert csc.prompts.ctx.shape == (5, 4, 16)
    torch.testing.assert_close(csc.prompts.ctx[3].detach(), tiny_clip.token_embedding(ids))


def test_base_prompt_as_the_upstream_command_lines_write_it(tiny_clip):
    """Seed 002's ``-p "a photo of a [CLS]"`` and TPT's ``--ctx_init a_photo_of_a`` are the prompt "a photo
    of a {class}.": 4 context tokens initialised from "a photo of a", the same prompt tokens.  Before, both
    were tokenised as written: 7 context tokens ("a photo of a [ cls ]" before every class name, or the
    underscores as tokens).  A [CLS] inside the prompt (the class in the middle) is refused."""
    plain = TPT(tiny_clip, NAMES, base_prompt="a photo of a").prompts
    for text in ("a photo of a [CLS]", "A photo of a [CLS]", "a_photo_of_a"):
        p = TPT(tiny_clip, NAMES, base_prompt=text).prompts
        assert p.n_ctx == 4 and p.base_prompt == text.replace("_", " ").replace(" [CLS]", ""), text
        assert torch.equal(p.tokens, plain.tokens), text
        torch.testing.assert_close(p.ctx.detach(), plain.ctx.detach())
    bad = TPT(tiny_clip, NAMES, base_prompt="a bad photo of a [CLS]").prompts  # seed 002's ensemble prompt
    assert bad.n_ctx == 5 and bad.base_prompt == "a bad photo of a"
    with pytest.raises(ConfigError, match=r"expected \[CLS\] only at the end"):
        TPT(tiny_clip, NAMES, base_prompt="a [CLS] in a photo")


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_zero_steps_is_plain_clip(tiny_clip, image, amp):
    """tts=0: CLIP zero-shot with the text "a photo of a {class}." through open_clip's own encode_text on all
    16 positions (ours: the 8 up to the prompts' end token, prompt_lengths).  Float32: equal to 1e-5.
    bf16: both under bfloat16 autocast, on different sequence lengths, so they round differently: ours is
    no further from open_clip's bf16 logits than those are from float32, and picks the same class."""
    tpt = TPT(tiny_clip, NAMES, tts=0, amp=amp)
    assert tpt.prompts.length == 8 < tiny_clip.context_length
    out = tpt(image)
    tok = tokenizer_for(tiny_clip)
    ref = {}
    for a in ("none", "bf16"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=a == "bf16"):
            text = F.normalize(
                tiny_clip.encode_text(tok([f"a photo of a {n}." for n in NAMES])).float(), dim=-1
            )
            x = (tpt.original(image) - tpt.mean) / tpt.std
            img = F.normalize(tiny_clip.encode_image(x).float(), dim=-1)
            ref[a] = (tiny_clip.logit_scale.exp() * img @ text.t()).float()
    if amp == "none":
        torch.testing.assert_close(out, ref["none"], atol=1e-5, rtol=1e-5)
    else:
        bf16_error = (ref["bf16"] - ref["none"]).abs().max()
        assert (out - ref["bf16"]).abs().max() <= bf16_error
        assert out.argmax() == ref["bf16"].argmax() == ref["none"].argmax()


@pytest.mark.parametrize("csc", [False, True])
def test_prompts_cut_after_their_end_tokens_are_exact(tiny_clip, image, monkeypatch, csc):
    """prompt_lengths / length_groups: the text encoder runs each prompt on its positions up to its
    end-of-text token (CLIP's causal mask: no position sees a later one; the feature is read at that token),
    prompts of similar lengths together.  Tuning two steps and predicting give the same context and logits
    as on all context_length positions in one batch, to float rounding; a model without the causal mask or
    pooling elsewhere keeps every position."""
    from tttlab.memo_tpt import tpt as T

    names = NAMES[:2] + ["a much longer class name of many tokens"] + NAMES[2:] + ["a longer name"]
    tok = tokenizer_for(tiny_clip)
    ends = tok([f"a photo of a {n}." for n in names]).argmax(-1)
    assert ends.tolist() == [7, 7, 14, 7, 7, 7, 9]
    cut = TPT(tiny_clip, names, n_views=8, tts=2, seed=1, class_specific_context=csc)
    assert cut.prompts.length == 15 and cut.prompts.tokens.shape == (7, 15)
    assert [(i.tolist(), n) for i, n in cut.prompts.groups] == [([0, 1, 3, 4, 5], 8), ([6], 10), ([2], 15)]
    texts = []
    # a shared context: the start token and the 4 context positions once, each group's rest on its own
    assert cut.prompts.shared_prefix is (not csc)
    if csc:
        real = cut._encode_text
        cut._encode_text = lambda prompts, tokens: (
            texts.append(tuple(prompts.shape[:2])) or real(prompts, tokens)
        )
        each = [(5, 8), (1, 10), (1, 15)]
    else:
        real = cut._encode_shared
        cut._encode_shared = lambda prefix, rest, ends: (
            texts.extend([tuple(prefix.shape[:1])] + [tuple(r.shape[:2]) for r in rest])
            or real(prefix, rest, ends)
        )
        each = [(5,), (5, 3), (1, 5), (1, 10)]
    got = cut(image)
    assert texts == each * 3  # two tuning steps and the prediction, 3 groups each
    assert TPT(tiny_clip, NAMES, tts=0).prompts.groups is None  # one length: one batch
    monkeypatch.setattr(
        T, "prompt_lengths", lambda model, tokens: torch.full((len(tokens),), tokens.shape[1])
    )
    monkeypatch.setattr(T, "shared_prefix_ok", lambda model: False)
    full = TPT(tiny_clip, names, n_views=8, tts=2, seed=1, class_specific_context=csc)
    assert full.prompts.length == tiny_clip.context_length == 16 and full.prompts.groups is None
    assert not full.prompts.shared_prefix
    want = full(image)
    assert not torch.equal(full.prompts.ctx, full.prompts.ctx_init)
    torch.testing.assert_close(cut.prompts.ctx, full.prompts.ctx, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    tokens = tok([f"a photo of a {n}." for n in names])
    assert T.prompt_lengths(tiny_clip, tokens).tolist() == (ends + 1).tolist()
    assert T.shared_prefix_ok(tiny_clip)
    monkeypatch.setattr(tiny_clip, "text_pool_type", "last")
    assert T.prompt_lengths(tiny_clip, tokens).tolist() == [16] * 7
    assert not T.shared_prefix_ok(tiny_clip)
    monkeypatch.setattr(tiny_clip, "text_pool_type", "argmax")
    monkeypatch.setattr(tiny_clip, "attn_mask", None)
    assert T.prompt_lengths(tiny_clip, tokens).tolist() == [16] * 7
    assert not T.shared_prefix_ok(tiny_clip)
    monkeypatch.undo()
    monkeypatch.setattr(tiny_clip.transformer, "grad_checkpointing", True)
    assert not T.shared_prefix_ok(tiny_clip)


#: a class name the tokenizer cuts at 16 positions (its end token last) and a single-token one
CUT_NAMES = [
    "dog",
    "tabby cat",
    "a much longer class name of many tokens cut here by the tokenizer",
    "x",
    "great white shark",
]


def _tiny_clip(**text):
    from tttlab.memo_tpt.models import build_clip

    cfg = copy.deepcopy(TINY_CLIP)
    cfg["text_cfg"].update(layers=2, **text)
    torch.manual_seed(0)
    return build_clip("tiny", config=cfg)


@pytest.mark.parametrize(
    "text, kw, shared",
    [
        ({"pool_type": "eos", "eos_id": 49407}, {}, True),  # open_clip's eos pooling at CLIP's end token
        ({"ls_init_value": 0.5, "proj_bias": True}, {"base_prompt": "a"}, True),  # layer scale, Linear
        ({"proj_type": "none"}, {"base_prompt": "a photo of a small"}, True),
        ({"qk_norm": True}, {}, False),  # open_clip's custom block: the grouped path
        ({}, {"ensemble": True}, True),
        ({}, {"align_steps": 1}, True),
    ],
)
def test_cut_prompts_exact_on_text_tower_variants(image, monkeypatch, text, kw, shared):
    """The cut / grouped / shared-start text paths on open_clip text-tower variants and TPT modes, with a
    class name the tokenizer truncates (end token at the last position) and a single-token one: the same
    initial text features, tuned context and logits as all context_length positions of open_clip's blocks."""
    from tttlab.memo_tpt import tpt as T

    model = _tiny_clip(**text)
    names = CUT_NAMES
    kw = {"n_views": 6, "tts": 2, "seed": 1, **kw}
    cut = TPT(model, names, **kw)
    assert cut.prompts.shared_prefix is shared and cut.prompts.groups is not None
    assert cut.prompts.length == 16
    monkeypatch.setattr(
        T, "prompt_lengths", lambda model, tokens: torch.full((len(tokens),), tokens.shape[1])
    )
    monkeypatch.setattr(T, "shared_prefix_ok", lambda model: False)
    full = TPT(model, names, **kw)
    assert full.prompts.groups is None and not full.prompts.shared_prefix
    torch.testing.assert_close(
        cut.initial_text_features(), full.initial_text_features(), atol=1e-6, rtol=1e-5
    )
    got, want = cut(image), full(image)
    torch.testing.assert_close(cut.prompts.ctx, full.prompts.ctx, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_memo_tpt_ensemble_member_is_exact(image, monkeypatch, bn_net):
    """Seed 002's MEMO + TPT ensemble: its TPT member on cut prompts steps and predicts as on all positions."""
    from tttlab.memo_tpt import tpt as T

    model = _tiny_clip()
    names = CUT_NAMES
    outs = []
    for full in (False, True):
        if full:
            monkeypatch.setattr(
                T, "prompt_lengths", lambda model, tokens: torch.full((len(tokens),), tokens.shape[1])
            )
            monkeypatch.setattr(T, "shared_prefix_ok", lambda model: False)
        net = copy.deepcopy(bn_net)
        tpt = TPT(model, names, n_views=6, selection=0.5, seed=1)
        assert tpt.prompts.shared_prefix is not full
        memo = Memo(net, n_augmentations=6, size=16, top_k=0.5, optimizer="sgd", lr=0.1, amp="none")
        outs.append((Ensemble([memo, tpt], [1.55, 0.7])(image), tpt.prompts.ctx.detach().clone()))
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)


def test_tpt_refuses_models_and_prompts_it_cannot_encode():
    """ConfigError, not a silently wrong run: a CLIP trained with another tokenizer (open_clip's -worldwide:
    eos pooling at an id CLIP's tokenizer never writes, so every prompt would end at position 0 with an empty
    context; CLIPA: a smaller vocabulary), a model without CLIP's own text tower (CustomTextCLIP), and a
    base prompt that leaves no room for the class name and end token."""
    from open_clip.model import CustomTextCLIP

    with pytest.raises(ConfigError, match="eos"):
        TPT(_tiny_clip(vocab_size=250100, pool_type="eos", eos_id=1), NAMES)
    with pytest.raises(ConfigError, match="vocab_size=32000"):
        TPT(_tiny_clip(vocab_size=32000), NAMES)
    torch.manual_seed(0)
    custom = CustomTextCLIP(**copy.deepcopy(TINY_CLIP))
    with pytest.raises(ConfigError, match="CustomTextCLIP"):
        TPT(custom, NAMES)
    model = _tiny_clip()
    words = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen".split()
    assert TPT(model, NAMES, base_prompt=" ".join(words[:13])).prompts.n_ctx == 13
    with pytest.raises(ConfigError, match="at most context_length - 3 = 13"):
        TPT(model, NAMES, base_prompt=" ".join(words))


def test_length_groups_are_the_fewest_positions():
    """length_groups against every split of the sorted distinct lengths into at most k consecutive runs:
    the same (fewest) total positions, the classes partitioned, each encoded on its group's longest."""
    import itertools

    from tttlab.memo_tpt.tpt import length_groups

    rng = np.random.default_rng(0)
    for trial in range(40):
        lengths = torch.as_tensor(rng.integers(3, 20, size=int(rng.integers(1, 30))))
        k = int(rng.integers(1, 6))
        groups = length_groups(lengths, k)
        assert len(groups) <= k
        assert sorted(torch.cat([i for i, _ in groups]).tolist()) == list(range(len(lengths)))
        assert all(int(lengths[i].max()) == n for i, n in groups)
        values = sorted(set(lengths.tolist()))
        best = min(
            sum(
                n * int((lengths <= n).sum() - (lengths <= lo).sum())
                for lo, n in zip((0, *cuts), (*cuts, values[-1]))
            )
            for g in range(min(k, len(values)))
            for cuts in itertools.combinations(values[:-1], g)
        )
        assert sum(len(i) * n for i, n in groups) == best, (trial, lengths.tolist(), k)


@pytest.mark.parametrize("mode", [{"tts": 0}, {"ensemble": True}])
def test_untuned_paths_encode_the_class_prompts_once(tiny_clip, mode):
    """Zero-shot (tts=0) and the view ensemble never tune the prompt: the class prompts go through the text
    encoder once for all images, with the same logits as encoding them again for every image; a tuning
    TPT (tts=1) still encodes them per step, and its context stays as tuned."""
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    tpt = TPT(tiny_clip, NAMES, n_views=8, seed=2, **mode)
    ref = TPT(tiny_clip, NAMES, n_views=8, seed=2, **mode)
    texts = []
    real, real_shared = tpt._encode_text, tpt._encode_shared
    tpt._encode_text = lambda *a: texts.append(1) or real(*a)
    tpt._encode_shared = lambda *a: texts.append(1) or real_shared(*a)
    for img in images:
        got = tpt(img)
        views = ref.views(img)
        with torch.no_grad():  # the initial prompt, encoded again for this image
            want = ref.predict(views, ref.text_features())
        assert torch.equal(got, want)
    assert len(texts) == 1
    tuned = TPT(tiny_clip, NAMES, n_views=8, tts=1, seed=2)
    tuned(images[0])
    assert not torch.equal(tuned.prompts.ctx, tuned.prompts.ctx_init)
    assert not torch.equal(
        tuned.predict(tuned.views(images[0])),
        tuned.predict(tuned.views(images[0]), tuned.initial_text_features()),
    )
    assert not torch.equal(tuned.prompts.ctx, tuned.prompts.ctx_init)  # reading the initial features kept it


def test_tpt_step_reset_and_selection(tiny_clip, image):
    tpt = TPT(tiny_clip, NAMES, n_views=20, selection=0.25, tts=1, seed=1)
    init = tpt.prompts.ctx.detach().clone()
    views = tpt.views(image)
    with torch.no_grad():
        z = tpt.logits(views)
    sel = select_confident(z, 0.25)
    assert sel.numel() == 5
    ctx = init.clone().requires_grad_(True)
    ref_opt = torch.optim.AdamW([ctx], lr=5e-3, weight_decay=0.01)
    tpt.prompts.ctx.data = ctx.data  # compute the reference loss through the learner with ctx
    loss = marginal_entropy(tpt.logits(views)[sel])
    (g,) = torch.autograd.grad(loss, [tpt.prompts.ctx])
    tpt.prompts.ctx.data = init.clone()
    ctx.grad = g
    ref_opt.step()
    tpt.reset()
    losses = tpt.adapt(views)
    torch.testing.assert_close(tpt.prompts.ctx.detach(), ctx.detach())
    torch.testing.assert_close(torch.tensor(losses[0]), loss.detach())
    tpt.reset()
    assert torch.equal(tpt.prompts.ctx.detach(), init)
    assert not tpt.optimizer.state


def test_tpt_runs_clip_in_eval_mode(image):
    """A CLIP handed over in training mode (open_clip.create_model's default) is put in eval mode, as
    upstream's model.eval(): a ResNet CLIP's BatchNorm then uses its running statistics, not the views'."""
    from tttlab.memo_tpt.models import build_clip

    cfg = {**TINY_RN_CLIP}
    torch.manual_seed(0)
    model = build_clip("tiny", config=cfg).train()
    ref = copy.deepcopy(model).eval()
    running = copy.deepcopy(model.visual.state_dict())
    tpt = TPT(model, NAMES, n_views=8, selection=0.5, tts=0)
    assert not model.training
    torch.testing.assert_close(tpt(image), TPT(ref, NAMES, tts=0)(image))
    assert all(torch.equal(v, running[k]) for k, v in model.visual.state_dict().items())


def test_view_ensemble_mode(tiny_clip, image):
    tpt = TPT(tiny_clip, NAMES, n_views=16, ensemble=True, seed=2)
    ref = TPT(tiny_clip, NAMES, n_views=16, tts=0, seed=2)
    out = tpt(image)
    views = ref.views(image)
    with torch.no_grad():
        z = ref.logits(views)
    p = z[select_confident(z, 0.1)].softmax(-1).mean(0)
    torch.testing.assert_close(out[0].exp(), p, atol=1e-5, rtol=1e-5)


def test_align_steps_restore_visual(tiny_clip, image):
    before = copy.deepcopy(tiny_clip.visual.state_dict())
    tpt = TPT(tiny_clip, NAMES, n_views=16, align_steps=2, selection=0.5)
    tpt.adapt(tpt.views(image))
    assert any(not torch.equal(before[k], v) for k, v in tiny_clip.visual.state_dict().items())
    tpt.reset()
    assert all(torch.equal(before[k], v) for k, v in tiny_clip.visual.state_dict().items())
    assert not any(p.requires_grad for p in tiny_clip.visual.parameters())


def test_align_steps_as_seed_002(image):
    """Seed 002's alignment: views selected once with the initial prompt, the visual encoder trained in
    training mode (BatchNorm on the selected views' statistics) on 1 - mean of all pairwise cosine
    similarities (diagonal included), one more training-mode forward after the steps (seed 002's "distance
    after": the running statistics take one more update), then one prompt step on the same selected views."""
    from tttlab.memo_tpt.models import build_clip

    torch.manual_seed(0)
    model = build_clip("tiny", config=TINY_RN_CLIP)
    ref = copy.deepcopy(model)
    kw = dict(n_views=16, selection=0.25, align_steps=1, align_lr=0.05, tts=1, seed=0)
    tpt = TPT(model, NAMES, **kw)
    views = tpt.views(image)
    tpt.adapt(views)
    # reference, written out
    rt = TPT(ref, NAMES, **{**kw, "align_steps": 0})
    with torch.no_grad():
        sel = select_confident(rt.logits(views), 0.25)
    params = [p for n, p in ref.visual.named_parameters() if "attnpool" not in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=0.05)
    ref.visual.train()
    f = F.normalize(ref.encode_image((views[sel] - rt.mean) / rt.std), dim=-1)
    (1 - (f @ f.t()).mean()).backward()
    opt.step()
    with torch.no_grad():
        ref.encode_image((views[sel] - rt.mean) / rt.std)
    ref.visual.eval()
    for p in params:
        p.requires_grad_(False)
    for k, v in ref.visual.state_dict().items():  # parameters and BatchNorm running statistics
        torch.testing.assert_close(model.visual.state_dict()[k], v)
    with torch.no_grad():
        feats = rt.image_features(views)
    loss = marginal_entropy(rt.logits_from(feats)[sel])
    rt.optimizer.zero_grad()
    loss.backward()
    rt.optimizer.step()
    torch.testing.assert_close(tpt.prompts.ctx, rt.prompts.ctx)


def test_view_ensemble_ignores_align_steps(tiny_clip, image):
    """Seed 002's predict in ensemble mode neither tunes nor aligns."""
    before = copy.deepcopy(tiny_clip.visual.state_dict())
    a = TPT(tiny_clip, NAMES, n_views=8, selection=0.5, ensemble=True, align_steps=2, align_lr=0.1)(image)
    assert all(torch.equal(before[k], v) for k, v in tiny_clip.visual.state_dict().items())
    b = TPT(tiny_clip, NAMES, n_views=8, selection=0.5, ensemble=True)(image)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- ensemble
def test_combine_formula_on_raw_view_logits_as_seed_002():
    """Seed 002's marginal_distribution: a_i = (logsumexp over views of the raw logits - log n) / T_i, then
    log_softmax (not the mean of per-view softmaxes: views with larger logits weigh more)."""
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    z2 = (
        torch.randn(4, 5, generator=g, dtype=torch.float64) * 3
        + torch.arange(4.0, dtype=torch.float64)[:, None]
    )
    m, w = combine([z1, z2], [1.55, 0.7])
    lp = []
    for z, t in ((z1, 1.55), (z2, 0.7)):
        a = (z.exp().mean(0)).log() / t
        lp.append(a.log_softmax(-1))
    h = torch.stack([-(x.exp() * x).sum() for x in lp])
    wr = (h.sum() / h) / (h.sum() / h).sum()
    torch.testing.assert_close(w.double(), wr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.double(), wr[0] * lp[0] + wr[1] * lp[1], rtol=1e-5, atol=1e-6)
    # not the mean-probability marginal
    mean_prob = ((z2.softmax(-1).mean(0)).log() / 0.7).log_softmax(-1)
    assert (lp[1] - mean_prob).abs().max() > 1e-2
    # one member, T = 1, one view: m is the view's log-softmax
    m1, w1 = combine([z1[:1]], [1.0])
    torch.testing.assert_close(m1.double(), z1[0].log_softmax(-1), rtol=1e-5, atol=1e-6)
    assert float(w1) == 1.0


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_ensemble_steps_every_member_and_simple_does_not(tiny_clip, bn_net, image, amp):
    tpt = TPT(tiny_clip, NAMES, n_views=8, selection=0.5, amp=amp)
    memo = Memo(bn_net, n_augmentations=8, size=16, top_k=0.5, optimizer="sgd", lr=0.1, amp=amp)
    w0 = bn_net.fc.weight.detach().clone()
    c0 = tpt.prompts.ctx.detach().clone()
    simple = Ensemble([memo, tpt], [1.55, 0.7], simple=True)
    out = simple(image)
    assert out.shape == (1, 5) and torch.equal(bn_net.fc.weight, w0) and torch.equal(tpt.prompts.ctx, c0)
    ens = Ensemble([memo, tpt], [1.55, 0.7])
    out = ens(image)
    assert out.shape == (1, 5) and torch.isfinite(out).all()
    assert not torch.equal(bn_net.fc.weight, w0) and not torch.equal(tpt.prompts.ctx, c0)
    ens.reset()
    assert torch.equal(bn_net.fc.weight, w0) and torch.equal(tpt.prompts.ctx, c0)


def test_a_prior_strength_below_one_warns_that_it_is_n_not_p():
    """seed 002's prior_strength is the mixing weight p (0.94); ours is MEMO's N (p = N/(N+1)): 0.94 here
    would silently mix the statistics almost half and half, so it warns and names the N to use."""
    from tttlab.memo_tpt.memo import check_options

    opts = dict(augmentation="augmix", n_augmentations=8, steps=1, lr=None, weight_decay=None, momentum=0.0,
                top_k=None, size=32, include_original=False, test_resize=None)  # fmt: skip
    with pytest.warns(UserWarning, match=r"p = N/\(N\+1\) = 0\.485.*15\.67"):
        check_options(prior_strength=0.94, **opts)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (None, 0, 16.0, 0.94 / 0.06):  # None: eval-mode BN; 0: batch statistics only
            check_options(prior_strength=n, **opts)


# ---------------------------------------------------------------- records' step
def test_adaptation_steps_are_the_optimizer_steps_one_image_takes(tiny_clip, bn_net, image, monkeypatch):
    """``adaptation_steps`` (the records' ``step`` of the evaluate and paper commands) counts the optimizer
    steps an image gets: MEMO ``steps``; TPT its prompt-tuning steps ``tts`` (the paper's ``tta_steps``), 0
    for zero-shot CLIP (``tts=0``) and the view-ensemble; the ensemble's ``steps`` (every member stepped
    once each), 0 for the simple ensemble.  Seed 002's visual alignment steps are TPT's
    ``alignment_steps``, counted apart (another optimizer on the visual encoder): they were added into
    ``step`` before (``align_steps=1, tts=2`` recorded 3 steps, read as three TPT steps)."""
    calls = []
    for cls in (torch.optim.SGD, torch.optim.AdamW, torch.optim.Adam):
        step = cls.step
        monkeypatch.setattr(
            cls, "step", lambda self, *a, _step=step, **kw: (calls.append(self), _step(self, *a, **kw))[1]
        )

    def tpt(**kw):
        return TPT(tiny_clip, NAMES, n_views=4, seed=0, **kw)

    memo, prompt = make_memo(bn_net, n_augmentations=2, steps=2), tpt()
    adapters = [  # (adapter, prompt / model steps, alignment steps)
        (make_memo(bn_net, n_augmentations=2, steps=0), 0, 0),
        (memo, 2, 0),
        (prompt, 1, 0),
        (tpt(tts=0), 0, 0),
        (tpt(tts=2, align_steps=1), 2, 1),
        (tpt(tts=0, align_steps=2), 0, 2),  # alignment, then the base prompt's prediction
        (tpt(ensemble=True, align_steps=1), 0, 0),  # the view-ensemble neither tunes nor aligns
        (Ensemble([memo, prompt], steps=2), 2 * 2, 0),  # 2 steps x 2 members (the members' own steps unused)
        (Ensemble([memo, prompt], simple=True), 0, 0),
    ]
    for adapter, optimizer_steps, align_steps in adapters:
        calls.clear()
        adapter(image)
        own = [o for o in calls if o is getattr(adapter, "optimizer", o)]  # TPT: the prompt's optimizer
        assert (len(own), len(calls) - len(own)) == (optimizer_steps, align_steps), adapter
        assert adapter.adaptation_steps == optimizer_steps // (
            len(adapter.members) if isinstance(adapter, Ensemble) else 1
        )
        assert getattr(adapter, "alignment_steps", 0) == align_steps
