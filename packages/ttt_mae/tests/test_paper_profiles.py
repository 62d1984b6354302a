"""The four paper profiles as the code runs them: composed through the package's loader (``common.compose``,
what the Hydra entry points validate), then the values the code derives (model shapes, learning rates
after the blr scaling, optimizer, trainable parameters, TTT settings, the test view) checked against the
upstream README commands (seed 001) and PAPERS.md section 2."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from tttlab.core.errors import ConfigError
from tttlab.ttt_mae import evaluate as E
from tttlab.ttt_mae import train as T
from tttlab.ttt_mae.common import compose, model_overrides
from tttlab.ttt_mae.model import build_model
from tttlab.ttt_mae.ttt import TTTAdapter, trainable_names
from tttlab.ttt_mae.views import resize_center_crop

# ViT-L/16 MAE + its decoder + the 12-block, 768-wide vit_head (official checkpoint shapes)
VIT_L = {
    "patch_embed.proj.weight": (1024, 3, 16, 16), "pos_embed": (1, 197, 1024), "blocks.23.mlp.fc1.weight": (4096, 1024),
    "blocks.0.attn.qkv.weight": (3072, 1024), "decoder_embed.weight": (512, 1024), "decoder_blocks.7.attn.qkv.weight": (1536, 512),
    "decoder_pred.weight": (768, 512), "classifier_embed.weight": (768, 1024), "classifier_pos_embed": (1, 197, 768),
    "classifier_blocks.11.attn.qkv.weight": (2304, 768), "classifier_pred.weight": (1000, 768),
}  # fmt: skip


def _paper_model(c, **extra):
    with torch.device("meta"):
        return build_model(c["model"], **model_overrides(c, **extra))


@pytest.mark.parametrize("entry", ["ttt", "baseline"])
def test_paper_ttt_and_baseline_profiles(entry):
    c = compose(entry, f"paper_{entry}")
    model = _paper_model(c)
    cfg = model.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.img_size) == (1024, 24, 16, 16, 224)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (512, 8, 16)
    assert (cfg.classifier_embed_dim, cfg.classifier_depth, cfg.classifier_num_heads) == (768, 12, 12)
    assert cfg.head_type == "vit_head" and cfg.norm_pix_loss and cfg.num_classes == 1000
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: shapes[k] for k in VIT_L} == VIT_L
    assert len([k for k in shapes if k.startswith("classifier_blocks.") and k.endswith("qkv.weight")]) == 12
    b = c["benchmark"]
    assert (b["name"], b["corruptions"], b["severities"], b["setting"]) == (
        "imagenet_c",
        "common",
        [5],
        "episodic",
    )
    assert c["test_resize"] == 256 and c["input_size"] == 224  # upstream's Resize(256) + CenterCrop(224)
    assert c["normalize"] == "auto" and c["amp"] == "none" and c["lr"] is None
    s = E.settings_of(c if entry == "ttt" else {**c, "steps_per_example": 0})
    if entry == "baseline":
        assert s.steps_per_example == 0
        return
    # per image: 20 SGD steps, momentum 0.9, wd 0, lr = 1e-2 * 128 / 256, 128 single-crop copies, 75 % masks
    assert (s.steps_per_example, s.batch_size, s.mask_ratio, s.lr) == (20, 128, 0.75, pytest.approx(5e-3))
    assert (s.optimizer_type, s.optimizer_momentum, s.finetune_mode, s.single_crop) == (
        "sgd",
        0.9,
        "encoder",
        True,
    )
    names = set(trainable_names(model, s.finetune_mode))
    assert {
        "cls_token",
        "mask_token",
        "patch_embed.proj.weight",
        "blocks.23.mlp.fc2.bias",
        "norm.weight",
    } <= names
    assert not any(n.startswith(("decoder", "classifier")) for n in names)


def test_paper_ttt_optimizer_as_built():
    """The adapter's optimizer under the paper settings (a small model, the same code path)."""
    c = compose("ttt", "paper_ttt")
    s = E.settings_of(c)
    torch.manual_seed(0)
    tiny = build_model("mae_vit_smoke_patch7")
    opt = TTTAdapter(tiny, s).optimizer
    assert type(opt) is torch.optim.SGD
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"], g["dampening"]) == (
        pytest.approx(5e-3), 0.9, 0, False, 0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "kind, world, lr, betas, wd, epochs, warmup, min_lr",
    [
        # README: 64 per GPU x 8 GPUs, blr 1e-3 -> lr 2e-3; MAE's AdamW (0.9, 0.95), wd 0.05
        ("pretrain", 8, 1e-3 * 64 * 8 / 256, (0.9, 0.95), 0.05, 800, 40, 0.0),
        # README: 32 x accum 4 x 8 GPUs = 1024, blr 1e-3 -> lr 4e-3; AdamW (0.9, 0.999), wd 0.2, to 1e-6
        ("probe", 8, 4e-3, (0.9, 0.999), 0.2, 20, 5, 1e-6),
    ],
)
def test_paper_pretrain_and_probe_profiles(kind, world, lr, betas, wd, epochs, warmup, min_lr):
    c = compose(kind, f"paper_{kind}")
    assert (c["epochs"], c["warmup_epochs"], c["min_lr"], c["input_size"]) == (epochs, warmup, min_lr, 224)
    assert c["model"] == "mae_vit_large_patch16" and c["norm_pix_loss"] and c["lr"] is None
    assert c["aug"]["enabled"] and c["aug"]["flip"]
    if kind == "pretrain":
        assert c["mask_ratio"] == 0.75 and c["aug"]["crop_scale"] == [0.2, 1.0]
    else:
        assert c["smoothing"] == 0.1 and c["aug"]["crop_scale"] == [0.08, 1.0]  # RandomResizedCrop default
        assert (c["head_type"], c["classifier_depth"], c["drop_path"]) == ("vit_head", 12, 0.0)
    torch.manual_seed(0)
    small = build_model("mae_vit_smoke_patch7", no_decoder=kind == "probe")
    for name, p in small.named_parameters():  # as T.build freezes them
        p.requires_grad_(
            name.startswith("classifier") if kind == "probe" else not name.startswith("classifier")
        )
    opt, base_lr = T.make_optimizer(c, small, kind, world)
    assert base_lr == pytest.approx(lr) and all(g["lr"] == pytest.approx(lr) for g in opt.param_groups)
    assert all(g["betas"] == betas for g in opt.param_groups)
    decays = {g["weight_decay"] for g in opt.param_groups}
    # pretraining: no decay on biases, norms and tokens (MAE); probing: upstream passes every head tensor
    assert decays == ({0.0, wd} if kind == "pretrain" else {wd})
    # linear warm-up over `warmup` epochs, then half-cosine to min_lr at the end
    assert T.lr_at(c, warmup / 2, lr) == pytest.approx(lr / 2)
    assert T.lr_at(c, warmup, lr) == pytest.approx(lr) and T.lr_at(c, epochs, lr) == pytest.approx(min_lr)


