"""Batched, seeded image augmentations on NCHW tensors (any device), for the self-supervised engines.

Every function draws its random numbers with ``torch.rand(..., generator=generator)`` (the global torch RNG
when ``generator`` is None) on the generator's device (CPU by default) and moves the few parameters to the
data's device, so results are deterministic under ``torch.manual_seed`` and identical on CPU and CUDA
up to the resampling arithmetic.  Each image gets its own random parameters in one batched call (upstream
torch-ttt drew one crop for the whole batch, always anchored at the top-left corner, with Python's
``random``).

* :func:`random_resized_crop_flip`: a random area/aspect crop at a random place, resized back to the input
  size with bilinear sampling, mirrored with probability ``flip_p`` (one ``grid_sample`` for the batch).
* :func:`random_grayscale`, :func:`random_gaussian_blur`: per-image, with probability ``p``.
* :func:`adjust_colors`, :func:`random_color_jitter`: brightness, contrast, saturation and hue changes of
  images in [0, 1] (torchvision's ``ColorJitter`` maths, clamped to [0, 1]), each image with its own
  factors and its own random order of the four changes, applied with probability ``p``.
* :func:`simclr_views`: torch-ttt's SimCLR view pipeline for its TTT++ engine (crop 0.2-1 + flip,
  grayscale p=0.2, 5-tap Gaussian blur p=0.3).
* :func:`official_ttt_pp_views`: the TTT++ code's own views (``cifar/utils/prepare_dataset.py``): crop
  0.2-1 + flip, colour jitter (brightness, contrast, saturation 0.4, hue 0.1) with p=0.8, grayscale p=0.2,
  no blur, in pixel space (un-normalised with the given mean / std, normalised back).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tttlab.core.errors import InvalidInputError

__all__ = [
    "adjust_colors",
    "official_ttt_pp_views",
    "random_color_jitter",
    "random_gaussian_blur",
    "random_grayscale",
    "random_resized_crop_flip",
    "simclr_views",
]

#: ITU-R 601 luma weights of R, G, B (grayscale, and the grey that contrast and saturation blend towards).
LUMA = (0.299, 0.587, 0.114)


def _rand(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64).to(device)


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise InvalidInputError(
            f"expected a float NCHW image batch, got {getattr(x, 'shape', type(x).__name__)}"
        )


def random_resized_crop_flip(
    x: torch.Tensor,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-image random resized crop (area fraction in ``scale``, aspect ratio in ``ratio``) + horizontal
    flip with probability ``flip_p``; output has the input's size."""
    _check_images(x)
    n = x.shape[0]
    u = _rand(4 * n, generator, x.device).view(4, n)
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
    aspect = log_r.exp()
    width = (area * aspect).sqrt().clamp(max=1.0)  # fractions of the full width / height
    height = (area / aspect).sqrt().clamp(max=1.0)
    cx = (u[2] * 2 - 1) * (1 - width)  # crop centre in [-1, 1] coordinates, crop stays inside
    cy = (u[3] * 2 - 1) * (1 - height)
    flip = _rand(n, generator, x.device) < flip_p
    sx = torch.where(flip, -width, width)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, height, cy
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_grayscale(x: torch.Tensor, p: float = 0.2, generator: torch.Generator | None = None):
    """With probability ``p`` per image, replace an RGB image by its luma (ITU-R 601) in all 3 channels;
    images with another channel count are returned unchanged (no random numbers drawn)."""
    _check_images(x)
    if x.shape[1] != 3:
        return x
    pick = (_rand(x.shape[0], generator, x.device) < p).view(-1, 1, 1, 1)
    return torch.where(pick, _luma(x).expand_as(x), x)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` luma of RGB ``x``."""
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def random_gaussian_blur(
    x: torch.Tensor,
    p: float = 0.3,
    kernel_size: int = 5,
    sigma: tuple[float, float] = (0.1, 2.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """With probability ``p`` per image, a separable Gaussian blur (``kernel_size`` taps, sigma uniform in
    ``sigma`` per image, reflect padding); one grouped convolution per axis for the whole batch."""
    _check_images(x)
    n, c, h, w = x.shape
    u = _rand(2 * n, generator, x.device).view(2, n)
    pick = (u[0] < p).view(-1, 1, 1, 1)
    sig = (sigma[0] + (sigma[1] - sigma[0]) * u[1]).to(x.dtype)
    half = kernel_size // 2
    taps = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sig.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, k)
    flat = x.reshape(1, n * c, h, w)
    pad_mode = "reflect" if min(h, w) > half else "replicate"
    flat = F.pad(flat, (half, half, 0, 0), mode=pad_mode)
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    flat = F.pad(flat, (0, 0, half, half), mode=pad_mode)
    flat = F.conv2d(flat, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return torch.where(pick, flat.view(n, c, h, w), x)


def simclr_views(
    x: torch.Tensor,
    num_views: int = 2,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.2, 1.0),
    grayscale_p: float = 0.2,
    blur_p: float = 0.3,
) -> torch.Tensor:
    """``num_views`` independently augmented copies of ``x``, stacked view-major: ``(num_views * N, ...)``
    (rows ``v * N + i`` are view ``v`` of image ``i``)."""
    _check_images(x)
    rep = x.repeat(num_views, 1, 1, 1)
    out = random_resized_crop_flip(rep, scale=scale, generator=generator)
    out = random_grayscale(out, p=grayscale_p, generator=generator)
    return random_gaussian_blur(out, p=blur_p, generator=generator)


def _rotate_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB ``x`` in [0, 1] with each image's hue turned by ``shift`` (fractions of a full turn, ``(N,)``),
    through HSV; saturation and value are kept."""
    r, g, b = x.unbind(dim=1)
    value, _ = x.max(dim=1)
    low, _ = x.min(dim=1)
    delta = value - low
    sat = torch.where(value > 0, delta / value.clamp_min(1e-12), torch.zeros_like(value))
    safe = delta.clamp_min(1e-12)
    # hue in sixths of a turn, from the channel that holds the maximum (red first, as on a tie)
    h = torch.where(
        value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1).to(x.dtype)) % 1.0
    sector = h * 6
    k = torch.floor(sector)
    frac = sector - k
    k = k.long() % 6
    p_ = value * (1 - sat)
    q_ = value * (1 - sat * frac)
    t_ = value * (1 - sat * (1 - frac))
    choices = (
        (value, t_, p_), (q_, value, p_), (p_, value, t_), (p_, q_, value), (t_, p_, value), (value, p_, q_),
    )  # fmt: skip
    out = []
    for channel in range(3):
        c = torch.zeros_like(value)
        for sector_index, rgb in enumerate(choices):
            c = torch.where(k == sector_index, rgb[channel], c)
        out.append(c)
    return torch.stack(out, dim=1)


def adjust_colors(
    x: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
    order: torch.Tensor,
) -> torch.Tensor:
    """Per-image colour changes of ``x`` (NCHW in [0, 1]): factors ``(N,)`` each, and ``order`` ``(N, 4)``, a
    permutation of 0..3 per image (0 brightness, 1 contrast, 2 saturation, 3 hue) giving which change comes
    at each of the four steps.  Brightness ``b``: ``b x``; contrast ``c``: ``c x + (1 - c) m`` with ``m`` the
    image's mean luma (mean value for one channel); saturation ``s``: ``s x + (1 - s) luma(x)``; each
    clamped to [0, 1]; hue: the HSV hue turned by ``hue`` (a fraction of a turn).  Saturation and hue leave
    images that are not RGB unchanged."""
    _check_images(x)
    n, c = x.shape[:2]
    shape = (n, 1, 1, 1)
    factors = [f.to(x.device, x.dtype).view(shape) for f in (brightness, contrast, saturation)]
    order = order.to(x.device)
    for step in range(4):
        which = order[:, step].view(shape)
        changed = torch.where(which == 0, (factors[0] * x).clamp(0, 1), x)
        gray = _luma(x) if c == 3 else x
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        changed = torch.where(which == 1, (factors[1] * x + (1 - factors[1]) * mean).clamp(0, 1), changed)
        if c == 3:
            changed = torch.where(which == 2, (factors[2] * x + (1 - factors[2]) * gray).clamp(0, 1), changed)
            changed = torch.where(which == 3, _rotate_hue(x, hue.to(x.device)), changed)
        x = changed
    return x


def random_color_jitter(
    x: torch.Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 0.8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """With probability ``p`` per image, :func:`adjust_colors` with factors drawn per image: brightness,
    contrast and saturation uniform in ``[max(0, 1 - v), 1 + v]``, hue uniform in ``[-hue, hue]``, and a
    uniformly random order of the four changes (torchvision's ``RandomApply([ColorJitter(...)], p)``, one
    draw per image).  ``x`` in [0, 1]."""
    _check_images(x)
    n = x.shape[0]
    u = _rand(9 * n, generator, x.device).view(9, n)

    def factor(v, row):
        return max(0.0, 1 - v) + (1 + v - max(0.0, 1 - v)) * row

    order = u[5:9].T.argsort(dim=1)  # the ranks of 4 uniforms: each of the 24 orders equally likely
    jittered = adjust_colors(
        x, factor(brightness, u[1]), factor(contrast, u[2]), factor(saturation, u[3]), hue * (2 * u[4] - 1),
        order,
    )  # fmt: skip
    return torch.where((u[0] < p).view(-1, 1, 1, 1), jittered, x)


def official_ttt_pp_views(
    x: torch.Tensor,
    num_views: int = 2,
    generator: torch.Generator | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """``num_views`` copies of ``x`` with the TTT++ code's SimCLR views, view-major as :func:`simclr_views`:
    crop (area 0.2-1) + flip, colour jitter (0.4, 0.4, 0.4, hue 0.1) with p=0.8, grayscale p=0.2, each drawn
    per image.  ``mean`` / ``std`` (per channel, or one value): ``x`` is normalised with them, and the
    views are made on the pixels ``x * std + mean`` (as the official code, before its normalisation) and
    normalised back; None: ``x`` holds pixels in [0, 1]."""
    _check_images(x)
    c = x.shape[1]

    def per_channel(values, default):
        if values is None:
            return torch.full((c,), default, dtype=x.dtype, device=x.device)
        t = torch.as_tensor(list(values) if not isinstance(values, (int, float)) else [values], dtype=x.dtype)
        if t.numel() == 1:
            t = t.expand(c)
        if t.shape != (c,):
            raise InvalidInputError(f"mean/std {list(values)}: expected 1 or {c} values (one per channel)")
        return t.to(x.device)

    m, s = per_channel(mean, 0.0).view(1, c, 1, 1), per_channel(std, 1.0).view(1, c, 1, 1)
    if not bool((s > 0).all()):
        raise InvalidInputError(f"std {s.flatten().tolist()}: expected positive values")
    pixels = x.repeat(num_views, 1, 1, 1) * s + m
    out = random_resized_crop_flip(pixels, scale=(0.2, 1.0), generator=generator)
    out = random_color_jitter(out, 0.4, 0.4, 0.4, 0.1, p=0.8, generator=generator)
    out = random_grayscale(out, p=0.2, generator=generator)
    return (out - m) / s
