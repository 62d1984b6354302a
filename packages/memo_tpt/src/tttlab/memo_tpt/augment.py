"""Test-time views for MEMO and TPT: batched on the model's device, plus a per-view PIL reference.

MEMO (Zhang, Levine, Finn 2022) and TPT (Shu et al. 2022) classify 64 augmented views of every test
image.  Upstream builds each view with a Python loop over PIL operations and converts every AugMix chain
to a normalised float tensor separately (``ToTensor`` + ``Normalize`` per chain), which makes augmentation
the bottleneck.  Here one call builds all views of an image as one ``(n_views, C, size, size)`` float tensor
on the image's device, working on 8-bit pixels (PIL's arithmetic) until a single fused conversion at the end:

* :func:`random_resized_crop_boxes`: torchvision's ``RandomResizedCrop`` parameter draw (area fraction in
  ``scale``, log-uniform aspect ratio, 10 tries, then the centre-crop fallback; integer sizes/offsets),
  vectorised over views;
* :func:`crop_resize`: every crop resized to ``size`` with antialiased bilinear interpolation, PIL's
  ``resize`` filter (on CPU torch's uint8 kernel, which follows Pillow's fixed-point algorithm: within one grey
  level of PIL); a horizontal flip is a crop of the once-mirrored image (no per-view flip);
* :func:`augmix`: AugMix (Hendrycks et al. 2020, ``hendrycks2020augmix``): ``width`` chains of 1-3
  operations drawn from the nine non-ImageNet-C operations (autocontrast, equalize, posterize, solarize,
  rotate, shear x/y, translate x/y) on 8-bit pixels with PIL's arithmetic: autocontrast and equalize as PIL's
  per-channel look-up tables from a ``bincount`` histogram, applied with one ``index_select`` (on CPU, when
  numba is installed, two compiled loops over the 8-bit pixels instead: ~2x faster, bit-identical);
  posterize and solarize as bit operations; translations as exact integer shifts; rotate/shear as PIL's bilinear affine map
  (pixel centres, edge-clamped neighbours, ``fill`` outside: black as AugMix/TPT, or MEMO's PIL
  ``fillcolor=128``, which Pillow applies to RGB images as (128, 0, 0); truncation to 8 bits): shears as per-line
  shifts (overlapping-window ``index_select`` / band copies) and one lerp, rotations as four cached gathers
  and three lerps.  Runs of look-up-table operations in a chain are composed in level space (the histogram
  carried through the tables; bit-identical); the chains of a view share its histogram.  Chains are mixed
  with Dirichlet(alpha) weights and blended with the view by Beta(alpha, alpha), fused with the conversion
  to float and the normalisation;
* :func:`make_views`: the whole pipeline: the original (shorter side resized to ``size`` bicubic with
  antialiasing, as torchvision's ``Resize`` + ``CenterCrop``) first if ``include_original``, then crops
  (+ AugMix when asked), one view at a time through crop, chains and conversion (its working set stays in
  cache; measured faster on CPU than one call per operation over groups of views), written once into a
  channels-last float tensor (``mean``/``std``: normalised there too).

Differences to PIL that remain: resampling may differ by one grey level (torch's and Pillow's fixed-point
resize filters round differently); rotate/shear by one level on ~1e-5 of the pixels (float32 lerps vs PIL's
float64); views are built from the 8-bit image (a float input is quantised to 256 levels first, as the PIL
reference does).

All random numbers come from ``generator`` (a CPU ``torch.Generator``; the global RNG when None) and only
the few parameters move to the device, so a seed gives the same views on CPU and CUDA up to resampling
arithmetic.  :func:`pil_views` is the per-view reference in upstream's style (torchvision PIL transforms,
PIL ``ImageOps``, ``ToTensor`` + ``Normalize`` per chain) used by the tests and ``benchmarks/bench_memo_tpt.py``.
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
    "original_view",
    "pil_views",
    "random_resized_crop_boxes",
    "resize_center_crop",
    "seed002_augmix",
    "seed002_augmix_views",
]

AUGMIX_OPS = (
    "autocontrast", "equalize", "posterize", "solarize", "rotate", "shear_x", "shear_y", "translate_x",
    "translate_y",
)  # fmt: skip
GEOMETRIC = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}
_GENERIC = False  # tests: run the device-agnostic kernels on CPU too


def _fast_cpu(device: torch.device) -> bool:
    return device.type == "cpu" and not _GENERIC


def _check_tensor(t: torch.Tensor) -> None:
    if t.ndim != 3 or t.shape[0] not in (1, 3) or min(t.shape[1:]) < 2:
        raise InvalidInputError(f"image must be (C, H, W) with C in {{1, 3}}, got shape {tuple(t.shape)}")
    if not t.is_floating_point() and t.dtype != torch.uint8:
        raise InvalidInputError(f"image tensor must be uint8 or float, got {t.dtype}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise InvalidInputError("image contains NaN or inf")


def _from_array(image):
    """A PIL image or uint8 numpy array as a uint8 (C, H, W) tensor (a view of the HWC array, of a copy where
    the array is read-only); tensors as-is."""
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
        image = np.ascontiguousarray(image)
        if not image.flags.writeable:  # e.g. np.asarray of a PIL image: torch warns on such a view
            image = image.copy()
        return torch.from_numpy(image).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        return image
    raise InvalidInputError(f"image must be a numpy array, PIL image or tensor, got {type(image).__name__}")


def as_image(image, device=None) -> torch.Tensor:
    """One image as a float (C, H, W) tensor in [0, 1]: from uint8 HWC numpy, a PIL image, a uint8 CHW
    tensor or a float CHW tensor already in [0, 1]."""
    t = _from_array(image)
    _check_tensor(t)
    if device is not None:
        t = t.to(device)  # uint8 travels to the device before conversion (4x fewer bytes)
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255)
    return t


def _hwc_uint8(image, device=None) -> torch.Tensor:
    """One image as a contiguous uint8 (H, W, C) tensor on ``device``; float images in [0, 1] are quantised
    to 256 levels (``round(255 x)``), as PIL holds them."""
    t = _from_array(image)
    _check_tensor(t)
    if device is not None:
        t = t.to(device)
    if t.is_floating_point():
        t = t.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return t.permute(1, 2, 0).contiguous()


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
    """Float images (k, C, H, W) resampled through pixel-coordinate affine maps ``a`` (k, 2, 3) with
    ``grid_sample`` (no rounding; used by the tiny-CLIP training crops)."""
    theta = _theta(a.double(), tuple(x.shape[-2:]), tuple(out_hw)).to(x.dtype)
    ho, wo = out_hw
    # the sampling grid by broadcasting (affine_grid's batched matmul is several times slower on CPU)
    xs = (torch.arange(wo, device=x.device, dtype=x.dtype) * 2 + 1) / wo - 1
    ys = (torch.arange(ho, device=x.device, dtype=x.dtype) * 2 + 1) / ho - 1
    t = theta[:, :, :, None, None]  # (k, 2, 3, 1, 1)
    grid = t[:, :, 0] * xs[None, None, None, :] + (t[:, :, 1] * ys[None, None, :, None] + t[:, :, 2])
    grid = grid.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=False)


def _resize_hwc(region: torch.Tensor, hw: tuple[int, int], mode: str, out: torch.Tensor | None = None):
    """Antialiased resize of a uint8 (h, w, C) region to ``hw`` (PIL's ``resize`` filters): a uint8
    (1, C, H, W) channels-last tensor, written into ``out`` (the same) when given.  On CPU torch's uint8
    kernel (Pillow's algorithm); elsewhere in float32, rounded back to 8 bits."""
    x = region.permute(2, 0, 1)[None]
    if _fast_cpu(region.device):
        x = x.contiguous(memory_format=torch.channels_last)
        if out is not None and mode == "bilinear":
            try:
                return torch.ops.aten._upsample_bilinear2d_aa.out(x, list(hw), False, None, None, out=out)
            except (RuntimeError, AttributeError):  # pragma: no cover - other torch versions
                pass
        y = F.interpolate(x, size=hw, mode=mode, antialias=True, align_corners=False)
    else:
        y = F.interpolate(x.float(), size=hw, mode=mode, antialias=True, align_corners=False)
        y = y.round_().clamp_(0, 255).to(torch.uint8).contiguous(memory_format=torch.channels_last)
    if out is not None:
        out.copy_(y)
        return out
    return y


def _crops_hwc(src: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor | None):
    """Yields ``(i, region)``: the uint8 (h, w, C) region of box i (left, top, w, h) of the (H, W, C) image,
    taken from the once-mirrored image where ``flip`` (a resized mirrored crop is the resized crop of the
    mirrored box of the mirrored image: no per-view flip)."""
    w_img = src.shape[1]
    flips = [False] * len(boxes) if flip is None else [bool(f) for f in flip.tolist()]
    mirrored = src.flip(1) if any(flips) else None
    for i, ((left, top, w, h), f) in enumerate(zip(boxes.tolist(), flips)):
        if f:
            yield i, mirrored[top : top + h, w_img - left - w : w_img - left]
        else:
            yield i, src[top : top + h, left : left + w]


def crop_resize(image: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None,
                out: torch.Tensor | None = None):  # fmt: skip
    """Crops ``boxes`` (k, 4) of one (C, H, W) image, each resized to ``size`` x ``size`` (antialiased
    bilinear, PIL's filter) and mirrored where ``flip``: (k, C, size, size), uint8 for a uint8 image (one grey
    level from PIL's ``crop`` + ``resize``), float in [0, 1] for a float image (resampled in float)."""
    k, c = boxes.shape[0], image.shape[0]
    if image.dtype == torch.uint8:
        src = image.permute(1, 2, 0).contiguous()
        if out is None:
            out = torch.empty(k, c, size, size, dtype=torch.uint8, device=image.device,
                              memory_format=torch.channels_last)  # fmt: skip
        for i, region in _crops_hwc(src, boxes, flip):
            _resize_hwc(region, (size, size), "bilinear", out=out[i : i + 1])
        return out
    if out is None:
        out = torch.empty(k, c, size, size, dtype=image.dtype, device=image.device)
    flips = [False] * k if flip is None else [bool(f) for f in flip.tolist()]
    for i, ((left, top, w, h), f) in enumerate(zip(boxes.tolist(), flips)):
        y = F.interpolate(image[None, :, top : top + h, left : left + w], size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)[0].clamp_(0, 1)  # fmt: skip
        out[i] = y.flip(-1) if f else y
    return out


def _center_box(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` output size (shorter side ``size``, the longer one truncated)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def _original_hwc(src: torch.Tensor, size: int, resize: int | None = None, mode: str = "bicubic"):
    """torchvision ``Resize(resize or size, mode)`` + ``CenterCrop(size)`` of a uint8 (H, W, C) image, as PIL
    does it (antialiased filter on 8-bit pixels): uint8 (size, size, C)."""
    h, w, _ = src.shape
    resize = size if resize is None else int(resize)
    if resize < size or mode not in ("bicubic", "bilinear"):
        raise InvalidInputError(
            f"original view: resize={resize} must be >= size={size} and mode={mode!r} bicubic or bilinear"
        )
    nh, nw = _center_box(h, w, resize)
    if (nh, nw) != (h, w):
        src = _resize_hwc(src, (nh, nw), mode)[0].permute(1, 2, 0)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return src[top : top + size, left : left + size]


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size`` (bicubic, antialiased; torchvision's output size), centre crop ``size``: TPT's
    base view (C, size, size); uint8 in, uint8 out (PIL's 8-bit arithmetic), float in, float out."""
    if image.dtype == torch.uint8:
        return _original_hwc(image.permute(1, 2, 0).contiguous(), size).permute(2, 0, 1)
    c, h, w = image.shape
    nh, nw = _center_box(h, w, size)
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None], size=(nh, nw), mode="bicubic", antialias=True,
                              align_corners=False)[0].clamp(0, 1)  # fmt: skip
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return image[:, top : top + size, left : left + size]


# ----------------------------------------------------------------------------------------------------------
# AugMix operations on one uint8 (H, W, C) view, PIL's arithmetic.  On CPU a view and its chains stay in
# cache (one view at a time through its whole chains and the mix); each operation is a few vectorised
# torch calls on 8-bit pixels.

_CACHE: dict = {}  # per-shape/angle constants (channel offsets, rotation taps, fill templates), bounded
_CACHE_SIZE = 64


def _cached(key, make):
    value = _CACHE.get(key)
    if value is None:  # (safe if another thread clears the cache meanwhile)
        value = make()
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.clear()
        _CACHE[key] = value
    return value


def _to_uint8(v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Non-negative floats truncated to uint8 (PIL's ``(UINT8)`` cast), through int16 (float -> uint8 has no
    vectorised CPU kernel; float -> int16 -> uint8 is ~5x faster)."""
    v16 = v.to(torch.int16)
    if out is None:
        return v16.to(torch.uint8)
    return out.copy_(v16.view(out.shape))


def _lut_index(x: torch.Tensor) -> torch.Tensor:
    """int32 indices ``channel * 256 + pixel`` of a uint8 (H, W, C) view into its per-channel tables, flat."""
    h, w, c = x.shape
    chan = _cached(("chan", h * w, c, x.device), lambda: (torch.arange(c, dtype=torch.int32, device=x.device)
                                                          * 256).repeat(h * w))  # fmt: skip
    return x.reshape(-1).to(torch.int32).add_(chan)


def _apply_lut(x: torch.Tensor, idx: torch.Tensor, lut: np.ndarray) -> torch.Tensor:
    table = torch.from_numpy(np.ascontiguousarray(lut, dtype=np.uint8).reshape(-1)).to(x.device)
    return table.index_select(0, idx).view(x.shape)


def _histogram(x: torch.Tensor, idx: torch.Tensor) -> np.ndarray:
    return torch.bincount(idx, minlength=x.shape[-1] * 256).view(-1, 256).cpu().numpy()


def _autocontrast_table(hist: np.ndarray) -> np.ndarray:
    """PIL ``ImageOps.autocontrast`` (cutoff 0) tables from per-channel histograms (C, 256): lo/hi the
    first/last non-empty bins, lut[i] = int(i * scale + offset) clipped to 0..255 with scale = 255 / (hi - lo),
    offset = -lo * scale (float64, PIL's order of operations); identity where hi <= lo."""
    nz = hist > 0
    lo = nz.argmax(1).astype(np.float64)
    hi = 255 - nz[:, ::-1].argmax(1).astype(np.float64)
    scale = 255.0 / np.maximum(hi - lo, 1)
    offset = -lo * scale
    i = np.arange(256, dtype=np.float64)
    lut = np.clip(np.trunc(i * scale[:, None] + offset[:, None]), 0, 255)
    return np.where((hi > lo)[:, None], lut, i).astype(np.int64)


def _equalize_table(hist: np.ndarray) -> np.ndarray:
    """PIL ``ImageOps.equalize`` tables from per-channel histograms: step = (pixels - count of the last
    non-empty level) // 255, lut[i] = (step // 2 + pixels below i) // step (clipped to 255); identity where
    step is 0."""
    hist = hist.astype(np.int64)
    last = 255 - (hist[:, ::-1] > 0).argmax(1)
    step = (hist.sum(1) - hist[np.arange(len(hist)), last]) // 255
    below = np.cumsum(hist, 1) - hist
    lut = np.minimum((step[:, None] // 2 + below) // np.maximum(step, 1)[:, None], 255)
    return np.where((step > 0)[:, None], lut, np.arange(256))


def _histogram3(flat: np.ndarray) -> np.ndarray:
    """Per-channel histograms (3, 256) of interleaved 3-channel uint8 pixels (compiled by numba: two partial
    histograms so consecutive increments do not wait on each other)."""
    n = flat.shape[0] // 3
    h0 = np.zeros(768, np.int64)
    h1 = np.zeros(768, np.int64)
    for i in range(0, n - 1, 2):
        j = 3 * i
        h0[flat[j]] += 1
        h0[256 + flat[j + 1]] += 1
        h0[512 + flat[j + 2]] += 1
        h1[flat[j + 3]] += 1
        h1[256 + flat[j + 4]] += 1
        h1[512 + flat[j + 5]] += 1
    if n % 2:
        j = 3 * (n - 1)
        h0[flat[j]] += 1
        h0[256 + flat[j + 1]] += 1
        h0[512 + flat[j + 2]] += 1
    return (h0 + h1).reshape(3, 256)


def _apply_lut3(flat: np.ndarray, lut: np.ndarray, out: np.ndarray) -> None:
    """``out`` = per-channel tables ``lut`` (768,) = (3, 256) applied to interleaved 3-channel uint8 pixels
    (compiled by numba)."""
    n = flat.shape[0] // 3
    for i in range(n):
        j = 3 * i
        out[j] = lut[flat[j]]
        out[j + 1] = lut[256 + flat[j + 1]]
        out[j + 2] = lut[512 + flat[j + 2]]


def _blend4(s0, s1, s2, s3, coef: np.ndarray, scale: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    """``out = bias + scale * (coef_0 s0 + coef_1 s1 + coef_2 s2 + coef_3 s3)`` per channel, interleaved
    3-channel uint8 sources into float32 ``out`` in one pass (compiled by numba: a view and its three AugMix
    chains, mixed, ``ToTensor`` and ``Normalize``)."""
    c0, c1, c2, c3 = coef[0], coef[1], coef[2], coef[3]
    n = out.shape[0] // 3
    for i in range(n):
        for ch in range(3):
            j = 3 * i + ch
            v = (
                c0 * np.float32(s0[j])
                + c1 * np.float32(s1[j])
                + c2 * np.float32(s2[j])
                + c3 * np.float32(s3[j])
            )
            out[j] = v * scale[ch] + bias[ch]


_NUMBA = True  # CPU look-up-table kernels compiled by numba when it is installed (tests toggle this)
_KERNELS: dict = {}


def _numba_kernels():
    """``(histogram3, apply_lut3)`` compiled by numba (cached on disk next to this file), or None without
    numba.  Compiled on first use (about a second, once per machine with the on-disk cache)."""
    if not _NUMBA:
        return None
    if "lut" not in _KERNELS:
        try:
            import numba
        except ImportError:
            _KERNELS["lut"] = None
        else:
            _KERNELS["lut"] = None
            for cache in (True, False):  # an unreadable on-disk cache: compile in memory
                jit = numba.njit(cache=cache, nogil=True, boundscheck=False)
                kernels = (jit(_histogram3), jit(_apply_lut3))
                try:
                    probe = np.arange(6, dtype=np.uint8)
                    kernels[1](probe, kernels[0](probe).astype(np.uint8).reshape(-1), np.empty_like(probe))
                except Exception:  # noqa: BLE001 - numba's cache/compile errors vary by version
                    continue
                _KERNELS["lut"] = kernels
                break
    return _KERNELS["lut"]


def _numba_blend():
    """:func:`_blend4` compiled by numba, or None (no numba, or ``_NUMBA`` off)."""
    if not _NUMBA:
        return None
    if "blend" not in _KERNELS:
        _KERNELS["blend"] = None
        if _numba_kernels() is not None:
            import numba

            for cache in (True, False):
                kernel = numba.njit(cache=cache, nogil=True, boundscheck=False)(_blend4)
                try:
                    probe = np.arange(6, dtype=np.uint8)
                    one = np.ones(4, np.float32)
                    kernel(probe, probe, probe, probe, one, one, one, np.empty(6, np.float32))
                except Exception:  # noqa: BLE001 - numba's cache/compile errors vary by version
                    continue
                _KERNELS["blend"] = kernel
                break
    return _KERNELS["blend"]


def _lut_source(x: torch.Tensor):
    """``(hist, apply)``: the per-channel histogram (C, 256) int64 of a uint8 (H, W, C) view and a function
    applying per-channel tables (C, 256) to it.  On CPU with numba, 3 channels: two compiled loops over the
    8-bit pixels (~2x faster than torch here); otherwise one int32 index ``channel * 256 + pixel`` shared by
    a ``bincount`` and an ``index_select``.  Bit-identical (both are lookups).  Measured and not taken:
    Pillow's C ``histogram`` + ``point`` on the same pixels (with the unpack to and from PIL's 4-byte
    pixels) were no faster than torch on this CPU."""
    h, w, c = x.shape
    kernels = _numba_kernels() if c == 3 and _fast_cpu(x.device) else None
    if kernels is not None:
        histogram3, apply_lut3 = kernels
        flat = x.contiguous().numpy().reshape(-1)

        def apply(lut: np.ndarray) -> torch.Tensor:
            out = torch.empty(h, w, c, dtype=torch.uint8)
            apply_lut3(flat, np.ascontiguousarray(lut, dtype=np.uint8).reshape(-1), out.numpy().reshape(-1))
            return out

        return histogram3(flat), apply
    idx = _lut_index(x)
    return _histogram(x, idx).astype(np.int64), lambda lut: _apply_lut(x, idx, lut)


def _autocontrast(x: torch.Tensor, level: float = 0.0, sign: float = 1.0) -> torch.Tensor:
    """PIL ``ImageOps.autocontrast`` (cutoff 0) per channel (:func:`_autocontrast_table`)."""
    hist, apply = _lut_source(x)
    return apply(_autocontrast_table(hist))


def _equalize(x: torch.Tensor, level: float = 0.0, sign: float = 1.0) -> torch.Tensor:
    """PIL ``ImageOps.equalize`` per channel (:func:`_equalize_table`)."""
    hist, apply = _lut_source(x)
    return apply(_equalize_table(hist))


def _lut_run(x: torch.Tensor, run, source=None) -> torch.Tensor:
    """Consecutive look-up-table operations of a chain (``(fn, level, sign)``, at least one of them
    histogram-based) composed in level space, bit-identical to applying them one by one: each table is
    computed from the histogram the previous tables produce (hist'[c, j] = sum of hist[c, i] with
    lut[c, i] = j), the pixels are looked up once.  ``source``: ``x``'s :func:`_lut_source` when already
    computed (the chains of a view share their view's histogram)."""
    hist, apply = source or _lut_source(x)
    i = np.arange(256)
    total = np.broadcast_to(i, hist.shape).copy()
    for step, (fn, level, _) in enumerate(run):
        if fn is _autocontrast:
            lut = _autocontrast_table(hist)
        elif fn is _equalize:
            lut = _equalize_table(hist)
        elif fn is _posterize:
            lut = np.broadcast_to(_posterize_levels(i, level), hist.shape)
        else:
            lut = np.broadcast_to(_solarize_levels(i, level), hist.shape)
        total = np.take_along_axis(lut, total, 1)
        if step + 1 < len(run):
            hist = np.stack([np.bincount(lut[c], weights=hist[c], minlength=256) for c in range(len(hist))])
            hist = hist.astype(np.int64)
    return apply(total)


def _posterize_levels(i: np.ndarray, level: float) -> np.ndarray:
    bits = min(8, max(0, 4 - int(level * 4 / 10)))
    return i & (255 - (2 ** (8 - bits) - 1))


def _solarize_levels(i: np.ndarray, level: float) -> np.ndarray:
    t = 256 - int(level * 256 / 10)
    return np.where(i >= t, 255 - i, i)


def _posterize(x: torch.Tensor, level: float, sign: float = 1.0) -> torch.Tensor:
    """PIL ``posterize(bits = 4 - int(level * 4 / 10))``: pixel & ~(2 ** (8 - bits) - 1)."""
    bits = min(8, max(0, 4 - int(level * 4 / 10)))
    return x & (255 - (2 ** (8 - bits) - 1))


def _solarize(x: torch.Tensor, level: float, sign: float = 1.0) -> torch.Tensor:
    """PIL ``solarize(threshold = 256 - int(level * 256 / 10))``: 255 - pixel where pixel >= threshold.  In
    8-bit arithmetic: clamp(pixel, t - 1, t) - (t - 1) is 1 exactly where pixel >= t; 255 - p = p ^ 255."""
    t = 256 - int(level * 256 / 10)
    if t > 255:
        return x.clone()
    if t <= 0:
        return torch.bitwise_not(x)
    return x.clamp(t - 1, t).sub_(t - 1).mul_(255).bitwise_xor_(x)


def _fill_tensor(fill, c: int, device) -> torch.Tensor | None:
    """The per-channel uint8 fill (C,) of the geometric operations, None for black (the fast path)."""
    if fill is None:
        return None
    if isinstance(fill, torch.Tensor) and fill.dtype == torch.uint8 and fill.shape == (c,):
        return fill if bool(fill.any()) else None
    vals = [int(fill)] * c if isinstance(fill, (int, float)) else [int(v) for v in fill]
    if c == 1 and len(vals) > 1:
        vals = vals[:1]  # PIL: an "L" image takes the first value (an integer colour is the grey level)
    if len(vals) != c or not all(0 <= v <= 255 for v in vals):
        raise InvalidInputError(f"fill={fill!r}: expected one or {c} grey levels in 0..255")
    if not any(vals):
        return None
    return _cached(
        ("fillc", tuple(vals), device), lambda: torch.tensor(vals, dtype=torch.uint8, device=device)
    )


def _mask_fill(out: torch.Tensor, keep: torch.Tensor, fill_mask: torch.Tensor | None) -> torch.Tensor:
    """``out & keep`` (keep: 0/255 per element) and, with a fill, ``| fill_mask`` (``~keep & fill``, which
    the callers cache or gather like ``keep``, so a fill costs one more pass, not three)."""
    out.bitwise_and_(keep)
    if fill_mask is not None:
        out.view(-1).bitwise_or_(fill_mask.view(-1))
    return out


def _translate(x: torch.Tensor, level: float, sign: float, dim: int, fill=None) -> torch.Tensor:
    """PIL's bilinear affine map with an integer offset is an exact shift, filled with ``fill`` (black by
    default) where it leaves the image."""
    n = x.shape[dim]
    d = max(-n, min(n, int(level * (n / 3) / 10) * int(sign)))
    f = _fill_tensor(fill, x.shape[2], x.device)
    if f is None:
        out = torch.zeros_like(x)
    else:  # a contiguous copy of a cached filled image (cloning the broadcast (C,) fill is 10x slower)
        out = _cached(("fillimg", tuple(x.shape), tuple(f.tolist()), x.device),
                      lambda: f.expand(x.shape).contiguous()).clone()  # fmt: skip
    if abs(d) < n:
        out.narrow(dim, max(-d, 0), n - abs(d)).copy_(x.narrow(dim, max(d, 0), n - abs(d)))
    return out


def _translate_x(x, level, sign, fill=None):
    return _translate(x, level, sign, 1, fill)


def _translate_y(x, level, sign, fill=None):
    return _translate(x, level, sign, 0, fill)


def _offsets(s: float, n: int):
    """Per-line offsets t = s * (i + 0.5) (float64) of a shear: floor(t), t - floor(t)."""
    t = s * (np.arange(n, dtype=np.float64) + 0.5)
    fl = np.floor(t)
    return t, fl.astype(np.int64), t - fl


def _shear_x(x: torch.Tensor, level: float, sign: float, fill=None) -> torch.Tensor:
    """PIL's bilinear ``transform`` with data (1, s, 0, 0, 1, 0), s = level * 0.3 / 10 * sign: with the row
    offset t = s * (y + 0.5), out[y, x] = a + (b - a) * d truncated, a/b the row's pixels x + floor(t) and
    + 1 (edge-clamped), d = t - floor(t); 0 where x + 0.5 + t is outside [0, W).  Both taps of all rows are
    ``index_select`` of overlapping windows over the edge-padded rows; the fill is a window of a
    [0]*W + [255]*W + [0]*W template (one side of a row is cut)."""
    h, w, c = x.shape
    t, n, d = _offsets(level * 0.3 / 10 * sign, h)
    p = int(np.abs(n).max()) + 2
    wp = w + 2 * p
    pad = torch.empty(h, wp, c, dtype=x.dtype, device=x.device)
    pad[:, p : p + w] = x
    pad[:, :p] = x[:, :1]
    pad[:, p + w :] = x[:, w - 1 :]
    win = pad.view(-1).unfold(0, w * c, c)  # window j: pixels j .. j + w - 1 of the padded rows
    start = torch.from_numpy(np.arange(h) * wp + p + n).to(x.device)
    a = win.index_select(0, start).float()
    v = torch.lerp(
        a, win.index_select(0, start + 1).float(), torch.from_numpy(d).float().to(x.device)[:, None]
    )
    out = _to_uint8(v)
    lo = np.clip(np.ceil(-0.5 - t), 0, w).astype(np.int64)
    hi = np.clip(np.ceil(w - 0.5 - t), 0, w).astype(np.int64)
    tmpl = _cached(("fill", w, c, x.device), lambda: torch.cat([
        torch.zeros(w * c, dtype=torch.uint8), torch.full((w * c,), 255, dtype=torch.uint8),
        torch.zeros(w * c, dtype=torch.uint8)]).to(x.device).unfold(0, w * c, c))  # fmt: skip
    idx = torch.from_numpy(np.where(hi < w, 2 * w - hi, w - lo)).to(x.device)
    keep = tmpl.index_select(0, idx)
    f = _fill_tensor(fill, c, x.device)
    fill_mask = None
    if f is not None:  # the same windows of a [fill]*W + [0]*W + [fill]*W template give ~keep & fill
        ftmpl = _cached(("filltmpl", w, c, tuple(f.tolist()), x.device), lambda: torch.cat([
            f.repeat(w), torch.zeros(w * c, dtype=torch.uint8, device=x.device), f.repeat(w)]).unfold(0, w * c, c))  # fmt: skip
        fill_mask = ftmpl.index_select(0, idx)
    return _mask_fill(out, keep, fill_mask).view(h, w, c)


def _shear_y(x: torch.Tensor, level: float, sign: float, fill=None) -> torch.Tensor:
    """PIL's bilinear ``transform`` with data (1, 0, 0, s, 1, 0): with the column offset t = s * (x + 0.5),
    out[y, x] = a + (b - a) * d, a/b the column's pixels y + floor(t) and + 1 (edge-clamped), 0 where
    y + 0.5 + t is outside [0, H).  floor(t) is monotone in x: each band of columns with one shift is two
    slice copies from the edge-padded view; each band with one cut is one slice fill."""
    h, w, c = x.shape
    t, n, d = _offsets(level * 0.3 / 10 * sign, w)
    p = int(np.abs(n).max()) + 2
    pad = torch.empty(h + 2 * p, w, c, dtype=x.dtype, device=x.device)
    pad[p : p + h] = x
    pad[:p] = x[:1]
    pad[p + h :] = x[h - 1 :]
    taps = torch.empty(h + 1, w, c, dtype=x.dtype, device=x.device)  # a = taps[:h], b = taps[1:]
    nl = n.tolist()
    edges = [0] + (np.flatnonzero(np.diff(n)) + 1).tolist() + [w]
    for xa, xb in zip(edges[:-1], edges[1:]):
        s = p + nl[xa]
        taps[:, xa:xb] = pad[s : s + h + 1, xa:xb]
    taps = taps.view(h + 1, w * c).float()
    d = torch.from_numpy(np.repeat(d, c)).float().to(x.device)
    out = _to_uint8(torch.lerp(taps[:h], taps[1:], d)).view(h, w, c)
    lo = np.clip(np.ceil(-0.5 - t), 0, h).astype(np.int64)
    hi = np.clip(np.ceil(h - 0.5 - t), 0, h).astype(np.int64)
    edges = [0] + (np.flatnonzero(np.diff(lo) | np.diff(hi)) + 1).tolist() + [w]
    lo, hi = lo.tolist(), hi.tolist()
    f = _fill_tensor(fill, c, x.device)
    f = 0 if f is None else f
    for xa, xb in zip(edges[:-1], edges[1:]):
        if lo[xa] > 0:
            out[: lo[xa], xa:xb] = f
        if hi[xa] < h:
            out[hi[xa] :, xa:xb] = f
    return out


def _rotation_matrix(deg: float, h: int, w: int) -> tuple[float, ...]:
    """PIL ``Image.rotate(deg)``'s affine data (output pixel -> input), computed as PIL does."""
    angle = -math.radians(deg)
    a, b, d, e = (round(math.cos(angle), 15), round(math.sin(angle), 15), round(-math.sin(angle), 15),
                  round(math.cos(angle), 15))  # fmt: skip
    cx, cy = w / 2, h / 2
    c = a * -cx + b * -cy + 0.0 + cx
    f = d * -cx + e * -cy + 0.0 + cy
    return a, b, c, d, e, f


def _affine_taps(data: tuple[float, ...], h: int, w: int, c: int, device):
    """PIL's bilinear sampling of affine ``data`` as a gather: flat element indices (H * W * C, int32) of the
    top-left neighbour in the image padded by one edge-replicated pixel on each side (the other three
    neighbours are at + C, + (W + 2) * C and both: PIL's edge clamping), the weights dx, dy and the 0/255
    keep mask (sampling point inside the image), computed in float64 as PIL does."""
    a0, a1, a2, a3, a4, a5 = data
    xin = np.arange(w, dtype=np.float64) + 0.5
    yin = np.arange(h, dtype=np.float64)[:, None] + 0.5
    xs = a0 * xin + a1 * yin + a2
    ys = a3 * xin + a4 * yin + a5
    keep = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    u, v = xs - 0.5, ys - 0.5
    x0, y0 = np.floor(u), np.floor(v)
    dx, dy = u - x0, v - y0
    col = np.clip(x0.astype(np.int64) + 1, 0, w)  # padded coordinates; kept points lie in [0, w]
    row = np.clip(y0.astype(np.int64) + 1, 0, h)
    tap = ((row * (w + 2) + col)[..., None] * c + np.arange(c)).reshape(-1).astype(np.int32)

    def per_elem(a, dtype):
        return torch.from_numpy(np.ascontiguousarray(np.repeat(a[..., None], c, -1).reshape(-1), dtype)).to(
            device
        )

    return torch.from_numpy(tap).to(device), per_elem(dx, np.float32), per_elem(dy, np.float32), per_elem(
        keep * 255, np.uint8)  # fmt: skip


def _rotate(x: torch.Tensor, level: float, sign: float, fill=None) -> torch.Tensor:
    """PIL ``rotate(int(level * 30 / 10) * sign, BILINEAR)``: per angle cached gather indices, PIL's nested
    interpolation (along rows, then between rows) in float32, truncated; 0 where the sampling point is
    outside.  Angle 0 is the view itself (PIL's shortcut copies it)."""
    h, w, c = x.shape
    deg = int(level * 30 / 10) * sign
    if deg % 360 == 0:
        return x  # (operations never write into their input)
    tap, dx, dy, keep = _cached(
        ("rot", deg, h, w, c, x.device), lambda: _affine_taps(_rotation_matrix(deg, h, w), h, w, c, x.device)
    )
    pad = torch.empty(h + 2, w + 2, c, dtype=torch.float32, device=x.device)
    pad[1:-1, 1:-1] = x
    pad[1:-1, 0], pad[1:-1, -1] = x[:, 0], x[:, -1]
    pad[0], pad[-1] = pad[1], pad[-2]
    flat = pad.view(-1)
    row = (w + 2) * c
    top = torch.lerp(flat.index_select(0, tap), flat[c:].index_select(0, tap), dx)
    bottom = torch.lerp(flat[row:].index_select(0, tap), flat[row + c :].index_select(0, tap), dx)
    out = _to_uint8(torch.lerp(top, bottom, dy))
    f = _fill_tensor(fill, c, x.device)
    fill_mask = None if f is None else _cached(
        ("rotfill", deg, h, w, c, tuple(f.tolist()), x.device), lambda: keep.bitwise_not().bitwise_and_(f.repeat(h * w))
    )  # fmt: skip
    return _mask_fill(out, keep, fill_mask).view(h, w, c)


_OPS = {
    "autocontrast": _autocontrast, "equalize": _equalize, "posterize": _posterize, "solarize": _solarize,
    "rotate": _rotate, "shear_x": _shear_x, "shear_y": _shear_y, "translate_x": _translate_x,
    "translate_y": _translate_y,
}  # fmt: skip


_LUT_OPS = (_autocontrast, _equalize, _posterize, _solarize)
_GEOMETRIC_OPS = (_rotate, _shear_x, _shear_y, _translate_x, _translate_y)


def _op(op: str):
    if op not in _OPS:
        raise InvalidInputError(f"unknown AugMix operation {op!r}; expected one of {AUGMIX_OPS}")
    return _OPS[op]


def apply_op(op: str, q: torch.Tensor, level: torch.Tensor, sign: torch.Tensor, fill=0) -> torch.Tensor:
    """One AugMix operation on views ``q`` (k, C, H, W) of grey levels (floats 0..255, integral) with
    per-view ``level`` (AugMix's 0.1..severity) and ``sign`` (+-1), geometric ones filling with ``fill``
    (grey level or one per channel); returns grey levels (k, C, H, W)."""
    fn = _op(op)
    x = q.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    kw = {"fill": fill} if fn in _GEOMETRIC_OPS else {}
    out = [
        fn(x[i].contiguous(), float(lv), float(sg), **kw)
        for i, (lv, sg) in enumerate(zip(level.tolist(), sign.tolist()))
    ]
    return torch.stack(out).permute(0, 3, 1, 2).to(q.dtype)


class _Draws:
    """AugMix's random parameters for k views (drawn up front, in one order, from ``generator``): chain
    lengths, per step the operation, level and sign of every chain (view i, chain c at i * width + c), and
    the mixing coefficients (k, 1 + width) of [view, chain_1..chain_width]: m and (1 - m) * w_c with
    w ~ Dirichlet(alpha), m ~ Beta(alpha, alpha).  ``fill``: what the geometric operations write where they
    leave the image (AugMix / TPT: black; MEMO: PIL's ``fillcolor=128``, i.e. (128, 0, 0) on RGB)."""

    def __init__(self, k, generator, severity=1.0, width=3, depth=(1, 3), alpha=1.0, ops=AUGMIX_OPS, fill=0):
        unknown = [op for op in ops if op not in AUGMIX_OPS]
        if unknown:
            raise InvalidInputError(f"unknown AugMix operations {unknown}; expected some of {AUGMIX_OPS}")
        total = k * width
        self.width, self.fill = width, fill
        self.lengths = torch.randint(depth[0], depth[1] + 1, (total,), generator=generator).tolist()
        self.steps = []
        for _ in range(depth[1]):
            choice = torch.randint(len(ops), (total,), generator=generator).tolist()
            level = (
                0.1 + (severity - 0.1) * torch.rand(total, generator=generator, dtype=torch.float64)
            ).tolist()
            sign = torch.where(torch.rand(total, generator=generator) < 0.5, -1.0, 1.0).tolist()
            self.steps.append([(_OPS[ops[o]], lv, sg) for o, lv, sg in zip(choice, level, sign)])
        gam = torch.distributions.Gamma(torch.full((k, width), float(alpha), dtype=torch.float64), 1.0)
        w = _sample(gam, generator)
        w = w / w.sum(1, keepdim=True)
        if alpha == 1.0:
            m = torch.rand(k, generator=generator, dtype=torch.float64)
        else:
            ga, gb = (_sample(torch.distributions.Gamma(torch.full((k,), float(alpha)), 1.0), generator)
                      for _ in range(2))  # fmt: skip
            m = ga / (ga + gb)
        self.coef = torch.cat([m[:, None], (1 - m[:, None]) * w], 1).float()

    def chain(self, x: torch.Tensor, i: int, c: int, shared: dict | None = None) -> torch.Tensor:
        """Chain ``c`` of view ``i`` applied to its uint8 (H, W, C) view; runs of look-up-table operations
        with a histogram-based one are composed into one look-up (:func:`_lut_run`); ``shared`` (one dict per
        view) keeps the view's histogram for the other chains that start with such a run."""
        j = i * self.width + c
        ops = [self.steps[step][j] for step in range(self.lengths[j])]
        k = 0
        while k < len(ops):
            r = k
            while r < len(ops) and ops[r][0] in _LUT_OPS:
                r += 1
            if any(op[0] in (_autocontrast, _equalize) for op in ops[k:r]):
                source = None
                if k == 0 and shared is not None:
                    source = shared.get("lut_source")
                    if source is None:
                        source = shared["lut_source"] = _lut_source(x)
                x = _lut_run(x, ops[k:r], source)
                k = r
            else:
                fn, level, sign = ops[k]
                x = fn(x, level, sign, self.fill) if fn in _GEOMETRIC_OPS else fn(x, level, sign)
                k += 1
        return x


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


def _norm(mean, std, c: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and bias taking 8-bit levels to ``(x / 255 - mean) / std`` (float32)."""
    m = torch.zeros(c, dtype=torch.float64) if mean is None else torch.as_tensor(mean, dtype=torch.float64)
    s = torch.ones(c, dtype=torch.float64) if std is None else torch.as_tensor(std, dtype=torch.float64)
    m, s = m.expand(c), s.expand(c)
    return (1 / (255 * s)).float().to(device), (-m / s).float().to(device)


class _Writer:
    """Writes view i of a channels-last float output (k, H, W, C) as ``bias + scale * sum_s coef_s * src_s``
    of uint8 (H, W, C) sources (the view and its AugMix chains; PIL's blend ``m * view + (1 - m) * sum_c w_c
    chain_c`` and ``ToTensor`` + ``Normalize``): the heaviest source converted into the output, the others
    added with their weight ratios through one reused float buffer, then one fused per-channel scale and
    shift, on data still in cache (measured faster here than one (1, 4) x (4, N) matrix product)."""

    def __init__(self, out_hwc: torch.Tensor, mean, std, n_src: int = 1):
        _, h, w, c = out_hwc.shape
        self.out = out_hwc
        scale, bias = _norm(mean, std, c, out_hwc.device)
        self.scale_row, self.bias_row = scale.repeat(w), bias.repeat(w)
        self.tmp = torch.empty(h * w * c, dtype=out_hwc.dtype, device=out_hwc.device) if n_src > 1 else None
        fused = (
            c == 3
            and out_hwc.dtype == torch.float32
            and _fast_cpu(out_hwc.device)
            and out_hwc[0].is_contiguous()
        )
        self.blend = _numba_blend() if fused else None
        if self.blend is not None:
            self.scale_np, self.bias_np = scale.cpu().numpy(), bias.cpu().numpy()

    def __call__(self, i: int, sources, coef: torch.Tensor | None = None) -> None:
        o = self.out[i]
        if self.blend is not None and len(sources) == 4:  # one compiled pass (CPU, numba; AugMix width 3)
            cf = coef.to(torch.float32).numpy()
            srcs = [src.contiguous().numpy().reshape(-1) for src in sources]
            self.blend(*srcs, cf, self.scale_np, self.bias_np, o.numpy().reshape(-1))
            return
        if len(sources) == 1:
            o.copy_(sources[0])
            rows = o.view(-1, self.scale_row.numel())
            torch.addcmul(self.bias_row, rows, self.scale_row, out=rows)
            return
        # sum_s coef_s src_s = coef_b * (src_b + sum_{s != b} (coef_s / coef_b) src_s), b the largest weight
        cl = coef.tolist()
        b = max(range(len(cl)), key=cl.__getitem__)
        o.copy_(sources[b])
        flat = o.view(-1)
        for s, src in enumerate(sources):
            if s != b:
                flat.add_(self.tmp.copy_(src.reshape(-1)), alpha=cl[s] / cl[b])
        rows = o.view(-1, self.scale_row.numel())
        torch.addcmul(self.bias_row, rows, self.scale_row * cl[b], out=rows)


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
    fill=0,
) -> torch.Tensor:
    """AugMix of each of the (k, C, H, W) views in [0, 1] (quantised to 256 levels, as PIL holds them):
    ``m * view + (1 - m) * sum_c w_c chain_c(view)`` with ``w ~ Dirichlet(alpha)``, ``m ~ Beta(alpha, alpha)``,
    chains of ``depth`` operations; float (k, C, H, W) in [0, 1], channels-last.  (The AugMix code writes
    ``(1 - m) * image + m * mix``; Beta(alpha, alpha) is symmetric, so the views have the same distribution,
    but the views of a given seed are not those of a port that draws ``m`` for the other term.)"""
    k, c, h, w = views.shape
    draws = _Draws(k, generator, severity, width, depth, alpha, ops, fill)
    x = views.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    out = torch.empty(k, c, h, w, dtype=views.dtype, device=views.device, memory_format=torch.channels_last)
    write = _Writer(out.permute(0, 2, 3, 1), None, None, 1 + width)
    for i in range(k):
        shared: dict = {}
        write(i, [x[i]] + [draws.chain(x[i], i, j, shared) for j in range(width)], draws.coef[i])
    return out


# ----------------------------------------------------------------------------------------------------------
# the pipeline


def _empty_views(shape, device) -> torch.Tensor:
    """A channels-last float32 (n, C, S, S) tensor.  On CPU through numpy, whose allocator asks the kernel
    for transparent huge pages on large arrays: the 38.5 MB of 64 views at 224 px then cost ~500x fewer page
    faults on first touch (measured: allocate + fill 12 ms vs 35 ms with torch's allocator, 2 cores)."""
    n, c, h, w = shape
    if device.type == "cpu":
        return torch.from_numpy(np.empty((n, h, w, c), dtype=np.float32)).permute(0, 3, 1, 2)
    return torch.empty(shape, dtype=torch.float32, device=device, memory_format=torch.channels_last)


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
    mean=None,
    std=None,
    out: torch.Tensor | None = None,
    fill=0,
) -> torch.Tensor:
    """``n_views`` views (n_views, C, size, size) of one image (any size) on ``device`` (default: the image's),
    float32 in [0, 1], or normalised ``(x - mean) / std`` when ``mean``/``std`` are given, in channels-last
    memory (or written into ``out``).  TPT on ImageNet variants: ``include_original=True,
    augmix_views=False``; TPT on fine-grained sets: ``augmix_views=True``; MEMO: ``include_original=False,
    augmix_views=True``; seed 002's ``cut`` MEMO augmentation: ``include_original=False, augmix_views=False``
    (crops and flips only).  ``fill``: the AugMix geometric operations' fill (grey level or one per channel;
    TPT: 0, MEMO: (128, 0, 0)).  Each view goes through its crop, AugMix chains and the conversion to float
    before the next one starts (its working set stays in cache)."""
    if not isinstance(n_views, int) or n_views < 1:
        raise InvalidInputError(f"n_views must be a positive integer, got {n_views!r}")
    src = _hwc_uint8(image, device)
    h, w, c = src.shape
    dev = src.device
    k = n_views - 1 if include_original else n_views
    shape = (n_views, c, size, size)
    direct = (out is not None and tuple(out.shape) == shape and out.dtype == torch.float32
              and out.device == dev and out.is_contiguous(memory_format=torch.channels_last))  # fmt: skip
    views = out if direct else _empty_views(shape, dev)
    out_hwc = views.permute(0, 2, 3, 1)
    if include_original:
        _Writer(out_hwc, mean, std)(0, [_original_hwc(src, size)])
    if k > 0:
        boxes = random_resized_crop_boxes(k, h, w, scale=scale, generator=generator)
        flips = torch.rand(k, generator=generator) < 0.5 if flip else None
        draws = _Draws(k, generator, severity, fill=fill) if augmix_views else None
        width = draws.width if augmix_views else 0
        write = _Writer(out_hwc[n_views - k :], mean, std, 1 + width)
        crop = torch.empty(1, c, size, size, dtype=torch.uint8, device=dev, memory_format=torch.channels_last)
        for i, region in _crops_hwc(src, boxes, flips):
            x = _resize_hwc(region, (size, size), "bilinear", out=crop)[0].permute(1, 2, 0)
            if draws is None:
                write(i, [x])
            else:
                shared: dict = {}
                write(i, [x] + [draws.chain(x, i, j, shared) for j in range(width)], draws.coef[i])
    if out is not None and not direct:
        return out.copy_(views)
    return views


#: seed 002's ``--augmix`` / ``aug_type='augmix'`` views (its ``EasyAgumenter``): torchvision's
#: ``transforms.v2.AugMix()`` constructed without arguments, i.e. these values (torchvision 0.17-0.29):
#: severity 3 (each operation's magnitude one of the first 3 of its 10 bins, a random sign where signed), 3 chains of 1-3 operations (``chain_depth=-1``), Dirichlet / Beta
#: alpha 1, all 13 operations (``all_ops``: the 9 of the AugMix paper plus brightness, color, contrast,
#: sharpness), bilinear geometric operations filled black; on the whole image, then ``Resize(size)`` bicubic +
#: ``CenterCrop(size)``: no random crop or flip.
SEED002_AUGMIX = {"severity": 3, "mixture_width": 3, "chain_depth": -1, "alpha": 1.0, "all_ops": True}


def seed002_augmix():
    """torchvision's ``AugMix`` with seed 002's (torchvision's default) parameters, :data:`SEED002_AUGMIX`."""
    from torchvision.transforms.v2 import AugMix

    return AugMix(**SEED002_AUGMIX)


def seed002_augmix_views(
    image, n_views: int, size: int, *, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """``n_views`` views (n_views, C, size, size), float32 in [0, 1] on ``device``, as seed 002's ``augmix``
    flag makes them: :func:`seed002_augmix` of the whole uint8 image, then :func:`resize_center_crop` (TPT's
    ``Resize(size, bicubic)`` + ``CenterCrop(size)`` with PIL's arithmetic).  torchvision draws from torch's
    global generator: it runs on a fork of it seeded from one draw of ``generator``, so the views depend on
    ``generator`` only and the global state is left as it was.  Runs on the CPU (torchvision's AugMix on a
    full-size image), one view at a time."""
    if not isinstance(n_views, int) or n_views < 1:
        raise InvalidInputError(f"n_views must be a positive integer, got {n_views!r}")
    src = _hwc_uint8(image, torch.device("cpu")).permute(2, 0, 1)  # (C, H, W) uint8, as AugMix takes it
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    aug = seed002_augmix()
    views = torch.empty((n_views, src.shape[0], size, size), dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(n_views):
            views[i] = resize_center_crop(aug(src), size).float().div_(255)
    return views.to(device) if device is not None else views


def original_view(image, size: int, device=None, mean=None, std=None, *, resize: int | None = None,
                  interpolation: str = "bicubic") -> torch.Tensor:  # fmt: skip
    """The original view (1, C, size, size): by default exactly as :func:`make_views` builds it
    (``include_original``: TPT's ``Resize(size, bicubic)`` + ``CenterCrop(size)``); ``resize`` /
    ``interpolation`` give other test transforms, e.g. MEMO's ``Resize(256)`` (bilinear) + ``CenterCrop(224)``
    with ``resize=256, interpolation="bilinear"``."""
    if resize is None and interpolation == "bicubic":
        return make_views(image, 1, size, include_original=True, device=device, mean=mean, std=std)
    src = _hwc_uint8(image, device)
    views = _empty_views((1, src.shape[2], size, size), src.device)
    _Writer(views.permute(0, 2, 3, 1), mean, std)(0, [_original_hwc(src, size, resize, interpolation)])
    return views


# ----------------------------------------------------------------------------------------------------------
# per-view PIL reference (upstream style)


def _pil_op(op: str, img, level: float, sign: float, fillcolor=None):
    """One AugMix operation with PIL (``fillcolor``: PIL's argument of rotate/transform, None = black)."""
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
        return img.rotate(int(level * 30 / 10) * sign, resample=Image.BILINEAR, fillcolor=fillcolor)
    data = {
        "shear_x": (1, level * 0.3 / 10 * sign, 0, 0, 1, 0),
        "shear_y": (1, 0, 0, level * 0.3 / 10 * sign, 1, 0),
        "translate_x": (1, 0, int(level * (w / 3) / 10) * sign, 0, 1, 0),
        "translate_y": (1, 0, 0, 0, 1, int(level * (h / 3) / 10) * sign),
    }[op]
    return img.transform(img.size, Image.AFFINE, data, resample=Image.BILINEAR, fillcolor=fillcolor)


def pil_augmix(img, rng: np.random.Generator, severity: float = 1.0, width: int = 3, ops=AUGMIX_OPS,
               preprocess=None, fillcolor=None):  # fmt: skip
    """AugMix on one PIL image, each chain converted by ``preprocess`` (default ``to_tensor``; upstream:
    ``to_tensor`` + ``Normalize``) and mixed as tensors, as upstream does; ``fillcolor``: PIL's argument of
    the geometric operations (upstream MEMO: 128)."""
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
            aug = _pil_op(op, aug, float(rng.uniform(0.1, severity)), float(rng.choice([-1, 1])), fillcolor)
        mix += float(w[c]) * to_tensor(aug)
    return m * orig + (1 - m) * mix


def pil_views(image, n_views: int, size: int, *, include_original=True, augmix_views=False, flip=True,
              scale=(0.08, 1.0), severity: float = 1.0, seed: int = 0, normalize=None,
              fillcolor=None) -> torch.Tensor:  # fmt: skip
    """The same views as :func:`make_views`, one PIL view at a time (torchvision ``RandomResizedCrop`` +
    ``RandomHorizontalFlip`` on the PIL image, PIL AugMix, ``to_tensor`` per chain, and ``Normalize(*normalize)``
    per chain when given, as upstream's ``preprocess``): the upstream-style reference."""
    from PIL import Image
    from torchvision import transforms as T

    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        image = Image.fromarray(image)  # no float round trip: the reference pays only for its own work
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
        out.append(
            pil_augmix(v, rng, severity, preprocess=pre, fillcolor=fillcolor) if augmix_views else pre(v)
        )
    return torch.stack(out)
