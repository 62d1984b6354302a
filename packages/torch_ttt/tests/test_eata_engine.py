"""EATA: Fisher calibration works, the regulariser vanishes at the anchor, the sample filters."""

from __future__ import annotations

import math

import torch
from torch import nn

from tttlab.torch_ttt import get_engine


def bn_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 1, 8, 8))
    return m.eval()


def batches(n_batches=3, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 8, 8, generator=g) for _ in range(n_batches)]


def test_fisher_calibration_and_penalty():
    m = bn_model()
    engine = get_engine("eata")(m, fisher_alpha=10.0)
    fishers = engine.compute_fishers(batches())
    assert set(fishers) == {"model.1.weight", "model.1.bias"}
    assert all((f >= 0).all() and f.sum() > 0 for f, _ in fishers.values())
    assert engine.fisher_penalty().item() == 0.0
    with torch.no_grad():
        m[1].weight += 0.1
    assert engine.fisher_penalty().item() > 0


def test_selection_filters_hand_case():
    engine = get_engine("eata")(bn_model(), e_margin=0.5, d_margin=0.9)
    confident = torch.tensor([[10.0, 0, 0, 0, 0], [0, 10.0, 0, 0, 0]])
    uncertain = torch.zeros(1, 5)  # entropy ln 5 > 0.5
    keep, ent, weights, _ = engine.select(torch.cat([confident, uncertain]))
    assert keep.tolist() == [0, 1]
    assert torch.allclose(weights, torch.exp(-(ent - 0.5)))
    engine.current_model_probs = torch.tensor([1.0, 0, 0, 0, 0])  # sample 0 is redundant with the average
    keep, *_ = engine.select(confident)
    assert keep.tolist() == [1]
    assert get_engine("eata")(bn_model()).margin(1000) == 0.4 * math.log(1000)


def test_eata_step_and_reset():
    m = bn_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    engine = get_engine("eata")(m, {"reset": "per_domain", "lr": 0.05}, e_margin=10.0).eval()
    engine.compute_fishers(batches())
    x = batches(1, seed=5)[0]
    engine(x)
    after = m.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == {"1.weight", "1.bias"}
    assert engine.current_model_probs is not None and engine.num_selected == 8
    engine.reset()
    assert all(torch.equal(before[k], m.state_dict()[k]) for k in before)
    assert engine.current_model_probs is None


def _confident_10_class_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        m[3].weight.mul_(8.0)  # confident predictions: most entropies under 0.4 ln 10
    return m.eval()


def test_redundancy_threshold_0_05_is_for_1000_classes():
    # The official d_margin 0.05 is ImageNet's: a one-hot p against a class-balanced average m has
    # cos = 1/sqrt(C) (0.03 for C=1000, 0.32 for C=10), so at 10 classes it rejects nearly every sample.
    from tttlab.torch_ttt.engine.eata_engine import eata_selection

    for c, kept in ((1000, True), (10, False)):
        p, m = torch.eye(c)[:1], torch.full((c,), 1.0 / c)
        assert bool(eata_selection(torch.zeros(1), p, m, 1.0, 0.05)[0]) is kept
        assert math.isclose(float(nn.functional.cosine_similarity(p, m[None])), c**-0.5, rel_tol=1e-5)


def test_evaluate_conf_keeps_adapting_after_the_first_batch_on_10_classes():
    # Regression: evaluate.py ran EATA on 10-class MNIST-C with d_margin 0.05, so once the moving average
    # existed (continual / per-domain) no sample passed the redundancy filter and EATA equalled BN.
    from pathlib import Path

    from omegaconf import OmegaConf

    import tttlab.torch_ttt as pkg

    conf = OmegaConf.load(Path(pkg.__file__).parent / "conf" / "engine" / "eata.yaml")
    kwargs = OmegaConf.to_container(conf.kwargs)
    engine = get_engine("eata")(_confident_10_class_model(), {"reset": "never"}, **kwargs).eval()
    g = torch.Generator().manual_seed(1)
    counts = []
    for _ in range(4):
        engine(torch.randn(64, 16, generator=g))
        counts.append(engine.last_selected)
    assert counts[0] > 0 and engine.current_model_probs is not None
    assert min(counts[1:]) > 0, f"samples adapted on per batch: {counts}"


