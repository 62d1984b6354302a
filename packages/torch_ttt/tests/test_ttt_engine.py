"""TTTEngine: exact rotations, heads trained from the first step, early-exit features, exact restores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tttlab.core.errors import InvalidInputError
from tttlab.torch_ttt import get_engine
from tttlab.torch_ttt.engine.base_engine import FeatureHook
from tttlab.torch_ttt.engine.ttt_engine import TTTEngine, rotate_batch


class TutorialNet(nn.Module):
    """Seed 004's network (conv 10/20 k5 -> fc 320-50-50-10, LeakyReLU)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(320, 50), nn.Linear(50, 50), nn.Linear(50, 10)
        self.act = nn.LeakyReLU()

    def forward(self, x):
        x = self.act(F.max_pool2d(self.conv1(x), 2))
        x = self.act(F.max_pool2d(self.conv2(x), 2)).flatten(1)
        return F.log_softmax(self.fc3(self.act(self.fc2(self.act(self.fc1(x))))), dim=-1)


def batch(n=6, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_rotations_are_exact():
    x = batch(3)
    rotated, labels = rotate_batch(x)
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert torch.equal(rotated[:3], x)
    assert torch.equal(torch.rot90(rotated[3:6], 3, dims=(2, 3)), x)  # 90 + 270 = identity
    assert torch.equal(torch.rot90(rotated[6:9], 2, dims=(2, 3)), x)
    r, lab = rotate_batch(x, "rand", generator=torch.Generator().manual_seed(0))
    for i in range(3):
        assert torch.equal(torch.rot90(r[i : i + 1], 4 - int(lab[i]), dims=(2, 3)), x[i : i + 1])


@pytest.mark.parametrize("layer", ["fc2", "conv2"])
def test_head_exists_before_first_call_and_is_trained(layer):
    torch.manual_seed(0)
    net = TutorialNet()
    engine = TTTEngine(net, layer)
    head_params = list(engine.angle_head.parameters())
    assert head_params and all(any(p is q for q in engine.parameters()) for p in head_params)
    opt = torch.optim.Adam(engine.parameters(), lr=0.01)  # built before the first call, as in seed 004
    before = [p.detach().clone() for p in head_params]
    engine.train()
    outputs, loss = engine(batch())
    (F.nll_loss(outputs, torch.zeros(6, dtype=torch.long)) + 0.35 * loss).backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, head_params))


def test_early_exit_features_equal_full_forward_features():
    net = TutorialNet().eval()
    engine = TTTEngine(net, "fc2")
    x = batch()
    with torch.no_grad(), FeatureHook(net.fc2) as hook:
        net(x)
        early = engine._features_only(x)
    assert torch.equal(early, hook.output)


def test_adaptation_contract():
    torch.manual_seed(0)
    net = TutorialNet().eval()
    engine = get_engine("ttt")(net, "fc2")
    engine.eval()
    x = batch()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    engine.optimization_parameters["num_steps"] = 0
    with torch.no_grad():
        assert torch.equal(engine(x)[0], net(x))
    engine.optimization_parameters.update(num_steps=1, reset="per_domain")
    out, loss = engine(x)
    after = net.state_dict()
    assert loss.item() > 0
    with torch.no_grad():
        assert torch.equal(out, net(x)), "the prediction is made by the adapted model"
    assert any(not torch.equal(before[k], after[k]) for k in before)
    engine.reset()
    assert all(torch.equal(before[k], net.state_dict()[k]) for k in before)


def test_rotation_loss_falls_when_adapting():
    torch.manual_seed(0)
    net = TutorialNet().eval()
    engine = TTTEngine(net, "fc2", optimization_parameters={"num_steps": 1, "reset": "never", "lr": 1e-3})
    engine.eval()
    x = batch(16, seed=3)
    losses = [float(engine(x)[1]) for _ in range(15)]
    assert losses[-1] < losses[0]


def test_bad_layer_and_unknown_shape():
    with pytest.raises(InvalidInputError, match="available layers.*fc2"):
        TTTEngine(TutorialNet(), "fc9")
    with pytest.raises(InvalidInputError, match="feature_shape"):
        TTTEngine(TutorialNet(), "act")
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    engine = TTTEngine(net, "2", example_input=batch(2))  # a Flatten layer: shape from a dry run
    assert isinstance(engine.angle_head[0], nn.Linear) and engine.angle_head[0].in_features == 4 * 26 * 26
