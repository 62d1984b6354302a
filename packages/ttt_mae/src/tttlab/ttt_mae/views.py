"""Image preparation and the training views of test-time training, on tensors, seeded by a generator.

Upstream builds each TTT batch with torchvision transforms on the PIL image: ``--single_crop`` gives
``batch_size`` identical copies of the evaluation view (resize 256 / centre crop 224 for ImageNet-C),
otherwise independent ``RandomResizedCrop(input_size, scale=(0.2, 1), bicubic)`` +
``RandomHorizontalFlip`` views.  Here the same sampling rule (10 tries of a uniform area fraction and a
log-uniform aspect ratio in (3/4, 4/3), then the centre-crop fallback) runs on a ``torch.Generator``,
so every view is reproducible from the image's seed, and the crop is resized with bicubic
interpolation (antialiased, clamped to [0, 1] as PIL's uint8 output is).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tttlab.core.errors import InvalidInputError


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) numpy -> float (N, C, H, W) in [0, 1]; float NCHW tensors pass through."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise InvalidInputError(f"images must be (N, H, W, C) uint8, got {getattr(images, 'shape', images)}")
    if images.dtype != np.uint8:
        raise InvalidInputError(f"images must be uint8 (N, H, W, C), got dtype {images.dtype}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def resize_center_crop(images: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """uint8 (N, H, W, C) -> uint8 (N, crop, crop, C): torchvision's ``Resize(resize, bicubic)`` (shorter side
    to ``resize``, the longer ``int(resize * long / short)``) + ``CenterCrop(crop)`` on PIL images, upstream's
    evaluation transform (applied by TTT-MAE to the already 224 px ImageNet-C files as well); the core's
    :func:`tttlab.core.data.resize_center_crop` per image."""
    from PIL import Image

    from tttlab.core.data import resize_center_crop as core_resize_center_crop

    transform = core_resize_center_crop(resize, crop, interpolation="bicubic")
    out = []
    for im in images:
        r = np.asarray(transform(Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)))
        out.append(r[..., None] if r.ndim == 2 else r)
    return np.stack(out)


class Normalizer:
    """``(x - mean) / std`` per channel.  The constants are copied to a device once and kept there: a blocking
    host-to-device copy per call would wait for the device to finish its queued work (a host sync per TTT
    step on a GPU)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        consts = self._on.get(x.device)
        if consts is None:
            consts = self._on[x.device] = (self.mean.to(x.device), self.std.to(x.device))
        return (x - consts[0]) / consts[1]


def crop_params(
    height: int, width: int, scale, ratio, generator: torch.Generator
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` by torchvision's RandomResizedCrop rule, drawn from ``generator``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_views(
    image: torch.Tensor, n: int, size: int, generator: torch.Generator, *,
    scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True,
) -> torch.Tensor:  # fmt: skip
    """``n`` views (n, C, size, size) in [0, 1] of one image (C, H, W), float in [0, 1] or uint8 (then only
    the crop is converted, as ``to_unit`` would: a full decoded photo need not be converted whole): random
    resized crop + flip."""
    _, H, W = image.shape
    views = []
    for _ in range(n):
        top, left, h, w = crop_params(H, W, scale, ratio, generator)
        crop = image[None, :, top : top + h, left : left + w]
        if crop.dtype == torch.uint8:
            crop = crop.float().div_(255.0)
        v = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        if flip and bool(torch.rand(1, generator=generator) < 0.5):
            v = v.flip(-1)
        views.append(v)
    return torch.cat(views).clamp_(0.0, 1.0)


def make_views(
    image: torch.Tensor, n: int, *, single_crop: bool, size: int, generator: torch.Generator,
    scale=(0.2, 1.0), flip: bool = True,
) -> torch.Tensor:  # fmt: skip
    """The TTT batch of one image in [0, 1]: ``n`` identical copies (``single_crop``) or random views."""
    if single_crop:
        return image[None].expand(n, -1, -1, -1)
    return random_resized_crop_views(image, n, size, generator, scale=scale, flip=flip)
