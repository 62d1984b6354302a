import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from tttlab.core.testing import hydra_state_kept

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny models: one thread is faster, and immune to oversubscription on shared cores
torch.set_num_threads(1)

TINY_CLIP = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=49408, width=16, heads=2, layers=1),
)


@pytest.fixture
def tiny_clip():
    from tttlab.memo_tpt.models import build_clip

    torch.manual_seed(0)
    return build_clip("tiny", config=TINY_CLIP)


class SmallBNNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture
def bn_net():
    torch.manual_seed(0)
    net = SmallBNNet()
    with torch.no_grad():  # non-trivial running statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def _hydra_state_kept():
    """Every test leaves Hydra's and logging's process-wide state as it found it: a command run in this process
    leaves its HydraConfig, log handlers and levels behind (:func:`tttlab.core.testing.hydra_state_kept`)."""
    with hydra_state_kept():
        yield
