"""Official checkpoint layouts (upstream key names), as synthetic files with tiny dims."""

import argparse

import pytest
import torch

from tttlab.core.errors import CheckpointError
from tttlab.ttt_mae.checkpoint import load_official
from tttlab.ttt_mae.model import build_model


def official_files(tmp_path, tiny, head_type="vit_head"):
    """A ``mae_pretrain_vit_large_full.pth``-like file (encoder + decoder) and a
    ``prob_lr1e-3_wd.2_blk12_ep20.pth``-like file (encoder copy + classifier*, no decoder, training
    state with an argparse Namespace), built from another seed so loading visibly changes the weights."""
    src = tiny(seed=1, head_type=head_type)
    sd = src.state_dict()
    pre = {k: v.clone() for k, v in sd.items() if not k.startswith(("classifier", "head.", "bn."))}
    if head_type == "vit_head":
        head = {k: v.clone() for k, v in sd.items() if not k.startswith("decoder") and k != "mask_token"}
    else:  # upstream's linear probe: head = Sequential(BatchNorm1d(affine=False), Linear)
        head = {k: v.clone() for k, v in sd.items() if not k.startswith(("decoder", "head.", "bn."))}
        head.update({"head.0.running_mean": torch.randn_like(sd["bn.running_mean"]),
                     "head.0.running_var": torch.rand_like(sd["bn.running_var"]) + 0.5,
                     "head.1.weight": sd["head.weight"].clone(), "head.1.bias": sd["head.bias"].clone()})  # fmt: skip
    torch.save({"model": pre}, tmp_path / "mae_pretrain_vit_large_full.pth")
    torch.save({"model": head, "optimizer": {}, "epoch": 19, "scaler": {}, "args": argparse.Namespace(blr=1e-3)},
               tmp_path / "prob_lr1e-3_wd.2_blk12_ep20.pth")  # fmt: skip
    return (
        tmp_path / "mae_pretrain_vit_large_full.pth",
        tmp_path / "prob_lr1e-3_wd.2_blk12_ep20.pth",
        src,
        head,
    )


@pytest.mark.parametrize("head_type", ["vit_head", "linear"])
def test_load_official_layout(tmp_path, tiny, head_type):
    pre, head_path, src, head = official_files(tmp_path, tiny, head_type)
    m = load_official(tiny(seed=2, head_type=head_type), pre, head_path)
    for k, v in m.state_dict().items():
        if k == "bn.running_mean":
            assert torch.equal(v, head["head.0.running_mean"])
        elif k == "bn.running_var":
            assert torch.equal(v, head["head.0.running_var"])
        elif k != "bn.num_batches_tracked":
            assert torch.equal(v, src.state_dict()[k]), k


def test_head_taken_from_head_file_only(tmp_path, tiny):
    pre, head_path, src, _ = official_files(tmp_path, tiny)
    other = tiny(seed=3).state_dict()
    sd = torch.load(pre)["model"]
    sd["classifier_pred.weight"] = other["classifier_pred.weight"]  # ignored: the head file wins
    torch.save({"model": sd}, pre)
    m = load_official(tiny(seed=2), pre, head_path)
    assert torch.equal(m.classifier_pred.weight, src.classifier_pred.weight)


def test_missing_and_mismatched_keys_are_named(tmp_path, tiny):
    pre, head_path, _, head = official_files(tmp_path, tiny)
    sd = torch.load(pre)["model"]
    del sd["decoder_pred.bias"]
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"decoder_pred\.bias") as e:
        load_official(tiny(), tmp_path / "bad.pth", head_path)
    assert "blocks.0.attn.qkv.weight (5, 5) != (96, 32)" in str(e.value)
    head = {k: v for k, v in head.items() if k != "classifier_norm.weight"}
    torch.save({"model": head}, tmp_path / "head.pth")
    with pytest.raises(CheckpointError, match=r"missing in .*head\.pth: classifier_norm\.weight"):
        load_official(tiny(), pre, tmp_path / "head.pth")


