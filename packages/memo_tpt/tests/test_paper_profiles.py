"""Every ``paper_*`` / ``seed002_*`` experiment as the code runs it: composed through Hydra, then the adapters
``main.build`` makes from it (tiny stand-in networks, the real settings) checked against the papers and
seed 002 (PAPERS.md section 3); then one image of an ImageNet fixture through each (the profiles' smoke)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tttlab.core import testing
from tttlab.memo_tpt.models import build_clip as real_build_clip

from .conftest import TINY_CLIP, SmallBNNet

CONF = Path(__file__).resolve().parents[1] / "src" / "tttlab" / "memo_tpt" / "conf" / "experiment"
EXPERIMENTS = sorted(p.stem for p in CONF.glob("*.yaml") if p.stem.startswith(("paper_", "seed002_")))

# the settings of MEMO (Zhang et al.: SGD 2.5e-4, wd 0, AugMix, N = 16, 64 augmented views) and of seed 002's
# EasyMemo (SGD 5e-3, wd 1e-4, crop + flip, prior 0.94, the clean view first of its views: 8 without top-k, 64
# with it, as its notebook); TPT (Shu et al.: 64 views, 6 kept, 1 AdamW step lr 5e-3 wd 0.01)
MEMO_PAPER = dict(opt=("sgd", 2.5e-4, 0.0), prior=16 / 17, augmentation="augmix", top_k=None, augs=64,
                  include_original=False)  # fmt: skip
MEMO_SEED002 = dict(opt=("sgd", 5e-3, 1e-4), prior=0.94, augmentation="cut", top_k=0.1, augs=64,
                    include_original=True)  # fmt: skip
# seed 002's ensemble ran its EasyMemo member with prior 1.0 (its class-wide BatchNorm2d.prior is 0.94 only
# inside EasyMemo.predict): source statistics = our prior_strength null
MEMO_SEED002_ENSEMBLE = {**MEMO_SEED002, "prior": None}
TPT = dict(n_views=64, kept=6, tts=1, lr=5e-3, weight_decay=0.01, augmix=False, ensemble=False, align_steps=0)
EXPECTED = {
    "paper_memo_resnet50_imagenet_a": ("memo", "a", MEMO_PAPER),
    "paper_memo_resnet50_imagenet_r": ("memo", "r", MEMO_PAPER),
    "seed002_memo_resnet50_imagenet_a": ("memo", "a", {**MEMO_SEED002, "top_k": None, "augs": 8}),
    "paper_tpt_rn50_imagenet_a": ("tpt", "a", {**TPT, "arch": "RN50"}),
    "paper_tpt_rn50_imagenet_v2": ("tpt", "v2", {**TPT, "arch": "RN50"}),
    "paper_tpt_vit_b16_imagenet_a": ("tpt", "a", {**TPT, "arch": "ViT-B-16"}),
    "paper_tpt_vit_b16_imagenet_r": ("tpt", "r", {**TPT, "arch": "ViT-B-16"}),
    "paper_tpt_vit_b16_imagenet_sketch": ("tpt", "sketch", {**TPT, "arch": "ViT-B-16"}),
    "paper_tpt_vit_b16_imagenet_v2": ("tpt", "v2", {**TPT, "arch": "ViT-B-16"}),
    "seed002_tpt_view_ensemble_imagenet_a": ("tpt", "a", {**TPT, "arch": "RN50", "ensemble": True}),
    "paper_ensemble_memo_tpt_imagenet_a": ("ensemble", "a", {"temps": [1.55, 0.7], "steps": 1}),
}


def _compose(app: str, overrides):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("tttlab.memo_tpt.conf", version_base=None):
        return OmegaConf.to_container(compose(config_name=app, overrides=list(overrides)), resolve=True)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    a = testing.make_imagenet_a(root / "a", n_per_class=1)
    r = testing.make_imagenet_r(root / "r", n_per_class=1)
    v2 = testing.make_imagenet_v2(root / "v2", classes=(0, 5), n_per_class=1)
    from tttlab.core import data

    return {
        "a": data.imagenet_a(a, transform=None),
        "r": data.imagenet_r(r, transform=None),
        "v2": data.imagenet_v2(v2, transform=None),
        "sketch": data.imagenet_v2(v2, transform=None),  # a 1000-class stand-in (the reader differs only)
    }


@pytest.fixture
def tiny_models(monkeypatch):
    from tttlab.memo_tpt import models

    built = []

    def classifier(arch, checkpoint=None, num_classes=None):
        built.append(arch)
        torch.manual_seed(0)
        return SmallBNNet(classes=num_classes or 1000).eval()

    def clip(arch, pretrained=None, device="cpu", config=None):
        built.append(arch)
        torch.manual_seed(0)
        return real_build_clip("tiny", config=TINY_CLIP, device=device)

    monkeypatch.setattr(models, "build_classifier", classifier)
    monkeypatch.setattr(models, "build_clip", clip)
    return built


def _check_memo(m, want, dataset):
    from tttlab.memo_tpt.memo import Memo

    assert isinstance(m, Memo)
    assert (m.opt_args["name"], m.opt_args["lr"], m.opt_args["weight_decay"]) == pytest.approx(want["opt"])
    opt = m._new_optimizer()
    assert m.opt_args["momentum"] == 0.0 and type(opt) is torch.optim.SGD
    # MEMO adapts every parameter of the classifier
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in m.model.parameters()
    )
    if want["prior"] is None:
        assert m.prior is None
    else:
        assert m.prior == pytest.approx(want["prior"], abs=1e-12)
    assert (m.augmentation, m.n_augmentations, m.steps, m.top_k, m.include_original) == (
        want["augmentation"],
        want["augs"],
        1,
        want["top_k"],
        want["include_original"],
    )
    assert (m.size, m.test_resize, m.scale, m.flip) == (224, 256, (0.08, 1.0), True)  # Resize 256 + crop 224
    n_cls = 200 if getattr(dataset, "class_indices", None) is not None else None
    assert (None if m.class_indices is None else len(m.class_indices)) == n_cls


def _check_tpt(t, want):
    from tttlab.memo_tpt.tpt import TPT, n_selected

    assert isinstance(t, TPT)
    assert (t.n_views, n_selected(t.n_views, t.selection), t.tts) == (
        want["n_views"],
        want["kept"],
        want["tts"],
    )
    assert (t.lr, t.weight_decay, t.augmix, t.ensemble, t.align_steps) == (
        want["lr"], want["weight_decay"], want["augmix"], want["ensemble"], want["align_steps"],
    )  # fmt: skip
    # "a photo of a": 4 learnable context tokens (seed 002's ensemble: "a bad photo of a", 5), one shared
    assert t.prompts.ctx.shape[-2] == want.get("n_ctx", 4)
    assert t.prompts.ctx.ndim == 2
    assert type(t.optimizer) is torch.optim.AdamW
    assert (
        t.optimizer.param_groups[0]["lr"] == want["lr"]
        and t.optimizer.param_groups[0]["weight_decay"] == 0.01
    )


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_paper_profile_builds_the_published_method(experiment, fixtures, tiny_models):
    from tttlab.memo_tpt import main

    assert experiment in EXPECTED, f"{experiment}: add its expected settings to this test"
    app, dataset_key, want = EXPECTED[experiment]
    c = _compose(app, [f"+experiment={experiment}"])
    assert c["device"] == "cuda" and c["data_to_test"] == dataset_key and c["method"] == app
    # each method's upstream precision (TPT: fp16 + GradScaler on CUDA); seed 002's MEMO: float32; its EasyTPT
    # ran OpenAI's float16 CLIP weights on CUDA, for which auto's fp16 autocast is the closest mode
    assert c["amp"] == ("none" if experiment == "seed002_memo_resnet50_imagenet_a" else "auto")
    dataset = fixtures[dataset_key]
    adapter, _ = main.build({**c, "device": "cpu"}, dataset, torch.device("cpu"), 0)
    if app == "memo":
        assert tiny_models == ["resnet50"]
        _check_memo(adapter, want, dataset)
    elif app == "tpt":
        assert tiny_models == [want["arch"]]
        _check_tpt(adapter, want)
    else:
        assert tiny_models == ["resnet50", "RN50"]
        assert adapter.temperatures == want["temps"] and adapter.steps == want["steps"] and not adapter.simple
        memo, tpt = adapter.members
        _check_memo(memo, MEMO_SEED002_ENSEMBLE, dataset)  # seed 002's EasyMemo member, not the paper's MEMO
        _check_tpt(tpt, {**TPT, "n_ctx": 5})
    # smoke: one image through the profile's adapter (4 views to stay fast)
    small, _ = main.build({**c, "device": "cpu", "augs": 4}, dataset, torch.device("cpu"), 0)
    image, label = dataset[0]
    logits = small(image)
    n_cls = 200 if dataset_key in ("a", "r") else 1000
    assert logits.shape == (1, n_cls) and torch.isfinite(logits).all()
