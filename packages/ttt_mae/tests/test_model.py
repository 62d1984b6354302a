import math

import pytest
import torch

from tttlab.core.errors import ConfigError, InvalidInputError
from tttlab.ttt_mae.model import build_model, model_config, sincos_pos_embed

#: upstream shapes (embed dim, blocks, heads) of the named encoders
OFFICIAL = {"mae_vit_large_patch16": (1024, 24, 16), "mae_vit_base_patch16": (768, 12, 12),
            "mae_vit_tiny_patch16": (192, 12, 3)}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_shapes(name):
    D, depth, heads = OFFICIAL[name]
    with torch.device("meta"):
        m = build_model(name)
    sd = m.state_dict()
    assert sd["pos_embed"].shape == (1, 197, D) and sd["cls_token"].shape == (1, 1, D)
    assert sd["patch_embed.proj.weight"].shape == (D, 3, 16, 16)
    assert sd[f"blocks.{depth - 1}.attn.qkv.weight"].shape == (3 * D, D)
    assert f"blocks.{depth}.norm1.weight" not in sd
    assert sd["blocks.0.mlp.fc1.weight"].shape == (4 * D, D)
    assert all(b.attn.num_heads == heads for b in m.blocks)
    Dd = m.cfg.decoder_embed_dim
    assert sd["decoder_pred.weight"].shape == (16 * 16 * 3, Dd)
    if name != "mae_vit_tiny_patch16":
        assert Dd == 512 and m.cfg.decoder_depth == 8 and m.cfg.decoder_num_heads == 16
        assert sd["classifier_embed.weight"].shape == (768, D)
        assert sd["classifier_pred.weight"].shape == (1000, 768)
        assert "classifier_blocks.11.attn.qkv.weight" in sd and "classifier_blocks.12.norm1.weight" not in sd


def test_sincos_formula():
    e = sincos_pos_embed(8, 3)
    assert e.shape == (10, 8) and torch.all(e[0] == 0)
    # token (row 1, col 2): first half encodes the column, second half the row
    t = e[1 + 1 * 3 + 2]
    w = [1.0, 1.0 / 100.0]  # 10000 ** (-k / 2) for k = 0, 1
    assert torch.allclose(
        t[:4], torch.tensor([math.sin(2 * w[0]), math.sin(2 * w[1]), math.cos(2 * w[0]), math.cos(2 * w[1])])
    )
    assert torch.allclose(
        t[4:], torch.tensor([math.sin(w[0]), math.sin(w[1]), math.cos(w[0]), math.cos(w[1])])
    )


def test_patchify_roundtrip(tiny):
    m = tiny()
    x = torch.randn(2, 1, 28, 28)
    p = m.patchify(x)
    assert p.shape == (2, 16, 49)
    assert torch.equal(p[0, 1], x[0, 0, 0:7, 7:14].reshape(-1))
    assert torch.equal(m.unpatchify(p), x)


def test_random_masking_invariants(tiny):
    m = tiny()
    x = torch.randn(3, 16, 5)
    noise = torch.rand(3, 16)
    kept, mask, ids_restore = m.random_masking(x, 0.75, noise)
    assert kept.shape == (3, 4, 5) and torch.all(mask.sum(1) == 12)
    for i in range(3):
        keep = torch.argsort(noise[i])[:4]
        assert torch.equal(kept[i], x[i, keep])
        assert torch.all(mask[i, keep] == 0)
        # ids_restore inverts the shuffle
        assert torch.equal(torch.argsort(noise[i])[ids_restore[i]], torch.arange(16))