def test_wrong_architecture_and_missing_file(tmp_path, tiny):
    pre, head_path, _, _ = official_files(tmp_path, tiny)
    bigger = build_model("mae_vit_smoke_patch7", depth=3)
    torch.save({"model": bigger.state_dict()}, tmp_path / "deeper.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.2\."):
        load_official(tiny(), tmp_path / "deeper.pth", head_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_official(tiny(), tmp_path / "nope.pth", head_path)
    with pytest.raises(CheckpointError, match="is a directory"):  # not "does not exist" (bad-input audit)
        load_official(tiny(), tmp_path, head_path)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_official(tiny(), tmp_path / "list.pth", head_path)


def test_head_file_deeper_than_classifier_depth_is_an_error(tmp_path, tiny):
    """A 2-block head file loaded with classifier_depth=1 used to drop the second block silently."""
    pre, _, _, _ = official_files(tmp_path, tiny)
    deep = tiny(seed=1, classifier_depth=2).state_dict()
    torch.save(
        {"model": {k: v for k, v in deep.items() if k.startswith("classifier")}}, tmp_path / "deep.pth"
    )
    with pytest.raises(
        CheckpointError, match=r"deep\.pth: head keys .*classifier_depth 1.*classifier_blocks\.1\."
    ):
        load_official(tiny(classifier_depth=1), pre, tmp_path / "deep.pth")
    load_official(tiny(classifier_depth=2), pre, tmp_path / "deep.pth")  # the matching depth loads
    # the same from one file holding everything (no resume_finetune)
    torch.save({"model": {**torch.load(pre)["model"], **deep}}, tmp_path / "all.pth")
    with pytest.raises(CheckpointError, match=r"all\.pth: head keys .*classifier_blocks\.1\."):
        load_official(tiny(classifier_depth=1), tmp_path / "all.pth")


def test_swapped_pretraining_and_head_files_are_named_as_such(tmp_path, tiny):
    """resume_model and resume_finetune given the other way round: the error said only that keys are missing
    (or, for our own pretraining file, whose model has a deeper untrained head, asked whether classifier_depth
    matches); it now also says the head file holds the MAE decoder and the model file none, so the two are
    probably swapped.  An error of the right order does not say so."""
    pre, head_path, _, _ = official_files(tmp_path, tiny)
    with pytest.raises(CheckpointError, match=r"missing in .*prob_lr.*: decoder") as e:
        load_official(tiny(), head_path, pre)
    assert str(e.value).endswith(
        f"; {pre} holds the MAE decoder and {head_path} does not: are the two files swapped? "
        "resume_model takes the pretraining checkpoint, resume_finetune the probe's (the head): "
        f"resume_model={pre} resume_finetune={head_path}"
    ), str(e.value)
    # ours: tttlab-ttt-mae-pretrain saves the whole model, its untrained head deeper than the probe's
    ours = tiny(seed=1, classifier_depth=2).state_dict()
    torch.save({"model": ours}, tmp_path / "pretrain.pth")
    with pytest.raises(
        CheckpointError, match=r"classifier_depth 1.*does classifier_depth.*are the two files swapped"
    ):
        load_official(tiny(classifier_depth=1), head_path, tmp_path / "pretrain.pth")
    with pytest.raises(CheckpointError) as e:  # the right order, a head file of another depth: no such guess
        load_official(tiny(classifier_depth=1), tmp_path / "pretrain.pth", tmp_path / "pretrain.pth")
    assert "are the two files swapped" not in str(e.value)


def test_files_pickling_other_objects_need_an_explicit_opt_in(tmp_path, tiny):
    """The official files' ``args`` Namespace is read safely; any other pickled object is refused with an
    error naming it and ``weights_only=false`` (no silent full unpickle), which then reads the file."""
    import pathlib

    from tttlab.ttt_mae.evaluate import load_model

    pre, head_path, src, head = official_files(tmp_path, tiny)
    odd = tmp_path / "odd.pth"
    torch.save({"model": head, "args": argparse.Namespace(output_dir=pathlib.PurePosixPath("/out"))}, odd)
    with pytest.raises(
        CheckpointError, match=r"resume_finetune .*odd\.pth pickles .*PurePosixPath.*weights_only=false"
    ):
        load_official(tiny(seed=2), pre, odd)
    m = load_official(tiny(seed=2), pre, odd, weights_only=False)
    assert torch.equal(m.classifier_pred.weight, src.classifier_pred.weight)
    # the config key reaches the reader (ttt / baseline: weights_only; probe: the same key for finetune)
    c = {"model": "mae_vit_smoke_patch7", "fused_attn": True, "model_overrides": {}, "head_type": "vit_head",
         "classifier_depth": 1, "norm_pix_loss": True, "input_size": 28, "resume_model": str(pre),
         "resume_finetune": str(odd), "weights_only": True}  # fmt: skip
    with pytest.raises(CheckpointError, match="PurePosixPath"):
        load_model(c, torch.device("cpu"))
    assert torch.equal(load_model({**c, "weights_only": False}, torch.device("cpu")).classifier_pred.weight,
                       src.classifier_pred.weight)  # fmt: skip


def test_every_entry_and_experiment_reads_checkpoints_safely_by_default():
    """``weights_only`` is true unless a user sets it: in every entry point and shipped experiment
    (mutation audit: a yaml default flipped to false, a full unpickle of every file, passed every test)."""
    from importlib.resources import files

    from tttlab.ttt_mae.common import compose

    folder = files("tttlab.ttt_mae").joinpath("conf/experiment")
    experiments = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
    suffixes = {"ttt": ("_ttt",), "baseline": ("_ttt", "_baseline"), "probe": ("_probe",)}
    composed = 0
    for entry, ends in suffixes.items():
        assert compose(entry)["weights_only"] is True, entry
        for exp in (e for e in experiments if e.endswith(ends)):
            assert compose(entry, exp)["weights_only"] is True, (entry, exp)
            composed += 1
    assert composed >= 10
