"""GPU checks (skipped without CUDA) and the full paper run (``repro``: never in CI)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tttlab.pilimit import InfMLP, PiSGD

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train(device, dtype, impl="chunked", steps=4):
    torch.manual_seed(0)
    net = InfMLP(64, 10, r=32, depth=2, bias_alpha=0.5, last_layer_alpha=0.5, chunk_size=16, impl=impl,
                 dtype=dtype, device=device)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(steps, 8, 64, generator=g), torch.randint(0, 10, (steps, 8), generator=g)
    opt = PiSGD(net, lr=0.5, gclip=0.4, gclip_per_param=True, last_layer_lr_mult=4.0)
    losses = []
    for x, y in zip(xs, ys):
        loss = F.cross_entropy(net(x.to(device)).float(), y.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, net


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_matches_cpu(dtype):
    cpu, _ = _train("cpu", "float32")
    gpu, net = _train("cuda", dtype)
    assert net.output_layer.A.is_cuda and net.output_layer.Amult.dtype == torch.float32
    assert gpu == pytest.approx(cpu, abs=1e-4 if dtype == "float32" else 3e-2)
    ref, _ = _train("cuda", dtype, impl="reference")
    assert gpu == pytest.approx(ref, abs=1e-4 if dtype == "float32" else 3e-2)


@pytest.mark.repro
@pytest.mark.skipif(not (torch.cuda.is_available() and os.environ.get("TTTLAB_CIFAR10_ROOT")),
                    reason="needs CUDA and TTTLAB_CIFAR10_ROOT (a folder with cifar-10-batches-py)")  # fmt: skip
def test_paper_cifar10(tmp_path):
    """The paper's CIFAR-10 infinite pi-net (50 epochs, hours on one GPU): expected 61.50% (paper)."""
    from tttlab.core.records import load_records
    from tttlab.pilimit.train import run, train_config

    c = train_config("paper_cifar10", [f"data.root={os.environ['TTTLAB_CIFAR10_ROOT']}", "device=cuda",
                                       f"out_dir={tmp_path}"])  # fmt: skip
    out = run(c)
    acc = load_records(out, metric="test_accuracy")
    assert float(acc.value.iloc[-1]) > 0.60
