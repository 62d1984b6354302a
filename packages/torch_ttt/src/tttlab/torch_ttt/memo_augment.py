"""AugMix (Hendrycks et al., ICLR 2020, bibtex ``hendrycks2020augmix``) on batched tensors, for MEMO.

MEMO (Zhang, Levine, Finn 2022) classifies AugMix views of each test image.  The reference AugMix works on
one PIL image at a time; this version augments a whole NCHW batch on its device.  Each view mixes
``width`` chains of 1-3 random operations with Dirichlet(1) weights and blends the mixture with the image
by Beta(1, 1), as AugMix with its defaults (alpha = 1, severity 3).  The blend is written
``m * image + (1 - m) * mix`` where the AugMix code has ``(1 - m) * image + m * mix``: the same distribution
(Beta(1, 1) is symmetric), not the same views for a given seed.

The operations are AugMix's set without the ones that overlap the ImageNet-C corruptions: autocontrast,
equalize, posterize, solarize, rotate, shear x/y, translate x/y, with AugMix's magnitudes (level drawn
uniformly in [0.1, severity], rotation up to 30 degrees x level/10, shear up to 0.3 x level/10, translation
up to a third of the image x level/10, posterize to 4 - int(4 x level/10) bits, solarize above
1 - int(256 x level/10)/256).  Inputs need not be in [0, 1]: each image is mapped to [0, 1] by its own
minimum and maximum for the operations and mapped back, so normalised tensors work (the intensity
operations then act on the image's own range); geometric operations fill with the image's minimum.
Every random number comes from ``generator`` (a CPU ``torch.Generator``) or the global torch RNG.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["AUGMIX_OPS", "augmix"]

AUGMIX_OPS = (
    "autocontrast",
    "equalize",
    "posterize",
    "solarize",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)


def _rand(shape, generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator).to(device)


def _per_channel_minmax(u: torch.Tensor) -> torch.Tensor:
    lo = u.amin(dim=(2, 3), keepdim=True)
    hi = u.amax(dim=(2, 3), keepdim=True)
    return torch.where(hi > lo, (u - lo) / (hi - lo).clamp_min(1e-12), u)


def _equalize(u: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel on 256 levels (equal pixels stay equal)."""
    k, c, h, w = u.shape
    levels = (u * 255).round().long().clamp(0, 255).reshape(k * c, h * w)
    hist = torch.zeros(k * c, 256, device=u.device, dtype=u.dtype)
    hist.scatter_add_(1, levels, torch.ones_like(levels, dtype=u.dtype))
    cdf = hist.cumsum(1)
    cdf_min = cdf.gather(1, levels.amin(1, keepdim=True))
    denom = (h * w - cdf_min).clamp_min(1)
    out = (cdf.gather(1, levels) - cdf_min) / denom
    constant = cdf_min >= h * w
    return torch.where(constant, levels.to(u.dtype) / 255, out).reshape(k, c, h, w)


def _affine(u: torch.Tensor, op: str, frac: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    k = u.shape[0]
    eye = torch.eye(2, 3, device=u.device, dtype=u.dtype).repeat(k, 1, 1)
    m = frac * sign
    if op == "rotate":
        angle = m * 30 * math.pi / 180
        eye[:, 0, 0], eye[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        eye[:, 1, 0], eye[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    elif op == "shear_x":
        eye[:, 0, 1] = m * 0.3
    elif op == "shear_y":
        eye[:, 1, 0] = m * 0.3
    elif op == "translate_x":
        eye[:, 0, 2] = m * 2 / 3  # a third of the width (grid coordinates span 2)
    else:  # translate_y
        eye[:, 1, 2] = m * 2 / 3
    grid = F.affine_grid(eye, list(u.shape), align_corners=False)
    return F.grid_sample(u, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _apply(op: str, u: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    frac = level / 10  # AugMix's int_parameter/float_parameter scale
    if op == "autocontrast":
        return _per_channel_minmax(u)
    if op == "equalize":
        return _equalize(u)
    shape = (-1, 1, 1, 1)
    if op == "posterize":
        bits = (4 - torch.floor(frac * 4)).clamp(1, 8)
        step = (2 ** (8 - bits)).view(shape)
        return torch.floor(u * 255 / step) * step / 255
    if op == "solarize":
        threshold = ((256 - torch.floor(frac * 256)) / 256).view(shape)
        return torch.where(u < threshold, u, 1 - u)
    return _affine(u, op, frac, sign)


@torch.no_grad()
def augmix(
    x: torch.Tensor,
    n_views: int,
    generator: torch.Generator | None = None,
    *,
    width: int = 3,
    depth: tuple[int, int] = (1, 3),
    severity: float = 3.0,
    ops: tuple[str, ...] = AUGMIX_OPS,
) -> torch.Tensor:
    """``n_views`` AugMix views of each NCHW image: a tensor (n_views, N, C, H, W)."""
    unknown = [op for op in ops if op not in AUGMIX_OPS]
    if unknown:
        raise ValueError(f"unknown AugMix operations {unknown}; expected some of {AUGMIX_OPS}")
    n, device = x.shape[0], x.device
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    scale = (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-12)
    unit = (x - lo) / scale
    total = n_views * width * n
    chains = unit.unsqueeze(0).expand(n_views * width, *unit.shape).reshape(total, *unit.shape[1:]).clone()
    lengths = torch.randint(depth[0], depth[1] + 1, (total,), generator=generator).to(device)
    for step in range(depth[1]):
        choice = torch.randint(len(ops), (total,), generator=generator).to(device)
        level = 0.1 + (severity - 0.1) * _rand(total, generator, device).to(x.dtype)
        sign = torch.where(_rand(total, generator, device) < 0.5, -1.0, 1.0).to(x.dtype)
        active = lengths > step
        for j, op in enumerate(ops):
            idx = (active & (choice == j)).nonzero().squeeze(1)
            if idx.numel():
                chains[idx] = _apply(op, chains[idx], level[idx], sign[idx]).clamp(0, 1)
    chains = chains.reshape(n_views, width, n, *x.shape[1:]) * scale + lo
    weights = -torch.log1p(-_rand((n_views, width, n), generator, device)).to(x.dtype)  # Dirichlet(1)
    weights = weights / weights.sum(1, keepdim=True)
    mix = (weights[..., None, None, None] * chains).sum(1)
    m = _rand((n_views, n), generator, device).to(x.dtype)[..., None, None, None]  # Beta(1, 1)
    return m * x.unsqueeze(0) + (1 - m) * mix
