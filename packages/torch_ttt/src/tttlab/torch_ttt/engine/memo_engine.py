"""MEMO: test-time robustness via adaptation and augmentation (marginal entropy minimisation).

Paper: Zhang, Levine, Finn, "MEMO: Test Time Robustness via Adaptation and Augmentation", NeurIPS 2022
(bibtex ``zhang2022memo``); upstream zhangmarvin/memo; API of torch-ttt's
``MemoEngine(model, optimization_parameters, augmentations, n_augmentations, prior_strength)``.

For every test image, ``n_augmentations`` augmented views are classified and the entropy of the *average*
predictive distribution (the marginal) is minimised; models with BatchNorm normalise with MEMO's prior
mix of source and test statistics, ``w = N/(N+1)`` on the source (N = ``prior_strength``, 16 in the
paper); then the original image is classified.  Episodic: ``reset="per_batch"`` by default.

Differences from torch-ttt 0.0.2 and why:

* models with BatchNorm work (upstream crashed) and use the paper's BN prior, during adaptation and for
  the final prediction, computed as the MEMO code does (test mean and unbiased variance of the batch of
  views, treated as constants by autograd: :func:`tttlab.torch_ttt.norm.prior_mixed_statistics`; the
  MEMO code patches ``BatchNorm2d`` only, here every BatchNorm); BN-free models work too;
* ``per_sample=True`` (default) is the paper's setting: each image is adapted on its own views, predicted,
  and (``reset="per_batch"``) restored before the next image, so the BN test statistics are those of the
  image's own views.  ``per_sample=False`` (upstream's computation, much faster) builds the n*B views of
  a batch of n images and runs ONE forward; the loss is the mean over images of each image's marginal
  entropy (in log space), one shared update for the batch; with BatchNorm the test statistics are then
  those of all images' views together, and the prediction's those of the n images (the MEMO code: the
  one image, mixed with the source statistics).  ``per_sample_bn`` is another name for ``per_sample``;
* every view has its own random augmentation (upstream applied one random transform to the whole batch);
* all parameters adapt (the paper), one SGD step by default (lr 1e-3, momentum 0.9, which for one step
  from a reset state is plain SGD; the MEMO code's SGD has no momentum, so with ``num_steps > 1`` pass
  ``momentum=0`` to take its steps; the MEMO code used SGD lr 2.5e-4 with 64 views for ResNet-50 on
  ImageNet and lr 5e-3 with 32 views for the GroupNorm ResNet-26 on CIFAR-10; 8 views here by default,
  for cost), no ``print``, no deep copy;
* augmentations (``augmentations=``): ``None``/``"geometric"`` (default) an AugMix-style mixture of random
  geometric chains (rotate, shear, translate, zoom) written with ``affine_grid``/``grid_sample`` so it
  runs batched on any device; ``"augmix"`` AugMix's full operation set (intensity operations too, on
  each image's own range: :func:`tttlab.torch_ttt.memo_augment.augmix`), what the paper used (it also
  random-resized-cropped and flipped ImageNet images first); or a callable: ``fn(x, n_views=,
  generator=)`` or ``fn(x, generator)`` giving (V, N, C, H, W) views, or a per-image transform
  ``fn(image)`` (torchvision style) called ``n_augmentations`` times per image;
* ``seed`` gives the engine its own ``torch.Generator`` for the augmentations (otherwise the global RNG,
  deterministic under ``torch.manual_seed``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..engine_registry import EngineRegistry
from ..norm import batchnorm_layers, marginal_entropy, prior_mixed_statistics
from .base_engine import BaseEngine

__all__ = ["MemoEngine", "affine_grid", "augmix_geometric"]


def _random_affine(n: int, generator: torch.Generator | None, device, dtype, severity: float = 1.0):
    """(n, 2, 3) affine matrices: rotation +-30 deg, shear +-0.3, translation +-0.15, zoom 0.9-1.1."""

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator).to(device=device, dtype=dtype)

    angle = u(-30, 30) * severity * math.pi / 180
    shear = u(-0.3, 0.3) * severity
    zoom = 1 + u(-0.1, 0.1) * severity
    tx, ty = u(-0.15, 0.15) * severity, u(-0.15, 0.15) * severity
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin + shear, tx], -1), torch.stack([sin, cos, ty], -1)], dim=1
    )  # fmt: skip
    return theta


def affine_grid(theta: torch.Tensor, size) -> torch.Tensor:
    """``F.affine_grid(theta, size, align_corners=False)`` for 4-D sizes, bit for bit, without its ``bmm``.

    ``F.affine_grid`` multiplies an (N, H*W, 3) base grid by ``theta`` with a batched matrix product of
    inner size 3, which on CPU costs more than the warp itself (about 15x this version for 768 MNIST-sized
    views).  Here each output coordinate is ``(t0 * x + t1 * y) + t2``, the same products and sums in the
    same order, as two small outer products and one full-size add: the returned grid (a strided
    (N, H, W, 2) view) holds the same values (bit for bit on the x86 CPUs measured, where the bmm sums
    the three terms in order without fused multiply-adds).
    """
    n, _, h, w = size

    def lin(k: int) -> torch.Tensor:  # pixel centres in [-1, 1], as affine_grid with align_corners=False
        return torch.linspace(-1, 1, k, device=theta.device, dtype=theta.dtype) * (k - 1) / k

    ax = theta[:, :, 0, None, None] * lin(w).view(1, 1, 1, w)  # (N, 2, 1, W)
    by = theta[:, :, 1, None, None] * lin(h).view(1, 1, h, 1)  # (N, 2, H, 1)
    return (ax + by).add_(theta[:, :, 2, None, None]).permute(0, 2, 3, 1)


def augmix_geometric(x: torch.Tensor, n_views: int, generator: torch.Generator | None = None,
                     width: int = 3) -> torch.Tensor:  # fmt: skip
    """``n_views`` AugMix-style views of each NCHW image: (n_views, N, C, H, W).

    Each view mixes ``width`` chains of one random affine warp with Dirichlet(1) weights, then blends the
    mixture with the original by Beta(1, 1), as AugMix does with its default alpha = 1.
    """
    n = x.shape[0]
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    # warp x - min (zeros padding then fills with the image's minimum); subtracted once per image, then
    # replicated: the same values as replicating first
    rep = (x - low).unsqueeze(0).expand(n_views * width, *x.shape).reshape(-1, *x.shape[1:])
    theta = _random_affine(rep.shape[0], generator, x.device, x.dtype)
    grid = affine_grid(theta, rep.shape)
    fill = low.repeat(n_views * width, 1, 1, 1)
    warped = F.grid_sample(rep, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    warped = warped.reshape(n_views, width, n, *x.shape[1:])
    # Dirichlet(1, ..., 1) = normalised standard exponentials; Beta(1, 1) = uniform
    gamma = -torch.log1p(-torch.rand((n_views, width, n), generator=generator)).to(x.dtype)
    w = (gamma / gamma.sum(1, keepdim=True)).to(device=x.device, dtype=x.dtype)
    mix = (w[..., None, None, None] * warped).sum(1)
    m = torch.rand((n_views, n), generator=generator).to(device=x.device, dtype=x.dtype)
    m = m[..., None, None, None]
    return m * x.unsqueeze(0) + (1 - m) * mix


@EngineRegistry.register("memo")
class MemoEngine(BaseEngine):
    optimization_defaults = {"num_steps": 1, "lr": 1e-3, "optimizer_name": "sgd", "momentum": 0.9}

    def __init__(
        self,
        model: nn.Module,
        optimization_parameters=None,
        augmentations: Callable | str | None = None,
        n_augmentations: int = 8,
        prior_strength: float = 16,
        *,
        per_sample: bool = True,
        seed: int | None = None,
        per_sample_bn: bool | None = None,
    ):
        super().__init__(model, optimization_parameters)
        if n_augmentations < 1:
            from tttlab.core.errors import InvalidInputError

            raise InvalidInputError(f"n_augmentations must be >= 1, got {n_augmentations}")
        if isinstance(augmentations, str) and augmentations not in ("geometric", "augmix"):
            from tttlab.core.errors import InvalidInputError

            raise InvalidInputError(
                f"augmentations={augmentations!r}; expected 'geometric', 'augmix' or a callable"
            )
        self.augmentations = augmentations
        self.n_augmentations = int(n_augmentations)
        self.prior_strength = prior_strength
        self.per_sample = bool(per_sample if per_sample_bn is None else per_sample_bn)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._has_bn = bool(batchnorm_layers(model))

    @property
    def compiled_prediction(self) -> bool:
        """The prior-mixed BatchNorm replaces the layers' forward: a compiled model runs eagerly then."""
        return not (self._has_bn and self.prior_strength is not None)

    def inference_context(self):
        if self._has_bn and self.prior_strength is not None:
            return prior_mixed_statistics(self.model, float(self.prior_strength))
        return contextlib.nullcontext()

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """(V, N, C, H, W) augmented views of the batch (V = ``n_augmentations`` for the built-in ones)."""
        aug = self.augmentations
        if aug is None or aug == "geometric":
            return augmix_geometric(x, self.n_augmentations, self.generator)
        if aug == "augmix":
            from ..memo_augment import augmix

            return augmix(x, self.n_augmentations, self.generator)
        kind = _augmentation_kind(aug)
        if kind == "n_views":
            out = aug(x, n_views=self.n_augmentations, generator=self.generator)
        elif kind == "generator":
            out = aug(x, self.generator)
        else:  # a per-image transform (torchvision style)
            out = torch.stack([torch.stack([aug(img) for img in x]) for _ in range(self.n_augmentations)])
        if not isinstance(out, torch.Tensor) or out.ndim != x.ndim + 1 or out.shape[1:] != x.shape:
            from tttlab.core.errors import InvalidInputError

            raise InvalidInputError(
                f"augmentations must give views shaped (V, *{tuple(x.shape)}), got "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
            )
        return out

    def _marginal_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.views(x)
        b, n = v.shape[:2]
        logits = self.model(v.reshape(b * n, *v.shape[2:])).reshape(b, n, -1)
        return logits.mean(0), marginal_entropy(logits).mean()

    def ttt_forward(self, inputs, **kwargs):
        """Train mode: ``(model(inputs), marginal entropy of the views)``."""
        outputs = self.model(inputs)
        return outputs, self._marginal_loss(inputs)[1]

    def adapt_loss(self, inputs, **kwargs):
        return self._marginal_loss(inputs)[1]

    def forward(self, inputs, **kwargs):
        if self.augmentations in (None, "geometric", "augmix") and not (
            isinstance(inputs, torch.Tensor)
            and inputs.ndim == 4
            and inputs.is_floating_point()
            and len(inputs)
        ):
            from tttlab.core.errors import InvalidInputError

            raise InvalidInputError(
                "MEMO's built-in augmentations take a float (N, C, H, W) image batch with N >= 1, got "
                + (
                    f"{inputs.dtype} {tuple(inputs.shape)}"
                    if isinstance(inputs, torch.Tensor)
                    else type(inputs).__name__
                )
            )
        if self.training or not self.per_sample or inputs.shape[0] == 1:
            return super().forward(inputs, **kwargs)
        results = [
            super(MemoEngine, self).forward(inputs[i : i + 1], **kwargs) for i in range(inputs.shape[0])
        ]
        return torch.cat([r[0] for r in results]), torch.stack([r[1] for r in results]).mean()


def _augmentation_kind(fn) -> str:
    """``"n_views"``: ``fn(x, n_views=, generator=)`` (like :func:`augmix_geometric`); ``"generator"``:
    ``fn(x, generator)`` giving all views; ``"per_image"``: ``fn(image)`` giving one view."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return "per_image"
    if "n_views" in params:
        return "n_views"
    return "generator" if len(params) >= 2 else "per_image"
