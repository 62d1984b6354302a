"""The paper profiles as the code runs them: each ``paper_*`` experiment composed through the real loader
(``train_config``), then the values the training loop derives from it (net shape, PiSGD groups' lr and
weight decay, lr schedule in steps, input normalisation), checked against the upstream commands (seed 003)
and ``cifar10mlp.py`` / ``transfer_imagenet.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tttlab.pilimit import data as D
from tttlab.pilimit.train import build_model, build_optimizer, num_outputs, train_config

# per experiment: model keys, net shape, batch/epochs, steps per epoch of the real data, {PiSGD group: (lr,
# weight decay)}, {step: lr / lr0}, (gclip, per parameter)
CIFAR_STEPS = 50_000 // 8  # 6,250: upstream's len(train_loader) (50,000 divisible by 8)
PAPER = {
    "paper_cifar10": dict(
        model=dict(
            kind="inf",
            r=400,
            depth=2,
            bias_alpha=0.5,
            first_layer_alpha=1.0,
            last_layer_alpha=0.5,
            last_bias_alpha=None,
            dtype="float16",
        ),
        d_in=3072,
        d_out=10,
        batch=8,
        epochs=50,
        steps=CIFAR_STEPS,
        # --no-apply-lr-mult-to-wd: weight decay wd / mult, so that every group decays by 1 - lr * wd
        groups={
            "first": (0.1, 1e-5 / 0.1),
            "hidden": (1.0, 1e-5),
            "last": (4.0, 1e-5 / 4.0),
            "bias": (0.5, 1e-5 / 0.5),
        },
        # multistep: lr x 0.15 after 40 epochs = 40 x 6,250 steps
        schedule={0: 1.0, 40 * CIFAR_STEPS - 1: 1.0, 40 * CIFAR_STEPS: 0.15, 50 * CIFAR_STEPS: 0.15},
        gclip=(0.4, True),
    ),
    "paper_transfer": dict(
        model=dict(
            kind="inf",
            r=200,
            depth=2,
            bias_alpha=0.5,
            first_layer_alpha=1.0,
            last_layer_alpha=1.0,
            last_bias_alpha=None,
            dtype="float16",
        ),
        d_in=3072,
        d_out=250,
        batch=16,
        epochs=40,
        steps=None,
        # apply_lr_mult_to_wd (upstream default): every group wd 1e-4; bias lr mult 0.5 (upstream default)
        groups={"first": (0.01, 1e-4), "hidden": (0.01, 1e-4), "last": (0.01, 1e-4), "bias": (0.005, 1e-4)},
        schedule=None,  # no scheduler
        gclip=(0.0, True),
    ),
}


@pytest.mark.parametrize("experiment", sorted(PAPER))
def test_paper_profile_composes_to_the_upstream_run(experiment):
    p = PAPER[experiment]
    c = train_config(experiment, ["data.root=/data", "transfer.root=/data"])
    assert {k: c["model"][k] for k in p["model"]} == p["model"]
    assert (c["data"]["batch_size"], c["train"]["epochs"]) == (p["batch"], p["epochs"])
    assert (c["optim"]["gclip"], c["optim"]["gclip_per_param"]) == p["gclip"]
    assert num_outputs(c) == p["d_out"]
    # the net and optimizer the training loop builds (float32 storage: the groups do not depend on it)
    small = {**c, "model": {**c["model"], "dtype": "float32", "r": 8}}
    net = build_model(small, p["d_in"], num_outputs(c), "cpu")
    assert net.input_layer.A.shape[0] == p["d_in"] and net.output_layer.A.shape[1] == p["d_out"]
    steps = p["steps"] or 1000
    opt, sched = build_optimizer(c, net, steps, steps * p["epochs"])
    lr0 = c["optim"]["lr"]
    got = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert got == pytest.approx(p["groups"])
    if p["schedule"] is None:
        assert sched is None
    else:
        for t, factor in p["schedule"].items():
            assert sched.lr_at(t) == pytest.approx(lr0 * factor), t


def test_paper_omniglot_profile_is_the_upstream_maml_command():
    c = train_config("paper_omniglot", ["maml.root=/data"])
    m, o, t = c["model"], c["optim"], c["maml"]
    assert (m["kind"], m["r"], m["depth"], m["bias_alpha"], m["first_layer_alpha"], m["dtype"]) == (
        "inf", 200, 1, 4.0, 2.0, "float16",
    )  # fmt: skip
    assert (o["lr"], o["first_layer_lr_mult"], o["last_layer_lr_mult"], o["gclip"], o["gclip_per_param"]) == (
        0.1, 0.2, 0.0, 0.1, False,
    )  # fmt: skip
    assert o["scheduler"] == "cosine" and c["train"]["epochs"] == 2
    assert (t["num_ways"], t["num_shots"], t["num_shots_test"], t["step_size"], t["meta_batch_size"]) == (
        5, 1, 1, 0.5, 8,
    )  # fmt: skip
    assert (t["num_batches"], t["num_test_batches"]) == (1000, 500)
    assert t["adapt_readout_only"] and t["gproj_inner"] and t["gproj_outer"] and t["readout_zero_init"]
    # flags the command leaves at meta/train.py's defaults (not the CIFAR-10 script's): no readout bias
    # (--last-bias-alpha 0), --bias-lr-mult 1, readout alpha 1
    assert (m["last_bias_alpha"], m["last_layer_alpha"], o["bias_lr_mult"]) == (0.0, 1.0, 1.0)


@pytest.mark.parametrize("experiment", ["paper_omniglot", "paper_omniglot_orig", "maml_mnist"])
def test_maml_readout_has_no_bias_and_is_zero_before_adaptation(experiment):
    # upstream: last_layer_lr_mult 0 + last_bias_alpha 0 + readout_zero_init = "readout fixed at zero before
    # adaptation": the meta-trained net's logits are exactly zero for any input, and the bias group's lr is
    # the meta lr (bias_lr_mult 1)
    c = train_config(experiment, [] if experiment == "maml_mnist" else ["maml.root=/data"])
    small = {**c, "model": {**c["model"], "dtype": "float32", "r": 8}}
    net = build_model(small, 28 * 28, 5, "cpu")
    assert net.output_layer.bias is None
    x = torch.randn(4, 28 * 28)
    assert torch.count_nonzero(net(x)) == 0
    opt, _ = build_optimizer(c, net, 10, 20)
    groups = {g["name"]: g["lr"] for g in opt.param_groups}
    assert groups["bias"] == pytest.approx(c["optim"]["lr"]) and groups["last"] == 0.0


# pilimit_orig README commands behind the paper's other rows (CIFAR-10 finite pi-net / muP, Omniglot inf);
# their --depth 2 is pilimit_orig's (input, one hidden layer, readout) = model.depth 1 here
ORIG = {
    "paper_cifar10_finite": dict(
        model=dict(kind="finite", width=2048, r=400, depth=1, bias_alpha=4.0, first_layer_alpha=0.125,
                   last_layer_alpha=0.5),
        optim=dict(lr=0.5, wd=1.6e-4, first_layer_lr_mult=0.2, last_layer_lr_mult=8.0, bias_lr_mult=0.5,
                   apply_lr_mult_to_wd=False, gclip=3.2, gclip_per_param=True, gproj=True, scheduler="multistep",
                   lr_drop_ratio=0.15, lr_drop_milestones=[35], gclip_drop_with_lr=True),
        batch=32, epochs=50,
    ),
    "paper_cifar10_mup": dict(
        model=dict(kind="mup", width=2048, depth=1, bias_alpha=4.0, first_layer_alpha=2.0, last_layer_alpha=0.25),
        optim=dict(lr=1.0, wd=1.6e-4, first_layer_lr_mult=0.2, last_layer_lr_mult=16.0, bias_lr_mult=0.5,
                   apply_lr_mult_to_wd=False, gclip=0.1, gclip_per_param=True, scheduler="multistep",
                   lr_drop_ratio=0.15, lr_drop_milestones=[40], gclip_drop_with_lr=True),
        batch=32, epochs=50,
    ),
    "paper_omniglot_orig": dict(
        model=dict(kind="inf", r=400, depth=1, bias_alpha=1.414214, first_layer_alpha=1.0, last_layer_alpha=1.0,
                   last_bias_alpha=0.0),
        optim=dict(lr=32.0, first_layer_lr_mult=0.4, last_layer_lr_mult=0.0, bias_lr_mult=1.0, gclip=0.1,
                   gclip_per_param=False, scheduler="cosine"),
        maml=dict(num_ways=5, num_shots=1, num_shots_test=1, step_size=0.353553, meta_batch_size=8,
                  num_batches=1000, num_test_batches=500, adapt_readout_only=True, gproj_inner=True,
                  gproj_outer=True, readout_zero_init=True),
        epochs=50,
    ),
}  # fmt: skip


@pytest.mark.parametrize("experiment", sorted(ORIG))
def test_paper_orig_profiles_are_pilimit_origs_commands(experiment):
    p = ORIG[experiment]
    c = train_config(experiment, ["maml.root=/data"] if "maml" in p else ["data.root=/data"])
    for section in ("model", "optim", "maml"):
        if section in p:
            assert {k: c[section][k] for k in p[section]} == pytest.approx(p[section]), section
    assert c["train"]["epochs"] == p["epochs"]
    if "batch" in p:
        assert c["data"]["batch_size"] == p["batch"]


def _imagenet32(root, labels):
    import pickle

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("train_data_batch_1", "val_data"):
        d = {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), "labels": list(labels)}
        with open(root / name, "wb") as f:
            pickle.dump(d, f)
    return root


def test_transfer_data_are_upstreams_250_classes_with_imagenet_normalisation(tmp_path):
    """ImageNet32 as ``transfer_imagenet.py`` feeds it: ImageNet mean/std (not CIFAR-10's), only the 250
    classes of ``train.classes``, relabelled by their position in that list; CIFAR-10 keeps its constants."""
    classes = train_config("paper_transfer", ["data.root=/d", "transfer.root=/d"])["train"]["classes"]
    assert len(classes) == 250 == len(set(classes)) and classes[:3] == [294, 828, 241]
    file_labels = [classes[0] + 1, 7, classes[2] + 1, classes[249] + 1, 1000]  # 1-based in the files
    root = _imagenet32(tmp_path / "i32", file_labels)
    x_all, y_all = D.load_flat("imagenet32", "train", root)
    images, _ = D.imagenet32(root, "train")
    chw = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(x_all, ((chw - mean) / std).flatten(1))
    assert y_all.tolist() == [classes[0], 6, classes[2], classes[249], 999]
    x, y = D.load_flat("imagenet32", "train", root, classes=classes)
    assert y.tolist() == [0, 2, 249] and torch.equal(x, x_all[[0, 2, 3]])
    x, y = D.load_flat("imagenet32", "train", root, num_examples=2, classes=classes)
    assert y.tolist() == [0, 2]  # the class filter first, then num_examples
    assert D.CIFAR_MEAN == pytest.approx((0.4914, 0.4824, 0.4467), abs=1e-4)
    for bad in ([], [1, 1], [1000], [-1], "5", [True]):
        with pytest.raises(D.InvalidInputError, match="train.classes"):
            D.load_flat("imagenet32", "train", root, classes=bad)


@pytest.mark.parametrize("labels", [[0, 5, 999], [1, 1001], [3, -2]])
def test_imagenet32_labels_outside_1_to_1000_are_refused(tmp_path, labels):
    """The ImageNet32 files count classes 1..1000; a file with 0-based labels (or any label outside) would
    shift or break every class silently: a DatasetLayoutError names the file and the range found."""
    root = _imagenet32(tmp_path / "i32", labels)
    want = rf"train_data_batch_1: labels {min(labels)}\.\.{max(labels)}; expected .* 1\.\.1000"
    with pytest.raises(D.DatasetLayoutError, match=want):
        D.imagenet32(root, "train")


@pytest.mark.parametrize("drop", [False, True])
def test_gclip_drop_with_lr_follows_the_lr_milestones_as_pilimit_orig(drop):
    # pilimit_orig (the paper's code) clips with MultiStepGClip(gclip, lr milestones, lr_drop_ratio), so its
    # clip drops with the lr; pilimit_lib (the default, and the paper_cifar10 command) keeps the fixed clip
    c = train_config("paper_cifar10", ["data.root=/data", f"optim.gclip_drop_with_lr={str(drop).lower()}"])
    small = {**c, "model": {**c["model"], "dtype": "float32", "r": 8}}
    net = build_model(small, 3072, 10, "cpu")
    opt, sched = build_optimizer(c, net, 10, 500)  # milestone: epoch 40 = step 400
    for _ in range(399):
        sched.step()
    assert (opt.lr, opt.gclip) == pytest.approx((1.0, 0.4))
    sched.step()
    # the clip drops one step after the lr: pilimit_orig's MultiStepGClip.step compares its count with the
    # milestones before incrementing it (torch's MultiStepLR after), so step 400 still clips at 0.4
    assert (opt.lr, opt.gclip) == pytest.approx((0.15, 0.4))
    sched.step()
    assert opt.lr == pytest.approx(0.15)
    assert opt.gclip == pytest.approx(0.4 * 0.15 if drop else 0.4)
    # a resumed scheduler restores both
    opt2, sched2 = build_optimizer(c, net, 10, 500)
    sched2.load_state_dict(sched.state_dict())
    assert (opt2.lr, opt2.gclip) == pytest.approx((opt.lr, opt.gclip))
