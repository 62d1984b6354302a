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
* :func:`simclr_views`: torch-ttt's SimCLR view pipeline for its TTT++ engine (crop 0.2-1 + flip,
  grayscale p=0.2, 5-tap Gaussian blur p=0.3).  The TTT++ code's own views differ: crop 0.2-1 + flip,
  colour jitter (brightness, contrast, saturation 0.4, hue 0.1) with p=0.8, grayscale p=0.2, no blur
  (``cifar/utils/prepare_dataset.py``); colour jitter is not offered here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tttlab.core.errors import InvalidInputError

__all__ = ["random_gaussian_blur", "random_grayscale", "random_resized_crop_flip", "simclr_views"]


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
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    gray = (x * weights).sum(dim=1, keepdim=True).expand_as(x)
    return torch.where(pick, gray, x)


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
