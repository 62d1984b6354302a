"""The CIFAR-10-C paper profile: RobustBench's WRN-28-10 ``Standard`` from a local checkpoint.

No CIFAR-10-C and no real checkpoint here: the architecture is checked against the published key names,
shapes and parameter count (on the meta device, no memory), the loader on synthetic state dicts saved
in RobustBench's on-disk layouts (small widths), the engines' contract on a small WRN, and the smoke
experiment end to end through the command's entry point on core's CIFAR-10-C fixtures.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tttlab.core import testing
from tttlab.core.errors import CheckpointError, ConfigError, DatasetNotFoundError
from tttlab.core.records import load_records
from tttlab.torch_ttt import evaluate as E
from tttlab.torch_ttt import get_engine
from tttlab.torch_ttt import train as T
from tttlab.torch_ttt.checkpoints import load_pretrained, read_state_dict
from tttlab.torch_ttt.models import model_info
from tttlab.torch_ttt.wide_resnet import WideResNet

SMALL = {"depth": 10, "widen_factor": 1}


def small_wrn(seed: int = 0, **kwargs) -> WideResNet:
    """A small WRN with non-trivial BatchNorm statistics and affine parameters (as a trained one has)."""
    torch.manual_seed(seed)
    model = WideResNet(**{**SMALL, **kwargs})
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.fc.weight.mul_(20.0)  # confident predictions: entropy filters keep samples
    return model.eval()


def save_robustbench(model: torch.nn.Module, path, layout: str = "state_dict+module") -> None:
    sd = model.state_dict()
    if "module" in layout:
        sd = {f"module.{k}": v for k, v in sd.items()}
    if layout.startswith("state_dict"):
        sd = {"state_dict": sd, "epoch": 200}
    torch.save(sd, path)


def test_wrn28_10_has_robustbench_standard_keys_shapes_and_36_5m_parameters():
    with torch.device("meta"):
        model = WideResNet()  # the registered default: 28-10
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 36_479_194
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {"conv1.weight", "fc.weight", "fc.bias", *(f"bn1.{s}" for s in bn)}
    for stage in (1, 2, 3):
        expected.add(f"block{stage}.layer.0.convShortcut.weight")
        for i in range(4):
            p = f"block{stage}.layer.{i}"
            expected |= {
                f"{p}.conv1.weight",
                f"{p}.conv2.weight",
                *(f"{p}.bn{j}.{s}" for j in (1, 2) for s in bn),
            }
    assert set(sd) == expected and len(sd) == 155
    shapes = {
        "conv1.weight": (16, 3, 3, 3), "block1.layer.0.bn1.weight": (16,), "block1.layer.0.conv1.weight": (160, 16, 3, 3),
        "block1.layer.0.convShortcut.weight": (160, 16, 1, 1), "block1.layer.1.bn1.weight": (160,),
        "block2.layer.0.conv1.weight": (320, 160, 3, 3), "block2.layer.0.convShortcut.weight": (320, 160, 1, 1),
        "block3.layer.0.convShortcut.weight": (640, 320, 1, 1), "block3.layer.3.conv2.weight": (640, 640, 3, 3),
        "bn1.running_var": (640,), "fc.weight": (10, 640), "fc.bias": (10,),
    }  # fmt: skip
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert model.block2.layer[0].conv1.stride == (2, 2) and model.block2.layer[1].conv1.stride == (1, 1)
    info = model_info("wrn28_10")
    assert (info.input_mean, info.input_std, info.image_shape, info.source_dataset) == (
        None,
        None,
        (32, 32, 3),
        "cifar10",
    )
    names = dict(model.named_modules())
    assert info.features_layer in names and all(layer in names for layer in info.actmad_layers)
    assert model_info("mnist_bn").input_mean == (0.1307,), "the MNIST models keep their normalisation"


def test_wrn_forward_is_the_preactivation_network_with_the_shortcut_on_the_activated_input():
    """Written out: a width-changing block's shortcut and conv1 read relu(bn1(x)); a width-keeping block
    adds the raw x.  (Loading the real weights into a network that differs here gives a wrong model.)"""
    model = small_wrn(depth=16, widen_factor=2)  # two blocks per stage: both kinds of shortcut
    x = torch.rand(3, 3, 32, 32)

    def bn(h, m):
        return F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    out = F.conv2d(x, model.conv1.weight, padding=1)
    for stage in (model.block1, model.block2, model.block3):
        for i, blk in enumerate(stage.layer):
            stride = blk.conv1.stride
            pre = F.relu(bn(out, blk.bn1))
            h = F.relu(bn(F.conv2d(pre, blk.conv1.weight, stride=stride, padding=1), blk.bn2))
            h = F.conv2d(h, blk.conv2.weight, padding=1)
            assert (blk.convShortcut is None) == (i > 0)
            out = h + (out if i > 0 else F.conv2d(pre, blk.convShortcut.weight, stride=stride))
    out = F.relu(bn(out, model.bn1)).mean((2, 3))
    expected = F.linear(out, model.fc.weight, model.fc.bias)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["bare", "bare+module", "state_dict", "state_dict+module", "no_counters"])
def test_checkpoint_round_trip_in_robustbench_layouts(tmp_path, layout):
    source = small_wrn(seed=1)
    path = tmp_path / "Standard.pt"
    if layout == "no_counters":  # a file from torch < 0.4.1: BatchNorm without num_batches_tracked
        torch.save({k: v for k, v in source.state_dict().items() if "num_batches" not in k}, path)
    else:
        save_robustbench(source, path, layout)
    assert not any(k.startswith("module.") for k in read_state_dict(path))
    loaded = load_pretrained("wrn28_10", path, **SMALL)
    assert not loaded.training
    for (k, a), (k2, b) in zip(source.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b) or "num_batches" in k
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), source(x))


def test_checkpoint_errors_name_the_path_and_the_keys(tmp_path):
    model = small_wrn()
    with pytest.raises(CheckpointError, match=r"nowhere\.pt does not exist"):
        load_pretrained("wrn28_10", tmp_path / "nowhere.pt", **SMALL)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt is not a readable PyTorch checkpoint"):
        load_pretrained("wrn28_10", tmp_path / "junk.pt", **SMALL)
    (tmp_path / "page.pt").write_bytes(b"<!DOCTYPE html><html><head><title>Google Drive</title>")
    with pytest.raises(CheckpointError, match=r"page\.pt is an HTML page, not a torch.save file"):
        load_pretrained("wrn28_10", tmp_path / "page.pt", **SMALL)
    # a training script's file that also pickles its arguments: refused by the safe reader, readable on request
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "args.pt")
    with pytest.raises(
        CheckpointError,
        match=r"args\.pt pickles objects .*argparse.Namespace.*with model_checkpoint\.weights_only=false",
    ):
        load_pretrained("wrn28_10", tmp_path / "args.pt", **SMALL)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(
        load_pretrained("wrn28_10", tmp_path / "args.pt", weights_only=False, **SMALL)(x), model(x)
    )
    torch.save({"epoch": 3, "best": 0.9}, tmp_path / "meta.pt")
    with pytest.raises(
        CheckpointError, match=r"meta\.pt: holds a mapping with keys best, epoch; expected a state"
    ):
        load_pretrained("wrn28_10", tmp_path / "meta.pt", **SMALL)
    sd = model.state_dict()
    broken = {k: v for k, v in sd.items() if k != "fc.bias"} | {"fc.extra": torch.zeros(1)}
    torch.save({"state_dict": broken}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as err:
        load_pretrained("wrn28_10", tmp_path / "broken.pt", **SMALL)
    msg = str(err.value)
    assert "broken.pt does not fit wrn28_10(depth=10, widen_factor=1)" in msg
    assert (
        "1 key(s) missing from the file: fc.bias" in msg
        and "1 key(s) the model does not have: fc.extra" in msg
    )
    save_robustbench(small_wrn(widen_factor=2), tmp_path / "wide.pt")  # the same keys, other widths
    with pytest.raises(CheckpointError, match=r"tensor\(s\) of the wrong shape: block1.layer.0.conv1.weight: "
                       r"checkpoint \(32, 16, 3, 3\) vs model \(16, 16, 3, 3\)"):  # fmt: skip
        load_pretrained("wrn28_10", tmp_path / "wide.pt", **SMALL)
    save_robustbench(small_wrn(depth=16), tmp_path / "deep.pt")  # more blocks: the list is cut after 5
    with pytest.raises(CheckpointError, match=r"36 key\(s\) the model does not have: .*\(31 more\)"):
        load_pretrained("wrn28_10", tmp_path / "deep.pt", **SMALL)
    with pytest.raises(ConfigError, match="depth must be 6 n"):
        load_pretrained("wrn28_10", tmp_path / "deep.pt", depth=11)


@pytest.mark.parametrize("name", ["bn", "tent", "eata"])
def test_engines_on_the_wrn_adapt_only_norm_affine_parameters_and_reset_exactly(name):
    model = small_wrn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    affine = {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for n in (f"{n}.weight", f"{n}.bias")
    }
    kwargs = {"d_margin": 0.4, "fisher_alpha": 1.0} if name == "eata" else {}
    engine = get_engine(name)(
        model, {"num_steps": 1, "lr": 1e-2, "optimizer_name": "adam", "reset": "never"}, **kwargs
    )
    engine.eval()  # test-time mode (train mode is the joint-training forward)
    x = torch.rand(8, 3, 32, 32)
    if name == "eata":
        engine.compute_fishers([torch.rand(4, 3, 32, 32) for _ in range(2)])
    out, _ = engine(x)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if name == "bn":
        assert changed == set()
        train_mode = small_wrn().train()  # test-batch statistics: a train-mode forward of the same weights
        torch.testing.assert_close(out, train_mode(x), rtol=1e-5, atol=1e-5)
    else:
        assert changed and changed <= affine, sorted(changed - affine)[:3]
        assert {n for n, _ in engine.adapted_parameters()} == {f"model.{k}" for k in affine}
    engine.reset()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_every_engine_builds_and_adapts_on_the_wrn_with_the_registered_default_layers():
    """The registry's features layer (block3) and ActMAD layers are what evaluate.py hooks by default."""
    from tttlab.torch_ttt import EngineRegistry

    x = torch.rand(4, 3, 32, 32)
    for name in EngineRegistry.names():
        model = small_wrn()
        kwargs = {"patch_len": 4} if name == "deyo" else {}
        engine = T.build_engine(
            name, model, "wrn28_10", kwargs, {"num_steps": 1}, torch.zeros(2, 3, 32, 32)
        ).eval()
        if hasattr(engine, "compute_statistics"):  # TTT++ / ActMAD reference statistics
            engine.compute_statistics([(torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))])
        out, _ = engine(x)
        assert out.shape == (4, 10) and torch.isfinite(out).all(), name


