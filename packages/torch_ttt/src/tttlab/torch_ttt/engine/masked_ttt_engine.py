"""Masked TTT: test-time training by reconstructing masked parts of the input, for tokens and images.

Paper: Gandelsman, Sun, Chen, Efros, "Test-Time Training with Masked Autoencoders", NeurIPS 2022 (bibtex
``gandelsman2022ttt-mae``); upstream yossigandelsman/test_time_training_mae; API of torch-ttt's
``MaskedTTTEngine(model, mask_token_id, features_layer_name, mask_prob, skip_tokens,
optimization_parameters)``.

Two modes, chosen by ``mask_token_id``:

* tokens (``mask_token_id`` given; torch-ttt's only mode, for BERT-style models): inputs are a dict with
  ``input_ids`` (or a tensor of ids); each token not in ``skip_tokens`` is replaced by ``mask_token_id``
  with probability ``mask_prob`` (default 0.15) and the features layer's output, logits over the
  vocabulary ``(N, L, V)``, is scored by cross-entropy at the masked positions.
* images (``mask_token_id=None``): float ``(N, C, H, W)`` inputs are cut into ``patch_size`` squares, a
  fixed fraction ``mask_prob`` (default 0.75, MAE's ratio; MAE's count: all but ``int(L * (1 -
  mask_prob))`` of the ``L`` patches, at least one) of each image's patches is
  set to ``mask_value``, and a small decoder built at construction reconstructs the pixels from the
  features layer: conv features -> 1x1 conv to ``C * patch_size**2`` channels + pixel shuffle (bilinear
  resize to H x W when the feature map is not H/patch_size); vector features -> a linear map to C*H*W
  (needs ``image_shape``).  The loss is the mean squared error over the masked pixels only (MAE's
  choice: the visible pixels are given, reconstructing them teaches nothing).

The decoder's image channels come from ``image_shape=(C, H, W)``, ``example_input=``, or the first
convolution's ``in_channels``.  Masks are drawn with ``generator`` (or the global torch RNG).

Differences from torch-ttt 0.0.2 and why: images are supported; train mode returns the outputs of the
*clean* input (upstream returned those of the masked input, which a task loss should not see), with the
clean and masked images in one forward when no BatchNorm layer uses batch statistics; during adaptation
the forward stops at the features layer; no deep copy of the inputs or the model; ``skip_tokens`` is not a
mutable default.  As upstream, only the model's parameters adapt (the decoder is trained jointly).

Against TTT-MAE's own code (yossigandelsman/test_time_training_mae), deliberately, because this engine
serves any model (CNNs included) through torch-ttt's per-batch API: TTT-MAE drops the masked patches from
a ViT encoder's input (here they are overwritten with ``mask_value`` so the image keeps its shape for any
network); it adapts one test image at a time, a fresh random 75 % mask per step, SGD (momentum 0.9) for
``steps_per_example`` steps, with the decoder frozen and the classifier a separate head, reset per image;
here the batch is adapted with the engine's optimizer settings (torch-ttt's 3 Adam steps at 1e-2 by
default) and reset policy.  The masked-pixel MSE is MAE's loss (its ``norm_pix_loss`` option, per-patch
normalised targets, is not offered).  ``packages/ttt_mae`` reproduces TTT-MAE itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tttlab.core.errors import InvalidInputError

from ..engine_registry import EngineRegistry
from ..heads import (
    features_only,
    has_training_batchnorm,
    infer_feature_shape,
    place_like_model,
    run_model,
)
from ..precision import full_precision
from .base_engine import BaseEngine, FeatureHook, find_module

__all__ = ["MaskedTTTEngine", "build_pixel_decoder", "mask_patches", "masked_mse"]


def mask_patches(
    images: torch.Tensor,
    patch_size: int,
    mask_prob: float,
    mask_value: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked_images, pixel_mask)``: in every image the same number, ``max(1, L - int(L * (1 -
    mask_prob)))`` (MAE's ``random_masking`` keeps ``int(L * (1 - mask_ratio))``), of its ``L`` patches
    (a ceil-divided grid, edge patches cropped) is set to ``mask_value``; ``pixel_mask`` is
    ``(N, 1, H, W)`` bool, True where masked."""
    n, _, h, w = images.shape
    gh, gw = -(-h // patch_size), -(-w // patch_size)
    num = gh * gw
    k = min(num, max(1, num - int(num * (1 - mask_prob))))
    gen_device = generator.device if generator is not None else "cpu"
    noise = torch.rand(n, num, generator=generator, device=gen_device)
    chosen = noise.argsort(dim=1)[:, :k]
    grid = torch.zeros(n, num, dtype=torch.bool, device=gen_device)
    grid.scatter_(1, chosen, True)
    grid = grid.to(images.device).view(n, 1, gh, gw)
    pixel_mask = grid.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)[:, :, :h, :w]
    masked = images.masked_fill(pixel_mask, mask_value)
    return masked, pixel_mask


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked pixels (all channels) only."""
    prediction = full_precision(prediction)
    mask = pixel_mask.expand_as(target).to(prediction.dtype)
    return ((prediction - target).pow(2) * mask).sum() / mask.sum().clamp_min(1.0)


def build_pixel_decoder(
    feature_shape: Sequence[int], image_shape: Sequence[int], patch_size: int
) -> nn.Module:
    """Conv features (N, F, h, w): Conv2d(F, C * p * p, 1) + PixelShuffle(p); vector features (N, D):
    Linear(D, C * H * W) + reshape (``image_shape`` must then give H and W)."""
    channels = int(image_shape[0])
    if len(feature_shape) == 4:
        p = int(patch_size)
        return nn.Sequential(nn.Conv2d(int(feature_shape[1]), channels * p * p, 1), nn.PixelShuffle(p))
    if len(feature_shape) == 2:
        if len(image_shape) != 3 or not all(int(s) > 0 for s in image_shape):
            raise InvalidInputError(
                "a linear pixel decoder needs the full image shape: pass image_shape=(C, H, W) or example_input"
            )
        c, h, w = (int(s) for s in image_shape)
        return nn.Sequential(nn.Linear(int(feature_shape[1]), c * h * w), nn.Unflatten(1, (c, h, w)))
    raise InvalidInputError(
        f"features of shape {tuple(feature_shape)}: the default pixel decoder handles (N, D) and (N, F, h, w); "
        "pass decoder=<module mapping the features to (N, C, H, W) pixels>"
    )


@EngineRegistry.register("masked_ttt")
class MaskedTTTEngine(BaseEngine):
    """Args (upstream's, then keyword-only): model; mask_token_id (None: image mode); features_layer_name;
    mask_prob (default 0.15 tokens, 0.75 images); skip_tokens; optimization_parameters; patch_size (4);
    mask_value (0.0); image_shape ``(C, H, W)`` / example_input / feature_shape (to build the decoder);
    decoder (your own, image mode); generator."""

    compiled_adaptation = False  # reads inner layers through hooks: eager under engine.compile()

    def feature_modules(self):
        """Under ``engine.compile()`` the adaptation runs a compiled copy of the model truncated here."""
        return [[self.target_module]]

    @property
    def target_module(self) -> nn.Module:
        """The features layer (a reference into ``model``)."""
        return self._target[0]

    def __init__(
        self,
        model: nn.Module,
        mask_token_id: int | None = None,
        features_layer_name: str | None = None,
        mask_prob: float | None = None,
        skip_tokens: Sequence[int] = (),
        optimization_parameters=None,
        *,
        patch_size: int = 4,
        mask_value: float = 0.0,
        image_shape: Sequence[int] | None = None,
        example_input: torch.Tensor | None = None,
        feature_shape: Sequence[int] | None = None,
        decoder: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(model, optimization_parameters)
        if features_layer_name is None:
            raise InvalidInputError("MaskedTTTEngine needs features_layer_name")
        self.features_layer_name = features_layer_name
        # a tuple, so the layer is not registered twice (engine.state_dict() keeps one copy)
        self._target = (find_module(model, features_layer_name),)
        self.mask_token_id = mask_token_id
        self.image_mode = mask_token_id is None
        if mask_prob is None:
            mask_prob = 0.75 if self.image_mode else 0.15
        if not 0.0 < float(mask_prob) <= 1.0:
            raise InvalidInputError(f"mask_prob={mask_prob!r}; expected a probability in (0, 1]")
        if int(patch_size) < 1:
            raise InvalidInputError(f"patch_size={patch_size!r}; expected an integer >= 1")
        self.mask_prob, self.patch_size, self.mask_value = (
            float(mask_prob),
            int(patch_size),
            float(mask_value),
        )
        self.skip_tokens = tuple(skip_tokens)
        self.generator = generator
        self.loss = nn.CrossEntropyLoss()
        if self.image_mode and decoder is None:
            if image_shape is None and example_input is not None:
                image_shape = tuple(example_input.shape[1:])
            if image_shape is None:
                first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
                if first_conv is None:
                    raise InvalidInputError(
                        "cannot tell the image channels for the pixel decoder; pass image_shape=(C, H, W) "
                        "or example_input=<a batch>"
                    )
                image_shape = (first_conv.in_channels,)
            shape = infer_feature_shape(
                model,
                self.target_module,
                features_layer_name,
                feature_shape,
                example_input,
                "the pixel decoder",
            )
            decoder = place_like_model(build_pixel_decoder(shape, image_shape, self.patch_size), model)
        self.decoder = decoder

    # -- tokens -------------------------------------------------------------------------------------
    def _mask_tokens(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gen_device = self.generator.device if self.generator is not None else "cpu"
        mask = torch.rand(input_ids.shape, generator=self.generator, device=gen_device).to(input_ids.device)
        mask = mask < self.mask_prob
        for token in self.skip_tokens:
            mask &= input_ids != token
        return input_ids.masked_fill(mask, self.mask_token_id), mask

    def _token_loss(self, inputs) -> torch.Tensor:
        ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            raise InvalidInputError(
                "token mode needs integer input_ids (a tensor or a dict with 'input_ids')"
            )
        masked_ids, mask = self._mask_tokens(ids)
        masked = {**inputs, "input_ids": masked_ids} if isinstance(inputs, dict) else masked_ids
        names = [self.features_layer_name]
        logits = features_only(self.model, self.target_module, masked, names)
        if not mask.any():
            return logits.sum() * 0.0  # nothing masked: a differentiable zero
        return self.loss(logits[mask], ids[mask])

    # -- images -------------------------------------------------------------------------------------
    def _check_images(self, inputs) -> None:
        if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4 or not inputs.is_floating_point():
            raise InvalidInputError(
                "image mode (mask_token_id=None) needs a float (N, C, H, W) batch; for tokens pass mask_token_id"
            )

    def reconstruct(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Decoder output resized to the image's H x W (bilinear) when needed."""
        pixels = self.decoder(features)
        if pixels.shape[-2:] != torch.Size(size):
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        return pixels

    def image_loss(
        self, images: torch.Tensor, features: torch.Tensor, pixel_mask: torch.Tensor
    ) -> torch.Tensor:
        return masked_mse(self.reconstruct(features, tuple(images.shape[-2:])), images, pixel_mask)

    def mask(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(masked_images, pixel_mask)`` with the engine's settings and generator."""
        return mask_patches(images, self.patch_size, self.mask_prob, self.mask_value, self.generator)

    # -- engine -------------------------------------------------------------------------------------
    def ttt_forward(self, inputs, **kwargs):
        """``(model(inputs), reconstruction loss)``; the outputs are those of the clean input."""
        if not self.image_mode:
            outputs = run_model(self.model, inputs)
            return outputs, self._token_loss(inputs)
        self._check_images(inputs)
        masked, pixel_mask = self.mask(inputs)
        if has_training_batchnorm(self.model):
            outputs = self.model(inputs)
            features = features_only(self.model, self.target_module, masked, [self.features_layer_name])
        else:
            n = inputs.shape[0]
            with FeatureHook(self.target_module) as hook:
                outputs = self.model(torch.cat([inputs, masked]))
            outputs, features = outputs[:n], hook.output[n:]
        return outputs, self.image_loss(inputs, features, pixel_mask)

    def adapt_loss(self, inputs, **kwargs):
        if not self.image_mode:
            return self._token_loss(inputs)
        self._check_images(inputs)
        masked, pixel_mask = self.mask(inputs)
        features = features_only(self.model, self.target_module, masked, [self.features_layer_name])
        return self.image_loss(inputs, features, pixel_mask)