def test_fisher_num_batches_reads_exactly_that_many_batches():
    """``num_batches=2`` over three batches equals the Fisher of the first two (mean of the squared
    pseudo-label gradients), computed by hand here (mutation audit: reading one batch too many survived)."""
    import torch.nn.functional as F

    from tttlab.torch_ttt.norm import batch_statistics, norm_affine_parameters

    data = batches(3, seed=4)
    engine = get_engine("eata")(bn_model())
    got = engine.compute_fishers(data, num_batches=2)
    model = bn_model()
    params = dict(norm_affine_parameters(model))
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    for x in data[:2]:
        with batch_statistics(model):
            out = model(x)
        grads = torch.autograd.grad(F.cross_entropy(out, out.detach().argmax(-1)), list(params.values()))
        for n, g in zip(params, grads):
            want[n] += g.square() / 2
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n][0], want[n], rtol=1e-5, atol=1e-9)
        assert torch.equal(got[n][1], params[n].detach())


# -- the Fisher calibration set of tttlab-torch-ttt-evaluate ------------------------------------------------


def test_fisher_subset_is_a_seeded_random_draw_without_repeats():
    """As the official ``set_dataset_size`` (all indices shuffled with the seeded ``random``, the first
    ``fisher_size`` kept): distinct indices, not the first N, the same for a seed, other for another seed;
    a set smaller than ``fisher_size`` is used whole."""
    import numpy as np
    import pytest

    from tttlab.core.errors import ConfigError
    from tttlab.torch_ttt.evaluate import fisher_subset

    a = fisher_subset(50_000, 2000, seed=0)
    assert a.shape == (2000,) and len(np.unique(a)) == 2000 and a.min() >= 0 and a.max() < 50_000
    np.testing.assert_array_equal(a, fisher_subset(50_000, 2000, seed=0))  # rerun / resume / other rank
    assert not np.array_equal(np.sort(a), np.arange(2000)) and a.max() > 40_000, "not the first 2,000"
    b = fisher_subset(50_000, 2000, seed=1)
    assert len(np.intersect1d(a, b)) < 400, "another seed draws other images (expected overlap 80)"
    np.testing.assert_array_equal(fisher_subset(50_000, 100, seed=0), a[:100])
    np.testing.assert_array_equal(np.sort(fisher_subset(10, 2000, seed=0)), np.arange(10))
    with pytest.raises(ConfigError, match="seed=-1"):
        fisher_subset(10, 5, seed=-1)


class _StatisticsSpy:
    """A TTT++/ActMAD stand-in: records the batches ``calibrate`` gives ``compute_statistics``."""

    def __init__(self):
        self.batches = None

    def compute_statistics(self, batches):
        self.batches = list(batches)

    def eval(self):
        return self