def write_fixture(root, model: torch.nn.Module, n: int = 8) -> dict[str, float]:
    """CIFAR-10-C fixture (gaussian_noise, fog) + CIFAR-10 fixture; severity-5 labels set so that the model
    (inputs x / 255, no mean/std) is right on exactly half the gaussian_noise images.  Returns the accuracy
    the source model must get per corruption, computed here without evaluate.py."""
    folder = testing.make_cifar10_c(root, corruptions=("gaussian_noise", "fog"), n_per_severity=n)
    testing.make_cifar10(root, n_train=10, n_test=10)

    def predict(corruption):
        images = np.load(folder / f"{corruption}.npy")[4 * n :]
        with torch.no_grad():
            return model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).argmax(1).numpy()

    pred = predict("gaussian_noise")
    labels = np.load(folder / "labels.npy")
    labels[4 * n :] = np.concatenate([pred[: n // 2], (pred[n // 2 :] + 1) % 10])
    np.save(folder / "labels.npy", labels)
    return {"gaussian_noise": 0.5, "fog": float((predict("fog") == labels[4 * n :]).mean())}


def hydra_compose(overrides: list[str]) -> dict:
    """``conf/evaluate.yaml`` as the command composes it."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    E.register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("tttlab.torch_ttt.conf", version_base=None):
        cfg = compose(config_name="evaluate", overrides=overrides)
    GlobalHydra.instance().clear()
    return T.to_dict(cfg)


def run_cli(monkeypatch, capsys, *overrides: str) -> str:
    """``tttlab-torch-ttt-evaluate <overrides>`` in this process (the console script's ``main``)."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    # Hydra's logging set-up would close every handler, absl's too, and with it pytest's capture stream
    # ("lost sys.stderr" later in the same CI process): the other packages' CLI tests turn it off too
    no_hydra_logging = ("hydra/job_logging=none", "hydra/hydra_logging=none")
    monkeypatch.setattr(sys, "argv", ["tttlab-torch-ttt-evaluate", *overrides, *no_hydra_logging])
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    try:
        E.main()
    finally:  # main() configures logging for a command; the other tests expect pytest's configuration
        root.setLevel(level)
        root.handlers[:] = handlers
    return capsys.readouterr().out


def test_paper_smoke_experiment_end_to_end_through_the_command(tmp_path, monkeypatch, capsys):
    model = small_wrn()
    expected = write_fixture(tmp_path / "data", model)
    save_robustbench(model, tmp_path / "Standard.pt")
    common = ["+experiment=paper_tent_cifar10c_smoke", f"benchmark.root={tmp_path / 'data'}",
              f"model_checkpoint.path={tmp_path / 'Standard.pt'}"]  # fmt: skip
    out = run_cli(monkeypatch, capsys, *common, "engine=source", f"out_dir={tmp_path / 'source'}")
    assert "torch_ttt.source on cifar10_c (reset_each_shift, reset per_domain, 0 step(s))" in out
    df = load_records(tmp_path / "source" / "records.jsonl", metric="accuracy").set_index("corruption")
    assert df.loc["gaussian_noise", "value"] == 0.5 and df.loc["fog", "value"] == pytest.approx(
        expected["fog"]
    )
    assert df.loc["mean", "value"] == pytest.approx((0.5 + expected["fog"]) / 2)
    row = df.loc["gaussian_noise"]
    assert (row["model"], row["dataset"], row["severity"], row["n"]) == ("wrn28_10", "cifar10_c", 5, 8)
    assert (
        row["extra"]["model_checkpoint"] == str(tmp_path / "Standard.pt")
        and row["extra"]["train_run"] is None
    )
    assert row["extra"]["benchmark_data"] == "files", "the released CIFAR-10-C layout was read"
    # EATA: its engine_defaults (the CIFAR-10-C values), Fisher information on the CIFAR-10 train fixture
    out = run_cli(
        monkeypatch,
        capsys,
        *common,
        "engine=eata",
        "benchmark.setting=continual",
        f"out_dir={tmp_path / 'eata'}",
    )
    # the title names the kwargs the engine ran with: its engine_defaults, the CIFAR-10-C values
    assert (
        "torch_ttt.eata on cifar10_c (continual, reset never, 1 step(s), engine kwargs d_margin=0.4, " in out
    )
    eata = load_records(tmp_path / "eata" / "records.jsonl")
    assert set(eata["metric"]) == {"accuracy", "s_per_image"} and set(eata["corruption"]) == {
        "gaussian_noise",
        "fog",
        "mean",
    }
    assert not (tmp_path / "models").exists() and not (tmp_path / "runs").exists(), "nothing was trained"


def test_paper_profile_on_a_root_without_the_released_files_is_recorded_as_generated(tmp_path):
    """A root with CIFAR-10 but no CIFAR-10-C folder (EATA's Fisher pass needs the first; a misnamed second
    is enough) made core regenerate CIFAR-10-C from the clean test set, silently: the run looked like the
    paper profile's but was on other pixels.  It now says so in a warning and in the records."""
    model = small_wrn()
    testing.make_cifar10(tmp_path / "data", n_train=10, n_test=8)
    save_robustbench(model, tmp_path / "Standard.pt")
    c = hydra_compose(["+experiment=paper_tent_cifar10c_smoke", "engine=source",
                       f"benchmark.root={tmp_path / 'data'}", f"model_checkpoint.path={tmp_path / 'Standard.pt'}",
                       f"out_dir={tmp_path / 'out'}"])  # fmt: skip
    with pytest.warns(UserWarning, match=r"holds no released cifar10_c files \(expected CIFAR-10-C/"):
        path = E.run(c)
    rows = load_records(path, metric="accuracy")
    assert set(rows[rows["corruption"] != "mean"]["n"]) == {8}
    assert {r["benchmark_data"] for r in rows["extra"]} == {"generated"}
    assert E.benchmark_data({**E.eval_config(c), "stream": "noisy"}) == "noisy"


def test_paper_stream_visits_each_corruption_file_in_order(tmp_path):
    """Tent's reference reads the released files without shuffling: the paper profile's batches are
    the file's images in order (core's default would visit them in a seeded permutation)."""
    n = 8
    folder = testing.make_cifar10_c(tmp_path, corruptions=("gaussian_noise", "fog"), n_per_severity=n)
    overrides = [
        "+experiment=paper_tent_cifar10c_smoke",
        f"benchmark.root={tmp_path}",
        "model_checkpoint.path=/x",
    ]
    labels = np.load(folder / "labels.npy")[4 * n :]

    def streamed(extra: list[str]) -> dict[str, np.ndarray]:
        c = E.eval_config(hydra_compose(overrides + extra))
        out: dict[str, list] = {}
        for batch in E.make_stream(c, E.init_distributed(), model_info("wrn28_10"))[0]:
            out.setdefault(batch.domain.corruption, []).append((batch.x, batch.y.numpy()))
        return {k: (torch.cat([x for x, _ in v]), np.concatenate([y for _, y in v])) for k, v in out.items()}

    in_order, shuffled = streamed([]), streamed(["benchmark.shuffle=true"])
    assert len(labels) == n and len(set(labels.tolist())) > 1
    for corruption in ("gaussian_noise", "fog"):
        x, y = in_order[corruption]
        images = np.load(folder / f"{corruption}.npy")[4 * n :]
        assert np.array_equal(y, labels)
        torch.testing.assert_close(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
        assert not np.array_equal(shuffled[corruption][1], y), "the default order is a permutation"
        assert sorted(shuffled[corruption][1].tolist()) == sorted(y.tolist())
    # benchmark.dirichlet_delta (compare's label-correlated streams) reaches the stream too: 0 sorts by class
    for x, y in streamed(["benchmark.dirichlet_delta=0"]).values():
        assert np.array_equal(y, np.sort(labels)) and len(x) == n


def test_only_the_paper_profile_reads_in_file_order():
    """The default stream (the command's and compare's evaluate) is core's: a seeded permutation, i.i.d.
    (mutation audit: evaluate.yaml's shuffle flipped to false, every torch_ttt number on another stream,
    passed every test)."""
    for b in (hydra_compose([])["benchmark"], E.eval_config({})["benchmark"]):
        assert b["shuffle"] is True and b["dirichlet_delta"] is None


def test_paper_experiment_composes_the_published_setting_and_rejects_mixed_model_sources(tmp_path):
    paper = hydra_compose(["+experiment=paper_tent_cifar10c", "model_checkpoint.path=/data/Standard.pt"])
    b = paper["benchmark"]
    assert (b["name"], b["corruptions"], b["severities"], b["setting"], b["batch_size"], b["num_examples"],
            b["shuffle"]) == ("cifar10_c", "common", [5], "reset_each_shift", 200, None, False)  # fmt: skip
    assert paper["model_checkpoint"] == {
        "name": "wrn28_10", "path": "/data/Standard.pt", "kwargs": {}, "weights_only": True,
    }  # fmt: skip
    assert paper["device"] == "cuda" and paper["experiment_name"] == "paper-tent-cifar10_c-reset_each_shift"
    assert paper["out_dir"] == "runs/torch_ttt/eval/paper-tent-cifar10_c-reset_each_shift"
    smoke = hydra_compose(
        ["+experiment=paper_tent_cifar10c_smoke", "engine=eata", "benchmark.setting=continual"]
    )
    assert smoke["out_dir"] == "runs/torch_ttt/eval/paper-eata-cifar10_c-continual-smoke", (
        "not the paper run's"
    )
    tent = E.eval_config(paper)["engine"]
    assert tent["kwargs"] == {"predict_before_update": True}
    assert {k: tent["optimization"][k] for k in ("num_steps", "lr", "optimizer_name")} == {
        "num_steps": 1, "lr": 1e-3, "optimizer_name": "adam"}  # fmt: skip
    eata = E.eval_config(hydra_compose(["+experiment=paper_tent_cifar10c", "engine=eata",
                                                    "model_checkpoint.path=/x", "+engine.kwargs.fisher_alpha=3"]))  # fmt: skip
    assert eata["engine"]["kwargs"] == {"d_margin": 0.4, "fisher_alpha": 3, "predict_before_update": True}, (
        "CLI wins"
    )
    assert (
        eata["engine"]["optimization"]["optimizer_name"] == "adam"
        and eata["calibration"]["num_examples"] == 2000
    )
    assert E.eval_config(hydra_compose(["+experiment=paper_tent_cifar10c", "engine=bn",
                                                    "model_checkpoint.path=/x"]))["engine"]["kwargs"] == {}  # fmt: skip
    for bad, needle in (
        ({"model_checkpoint": {"name": "wrn28_10"}}, "without model_checkpoint.path"),
        ({"model_checkpoint": {"path": "/x"}}, "without model_checkpoint.name"),
        (
            {"model_checkpoint": {"name": "wrn28_10", "path": "/x"}, "train_run": "runs/a"},
            "expected one model source",
        ),
        ({"model_checkpoint": {"name": "wrn28_10", "path": "/x"}, "stream": "noisy"}, "stream=noisy"),
        ({"model_checkpoint": {"name": "wrn28_10", "path": "/x", "kwargs": {"width": 2}}}, "width"),
        ({"engine_defaults": {"tentt": {}}}, "engine_defaults.tentt: unknown engine"),
    ):
        with pytest.raises(ConfigError, match=needle):
            E.eval_config(bad)
    with pytest.raises(DatasetNotFoundError, match="needs root"):  # the benchmark first, before any model
        E.run({**paper, "device": "cpu", "out_dir": str(tmp_path / "e")})
    with pytest.raises(ConfigError, match="'wrn28_10' is not an MNIST model"):
        T.train_config("smoke", ["model.name=wrn28_10"])


def test_an_empty_engine_kwargs_override_means_the_engine_defaults(tmp_path, monkeypatch, capsys):
    """``engine.kwargs={}`` changed nothing: Hydra merges the given mapping into conf/engine/ittt.yaml's
    (``feedback: softmax`` stayed), and users had to spell out ``engine.kwargs.feedback=output``.  It now
    empties the kwargs (the engine class's own defaults), also an experiment's engine_defaults kwargs (its
    optimization settings still apply); other overrides keep Hydra's merge."""
    assert E._keyword_defaults(E.get_engine("ittt"))["feedback"] == "output"
    assert E.eval_config({"engine": "ittt"})["engine"]["kwargs"] == {"feedback": "softmax"}
    assert E.eval_config({"engine": "ittt"}, ["engine.kwargs={}"])["engine"]["kwargs"] == {}
    assert E.eval_config({"engine": "ittt"}, ["engine.kwargs={ }"])["engine"]["kwargs"] == {}
    assert E.eval_config({"engine": "ittt"}, ["engine.kwargs.feedback=output"])["engine"]["kwargs"] == {
        "feedback": "output"
    }
    paper = hydra_compose(["+experiment=paper_tent_cifar10c", "model_checkpoint.path=/x", "engine.kwargs={}"])
    assert E.eval_config(paper)["engine"]["kwargs"] == {"predict_before_update": True}, "merged: unchanged"
    tent = E.eval_config(paper, clear_engine_kwargs=True)["engine"]
    assert tent["kwargs"] == {} and tent["optimization"]["optimizer_name"] == "adam"
    # the command: the composed config cannot tell the override from none; main reads it from Hydra
    seen = []

    def fake_run(cfg, clear_engine_kwargs=False, command_line=None):
        seen.append(E.eval_config(cfg, clear_engine_kwargs=clear_engine_kwargs,
                                  command_line=command_line)["engine"]["kwargs"])  # fmt: skip
        return str(tmp_path / "records.jsonl")

    monkeypatch.setattr(E, "run", fake_run)
    monkeypatch.setattr(E, "summary_lines", lambda path: [])
    run_cli(monkeypatch, capsys, "engine=ittt", "engine.kwargs={}")
    run_cli(monkeypatch, capsys, "engine=ittt")
    assert seen == [{}, {"feedback": "softmax"}]
