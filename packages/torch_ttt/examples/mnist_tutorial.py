"""Seed 004's MNIST TTT tutorial on the embedded MNIST, with the rotation head actually trained.

    python packages/torch_ttt/examples/mnist_tutorial.py                      # torch's threads (2 here)
    OMP_NUM_THREADS=1 python packages/torch_ttt/examples/mnist_tutorial.py    # much faster on a shared CPU

Joint training (1 epoch, Adam lr 0.01, batch 64, seed 7, loss = NLL + 0.35 * rotation loss, features of
fc2), then the test set with x + 2 * N(0, 1) noise after normalisation, batch 32, TTT after 0..3 steps.

Cost: one epoch over the 50,000 embedded training images (782 batches, each image with its 4 rotations),
then the 10,000 test images 5 times (clean, TTT 0..3 steps).  Measured 2026-12-01 on the shared 2-core
machine while other jobs ran (load average 1-8): with ``OMP_NUM_THREADS=1`` 1 min 14 s (60 s of CPU; two
runs), with torch's 2 threads 3 min 10 s, 4 min 22 s and 5 min 49 s (180-233 s of CPU: on shared cores the
tiny model's two intra-op threads mostly wait for each other), and much longer on a heavily loaded machine
(a session saw 18 min).  The thread count also changes the results a little (float summation order; see
the README's table of this script's runs).
The tutorial's own code path, kept for comparison: ``tttlab-torch-ttt-train +experiment=mnist_tutorial``
runs the same recipe with Hydra configs, run records and resume (see the README for both results).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tttlab.core import data
from tttlab.torch_ttt.engine.ttt_engine import TTTEngine


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(320, 50), nn.Linear(50, 50), nn.Linear(50, 10)
        self.activation = nn.LeakyReLU()

    def forward(self, x):
        x = self.activation(F.max_pool2d(self.conv1(x), 2))
        x = self.activation(F.max_pool2d(self.conv2(x), 2)).flatten(1)
        x = self.activation(self.fc2(self.activation(self.fc1(x))))
        return F.log_softmax(self.fc3(x), dim=-1)


def tensors(split: str):
    ds = data.mnist(split)
    x, y = ds.take(np.arange(len(ds)))
    x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.1307) / 0.3081
    return x, torch.from_numpy(y)


def main() -> dict:
    torch.manual_seed(7)
    x_train, y_train = tensors("train")
    x_test, y_test = tensors("test")
    net = Net()
    engine = TTTEngine(net, "fc2")
    optimizer = torch.optim.Adam(engine.parameters(), lr=0.01)
    engine.train()
    for i in range(0, len(x_train), 64):
        optimizer.zero_grad()
        outputs, ssl = engine(x_train[i : i + 64])
        (F.nll_loss(outputs, y_train[i : i + 64]) + 0.35 * ssl).backward()
        optimizer.step()
    engine.eval()
    with torch.no_grad():
        results = {"clean": (net(x_test).argmax(1) == y_test).float().mean().item()}
    noisy = x_test + 2 * torch.randn(x_test.shape, generator=torch.Generator().manual_seed(7))
    for steps in (0, 1, 2, 3):
        engine.optimization_parameters["num_steps"] = steps
        correct, t0 = 0, time.perf_counter()
        for i in range(0, len(noisy), 32):
            outputs, _ = engine(noisy[i : i + 32])
            correct += (outputs.argmax(1) == y_test[i : i + 32]).sum().item()
        results[f"noisy, TTT {steps} steps"] = correct / len(noisy)
        results[f"seconds, {steps} steps"] = round(time.perf_counter() - t0, 1)
    for key, value in results.items():
        print(f"{key:24s} {value:.1f}" if key.startswith("seconds") else f"{key:24s} {value:.4f}")
    return results


if __name__ == "__main__":
    main()
