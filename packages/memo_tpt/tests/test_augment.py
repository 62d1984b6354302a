import numpy as np
import pytest
import torch
from PIL import Image

from tttlab.core.errors import InvalidInputError
from tttlab.memo_tpt import augment as A


@pytest.fixture
def photo():
    rng = np.random.default_rng(1)
    base = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3)
    return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("op", A.AUGMIX_OPS)
@pytest.mark.parametrize("level,sign", [(0.9, 1.0), (2.7, -1.0)])
def test_ops_match_pil(photo, op, level, sign):
    pil = Image.fromarray(photo)
    q = torch.from_numpy(photo).permute(2, 0, 1).float()[None]
    ours = A.apply_op(
        op, q, torch.tensor([level], dtype=torch.float64), torch.tensor([sign], dtype=torch.float64)
    )
    ref = torch.from_numpy(np.array(A._pil_op(op, pil, level, sign))).permute(2, 0, 1).float()
    diff = (ours[0] - ref).abs()
    if op in ("rotate", "shear_x", "shear_y"):  # PIL's fixed-point bilinear: edge pixels may differ
        assert diff.mean() < 2.0 and (diff > 2).float().mean() < 0.05
    else:
        assert torch.equal(ours[0], ref)


def test_crop_boxes_follow_random_resized_crop():
    g = torch.Generator().manual_seed(0)
    boxes = A.random_resized_crop_boxes(500, 100, 150, scale=(0.08, 1.0), generator=g)
    left, top, w, h = boxes.T
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= 150).all() and (top + h <= 100).all()
    area = (w * h).double() / (100 * 150)
    ratio = w.double() / h
    assert area.min() >= 0.07 and area.max() <= 1.0
    assert ratio.min() >= 0.74 and ratio.max() <= 1.35
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.zeros(1, 100, 150), [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(500)], dtype=torch.float64)  # fmt: skip
    ref_area = ref[:, 2] * ref[:, 3] / (100 * 150)
    assert abs(area.mean() - ref_area.mean()) < 0.05 and abs(area.std() - ref_area.std()) < 0.05


def test_full_box_is_identity_and_flip_mirrors():
    x = torch.rand(3, 20, 20)
    box = torch.tensor([[0, 0, 20, 20]] * 2)
    out = A.crop_resize(x, box, 20, torch.tensor([False, True]))
    torch.testing.assert_close(out[0], x)
    torch.testing.assert_close(out[1], x.flip(-1))


def test_views_deterministic_original_first(image):
    make = lambda: A.make_views(image, 8, 32, augmix_views=True, generator=torch.Generator().manual_seed(3))  # noqa: E731
    a, b = make(), make()
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a[0], A.resize_center_crop(A.as_image(image), 32))
    assert not torch.equal(a[1], a[2])


def test_pil_reference_same_shapes(image):
    v = A.pil_views(image, 5, 32, augmix_views=True, seed=0)
    assert v.shape == (5, 3, 32, 32) and 0 <= v.min() and v.max() <= 1


def test_augmix_identity_ops_keep_view():
    """With only autocontrast on an image already spanning 0..255, every chain is the view itself."""
    x = torch.linspace(0, 1, 3 * 16 * 16).reshape(1, 3, 16, 16).repeat(4, 1, 1, 1)
    x = (x * 255).round() / 255
    x[:, :, 0, 0], x[:, :, -1, -1] = 0, 1
    out = A.augmix(x, torch.Generator().manual_seed(0), ops=("autocontrast",))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_bad_images():
    with pytest.raises(InvalidInputError):
        A.as_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(InvalidInputError):
        A.make_views(np.zeros((8, 8, 3), np.uint8), 0, 8)
    with pytest.raises(InvalidInputError):
        A.augmix(torch.rand(2, 3, 8, 8), ops=("blur",))
