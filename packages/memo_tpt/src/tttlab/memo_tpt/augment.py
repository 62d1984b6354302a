"""Test-time views for MEMO and TPT: batched on the model's device, plus a per-view PIL reference.

MEMO (Zhang, Levine, Finn 2022) and TPT (Shu et al. 2022) classify 64 augmented views of every test
image.  Upstream builds each view with a Python loop over PIL operations and converts every AugMix chain
to a tensor separately, which makes augmentation the bottleneck on a GPU.  Here one call builds all views
of an image as one ``(n_views, C, size, size)`` tensor in [0, 1] on the image's device:

* :func:`random_resized_crop_boxes`: torchvision's ``RandomResizedCrop`` parameter draw (area fraction in
  ``scale``, log-uniform aspect ratio, 10 tries, then the centre-crop fallback; integer sizes/offsets),
  vectorised over views;
* :func:`crop_resize`: every crop (+ horizontal flip) resampled to ``size`` with one bilinear
  ``grid_sample`` (upstream: PIL's bilinear resize, which low-passes large crops; ours does not);
* :func:`augmix`: AugMix (Hendrycks et al. 2020, ``hendrycks2020augmix``) on a batch of views: ``width``
  chains of 1-3 operations drawn from the nine non-ImageNet-C operations (autocontrast, equalize,
  posterize, solarize, rotate, shear x/y, translate x/y) with PIL's arithmetic on the 256 grey levels
  (autocontrast/equalize/posterize/solarize look-up tables as PIL computes them; geometric operations as
  PIL's affine maps about pixel centres, bilinear, zero fill), mixed with Dirichlet(alpha) weights and
  blended with the view by Beta(alpha, alpha).  Each operation runs once per chain step on the subset of
  views that drew it.
* :func:`make_views`: the whole pipeline: the original (shorter side resized to ``size`` bicubic with
  antialiasing + centre crop) first if ``include_original``, then crops (+ AugMix when asked).

All random numbers come from ``generator`` (a CPU ``torch.Generator``; the global RNG when None) and only
the few parameters move to the device, so a seed gives the same views on CPU and CUDA up to resampling
arithmetic.  :func:`pil_views` is the per-view reference in upstream's style (torchvision PIL transforms,
PIL ``ImageOps``, one ``to_tensor`` per chain) used by the tests and ``benchmarks/bench_memo_tpt.py``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from tttlab.core.errors import InvalidInputError

__all__ = [
    "AUGMIX_OPS",
    "as_image",
    "augmix",
    "crop_resize",
    "make_views",
    "pil_views",
    "random_resized_crop_boxes",
    "resize_center_crop",
]

AUGMIX_OPS = (
    "autocontrast", "equalize", "posterize", "solarize", "rotate", "shear_x", "shear_y", "translate_x",
    "translate_y",
)  # fmt: skip
GEOMETRIC = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}
CPU_CHUNK = 16


def as_image(image, device=None) -> torch.Tensor:
    """One image as a float (C, H, W) tensor in [0, 1]: from uint8 HWC numpy, a PIL image, a uint8 CHW
    tensor or a float CHW tensor already in [0, 1]."""
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
    except ImportError:  # pragma: no cover
        pass
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise InvalidInputError(
                f"image must be uint8 (H, W) or (H, W, C), got {image.dtype} {image.shape}"
            )
        if image.ndim == 2:
            image = image[..., None]
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        t = image
    else:
        raise InvalidInputError(
            f"image must be a numpy array, PIL image or tensor, got {type(image).__name__}"
        )
    if t.ndim != 3 or t.shape[0] not in (1, 3) or min(t.shape[1:]) < 2:
        raise InvalidInputError(f"image must be (C, H, W) with C in {{1, 3}}, got shape {tuple(t.shape)}")
    if device is not None:
        t = t.to(device)  # uint8 travels to the device before conversion (4x fewer bytes)
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255)
    if not t.is_floating_point():
        raise InvalidInputError(f"image tensor must be uint8 or float, got {t.dtype}")
    if not torch.isfinite(t).all():
        raise InvalidInputError("image contains NaN or inf")
    return t


def _rand(shape, generator, device, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=dtype).to(device)


# ----------------------------------------------------------------------------------------------------------
# crops


def random_resized_crop_boxes(
    n: int, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None, tries: int = 10
) -> torch.Tensor:
    """``(n, 4)`` int64 boxes ``(left, top, w, h)`` drawn as torchvision's ``RandomResizedCrop.get_params``."""
    area = height * width
    u = torch.rand((4, n, tries), generator=generator, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
    aspect = log_r.exp()
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.long().argmax(1), torch.full((n,), -1))
    # fallback: the whole image cut to the ratio bounds, centred (torchvision's)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    pick = first.clamp_min(0)
    rows = torch.arange(n)
    bw = torch.where(first >= 0, w[rows, pick], torch.full((n,), fw))
    bh = torch.where(first >= 0, h[rows, pick], torch.full((n,), fh))
    left = torch.floor(u[2, rows, pick] * (width - bw + 1)).long()
    top = torch.floor(u[3, rows, pick] * (height - bh + 1)).long()
    left = torch.where(first >= 0, left, (width - bw) // 2)
    top = torch.where(first >= 0, top, (height - bh) // 2)
    return torch.stack([left, top, bw, bh], 1)


def _theta(a: torch.Tensor, hw_in: tuple[int, int], hw_out: tuple[int, int]) -> torch.Tensor:
    """Pixel-coordinate affine maps (k, 2, 3) (output pixel -> input pixel, continuous coordinates with
    pixel centres at i + 0.5, as PIL's ``transform``) as ``affine_grid`` thetas (align_corners=False)."""
    (hi, wi), (ho, wo) = hw_in, hw_out
    k = a.shape[0]
    full = torch.zeros(k, 3, 3, dtype=a.dtype, device=a.device)
    full[:, :2] = a
    full[:, 2, 2] = 1
    n_in = torch.tensor([[2 / wi, 0, -1], [0, 2 / hi, -1], [0, 0, 1]], dtype=a.dtype, device=a.device)
    n_out_inv = torch.tensor(
        [[wo / 2, 0, wo / 2], [0, ho / 2, ho / 2], [0, 0, 1]], dtype=a.dtype, device=a.device
    )
    return (n_in @ full @ n_out_inv)[:, :2]


def _warp(x: torch.Tensor, a: torch.Tensor, out_hw, mode="bilinear", padding="zeros") -> torch.Tensor:
    theta = _theta(a.double(), tuple(x.shape[-2:]), tuple(out_hw)).to(x.dtype)
    ho, wo = out_hw
    # the sampling grid by broadcasting (affine_grid's batched matmul is several times slower on CPU)
    xs = (torch.arange(wo, device=x.device, dtype=x.dtype) * 2 + 1) / wo - 1
    ys = (torch.arange(ho, device=x.device, dtype=x.dtype) * 2 + 1) / ho - 1
    t = theta[:, :, :, None, None]  # (k, 2, 3, 1, 1)
    grid = t[:, :, 0] * xs[None, None, None, :] + (t[:, :, 1] * ys[None, None, :, None] + t[:, :, 2])
    grid = grid.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=False)


def crop_resize(image: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None,
                out: torch.Tensor | None = None):  # fmt: skip
    """Crops ``boxes`` (k, 4) of one (C, H, W) image, each resized to ``size`` x ``size`` (bilinear) and
    mirrored where ``flip``: (k, C, size, size)."""
    k = boxes.shape[0]
    b = boxes.to(image.device, torch.float64)
    a = torch.zeros(k, 2, 3, dtype=torch.float64, device=image.device)
    sx, sy = b[:, 2] / size, b[:, 3] / size
    if flip is not None:
        f = flip.to(image.device)
        a[:, 0, 0] = torch.where(f, -sx, sx)
        a[:, 0, 2] = torch.where(f, b[:, 0] + b[:, 2], b[:, 0])
    else:
        a[:, 0, 0], a[:, 0, 2] = sx, b[:, 0]
    a[:, 1, 1], a[:, 1, 2] = sy, b[:, 1]
    # on CPU, chunks of 16 views keep the working set in cache (measured 1.5x faster than one call)
    step = CPU_CHUNK if image.device.type == "cpu" else k
    src = image.unsqueeze(0)
    if out is None:
        out = torch.empty(k, image.shape[0], size, size, dtype=image.dtype, device=image.device)
    for i in range(0, k, step):
        part = a[i : i + step]
        out[i : i + step] = _warp(src.expand(len(part), -1, -1, -1), part, (size, size), padding="border")
    return out


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size`` (bicubic, antialiased), centre crop ``size``: TPT's base view; (C, s, s)."""
    c, h, w = image.shape
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
        if (nh, nw) != (h, w):
            image = F.interpolate(image[None], size=(nh, nw), mode="bicubic", antialias=True,
                                  align_corners=False)[0].clamp(0, 1)  # fmt: skip
        top, left = (nh - size) // 2, (nw - size) // 2
        image = image[:, top : top + size, left : left + size]
    return image


# ----------------------------------------------------------------------------------------------------------
# AugMix on a batch


def _levels(u: torch.Tensor) -> torch.Tensor:
    return (u * 255).round().clamp(0, 255)


def _autocontrast(q: torch.Tensor) -> torch.Tensor:
    k, c = q.shape[:2]
    lo, hi = q.reshape(k, c, -1).aminmax(dim=2)
    lo, hi = lo[..., None, None], hi[..., None, None]
    scale = 255 / (hi - lo).clamp_min(1)
    out = torch.floor((q - lo) * scale).clamp(0, 255)
    return torch.where(hi > lo, out, q)


def _equalize(q: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.equalize`` per channel: lut[i] = (step // 2 + #pixels below i) // step."""
    k, c, h, w = q.shape
    lv = q.to(torch.uint8).reshape(k * c, h * w).long()
    offset = torch.arange(k * c, device=q.device)[:, None] * 256
    hist = torch.bincount((lv + offset).reshape(-1), minlength=k * c * 256).reshape(k * c, 256)
    last = 255 - (hist.flip(1) > 0).long().argmax(1)
    step = (h * w - hist.gather(1, last[:, None])[:, 0]) // 255
    below = hist.cumsum(1) - hist
    lut = ((step[:, None] // 2 + below) // step.clamp_min(1)[:, None]).clamp(max=255)
    out = lut.gather(1, lv).to(q.dtype)
    out = torch.where((step > 0)[:, None], out, lv.to(q.dtype))
    return out.reshape(k, c, h, w)


def _geometric_matrix(op: str, level: torch.Tensor, sign: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """PIL's affine data (output pixel -> input pixel) for AugMix's geometric operations."""
    k = level.shape[0]
    a = torch.zeros(k, 2, 3, dtype=torch.float64, device=level.device)
    a[:, 0, 0] = a[:, 1, 1] = 1
    if op == "rotate":
        deg = torch.floor(level * 30 / 10) * sign
        t = -torch.deg2rad(deg)
        cx, cy = w / 2, h / 2
        a[:, 0, 0], a[:, 0, 1] = torch.cos(t), torch.sin(t)
        a[:, 1, 0], a[:, 1, 1] = -torch.sin(t), torch.cos(t)
        a[:, 0, 2] = cx - a[:, 0, 0] * cx - a[:, 0, 1] * cy
        a[:, 1, 2] = cy - a[:, 1, 0] * cx - a[:, 1, 1] * cy
    elif op == "shear_x":
        a[:, 0, 1] = level * 0.3 / 10 * sign
    elif op == "shear_y":
        a[:, 1, 0] = level * 0.3 / 10 * sign
    elif op == "translate_x":
        a[:, 0, 2] = torch.floor(level * (w / 3) / 10) * sign
    elif op == "translate_y":
        a[:, 1, 2] = torch.floor(level * (h / 3) / 10) * sign
    return a


def _translate(u: torch.Tensor, op: str, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Integer translations (PIL's bilinear affine with an integer offset is an exact shift, zero fill)."""
    h, w = u.shape[-2:]
    n = w if op == "translate_x" else h
    shift = (torch.floor(level * (n / 3) / 10) * sign).long().tolist()
    out = torch.zeros_like(u)
    for i, d in enumerate(shift):
        d = max(-n, min(n, d))
        src = slice(max(d, 0), n + min(d, 0))
        dst = slice(max(-d, 0), n - max(d, 0))
        if op == "translate_x":
            out[i, :, :, dst] = u[i, :, :, src]
        else:
            out[i, :, dst] = u[i, :, src]
    return out


def apply_op(op: str, q: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """One AugMix operation on views ``q`` (k, C, H, W) of grey levels (floats 0..255, integral) with
    per-view ``level`` (AugMix's 0.1..severity, float64) and ``sign`` (+-1); returns grey levels."""
    if op in ("translate_x", "translate_y"):
        return _translate(q, op, level, sign)
    if op in GEOMETRIC:
        a = _geometric_matrix(op, level.to(q.device), sign.to(q.device), q.shape[2], q.shape[3])
        return _warp(q, a, q.shape[-2:], mode="bilinear").round_()
    if op == "autocontrast":
        out = _autocontrast(q)
    elif op == "equalize":
        out = _equalize(q)
    elif op == "posterize":
        shift = (8 - (4 - torch.floor(level * 4 / 10))).to(q.device, q.dtype)
        div = torch.pow(2.0, shift)[:, None, None, None]
        out = torch.floor(q / div) * div
    elif op == "solarize":
        thr = (256 - torch.floor(level * 256 / 10)).to(q.device, q.dtype)[:, None, None, None]
        out = torch.where(q >= thr, 255 - q, q)
    else:
        raise InvalidInputError(f"unknown AugMix operation {op!r}; expected one of {AUGMIX_OPS}")
    return out


@torch.no_grad()
def augmix(
    views: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    severity: float = 1.0,
    width: int = 3,
    depth: tuple[int, int] = (1, 3),
    alpha: float = 1.0,
    ops: tuple[str, ...] = AUGMIX_OPS,
) -> torch.Tensor:
    """AugMix of each of the (k, C, H, W) views in [0, 1]: ``m * view + (1 - m) * sum_c w_c chain_c(view)``
    with ``w ~ Dirichlet(alpha)``, ``m ~ Beta(alpha, alpha)``, chains of ``depth`` operations."""
    unknown = [op for op in ops if op not in AUGMIX_OPS]
    if unknown:
        raise InvalidInputError(f"unknown AugMix operations {unknown}; expected some of {AUGMIX_OPS}")
    k, device = views.shape[0], views.device
    total = k * width
    # chain-major (chain c of view i at c * k + i), on PIL's 256 grey levels
    chains = _levels(views).repeat(width, 1, 1, 1)
    lengths = torch.randint(depth[0], depth[1] + 1, (total,), generator=generator)
    for step in range(depth[1]):
        choice = torch.randint(len(ops), (total,), generator=generator)
        level = 0.1 + (severity - 0.1) * torch.rand(total, generator=generator, dtype=torch.float64)
        sign = torch.where(torch.rand(total, generator=generator) < 0.5, -1.0, 1.0).double()
        active = lengths > step
        for j, op in enumerate(ops):
            idx = (active & (choice == j)).nonzero().squeeze(1)
            if idx.numel():
                dev_idx = idx.to(device)
                chains[dev_idx] = apply_op(op, chains[dev_idx], level[idx], sign[idx])
    gam = torch.distributions.Gamma(torch.full((k, width), float(alpha), dtype=torch.float64), 1.0)
    w = _sample(gam, generator)
    w = (w / w.sum(1, keepdim=True) / 255).to(device, views.dtype)
    chains = chains.view(width, k, *views.shape[1:])
    mix = chains[0] * w[:, 0, None, None, None]
    for c in range(1, width):
        mix.addcmul_(chains[c], w[:, c, None, None, None])
    if alpha == 1.0:
        m = torch.rand(k, generator=generator, dtype=torch.float64)
    else:
        ga, gb = (_sample(torch.distributions.Gamma(torch.full((k,), float(alpha)), 1.0), generator)
                  for _ in range(2))  # fmt: skip
        m = ga / (ga + gb)
    m = m.to(device, views.dtype)[:, None, None, None]
    return mix.mul_(1 - m).addcmul_(views, m)


def _sample(dist, generator):
    """Gamma samples drawn from ``generator`` (torch's samplers take no generator): alpha = 1 is the
    exponential distribution (inverse CDF); other shapes use the global RNG seeded from ``generator``."""
    conc = dist.concentration
    if bool((conc == 1).all()):
        u = torch.rand(conc.shape, generator=generator, dtype=torch.float64)
        return -torch.log1p(-u)
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return dist.sample().double()


# ----------------------------------------------------------------------------------------------------------
# the pipeline


@torch.no_grad()
def make_views(
    image,
    n_views: int,
    size: int,
    *,
    include_original: bool = True,
    augmix_views: bool = False,
    flip: bool = True,
    scale=(0.08, 1.0),
    severity: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """``n_views`` views (n_views, C, size, size) in [0, 1] of one image (any size), on ``device`` (default:
    the image's).  TPT on ImageNet variants: ``include_original=True, augmix_views=False``; TPT on
    fine-grained sets: ``augmix_views=True``; MEMO: ``include_original=False, augmix_views=True``; seed 002's
    ``cut`` MEMO augmentation: ``include_original=False, augmix_views=False`` (crops and flips only)."""
    if not isinstance(n_views, int) or n_views < 1:
        raise InvalidInputError(f"n_views must be a positive integer, got {n_views!r}")
    x = as_image(image, device)
    _, h, w = x.shape
    k = n_views - 1 if include_original else n_views
    out = torch.empty(n_views, x.shape[0], size, size, dtype=x.dtype, device=x.device)
    if include_original:
        out[0] = resize_center_crop(x, size)
    if k > 0:
        boxes = random_resized_crop_boxes(k, h, w, scale=scale, generator=generator)
        flips = torch.rand(k, generator=generator) < 0.5 if flip else None
        crops = out[n_views - k :]
        crop_resize(x, boxes, size, flips, out=crops)
        if augmix_views:
            crops.copy_(augmix(crops, generator, severity=severity))
    return out  # bilinear crops and AugMix mixtures of [0, 1] images stay in [0, 1]


# ----------------------------------------------------------------------------------------------------------
# per-view PIL reference (upstream style)


def _pil_op(op: str, img, level: float, sign: float):
    from PIL import Image, ImageOps

    w, h = img.size
    if op == "autocontrast":
        return ImageOps.autocontrast(img)
    if op == "equalize":
        return ImageOps.equalize(img)
    if op == "posterize":
        return ImageOps.posterize(img, 4 - int(level * 4 / 10))
    if op == "solarize":
        return ImageOps.solarize(img, 256 - int(level * 256 / 10))
    if op == "rotate":
        return img.rotate(int(level * 30 / 10) * sign, resample=Image.BILINEAR)
    data = {
        "shear_x": (1, level * 0.3 / 10 * sign, 0, 0, 1, 0),
        "shear_y": (1, 0, 0, level * 0.3 / 10 * sign, 1, 0),
        "translate_x": (1, 0, int(level * (w / 3) / 10) * sign, 0, 1, 0),
        "translate_y": (1, 0, 0, 0, 1, int(level * (h / 3) / 10) * sign),
    }[op]
    return img.transform(img.size, Image.AFFINE, data, resample=Image.BILINEAR)


def pil_augmix(img, rng: np.random.Generator, severity: float = 1.0, width: int = 3, ops=AUGMIX_OPS,
               preprocess=None):  # fmt: skip
    """AugMix on one PIL image, each chain converted by ``preprocess`` (default ``to_tensor``; upstream:
    ``to_tensor`` + ``Normalize``) and mixed as tensors, as upstream does."""
    from torchvision.transforms.functional import to_tensor

    to_tensor = preprocess or to_tensor

    w = rng.dirichlet([1.0] * width).astype(np.float32)
    m = np.float32(rng.beta(1.0, 1.0))
    orig = to_tensor(img)
    mix = torch.zeros_like(orig)
    for c in range(width):
        aug = img.copy()
        for _ in range(rng.integers(1, 4)):
            op = ops[rng.integers(len(ops))]
            aug = _pil_op(op, aug, float(rng.uniform(0.1, severity)), float(rng.choice([-1, 1])))
        mix += float(w[c]) * to_tensor(aug)
    return m * orig + (1 - m) * mix


def pil_views(image, n_views: int, size: int, *, include_original=True, augmix_views=False, flip=True,
              scale=(0.08, 1.0), severity: float = 1.0, seed: int = 0, normalize=None) -> torch.Tensor:  # fmt: skip
    """The same views as :func:`make_views`, one PIL view at a time (torchvision ``RandomResizedCrop`` +
    ``RandomHorizontalFlip`` on the PIL image, PIL AugMix, ``to_tensor`` per chain, and ``Normalize(*normalize)``
    per chain when given, as upstream's ``preprocess``): the upstream-style reference."""
    from PIL import Image
    from torchvision import transforms as T

    if not isinstance(image, Image.Image):
        x = as_image(image)
        image = Image.fromarray((x.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8).squeeze())
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    base = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    crop = T.Compose([T.RandomResizedCrop(size, scale=scale)] + ([T.RandomHorizontalFlip()] if flip else []))
    pre = T.ToTensor() if normalize is None else T.Compose([T.ToTensor(), T.Normalize(*normalize)])
    out = [pre(base(image))] if include_original else []
    for _ in range(n_views - len(out)):
        v = crop(image)
        out.append(pil_augmix(v, rng, severity, preprocess=pre) if augmix_views else pre(v))
    return torch.stack(out)