def test_evaluate_computes_the_fisher_on_the_seeded_subset(tmp_path, monkeypatch, caplog):
    """``evaluate.calibrate`` hands EATA's ``compute_fishers`` exactly the images of ``fisher_subset`` (the
    run's seed, calibration.num_examples), in batches of calibration.batch_size, and the Fisher kept is the
    one of those images; TTT++/ActMAD statistics still use the first images."""
    import logging

    import numpy as np

    from tttlab.core import data, testing
    from tttlab.core.torch import to_tensor
    from tttlab.torch_ttt import evaluate as E
    from tttlab.torch_ttt.engine.eata_engine import EataEngine
    from tttlab.torch_ttt.models import model_info

    testing.make_cifar10(tmp_path, n_train=40, n_test=2)
    info = model_info("wrn28_10")

    def config(seed, num_examples=12):
        return E.eval_config({
            "engine": "eata", "seed": seed, "device": "cpu",
            "model_checkpoint": {"name": "wrn28_10", "path": "/unused", "kwargs": {"depth": 10, "widen_factor": 1}},
            "calibration": {"root": str(tmp_path), "num_examples": num_examples, "batch_size": 4},
        })  # fmt: skip

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 10)).eval()  # fmt: skip

    seen = []
    original = EataEngine.compute_fishers

    def spy(self, batches, *args, **kwargs):
        batches = list(batches)
        seen.append(batches)
        return original(self, batches, *args, **kwargs)

    monkeypatch.setattr(EataEngine, "compute_fishers", spy)
    train = data.cifar10(tmp_path, split="train")
    for seed in (3, 4):
        engine = get_engine("eata")(model())
        E.calibrate(engine, config(seed), torch.device("cpu"), info)
        idx = E.fisher_subset(len(train), 12, seed)
        images, labels = train.take(idx)
        x = torch.cat([b[0] for b in seen[-1]])
        assert [len(b[0]) for b in seen[-1]] == [4, 4, 4]
        assert torch.equal(x, to_tensor(images, mean=info.input_mean, std=info.input_std))
        assert torch.equal(torch.cat([b[1] for b in seen[-1]]), torch.from_numpy(labels.astype(np.int64)))
        assert not np.array_equal(np.sort(idx), np.arange(12)), "a random subset, not the first 12"
        want = get_engine("eata")(model()).compute_fishers(list(x.split(4)))
        assert engine.fishers.keys() == want.keys()
        for name, (fisher, theta0) in want.items():
            torch.testing.assert_close(engine.fishers[name][0], fisher)
            assert torch.equal(engine.fishers[name][1], theta0)
    assert not torch.equal(seen[0][0][0], seen[1][0][0]), "seeds 3 and 4 draw other images"
    # a rerun (or resume) with the same seed: the same images
    E.calibrate(get_engine("eata")(model()), config(3), torch.device("cpu"), info)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(seen[0], seen[-1]))
    # more images asked for than the training set has: all 40 of them, once each, and a warning
    with caplog.at_level(logging.WARNING, logger="tttlab.torch_ttt.evaluate"):
        E.calibrate(get_engine("eata")(model()), config(3, num_examples=100), torch.device("cpu"), info)
    x = torch.cat([b[0] for b in seen[-1]])
    everything = to_tensor(train.take(np.arange(len(train)))[0])
    assert len(x) == 40 and torch.equal(
        x[torch.from_numpy(np.argsort(E.fisher_subset(40, 100, 3)))], everything
    )
    assert "calibration.num_examples=100" in caplog.text and "only 40 images" in caplog.text
    # TTT++/ActMAD reference statistics: the first calibration.num_examples images, as before
    stats = _StatisticsSpy()
    E.calibrate(stats, config(3), torch.device("cpu"), info)
    assert torch.equal(torch.cat([b[0] for b in stats.batches]), to_tensor(train.take(np.arange(12))[0]))


def test_eta_is_eata_without_the_fisher_term():
    """The paper's ETA (official ``--algorithm eta``: no Fisher regulariser) is the engine without
    ``fishers``; ``fisher_alpha=0`` (what ``evaluate.py`` can pass, as it always calibrates) takes the
    same step.  With the regulariser the step differs once the parameters left the anchor."""
    x = batches(1, n=16, seed=7)[0]
    calib = batches(2, n=16, seed=1)
    states = {}
    for name, alpha, calibrate in (("eta", 2000.0, False), ("alpha0", 0.0, True), ("eata", 2000.0, True)):
        m = bn_model()
        engine = get_engine("eata")(m, {"reset": "never", "lr": 0.05, "num_steps": 2}, e_margin=10.0,
                                    d_margin=None, fisher_alpha=alpha).eval()  # fmt: skip
        if calibrate:
            engine.compute_fishers(calib)
        engine(x)
        states[name] = {k: v.clone() for k, v in m.state_dict().items()}
    for k in states["eta"]:
        torch.testing.assert_close(states["alpha0"][k], states["eta"][k], rtol=0, atol=0)
    assert not torch.equal(states["eata"]["1.weight"], states["eta"]["1.weight"])