def test_test_resize_is_torchvisions_resize_and_center_crop():
    """Upstream's ``Resize(256, interpolation=3)`` + ``CenterCrop(224)`` on the PIL image, exactly."""
    from PIL import Image
    from torchvision import transforms

    rng = np.random.default_rng(0)
    tf = transforms.Compose([transforms.Resize(256, interpolation=3), transforms.CenterCrop(224)])
    for shape in ((224, 224, 3), (230, 300, 3), (300, 229, 3)):
        im = rng.integers(0, 256, shape, dtype=np.uint8)
        ours = resize_center_crop(im[None], 256, 224)[0]
        np.testing.assert_array_equal(ours, np.asarray(tf(Image.fromarray(im))))


def test_paper_baseline_predicts_the_resized_view_of_imagenet_c(tmp_path):
    """End to end on an ImageNet-C fixture: the paper profile's prediction is the model's on the
    resized/centre-cropped file (not on the stored image); single-crop TTT steps run on that view;
    ``test_resize`` with random views or below ``input_size`` is refused."""
    from tttlab.core.records import load_records
    from tttlab.core.testing import make_imagenet_c
    from tttlab.ttt_mae.common import IMAGENET_MEAN, IMAGENET_STD
    from tttlab.ttt_mae.views import Normalizer, to_unit

    arch = dict(patch_size=56, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                decoder_num_heads=2, classifier_embed_dim=16, classifier_num_heads=2, mlp_ratio=2.0)  # fmt: skip
    root = make_imagenet_c(tmp_path / "imagenet-c", corruptions=("fog",), severities=(5,))
    torch.manual_seed(0)
    src = build_model("mae_vit_base_patch16", classifier_depth=1, **arch)
    torch.save({"model": {k: v for k, v in src.state_dict().items() if not k.startswith("classifier")}},
               tmp_path / "mae.pth")  # fmt: skip
    head = {k: v for k, v in src.state_dict().items() if k.startswith("classifier")}
    torch.save({"model": head, "args": argparse.Namespace(blr=1e-3)}, tmp_path / "prob.pth")
    over = {"out_dir": str(tmp_path / "out"), "device": "cpu", "model": "mae_vit_base_patch16", "model_overrides": arch,
            "classifier_depth": 1, "resume_model": str(tmp_path / "mae.pth"), "resume_finetune": str(tmp_path / "prob.pth"),
            "num_threads": 1, "benchmark": {"root": str(root), "num_examples": 3, "corruptions": ["fog"]},
            "logging": {"progress": False}}  # fmt: skip
    c = compose("baseline", "paper_baseline", over)
    E.run_benchmark(c, "ttt_mae.baseline")
    got = {e["index"]: e["predictions"][0] for e in load_records(tmp_path / "out" / "images").extra}
    bench = E.make_bench(c)
    images, _ = bench.domain_dataset(bench.domains[0]).take(np.arange(3))
    norm = Normalizer(IMAGENET_MEAN, IMAGENET_STD)
    src.eval()
    with torch.no_grad():
        zoomed = (
            src.classify(norm(to_unit(resize_center_crop(np.asarray(images), 256, 224)))).argmax(1).tolist()
        )
    assert got == dict(enumerate(zoomed))
    with torch.no_grad():  # the stored 224 px images (what test_resize=null feeds) give other logits
        stored = src.classify(norm(to_unit(np.asarray(images))))
        assert not torch.allclose(
            stored, src.classify(norm(to_unit(resize_center_crop(np.asarray(images), 256, 224))))
        )
    # TTT on the same view: two single-crop steps run
    c = compose(
        "ttt",
        "paper_ttt",
        {**over, "out_dir": str(tmp_path / "ttt"), "steps_per_example": 2, "batch_size": 2},
    )
    df = load_records(E.run_benchmark(c, "ttt_mae.ttt"))
    assert int(df[(df.metric == "accuracy") & (df.corruption == "fog")].n.iloc[0]) == 3
    for bad, needle in (
        ({"single_crop": False}, "single_crop=false"),
        ({"test_resize": 200}, "test_resize=200"),
    ):
        with pytest.raises(ConfigError, match=needle):
            E.settings_of({**c, **bad})
