import warnings

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
@pytest.mark.parametrize("level,sign", [(0.9, 1.0), (0.5, -1.0), (2.7, -1.0), (9.5, 1.0)])
def test_ops_match_pil(photo, op, level, sign):
    pil = Image.fromarray(photo)
    q = torch.from_numpy(photo).permute(2, 0, 1).float()[None]
    ours = A.apply_op(
        op, q, torch.tensor([level], dtype=torch.float64), torch.tensor([sign], dtype=torch.float64)
    )
    ref = torch.from_numpy(np.array(A._pil_op(op, pil, level, sign))).permute(2, 0, 1).float()
    diff = (ours[0] - ref).abs()
    if op in ("rotate", "shear_x", "shear_y"):  # float32 interpolation vs PIL's float64: rare off-by-one
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    else:
        assert torch.equal(ours[0], ref)


@pytest.mark.parametrize("op", sorted(A.GEOMETRIC))
@pytest.mark.parametrize("level,sign", [(0.9, 1.0), (5.5, -1.0)])
def test_geometric_ops_fill_as_memo_upstream(photo, op, level, sign):
    """Upstream MEMO's AugMix passes PIL ``fillcolor=128``: on an RGB image Pillow fills (128, 0, 0);
    fill=(128, 0, 0) reproduces it (and 128 on a one-channel image is grey 128)."""
    for img, fill in ((photo, (128, 0, 0)), (photo[..., :1], (128, 0, 0)), (photo, 77)):
        pil = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img)
        q = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None]
        lv, sg = torch.tensor([level], dtype=torch.float64), torch.tensor([sign], dtype=torch.float64)
        ours = A.apply_op(op, q, lv, sg, fill=fill)[0]
        ref = np.array(A._pil_op(op, pil, level, sign, fillcolor=128 if fill != 77 else (77, 77, 77)))
        ref = torch.from_numpy(ref.reshape(*ref.shape[:2], -1)).permute(2, 0, 1).float()
        diff = (ours - ref).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (op, fill)
        outside = (ours - A.apply_op(op, q, lv, sg)[0]).abs().sum() > 0
        assert outside or op == "rotate" and int(level * 3) == 0  # the fill shows somewhere


def test_memo_views_fill_like_upstream_tpt_views_black():
    """On a black image every AugMix operation keeps black except where a geometric one fills: MEMO's
    views show upstream's (128, 0, 0) fill, TPT's AugMix views stay black."""
    from tttlab.memo_tpt.memo import Memo

    black = np.zeros((80, 80, 3), np.uint8)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1))
    views = Memo(net, n_augmentations=16, size=64, seed=0).views(black)
    assert views[:, 0].max() > 0.05 and views[:, 1:].max() == 0
    tpt_like = A.make_views(black, 16, 64, include_original=False, augmix_views=True,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert tpt_like.max() == 0


@pytest.mark.parametrize("op", ["rotate", "shear_x", "shear_y", "equalize", "autocontrast"])
def test_ops_match_pil_on_a_real_photo(op):
    """224 px crops of a real photo, several levels: bit-exact but for ~1e-5 of the pixels (float32)."""
    skdata = pytest.importorskip("skimage.data")
    img = Image.fromarray(skdata.astronaut()).resize((224, 224), Image.BILINEAR)
    q = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()[None]
    for level, sign in [(0.35, 1.0), (0.7, -1.0), (0.99, 1.0)]:
        ours = A.apply_op(op, q, torch.tensor([level], dtype=torch.float64), torch.tensor([sign]))[0]
        ref = torch.from_numpy(np.array(A._pil_op(op, img, level, sign))).permute(2, 0, 1).float()
        diff = (ours - ref).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-4


def test_crops_match_pil_resized_crop_and_flip(photo):
    """Antialiased uint8 resize of each box (mirrored box of the mirrored image where flipped) = PIL's
    crop + bilinear resize (+ flip) within one grey level (torch's and Pillow's fixed-point filters round
    differently on some pixels)."""
    pil = Image.fromarray(photo)
    g = torch.Generator().manual_seed(0)
    boxes = A.random_resized_crop_boxes(12, 64, 64, generator=g)
    flips = torch.rand(12, generator=g) < 0.5
    ours = A.crop_resize(torch.from_numpy(photo).permute(2, 0, 1), boxes, 24, flips)
    assert ours.dtype == torch.uint8 and ours.shape == (12, 3, 24, 24)
    for i, (left, top, w, h) in enumerate(boxes.tolist()):
        ref = pil.crop((left, top, left + w, top + h)).resize((24, 24), Image.BILINEAR)
        if flips[i]:
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
        diff = (torch.from_numpy(np.array(ref)).permute(2, 0, 1).int() - ours[i].int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.3


@pytest.mark.parametrize("hw", [(64, 64), (48, 80), (90, 40)])
def test_original_view_matches_torchvision_pil(hw):
    from torchvision import transforms as T

    rng = np.random.default_rng(2)
    base = np.linspace(0, 255, hw[0] * hw[1] * 3).reshape(*hw, 3)
    photo = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    ref = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32)])
    ref = torch.from_numpy(np.asarray(ref(Image.fromarray(photo)))).permute(2, 0, 1).float()
    ours = A.original_view(photo, 32)[0] * 255
    diff = (ours - ref).abs()
    assert diff.max() <= 1.0001 and diff.mean() < 0.35