def test_norm_pix_loss_by_hand(tiny):
    m = tiny()
    x = torch.randn(2, 1, 28, 28)
    pred = torch.randn(2, 16, 49)
    mask = (torch.rand(2, 16) > 0.5).float()
    mask[:, 0] = 1
    t = m.patchify(x)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True, unbiased=True) + 1e-6).sqrt()
    want = (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(m.forward_loss(x, pred, mask), want, atol=1e-6)
    raw = tiny(norm_pix_loss=False)
    want_raw = (((pred - m.patchify(x)) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(raw.forward_loss(x, pred, mask), want_raw, atol=1e-6)


@pytest.mark.parametrize("head_type", ["vit_head", "linear"])
def test_sdpa_equals_explicit_attention_and_classify_uses_all_tokens(tiny, head_type):
    m = tiny(head_type=head_type).eval()
    x = torch.randn(4, 1, 28, 28)
    noise = torch.rand(4, 16)
    a_cls, a_mae = m.classify(x), m.mae_loss(x, 0.75, noise)
    m.set_fused_attn(False)
    b_cls, b_mae = m.classify(x), m.mae_loss(x, 0.75, noise)
    assert torch.allclose(a_cls, b_cls, atol=1e-5) and torch.allclose(a_mae, b_mae, atol=1e-5)
    latent, mask, _ = m.forward_encoder(x, 0.0)
    assert latent.shape[1] == 17 and mask is None
    assert a_cls.shape == (4, 10)


def test_bad_inputs(tiny):
    with pytest.raises(InvalidInputError, match="not divisible"):
        build_model("mae_vit_smoke_patch7", img_size=30)
    with pytest.raises(ConfigError, match="model="):
        model_config("mae_vit_gigantic")
    with pytest.raises(ConfigError, match="head_type"):
        build_model("mae_vit_smoke_patch7", head_type="mlp")
    m = tiny()
    with pytest.raises(InvalidInputError, match="mask_ratio"):
        m.mae_loss(torch.randn(1, 1, 28, 28), 1.0)
    with pytest.raises(InvalidInputError, match="mode"):
        m(torch.randn(1, 1, 28, 28), mode="nope")


def _block_keys(prefix, n):
    names = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
             "mlp.fc2.bias"]  # fmt: skip
    return {f"{prefix}.{i}.{k}" for i in range(n) for k in names}


def test_vit_large_key_set_is_the_documented_upstream_one():
    """The names of mae_pretrain_vit_large_full.pth + prob_lr1e-3_wd.2_blk12_ep20.pth (checkpoint.py)."""
    with torch.device("meta"):
        m = build_model("mae_vit_large_patch16")
    pretrain = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias", "decoder_pos_embed",
                "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}  # fmt: skip
    pretrain |= _block_keys("blocks", 24) | _block_keys("decoder_blocks", 8)
    head = {"classifier_embed.weight", "classifier_embed.bias", "classifier_pos_embed", "classifier_norm.weight",
            "classifier_norm.bias", "classifier_pred.weight", "classifier_pred.bias"}  # fmt: skip
    head |= _block_keys("classifier_blocks", 12)
    assert set(m.state_dict()) == pretrain | head
    sd = m.state_dict()
    assert sd["decoder_blocks.7.attn.qkv.weight"].shape == (1536, 512)
    assert sd["classifier_blocks.11.mlp.fc1.weight"].shape == (3072, 768)
    assert sd["classifier_pos_embed"].shape == (1, 197, 768)


def test_one_image_with_n_masks_equals_n_copies(tiny):
    """Single-crop TTT passes one image and n mask rows: the same loss and gradients as n copies."""
    m = tiny()
    img = torch.randn(1, 1, 28, 28)
    noise = torch.rand(5, m.num_patches)
    a = m.mae_loss(img.expand(5, -1, -1, -1), 0.75, noise)
    ga = torch.autograd.grad(a, list(m.parameters()), allow_unused=True)
    b = m.mae_loss(img, 0.75, noise)
    gb = torch.autograd.grad(b, list(m.parameters()), allow_unused=True)
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-6)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("entry", "experiment", "size"),
    [("pretrain", "smoke_pretrain", 27), ("ttt", "smoke_ttt", 30), ("probe", "smoke_probe", 0)],
)
def test_bad_input_size_named_as_typed(entry, experiment, size):
    """A run config's ``input_size`` is reported under that key (not the model's ``img_size``), with the
    patch size it must divide by."""
    from tttlab.ttt_mae.common import compose, model_overrides

    c = compose(entry, experiment, overrides=[f"input_size={size}"])
    with pytest.raises(ConfigError) as info:
        model_overrides(c)
    msg = str(info.value)
    assert msg.startswith(f"input_size={size};") and "divisible by the patch size 7" in msg
    assert "img_size" not in msg and "\n" not in msg
    assert model_overrides(compose(entry, experiment, overrides=["input_size=28"]))["img_size"] == 28
