"""ImageNet views of ``pretrain`` / ``probe`` as upstream's ``main_pretrain.py`` / ``main_prob.py`` make them
(torchvision ``ImageFolder``): every training view a RandomResizedCrop of the whole decoded JPEG (scale
and aspect relative to the whole file), the evaluation view ``Resize(256)`` bicubic + ``CenterCrop(224)``
of the file.  Until this test the training crops were drawn from the core's 256 / 224 centre crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tttlab.core.errors import DatasetLayoutError, DatasetNotFoundError, TTTLabError
from tttlab.ttt_mae import train as T
from tttlab.ttt_mae import views
from tttlab.ttt_mae.common import compose

#: (height, width) of the fixture files: non-square both ways, one square, one just above 224 on its short side
SIZES = [(240, 400), (410, 260), (300, 300), (257, 611), (520, 330), (229, 232)]


def write_imagenet(root: Path, split: str, sizes=SIZES, seed: int = 0) -> Path:
    """``<root>/<split>/<wnid>/*.JPEG`` with one file of each size, two classes; returns ``root``."""
    from PIL import Image

    from tttlab.core.data import imagenet_wnids

    rng = np.random.default_rng(seed)
    wnids = imagenet_wnids()
    for i, (h, w) in enumerate(sizes):
        folder = root / split / wnids[[7, 900][i % 2]]
        folder.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) % 256], -1)
        noise = rng.integers(-20, 21, size=(h, w, 3))
        img = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i}.JPEG", quality=95)
    return root


def decoded(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def centre_box(h: int, w: int, resize: int = 256, crop: int = 224) -> tuple[float, float, float, float]:
    """The region of an (h, w) file that Resize(256) + CenterCrop(224) keeps: (top, left, bottom, right)."""
    side = crop * min(h, w) / resize
    return (h - side) / 2, (w - side) / 2, (h + side) / 2, (w + side) / 2


def tiny_cfg(kind: str, out: Path, root: Path, **kw):
    overrides = {"depth": 1, "decoder_depth": 1}
    return compose(kind, f"smoke_{kind}", {
        "out_dir": str(out), "model": "mae_vit_tiny_patch16", "input_size": 32, "model_overrides": overrides,
        "data": {"name": "imagenet", "root": str(root), "split": "train", "num_examples": None},
        "aug": {"enabled": True}, "batch_size": 3, "epochs": 1, "logging": {"progress": False}, **kw,
    })  # fmt: skip


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    write_imagenet(root, "train")
    write_imagenet(root, "val", seed=1)
    return root


def record_crops(monkeypatch) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """Every ``crop_params`` call of the views: ``(height, width, (top, left, h, w))``."""
    seen, original = [], views.crop_params

    def spy(height, width, scale, ratio, generator):
        box = original(height, width, scale, ratio, generator)
        seen.append((height, width, box))
        return box

    monkeypatch.setattr(views, "crop_params", spy)
    return seen


@pytest.mark.parametrize("kind", ["pretrain", "probe"])
def test_training_crops_are_drawn_from_the_whole_file(tmp_path, imagenet, monkeypatch, kind):
    """``pretrain`` and ``probe`` crop each training view from the decoded file at its own size (the old
    code drew them from a 224 x 224 array)."""
    extra = {}
    if kind == "probe":
        pre = T.run(tiny_cfg("pretrain", tmp_path / "pre", imagenet), "pretrain")
        extra = {"finetune": str(pre)}
    seen = record_crops(monkeypatch)
    T.run(tiny_cfg(kind, tmp_path / kind, imagenet, **extra), kind, stop_after_steps=2)
    assert len(seen) == 6  # 2 steps of 3 images
    assert {(h, w) for h, w, _ in seen} <= set(SIZES) and len({(h, w) for h, w, _ in seen}) == 6


def test_the_crop_samples_the_whole_image_at_upstreams_scale_and_aspect(imagenet):
    """The probe's ``RandomResizedCrop(224)`` (scale 0.08-1, aspect 3/4-4/3) on the files: every view is the
    bicubic resize of a box of the decoded file (flipped or not), the box's area fraction of the whole file
    in the scale range and its aspect in the ratio range (up to the rounding of its sides); boxes reach
    outside the centre region that Resize(256) + CenterCrop(224) keeps and cover up to nearly the whole
    file (the old crops of that centre region covered at most 224^2 / 256^2 of a square file, 32 % of the
    257 x 611 one)."""
    c = compose("probe", None, {"input_size": 224, "data": {"name": "imagenet", "root": str(imagenet)}})
    low, high = c["aug"]["crop_scale"]
    assert (low, high) == (0.08, 1.0) and c["aug"]["flip"]
    ds = T.load_dataset(c, full_images=True)
    assert sorted(np.asarray(im).shape[:2] for im in ds.take_list(np.arange(len(ds)))[0]) == sorted(SIZES)
    files = [decoded(p) for p in ds.paths]
    g, replay = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    outside, fractions = 0, []
    for _ in range(6):
        images, _ = ds.take_list(np.arange(len(ds)))
        out = T.augment(images, c, g)
        assert out.shape == (len(ds), 3, 224, 224)
        for file, view in zip(files, out):
            H, W = file.shape[:2]
            top, left, h, w = views.crop_params(H, W, (low, high), (3 / 4, 4 / 3), replay)
            flipped = bool(torch.rand(1, generator=replay) < 0.5)
            crop = torch.from_numpy(file[top : top + h, left : left + w].copy()).permute(2, 0, 1)[None]
            ref = F.interpolate(crop.float() / 255, size=(224, 224), mode="bicubic", antialias=True)
            ref = ref.clamp(0, 1)[0]
            assert torch.equal(view, ref.flip(-1) if flipped else ref)
            fractions.append(h * w / (H * W))
            # rounding each side to an integer moves the area by at most ~(h + w) / 2 pixels
            slack = (h + w) / (H * W)
            assert low - slack <= h * w / (H * W) <= high + slack
            assert 3 / 4 * (1 - 2 / min(h, w)) <= w / h <= 4 / 3 * (1 + 2 / min(h, w))
            t0, l0, b0, r0 = centre_box(H, W)
            outside += top < t0 - 1 or left < l0 - 1 or top + h > b0 + 1 or left + w > r0 + 1
    assert outside > 0
    assert max(fractions) > 0.6 and min(fractions) < 0.3


def test_scale_is_relative_to_the_whole_file():
    """Over many draws on a 257 x 611 file the pretraining scale (0.2, 1) spans area fractions of the
    whole file from ~0.2 up to what the aspect range allows (a 4/3 box at most 257 high: 257 * 343 / (257 *
    611) = 0.56), where crops of the 224 centre square could not exceed 0.32 of it."""
    c = {"aug": {"enabled": True, "crop_scale": [0.2, 1.0], "flip": True}, "input_size": 16}
    g = torch.Generator().manual_seed(0)
    H, W = 257, 611
    boxes = [views.crop_params(H, W, (0.2, 1.0), (3 / 4, 4 / 3), g) for _ in range(400)]
    fractions = np.array([h * w / (H * W) for _, _, h, w in boxes])
    assert fractions.min() == pytest.approx(0.2, abs=0.02) and fractions.max() > 0.5
    assert all(0 <= t and 0 <= left and t + h <= H and left + w <= W for t, left, h, w in boxes)
    assert any(left + w > (W + 224 * 257 / 256) / 2 + 1 for _, left, _, w in boxes)  # right of the centre
    file = np.zeros((H, W, 3), np.uint8)
    assert T.augment([file], c, g).shape == (1, 3, 16, 16)


def test_eval_view_is_resize_256_bicubic_and_centre_crop(imagenet):
    """The probe's clean accuracy (ImageNet ``val``) and the no-augmentation training view are torchvision's
    ``Resize(256, bicubic)`` + ``CenterCrop(input_size)`` of each file (the old reader resized bilinearly)."""
    from PIL import Image

    tv = pytest.importorskip("torchvision.transforms")
    c = {"input_size": 224, "data": {"name": "imagenet", "root": str(imagenet), "split": "train"}}
    ref_t = tv.Compose([tv.Resize(256, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(224)])
    for split in ("val", "train"):
        ds = T.load_dataset(c, split=split)
        images, _ = ds.take(np.arange(len(ds)))
        assert images.shape == (len(SIZES), 224, 224, 3)
        for path, got in zip(ds.paths, images):
            with Image.open(path) as img:
                assert np.array_equal(got, np.asarray(ref_t(img.convert("RGB")))), path
    small = T.load_dataset({**c, "input_size": 192}, split="val").take([0])[0]
    ref_s = tv.Compose([tv.Resize(256, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(192)])
    with Image.open(T.load_dataset(c, split="val").paths[0]) as img:
        assert np.array_equal(small[0], np.asarray(ref_s(img.convert("RGB"))))


def test_bad_paths_stay_tttlab_errors(tmp_path, imagenet):
    """A missing root and an undecodable file are TTTLabErrors naming the path, with full-image crops too."""
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        T.run(tiny_cfg("pretrain", tmp_path / "a", tmp_path / "nowhere"), "pretrain")
    assert not (tmp_path / "a").exists()
    bad = tmp_path / "bad"
    write_imagenet(bad, "train", sizes=SIZES[:3])
    broken = next((bad / "train").rglob("*.JPEG"))
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetLayoutError, match=broken.name) as info:
        T.run(tiny_cfg("pretrain", tmp_path / "b", bad), "pretrain")
    assert isinstance(info.value, TTTLabError)


def test_mnist_and_cifar_views_unchanged():
    """Array datasets keep the array path: ``augment`` of a float batch is RandomResizedCrop of each
    (same generator draws as before), and a uint8 image crops to the same view as its float copy."""
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    c = {"aug": {"enabled": True, "crop_scale": [0.2, 1.0], "flip": True}, "input_size": 28}
    x = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    a = T.augment(T.to_unit(x), c, g1)
    b = T.augment(list(x), c, g2)
    assert torch.equal(a, b) and a.shape == (4, 1, 28, 28)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
