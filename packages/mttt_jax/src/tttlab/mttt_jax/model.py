"""The ViT of MTTT (big_vision style, pre-LN) with a configurable token mixer.

Upstream ``model.py``: patch embedding (a strided Conv), sincos-2d or learned position embedding, blocks
``x + mixer(LN(x))``, ``x + MLP(LN(x))``, final LayerNorm, global average pooling, ``tanh`` pre-logits,
zero-initialised head.  Every block also returns its inner losses, so the model returns
``(logits (B, classes), inner losses (depth, T+1))`` (``inf`` for the attention baselines, as upstream),
the inner losses averaged over the batch; ``per_example_inner=True`` returns them per image,
``(B, depth, T+1)`` (evaluation: a padded last batch is averaged over its real images only).

Differences: the image size is a parameter (upstream hard-codes 224, we also train 28 px MNIST), blocks
can be rematerialised (``remat``) to fit long sequences (pixels), and the compute dtype is an option.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .errors import MTTTConfigError
from .inner_loop import InnerConfig, make_mixer

#: width, depth, mlp_dim, num_heads (upstream ``train.py``; ``mnist``/``smoke`` are our CPU sizes).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "small": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "mnist": dict(width=64, depth=4, mlp_dim=128, num_heads=2),
    "smoke": dict(width=16, depth=2, mlp_dim=32, num_heads=2),
}


def model_size(name: str, **overrides) -> dict[str, int]:
    if name not in MODEL_SIZES:
        raise MTTTConfigError(f"model={name!r}; expected one of {sorted(MODEL_SIZES)}")
    return {**MODEL_SIZES[name], **{k: int(v) for k, v in overrides.items() if v is not None}}


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0, dtype=jnp.float32):
    if width % 4:
        raise MTTTConfigError(f"width {width} must be a multiple of 4 for the sincos2d position embedding")
    y, x = np.mgrid[:h, :w]
    omega = np.arange(width // 4) / max(width // 4 - 1, 1)
    omega = 1.0 / (temperature**omega)
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return jnp.asarray(pe, dtype)[None]


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        inits = dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(1e-6))
        d = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, **inits)(x)
        x = nn.gelu(x)
        return nn.Dense(d, dtype=self.dtype, **inits)(x)


class Encoder1DBlock(nn.Module):
    """``x + mixer(LN(x))`` then ``x + MLP(LN(x))``; returns ``(x, inner losses)``."""

    width: int
    mlp_dim: int
    num_heads: int
    inner: InnerConfig = field(default_factory=InnerConfig)
    dtype: Any = jnp.float32
    per_example_inner: bool = False

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(dtype=self.dtype)(x)
        y, inner_losses = make_mixer(self.inner, self.width, self.num_heads, self.dtype, name="mixer",
                                     per_example=self.per_example_inner)(y)  # fmt: skip
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype)(x)
        x = x + MlpBlock(self.mlp_dim, self.dtype)(y)
        return x, inner_losses


class Model(nn.Module):
    """ViT classifier; ``__call__(images NHWC) -> (logits, inner losses (depth, T+1))``, the inner losses
    averaged over the batch, or per image ``(B, depth, T+1)`` with ``per_example_inner=True``."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_classes: int = 1000
    image_size: Sequence[int] = (224, 224)
    patch_size: Sequence[int] = (16, 16)
    posemb: str = "sincos2d"
    head_zeroinit: bool = True
    inner: InnerConfig = field(default_factory=InnerConfig)
    remat: bool = False
    dtype: Any = jnp.float32
    per_example_inner: bool = False

    @property
    def grid(self) -> tuple[int, int]:
        (ih, iw), (ph, pw) = tuple(self.image_size), tuple(self.patch_size)
        if ih % ph or iw % pw:
            raise MTTTConfigError(f"image size {(ih, iw)} is not divisible by patch size {(ph, pw)}")
        return ih // ph, iw // pw

    @property
    def num_tokens(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @nn.compact
    def __call__(self, image):
        b = image.shape[0]
        if tuple(image.shape[1:3]) != tuple(self.image_size):
            raise MTTTConfigError(
                f"images of size {image.shape[1:3]}; the model expects {tuple(self.image_size)}"
            )
        x = nn.Conv(self.width, tuple(self.patch_size), strides=tuple(self.patch_size), padding="VALID",
                    dtype=self.dtype, name="embedding")(image)  # fmt: skip
        x = x.reshape(b, -1, self.width)
        gh, gw = self.grid
        if self.posemb == "learn":
            pe = self.param("pos_embedding", nn.initializers.normal(1 / np.sqrt(self.width)),
                            (1, gh * gw, self.width))  # fmt: skip
        elif self.posemb == "sincos2d":
            pe = posemb_sincos_2d(gh, gw, self.width)
        else:
            raise MTTTConfigError(f"posemb={self.posemb!r}; expected 'learn' or 'sincos2d'")
        x = x + pe.astype(x.dtype)
        block_cls = nn.remat(Encoder1DBlock) if self.remat else Encoder1DBlock
        losses = []
        for layer in range(self.depth):
            x, inner_losses = block_cls(self.width, self.mlp_dim, self.num_heads, self.inner, self.dtype,
                                        self.per_example_inner, name=f"encoderblock_{layer}")(x)  # fmt: skip
            losses.append(inner_losses)
        x = nn.LayerNorm(name="encoder_norm", dtype=self.dtype)(x)
        x = jnp.mean(x, axis=1)
        x = nn.tanh(nn.Dense(self.width, name="pre_logits", dtype=self.dtype)(x))
        kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
        logits = nn.Dense(self.num_classes, name="head", dtype=self.dtype, **kw)(x)
        return logits.astype(jnp.float32), jnp.stack(losses, axis=1 if self.per_example_inner else 0)


def build_model(
    *,
    model: str = "small",
    tokens: str = "patch",
    inner: Any = None,
    num_classes: int = 1000,
    image_size: Sequence[int] | int = 224,
    patch_size: Sequence[int] | int | None = None,
    posemb: str | None = None,
    remat: bool = False,
    dtype: str = "float32",
    arch: dict | None = None,
) -> Model:
    """A :class:`Model` from config values (upstream names: ``model``, ``benchmark``=``tokens``).

    ``tokens='patch'``: 16x16 patches with a sincos-2d embedding; ``'pixel'``: 1x1 patches with a
    learned embedding (upstream's two benchmarks).  ``patch_size``/``posemb`` override those defaults.
    """
    if tokens not in ("patch", "pixel"):
        raise MTTTConfigError(f"tokens={tokens!r}; expected 'patch' or 'pixel'")
    pair = lambda v: (int(v), int(v)) if isinstance(v, (int, np.integer)) else tuple(int(a) for a in v)  # noqa: E731
    if patch_size is None:
        patch_size = 16 if tokens == "patch" else 1
    if posemb is None:
        posemb = "sincos2d" if tokens == "patch" else "learn"
    return Model(
        **model_size(model, **(arch or {})), num_classes=num_classes, image_size=pair(image_size),
        patch_size=pair(patch_size), posemb=posemb, inner=InnerConfig.from_dict(inner), remat=remat,
        dtype=jnp.dtype(dtype),
    )  # fmt: skip
