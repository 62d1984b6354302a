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
