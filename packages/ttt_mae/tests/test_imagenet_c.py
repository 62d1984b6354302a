"""The paper's path end to end on an on-disk ImageNet-C fixture: official-layout checkpoint files,
224 px RGB images, ImageNet normalisation, RandomResizedCrop + flip views (tiny dims: patch 56)."""

import argparse

import pytest
import torch

from tttlab.core.records import load_records
from tttlab.core.testing import make_imagenet_c
from tttlab.ttt_mae.common import compose
from tttlab.ttt_mae.evaluate import run_benchmark
from tttlab.ttt_mae.model import build_model

ARCH = dict(patch_size=56, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=2, classifier_embed_dim=16, classifier_num_heads=2, mlp_ratio=2.0)  # fmt: skip


@pytest.mark.parametrize("method", ["ttt_mae.baseline", "ttt_mae.ttt"])
def test_imagenet_c_with_official_layout(tmp_path, method):
    root = make_imagenet_c(tmp_path / "imagenet-c", corruptions=("fog", "contrast"), severities=(5,))
    torch.manual_seed(0)
    src = build_model("mae_vit_base_patch16", classifier_depth=1, **ARCH)
    sd = src.state_dict()
    torch.save(
        {"model": {k: v for k, v in sd.items() if not k.startswith("classifier")}}, tmp_path / "mae.pth"
    )
    head = {k: v for k, v in sd.items() if not k.startswith("decoder") and k != "mask_token"}
    torch.save({"model": head, "epoch": 19, "args": argparse.Namespace(blr=1e-3)}, tmp_path / "prob.pth")
    c = compose("ttt", "paper_ttt", {
        "out_dir": str(tmp_path / "out"), "device": "cpu", "model": "mae_vit_base_patch16", "model_overrides": ARCH,
        "classifier_depth": 1, "resume_model": str(tmp_path / "mae.pth"), "resume_finetune": str(tmp_path / "prob.pth"),
        "steps_per_example": 2, "batch_size": 4, "single_crop": False, "test_resize": None, "num_threads": 1,
        "benchmark": {"root": str(root), "num_examples": 2, "corruptions": ["fog", "contrast"]}, "logging": {"progress": False},
    })  # fmt: skip
    df = load_records(run_benchmark(c, method))
    acc = df[(df.metric == "accuracy") & (df.corruption != "mean")]
    assert sorted(acc.corruption) == ["contrast", "fog"] and set(acc.n) == {2} and set(acc.severity) == {5}
    images = load_records(tmp_path / "out" / "images")
    steps = 0 if method == "ttt_mae.baseline" else 2
    assert all(len(e["predictions"]) == steps + 1 and 0 <= e["label"] < 1000 for e in images.extra)
    if steps:
        assert all(len(e["losses"]) == 2 and all(v > 0 for v in e["losses"]) for e in images.extra)
