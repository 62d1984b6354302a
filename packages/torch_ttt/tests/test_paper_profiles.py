"""The CIFAR-10-C paper profile as ``evaluate`` runs it: ``+experiment=paper_tent_cifar10c`` composed through
Hydra, then the engine that ``load_engine`` builds from it (a small WRN in RobustBench's layout, the
paper's settings) stepped once, and the optimizer, adapted parameters, thresholds and reset policy it
really uses compared with mariodoebler/test-time-adaptation's ``cfgs/cifar10_c/{tent,eata}.yaml`` (Adam,
beta 0.9 / 0.999, lr 1e-3, wd 0, 1 step, batch 200; EATA: Fisher weight 1.0, d_margin 0.4, E0 = 0.4 ln 10,
2,000 source images for the Fisher pass)."""

from __future__ import annotations

import math

import pytest
import torch

from tttlab.torch_ttt import evaluate as E
from tttlab.torch_ttt.engine.base_engine import Reset
from tttlab.torch_ttt.models import model_info

from .test_paper_cifar10c import SMALL, hydra_compose, save_robustbench, small_wrn


@pytest.mark.parametrize(
    "engine, setting, reset",
    [("source", "reset_each_shift", "per_domain"), ("bn", "reset_each_shift", "per_domain"),
     ("tent", "reset_each_shift", "per_domain"), ("tent", "continual", "never"),
     ("eata", "continual", "never")],
)  # fmt: skip
def test_paper_profile_engine_as_built(tmp_path, engine, setting, reset):
    save_robustbench(small_wrn(), tmp_path / "Standard.pt")
    over = ["+experiment=paper_tent_cifar10c", f"engine={engine}", f"benchmark.setting={setting}",
            f"model_checkpoint.path={tmp_path / 'Standard.pt'}"]  # fmt: skip
    composed = hydra_compose(over)
    assert composed["model_checkpoint"]["kwargs"] == {}  # the paper's WRN-28-10 (a small one below)
    c = E.eval_config({**composed, "device": "cpu", "model_checkpoint": {**composed["model_checkpoint"],
                                                                         "kwargs": SMALL}})  # fmt: skip
    b = c["benchmark"]
    assert (b["name"], b["corruptions"], b["severities"], b["batch_size"], b["num_examples"]) == (
        "cifar10_c", "common", [5], 200, None,
    )  # fmt: skip
    info = model_info("wrn28_10")
    assert info.input_mean is None and info.input_std is None and info.image_shape == (32, 32, 3)
    eng, model_name, _, _ = E.load_engine(c, None, torch.device("cpu"), E.example_images(info))
    assert model_name == "wrn28_10"
    assert eng.optimization_parameters["reset"] is Reset.parse(reset) and E.reset_policy(c) is Reset.parse(
        reset
    )
    if engine in ("tent", "eata"):
        opt = eng.optimization_parameters
        assert (opt["num_steps"], opt["lr"], opt["optimizer_name"]) == (1, 1e-3, "adam")
        assert eng.predict_before_update is True
    if engine == "eata":
        assert (eng.d_margin, eng.fisher_alpha, eng.e_margin) == (0.4, 1.0, None)
        assert eng.margin(10) == pytest.approx(0.4 * math.log(10))
        assert (c["calibration"]["num_examples"], c["calibration"]["batch_size"]) == (2000, 200)
        eng.compute_fishers([torch.rand(4, 3, 32, 32)])
    eng.eval()
    x = torch.rand(8, 3, 32, 32)
    eng(x)
    if engine in ("source", "bn"):
        assert eng.optimizer is None
        return
    optim = eng.optimizer
    assert type(optim) is torch.optim.Adam
    g = optim.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (1e-3, (0.9, 0.999), 0)
    affine = {f"model.{n}.{p}" for n, m in eng.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
              for p in ("weight", "bias")}  # fmt: skip
    assert {n for n, _ in eng.adapted_parameters()} == affine
    assert sum(p.numel() for p in g["params"]) == sum(p.numel() for _, p in eng.adapted_parameters())
