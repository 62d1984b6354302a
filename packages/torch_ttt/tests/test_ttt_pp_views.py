"""TTT++'s official contrastive views (``TTTPPEngine(views="official")``): crop + flip, colour jitter
(0.4, 0.4, 0.4, hue 0.1) with p=0.8, grayscale p=0.2, drawn per image on a batch tensor."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from tttlab.core.errors import InvalidInputError
from tttlab.torch_ttt import augment as A
from tttlab.torch_ttt.engine.ttt_pp_engine import TTTPPEngine


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def one(*values) -> torch.Tensor:
    return torch.tensor([float(v) for v in values])


def test_adjust_colors_by_hand():
    # one channel, two pixels [0.2, 0.6]: brightness 2 then contrast 0.5 (blend to the image mean)
    x = torch.tensor([0.2, 0.6]).view(1, 1, 1, 2)
    bc = A.adjust_colors(x, one(2), one(0.5), one(0.3), one(0.25), torch.tensor([[0, 1, 2, 3]]))
    # 2x = [0.4, 1.2 -> 1.0 (clamped)]; mean 0.7; 0.5 x + 0.35 = [0.55, 0.85]; saturation, hue: no change
    torch.testing.assert_close(bc.flatten(), torch.tensor([0.55, 0.85]))
    cb = A.adjust_colors(x, one(2), one(0.5), one(0.3), one(0.25), torch.tensor([[1, 0, 3, 2]]))
    # contrast first: mean 0.4, [0.3, 0.5]; then 2x = [0.6, 1.0]
    torch.testing.assert_close(cb.flatten(), torch.tensor([0.6, 1.0]))
    # RGB pixels red (1, 0, 0) and blue (0, 0, 1)
    rgb = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]).view(1, 3, 1, 2)
    order = torch.tensor([[0, 1, 2, 3]])
    # hue +1/3 of a turn: red -> green, blue -> red
    hue = A.adjust_colors(rgb, one(1), one(1), one(1), one(1 / 3), order)
    torch.testing.assert_close(hue[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(hue[0, :, 0, 1], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    # saturation 0: each pixel's luma (0.299 red, 0.114 blue) in all channels
    gray = A.adjust_colors(rgb, one(1), one(1), one(0), one(0), order)
    torch.testing.assert_close(gray[0, :, 0], torch.tensor([[0.299, 0.114]] * 3))
    # contrast 0: the image's mean luma (0.299 + 0.114) / 2 everywhere
    flat = A.adjust_colors(rgb, one(1), one(0), one(1), one(0), order)
    torch.testing.assert_close(flat, torch.full_like(rgb, 0.2065))


def test_adjust_colors_matches_torchvision_in_any_order():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    x = torch.rand(1, 3, 6, 7, generator=gen(0))
    b, c, s, h = 1.3, 0.7, 1.35, -0.08
    ops = (
        lambda t: tvf.adjust_brightness(t, b), lambda t: tvf.adjust_contrast(t, c),
        lambda t: tvf.adjust_saturation(t, s), lambda t: tvf.adjust_hue(t, h),
    )  # fmt: skip
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        ref = x
        for k in order:
            ref = ops[k](ref)
        ours = A.adjust_colors(x, one(b), one(c), one(s), one(h), torch.tensor([order]))
        # torchvision's luma weighs red 0.2989, ours 0.299
        torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)


def test_color_jitter_draws_each_images_own_factors_and_order(monkeypatch):
    seen = {}
    real = A.adjust_colors

    def spy(x, brightness, contrast, saturation, hue, order):
        seen.update(b=brightness, c=contrast, s=saturation, h=hue, order=order)
        return real(x, brightness, contrast, saturation, hue, order)

    monkeypatch.setattr(A, "adjust_colors", spy)
    x = torch.full((2000, 3, 2, 2), 0.5)
    out = A.random_color_jitter(x, generator=gen(1))
    for key, low, high in (("b", 0.6, 1.4), ("c", 0.6, 1.4), ("s", 0.6, 1.4), ("h", -0.1, 0.1)):
        v = seen[key]
        assert v.shape == (2000,) and low <= v.min() and v.max() <= high, key
        assert v.unique().numel() == 2000, key  # one draw per image
    assert {tuple(o.tolist()) for o in seen["order"]} == set(itertools.permutations(range(4)))
    # p = 0.8: about 80 % of the images changed (a grey image changes only through brightness and contrast)
    changed = (out != x).flatten(1).any(dim=1).float().mean().item()
    assert 0.75 < changed < 0.85
    # brightness only, p = 1: each grey image scaled by its own factor
    only = A.random_color_jitter(x[:8], 0.4, 0.0, 0.0, 0.0, p=1.0, generator=gen(2))
    levels = only[:, 0, 0, 0]
    assert levels.unique().numel() == 8 and ((levels >= 0.3) & (levels <= 0.7)).all()
    torch.testing.assert_close(only, levels.view(8, 1, 1, 1).expand_as(only))


def test_official_views_are_seeded_per_image_and_made_on_pixels():
    x = torch.rand(1, 3, 8, 8, generator=gen(3)).expand(6, 3, 8, 8).contiguous()  # one image, 6 times
    a = A.official_ttt_pp_views(x, generator=gen(0))
    assert a.shape == (12, 3, 8, 8) and torch.equal(a, A.official_ttt_pp_views(x, generator=gen(0)))
    assert not torch.equal(a, A.official_ttt_pp_views(x, generator=gen(1)))
    distinct = {tuple(v.flatten().tolist()) for v in a}
    assert len(distinct) == 12  # each copy of the same image got its own crop / jitter
    assert a.min() >= 0 and a.max() <= 1
    # normalised inputs: the same views, made on the pixels and normalised back
    mean, std = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    normed = A.official_ttt_pp_views((x - m) / s, generator=gen(0), mean=mean, std=std)
    torch.testing.assert_close(normed * s + m, a, atol=1e-5, rtol=0)
    with pytest.raises(InvalidInputError, match=r"expected 1 or 3 values"):
        A.official_ttt_pp_views(x, mean=[0.5, 0.5])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def test_engine_option_official_views():
    x = torch.rand(4, 3, 8, 8, generator=gen(4))
    default = TTTPPEngine(Net(), "fc1", generator=gen(0))
    torch.testing.assert_close(default._views(x), A.simclr_views(x, 2, generator=gen(0)))
    official = TTTPPEngine(Net(), "fc1", generator=gen(0), views="official", view_mean=[0.5], view_std=[0.25])
    expected = A.official_ttt_pp_views(x, 2, gen(0), mean=[0.5], std=[0.25])
    torch.testing.assert_close(official._views(x), expected)
    official.eval()
    official.compute_statistics([torch.rand(8, 3, 8, 8, generator=gen(5))])
    official.optimization_parameters.update(num_steps=1, lr=1e-3, reset="never")
    _, loss = official(x)
    assert torch.isfinite(torch.as_tensor(loss))
    with pytest.raises(InvalidInputError, match=r"views='simclr'.*torch_ttt.*official"):
        TTTPPEngine(Net(), "fc1", views="simclr")
    with pytest.raises(InvalidInputError, match="expected one of them"):
        TTTPPEngine(Net(), "fc1", views="official", contrastive_transform=lambda t: t)
