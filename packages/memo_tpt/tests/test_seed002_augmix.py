"""Seed 002's ``augmix`` flag (EasyTPT ``-A/--augmix``, EasyMemo ``aug_type='augmix'``): its views are
torchvision's ``transforms.v2.AugMix()`` with the defaults (severity 3, 3 chains of 1-3 operations, alpha 1,
all 13 operations) of the whole image, then ``Resize(224)`` bicubic + ``CenterCrop(224)``; no random crop or
flip; the original view first.  ``TPT(augmix="seed002")``, ``Memo(augmentation="seed002_augmix")``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tttlab.core.errors import ConfigError
from tttlab.memo_tpt import augment as A

NAMES = ["zero", "one", "two", "three", "four"]


@pytest.fixture
def image():
    """A 40 x 56 RGB image (not square: the resize and the centre crop both act)."""
    rng = np.random.default_rng(3)
    base = np.linspace(0, 255, 40 * 56 * 3).reshape(40, 56, 3)
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def test_the_transform_is_torchvisions_default_augmix_with_13_operations():
    """The parameters seed 002 got from ``AugMix()``: they are torchvision's defaults (checked against the
    installed torchvision), and ``all_ops`` gives the 13 operations (the AugMix paper's 9 plus brightness,
    color, contrast, sharpness)."""
    import inspect

    from torchvision.transforms.v2 import AugMix

    aug = A.seed002_augmix()
    assert isinstance(aug, AugMix)
    assert (aug.severity, aug.mixture_width, aug.chain_depth, aug.alpha, aug.all_ops) == (3, 3, -1, 1.0, True)
    defaults = {k: p.default for k, p in inspect.signature(AugMix).parameters.items()}
    assert {k: defaults[k] for k in A.SEED002_AUGMIX} == A.SEED002_AUGMIX
    space = aug._AUGMENTATION_SPACE if aug.all_ops else aug._PARTIAL_AUGMENTATION_SPACE
    assert len(space) == 13 and {"Brightness", "Color", "Contrast", "Sharpness"} <= set(space)


def test_views_are_augmix_of_the_whole_image_then_resize_and_centre_crop(image, monkeypatch):
    """Each view = the reference composition, run here on torchvision and PIL directly with the same torch
    seed: AugMix() of the whole image, PIL Resize(24, bicubic), CenterCrop(24) (PIL's bicubic vs ours: at
    most one grey level).  No random crop: without AugMix's changes (a fork where AugMix returns its input)
    every view is the original view."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    gen = torch.Generator().manual_seed(5)
    views = A.seed002_augmix_views(image, 4, 24, generator=gen)
    assert views.shape == (4, 3, 24, 24) and views.dtype == torch.float32
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        aug = T.AugMix()
        post = T.Compose([T.Resize(24, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(24)])
        src = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        for i in range(4):
            ref = np.asarray(post(Image.fromarray(aug(src).permute(1, 2, 0).numpy())))
            ours = (views[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1, i
    monkeypatch.setattr(A, "seed002_augmix", lambda: lambda x: x)  # AugMix off: resize + crop left
    plain = A.seed002_augmix_views(image, 3, 24, generator=torch.Generator().manual_seed(0))
    original = A.make_views(image, 1, 24, include_original=True)
    levels = (plain * 255).round().to(torch.uint8)
    assert all(
        torch.equal(v, (original[0] * 255).round().to(torch.uint8)) for v in levels
    )  # no crop, no flip


def test_views_are_deterministic_under_a_seed_and_leave_the_global_generator_alone(image):
    def views(seed):
        return A.seed002_augmix_views(image, 5, 24, generator=torch.Generator().manual_seed(seed))

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = views(0)
    assert torch.equal(torch.get_rng_state(), state)  # torch's global generator as it was
    torch.manual_seed(456)  # another global state: the same views
    assert torch.equal(views(0), a)
    b = views(1)
    assert not torch.equal(a, b)
    assert len({tuple(v.flatten()[:50].tolist()) for v in a}) == 5  # five different draws
    g = torch.Generator().manual_seed(0)  # successive images of one generator differ
    assert not torch.equal(
        A.seed002_augmix_views(image, 5, 24, generator=g), A.seed002_augmix_views(image, 5, 24, generator=g)
    )


def test_tpt_augmix_seed002_views(tiny_clip, image):
    """TPT(augmix="seed002"): the original view first, then seed 002's AugMix views from TPT's generator;
    the same seed gives the same views.  Any other string is a ConfigError naming the choices."""
    from tttlab.memo_tpt.tpt import TPT

    t = TPT(tiny_clip, NAMES, n_views=6, augmix="seed002", seed=7)
    v = t.views(image)
    size = t.size
    assert v.shape == (6, 3, size, size)
    assert torch.equal(v[0], A.make_views(image, 1, size, include_original=True)[0])
    want = A.seed002_augmix_views(image, 5, size, generator=torch.Generator().manual_seed(7))
    assert torch.equal(v[1:], want)
    assert torch.equal(TPT(tiny_clip, NAMES, n_views=6, augmix="seed002", seed=7).views(image), v)
    assert not torch.equal(TPT(tiny_clip, NAMES, n_views=6, augmix=True, seed=7).views(image)[1:], want)
    with pytest.raises(ConfigError, match=r"augmix='yes'; expected false, true .* or seed002"):
        TPT(tiny_clip, NAMES, augmix="yes")


def test_memo_seed002_augmix_views(bn_net, image):
    """Memo(augmentation="seed002_augmix"): its B views are seed 002's AugMix views (with include_original,
    the clean Resize(256)-style view first, as seed 002's EasyMemo data loader)."""
    from tttlab.memo_tpt.memo import Memo

    m = Memo(bn_net, augmentation="seed002_augmix", n_augmentations=4, size=24, seed=3)
    want = A.seed002_augmix_views(image, 4, 24, generator=torch.Generator().manual_seed(3))
    assert torch.equal(m.views(image), want)
    m = Memo(bn_net, augmentation="seed002_augmix", n_augmentations=4, size=24, seed=3, include_original=True)
    v = m.views(image)
    assert torch.equal(v[0], m.original(image)[0]) and torch.equal(v[1:], want[:3])
    with pytest.raises(ConfigError, match=r"augmentation='augmix3'; expected one of"):
        Memo(bn_net, augmentation="augmix3")


def test_the_tpt_command_passes_augmix_seed002_and_checks_it_before_the_data(tmp_path):
    """``augmix=seed002`` on the tpt command reaches TPT as the string (it was bool(): True, TPT's AugMix);
    a bad value is named before any test set is read."""
    from tttlab.memo_tpt import main as M

    c = {"augmix": "seed002", "augs": 64, "base_prompt": "a photo of a", "selection": 0.1, "tts": 1, "lr": 5e-3,
         "single_context": True, "ensemble": False, "align_steps": 0}  # fmt: skip
    assert M.tpt_options(c)["augmix"] == "seed002"
    assert M.tpt_options({**c, "augmix": True})["augmix"] is True
    M._check_adapter_options({"method": "tpt", **c})
    with pytest.raises(ConfigError, match=r"augmix='seed'"):
        M._check_adapter_options({"method": "tpt", **c, "augmix": "seed"})


def test_the_evaluate_contract_passes_augmix_seed002_to_tpt(monkeypatch, tmp_path):
    """The evaluate contract's ``tpt.augmix`` reaches TPT as given (bool() made ``seed002`` TPT's AugMix)."""
    from tttlab.memo_tpt import evaluate as E
    from tttlab.memo_tpt import tiny_clip
    from tttlab.memo_tpt import tpt as tpt_module

    got = {}

    class Recorder:
        def __init__(self, model, names, **kw):
            got.update(kw)

    monkeypatch.setattr(
        tiny_clip, "load_or_train_clip", lambda *a, **k: (torch.nn.Linear(1, 1), tmp_path / "m")
    )
    monkeypatch.setattr(tpt_module, "TPT", Recorder)
    c = E.eval_config({"method": "memo_tpt.tpt", "cache_dir": str(tmp_path), "tpt": {"augmix": "seed002"}})
    E.build_method(c, torch.device("cpu"))
    assert got["augmix"] == "seed002"
