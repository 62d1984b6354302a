import pytest
import torch

from tttlab.core.errors import CheckpointError, ConfigError
from tttlab.ttt_mae import train as T
from tttlab.ttt_mae.common import compose


def pre_cfg(out, **kw):
    return compose("pretrain", "smoke_pretrain",
                   {"out_dir": str(out), "epochs": 2, "data": {"num_examples": 128}, "batch_size": 32,
                    "logging": {"progress": False}, **kw})  # fmt: skip


def sd(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_pretrain_kill_resume_bitwise(tmp_path):
    full = T.run(pre_cfg(tmp_path / "a"), "pretrain")
    T.run(pre_cfg(tmp_path / "b"), "pretrain", stop_after_steps=6)  # killed in epoch 2 (4 steps/epoch)
    resumed = T.run(pre_cfg(tmp_path / "b"), "pretrain")
    a, b = sd(full), sd(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    assert [h["epoch"] for h in first["history"]] == [0, 1]


def test_probe_trains_only_the_head(tmp_path):
    pre = T.run(pre_cfg(tmp_path / "pre", epochs=1), "pretrain")
    c = compose("probe", "smoke_probe", {"out_dir": str(tmp_path / "probe"), "finetune": str(pre), "epochs": 1,
                                         "data": {"num_examples": 96}, "batch_size": 32,
                                         "logging": {"progress": False}})  # fmt: skip
    out = sd(T.run(c, "probe"))
    base = sd(pre)
    assert all(torch.equal(out[k], base[k]) for k in out if not k.startswith("classifier"))
    assert not any(k.startswith("decoder") for k in out)
    fresh = T.build({**c, "finetune": str(pre)}, "probe").state_dict()
    assert not torch.equal(out["classifier_pred.weight"], fresh["classifier_pred.weight"])


def test_lr_schedule_and_errors(tmp_path):
    c = {"warmup_epochs": 2, "epochs": 10, "min_lr": 0.1}
    assert T.lr_at(c, 1.0, 1.0) == pytest.approx(0.5)
    assert T.lr_at(c, 2.0, 1.0) == pytest.approx(1.0)
    assert T.lr_at(c, 10.0, 1.0) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="finetune"):
        T.build(compose("probe", "smoke_probe"), "probe")
    bad = compose("probe", "smoke_probe", {"finetune": str(tmp_path / "none.pth")})
    with pytest.raises(CheckpointError, match="none.pth"):
        T.build(bad, "probe")
    with pytest.raises(ConfigError, match="data.root"):
        T.load_dataset({"data": {"name": "imagenet", "root": None, "split": "train"}})
    with pytest.raises(ConfigError, match="unknown config key"):
        compose("pretrain", None, {"stepz": 1})


def test_probe_clean_accuracy_reads_imagenet_val(tmp_path):
    """ImageNet has train/val: the probe's clean accuracy was looked up in a 'test' split and never measured."""
    from tttlab.core import testing
    from tttlab.ttt_mae.model import build_model
    from tttlab.ttt_mae.views import Normalizer

    root = testing.make_imagenet(tmp_path / "imagenet")
    torch.manual_seed(0)
    model = build_model("mae_vit_tiny_patch16", depth=1, decoder_depth=1, classifier_depth=1, no_decoder=True)
    c = {"data": {"name": "imagenet", "root": str(root), "split": "train"}, "amp": "none"}
    acc, n = T.clean_accuracy(model, c, torch.device("cpu"), Normalizer(*T.normalization(c, "imagenet")))
    assert n == 6 and 0.0 <= acc <= 1.0
    missing = {
        "data": {"name": "imagenet", "root": str(tmp_path / "nothing"), "split": "train"},
        "amp": "none",
    }
    assert T.clean_accuracy(model, missing, torch.device("cpu"), lambda x: x)[1] == 0