def test_normalised_views_and_out(photo):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    kw = dict(augmix_views=True, include_original=False)
    plain = A.make_views(photo, 6, 24, generator=torch.Generator().manual_seed(1), **kw)
    norm = A.make_views(photo, 6, 24, generator=torch.Generator().manual_seed(1), mean=mean, std=std, **kw)
    ref = (plain - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(norm, ref, atol=2e-6, rtol=1e-6)
    out = torch.full((6, 3, 24, 24), float("nan"))  # contiguous (not channels-last): written by copy
    res = A.make_views(photo, 6, 24, generator=torch.Generator().manual_seed(1), out=out, **kw)
    assert res is out and torch.equal(out, plain)


def test_generic_kernels_match_cpu_kernels(photo, monkeypatch):
    """The device-agnostic path (float resize rounded to 8 bits; what CUDA runs) agrees with the CPU uint8
    kernels within two grey levels on crops and the original view."""
    make = lambda: A.make_views(photo, 9, 24, generator=torch.Generator().manual_seed(5))  # noqa: E731
    fast = make()
    monkeypatch.setattr(A, "_GENERIC", True)
    generic = make()
    assert (fast - generic).abs().max() <= 2.01 / 255 and (fast - generic).abs().mean() < 0.5 / 255


def test_views_distributed_like_the_reference(photo):
    """Per-view brightness and contrast of 64 AugMix views: the same distribution as the PIL reference's."""
    ours = A.make_views(photo, 64, 32, include_original=False, augmix_views=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    ref = A.pil_views(photo, 64, 32, include_original=False, augmix_views=True, seed=0)
    for stat in (lambda v: v.mean((1, 2, 3)), lambda v: v.std((1, 2, 3))):
        a, b = stat(ours), stat(ref)
        assert abs(a.mean() - b.mean()) < 0.03 and abs(a.std() - b.std()) < 0.03


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
    assert torch.equal(a[0], A.original_view(image, 32)[0])
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


def test_composed_lookup_runs_equal_op_by_op(photo):
    """A run of look-up-table operations composed in level space (histograms carried through the tables)
    is bit-identical to applying the operations one by one."""
    x = torch.from_numpy(photo).contiguous()
    ops = [A._autocontrast, A._equalize, A._posterize, A._solarize]
    rng = np.random.default_rng(0)
    for _ in range(30):
        run = [(ops[rng.integers(4)], float(rng.uniform(0.1, 3.0)), 1.0) for _ in range(rng.integers(2, 5))]
        ref = x
        for fn, level, sign in run:
            ref = fn(ref, level, sign)
        assert torch.equal(A._lut_run(x, run), ref)


def test_chains_sharing_the_view_histogram_equal_op_by_op(photo):
    """Chains of one view that start with histogram operations share the view's histogram (one ``bincount``
    per view); every chain stays bit-identical to applying its operations one by one."""
    x = torch.from_numpy(photo).contiguous()
    ops = ("autocontrast", "equalize", "posterize", "solarize", "rotate")
    draws = A._Draws(40, torch.Generator().manual_seed(3), severity=1.0, ops=ops)
    shared_used = 0
    for i in range(40):
        shared: dict = {}
        for c in range(draws.width):
            j = i * draws.width + c
            ref = x
            for step in range(draws.lengths[j]):
                fn, level, sign = draws.steps[step][j]
                ref = fn(ref, level, sign)
            assert torch.equal(draws.chain(x, i, c, shared), ref)
            assert torch.equal(draws.chain(x, i, c), ref)
        shared_used += "lut_source" in shared
    assert shared_used > 5


def test_numba_lookup_kernels_equal_torch_path(photo, monkeypatch):
    """The compiled CPU histogram/look-up kernels (numba, when installed) are bit-identical to the torch path
    (int32 index + ``bincount`` + ``index_select``), op by op; whole MEMO views agree up to the float32
    rounding of the fused mix + normalisation kernel (its sums run in another order)."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(0)
    images = [
        torch.from_numpy(photo).contiguous(),
        torch.from_numpy(rng.integers(0, 256, (31, 17, 3), np.uint8)),
    ]
    images.append(torch.from_numpy(np.full((5, 7, 3), 9, np.uint8)))  # flat: identity tables
    run = [
        (A._equalize, 0.5, 1.0),
        (A._posterize, 0.5, 1.0),
        (A._autocontrast, 0.5, 1.0),
        (A._solarize, 0.7, 1),
    ]
    kw = dict(include_original=False, augmix_views=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))

    def results():
        out = [f(x, 0.5, 1.0) for x in images for f in (A._autocontrast, A._equalize)]
        out += [A._lut_run(x, run) for x in images]
        views = A.make_views(photo, 12, 32, generator=torch.Generator().manual_seed(2), **kw)
        return out, views

    assert A._numba_kernels() is not None
    fast, fast_views = results()
    monkeypatch.setattr(A, "_NUMBA", False)
    assert A._numba_kernels() is None
    ref, ref_views = results()
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))
    torch.testing.assert_close(fast_views, ref_views, rtol=0, atol=2e-6)


def test_fused_blend_equals_the_mix_formula(monkeypatch):
    """The numba mix + ``ToTensor`` + ``Normalize`` pass of a view and its 3 chains equals
    ``(sum_s coef_s src_s / 255 - mean) / std`` (float64) and the torch writer, to float32 rounding."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(3)
    srcs = [torch.from_numpy(rng.integers(0, 256, (9, 7, 3), np.uint8)) for _ in range(4)]
    coef = torch.tensor([0.35, 0.1, 0.4, 0.15])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    want = sum(c * s.double() for c, s in zip(coef.double(), srcs)) / 255
    want = ((want - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64)).float()
    outs = []
    for numba_on in (True, False):
        monkeypatch.setattr(A, "_NUMBA", numba_on)
        out = torch.zeros(1, 9, 7, 3)
        writer = A._Writer(out, mean, std, 4)
        assert (writer.blend is not None) == numba_on
        writer(0, srcs, coef)
        outs.append(out[0])
    for got in outs:
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=2e-6)


def test_a_read_only_image_array_is_taken_without_a_warning():
    """np.asarray of a PIL image is read-only; torch warns (once per process) when a tensor views it."""
    pixels = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    read_only = np.asarray(Image.fromarray(pixels))
    assert not read_only.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = A.as_image(read_only)
    assert torch.equal(out, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    assert not read_only.flags.writeable  # the caller's array is left as it was
