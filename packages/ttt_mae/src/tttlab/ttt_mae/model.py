"""The Y-shaped model of TTT-MAE: a MAE ViT encoder, the MAE decoder and a classification head.

Paper: Gandelsman, Sun, Chen, Efros, "Test-Time Training with Masked Autoencoders", NeurIPS 2022
(bibtex key ``gandelsman2022testtime``).  Upstream: github.com/yossigandelsman/test_time_training_mae
(``models_mae_shared.py``), itself built on facebookresearch/mae.

Structure (parameter names equal upstream's, so the official checkpoints load; see ``checkpoint.py``):

- encoder: ``patch_embed.proj`` (conv, kernel = stride = patch), ``cls_token``, fixed 2-D sin-cos
  ``pos_embed`` (1, L+1, D), ``blocks.<i>`` (timm ``Block``: ``norm1``, ``attn.qkv``, ``attn.proj``,
  ``norm2``, ``mlp.fc1``, ``mlp.fc2``; qkv bias, LayerNorm eps 1e-6, MLP ratio 4), ``norm``;
- decoder: ``decoder_embed`` (D -> Dd), ``mask_token``, fixed ``decoder_pos_embed``, ``decoder_blocks.<i>``,
  ``decoder_norm``, ``decoder_pred`` (Dd -> patch**2 * channels);
- head ``vit_head``: ``classifier_embed`` (D -> Dc), fixed ``classifier_pos_embed``, ``classifier_depth``
  ``classifier_blocks``, ``classifier_norm``, ``classifier_pred`` on the CLS token; head ``linear``:
  ``bn`` (BatchNorm1d without affine, eps 1e-6) then ``head`` on the encoder's CLS token.

Random masking keeps ``int(L * (1 - mask_ratio))`` patches per sample, chosen by argsort of uniform noise
(the noise may be passed in, so that a batched run and a sequential run see the same masks).  The MAE
loss is the mean squared error over masked patches, targets normalised per patch (mean, unbiased
variance + 1e-6) with ``norm_pix_loss``.  Classification runs the encoder with mask ratio 0 (all tokens).

Attention is timm's, which calls ``torch.nn.functional.scaled_dot_product_attention`` (``fused_attn=True``,
our default) or the explicit softmax(QK^T)V (``fused_attn=False``, used by the upstream-style reference
path of the benchmark).  Differences from upstream: any number of input channels (MNIST has one), the
decoder is optional (``no_decoder``, as upstream's probing model), and ``forward`` also takes ``mode`` so
that ``torch.func.functional_call`` can reach the MAE loss and the classifier (batched adaptation).
:meth:`MaskedAutoencoderViT.mae_loss_lean` is the same loss without the work it cannot read (used by the
fast TTT paths; ``mae_loss`` stays as upstream computes it, for the reference path and pretraining).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tttlab.core.errors import ConfigError, InvalidInputError, require

# every user of the model (the console scripts, evaluate's runs under tttlab-compare, the package's names) gets
# the install command; a compare run failed with "ModuleNotFoundError: No module named 'timm'"
require("timm", package="tttlab-ttt-mae", reason="the MAE model needs timm, which is not installed")
from timm.layers import PatchEmbed  # noqa: E402
from timm.models.vision_transformer import Block  # noqa: E402

HEAD_TYPES = ("linear", "vit_head")


@dataclass(frozen=True)
class MAEConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    classifier_embed_dim: int = 768
    classifier_depth: int = 12
    classifier_num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    head_type: str = "vit_head"
    norm_pix_loss: bool = True
    no_decoder: bool = False
    drop_path_rate: float = 0.0


#: Named architectures.  ``large``/``base`` are upstream's ``mae_vit_large_patch16`` /
#: ``mae_vit_base_patch16`` (decoder 512-d, 8 blocks, 16 heads) with the ViT-B-like head upstream pairs
#: with ViT-L; ``tiny`` is the DeiT-Ti shape (192-d, 12 blocks, 3 heads); the ``mnist``/``smoke`` ones are
#: our CPU proxies on 28x28 single-channel images.
ARCHS: dict[str, dict] = {
    "mae_vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16),
    "mae_vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12),
    "mae_vit_tiny_patch16": dict(
        embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4,
        classifier_embed_dim=192, classifier_num_heads=3,
    ),
    "mae_vit_mnist_patch7": dict(
        img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=64,
        decoder_depth=2, decoder_num_heads=4, classifier_embed_dim=64, classifier_depth=1,
        classifier_num_heads=4, mlp_ratio=2.0, num_classes=10,
    ),
    "mae_vit_smoke_patch7": dict(
        img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
        decoder_depth=1, decoder_num_heads=2, classifier_embed_dim=16, classifier_depth=1,
        classifier_num_heads=2, mlp_ratio=2.0, num_classes=10,
    ),
}  # fmt: skip


def model_config(name: str, **overrides) -> MAEConfig:
    """The :class:`MAEConfig` of a named architecture, with ``overrides`` (``None`` values ignored)."""
    if name not in ARCHS:
        raise ConfigError(f"model={name!r}; expected one of {sorted(ARCHS)}")
    fields = set(MAEConfig.__dataclass_fields__)
    bad = sorted(k for k in overrides if k not in fields)
    if bad:
        raise ConfigError(f"unknown model option(s) {bad}; expected some of {sorted(fields)}")
    cfg = replace(MAEConfig(), **ARCHS[name])
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def sincos_pos_embed(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding, ``(grid_size**2 + cls, dim)``: the first ``dim/2`` channels
    encode the column index, the last ``dim/2`` the row index, each as ``[sin(pos w), cos(pos w)]`` with
    ``w_k = 10000**(-k / (dim/4))``; the CLS row is zero."""
    if dim % 4:
        raise ConfigError(f"embedding dim {dim} must be divisible by 4 for the 2-D sin-cos embedding")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def one_d(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    emb = np.concatenate([one_d(cols.astype(np.float64)), one_d(rows.astype(np.float64))], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float()


class MaskedAutoencoderViT(nn.Module):
    """MAE encoder + decoder + classification head (see the module docstring)."""

    def __init__(self, cfg: MAEConfig, fused_attn: bool = True):
        super().__init__()
        if cfg.img_size % cfg.patch_size:
            raise InvalidInputError(
                f"img_size={cfg.img_size} is not divisible by patch_size={cfg.patch_size}"
            )
        if cfg.head_type not in HEAD_TYPES:
            raise ConfigError(f"head_type={cfg.head_type!r}; expected one of {HEAD_TYPES}")
        self.cfg = cfg
        norm = partial(nn.LayerNorm, eps=1e-6)
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D)
        L = self.patch_embed.num_patches
        self.num_patches = L
        gs = cfg.img_size // cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("pos_embed", sincos_pos_embed(D, gs)[None])
        self.blocks = nn.ModuleList(
            [Block(D, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(cfg.depth)]
        )
        self.norm = norm(D)
        if not cfg.no_decoder:
            Dd = cfg.decoder_embed_dim
            self.decoder_embed = nn.Linear(D, Dd)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
            self.register_buffer("decoder_pos_embed", sincos_pos_embed(Dd, gs)[None])
            self.decoder_blocks = nn.ModuleList(
                [Block(Dd, cfg.decoder_num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm)
                 for _ in range(cfg.decoder_depth)]
            )  # fmt: skip
            self.decoder_norm = norm(Dd)
            self.decoder_pred = nn.Linear(Dd, cfg.patch_size**2 * cfg.in_chans)
        if cfg.head_type == "vit_head":
            Dc = cfg.classifier_embed_dim
            self.classifier_embed = nn.Linear(D, Dc)
            self.register_buffer("classifier_pos_embed", sincos_pos_embed(Dc, gs)[None])
            dpr = np.linspace(0, cfg.drop_path_rate, max(cfg.classifier_depth, 1)).tolist()
            self.classifier_blocks = nn.ModuleList(
                [Block(Dc, cfg.classifier_num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm,
                       drop_path=dpr[i]) for i in range(cfg.classifier_depth)]
            )  # fmt: skip
            self.classifier_norm = norm(Dc)
            self.classifier_pred = nn.Linear(Dc, cfg.num_classes)
        else:
            self.bn = nn.BatchNorm1d(D, affine=False, eps=1e-6)
            self.head = nn.Linear(D, cfg.num_classes)
        self._init_weights()
        self.set_fused_attn(fused_attn)
        #: attention over at most this many tokens in the qkv projection's (B, T, H, hd) layout, as
        #: broadcast products and sums (:func:`_token_major_attention`); 0: never.  Set by the compiled
        #: batched TTT path (inductor, CPU): 2.3x faster than the permutes + batched tiny matrix products
        #: for the 5 tokens of a 75 %-masked 16-patch image, slower for 17 tokens; slow in eager mode
        self.token_major_max_tokens = 0

    # ------------------------------------------------------------------ set-up
    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        if hasattr(self, "mask_token"):
            nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_fused_attn(self, fused: bool) -> MaskedAutoencoderViT:
        """``True``: ``scaled_dot_product_attention``; ``False``: explicit softmax(QK^T / sqrt(d)) V."""
        for m in self.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = bool(fused)
        return self

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    # ------------------------------------------------------------------ patches
    def check_images(self, imgs: torch.Tensor) -> None:
        c = self.cfg
        if (
            imgs.ndim != 4
            or imgs.shape[1] != c.in_chans
            or imgs.shape[2] != c.img_size
            or imgs.shape[3] != c.img_size
        ):
            raise InvalidInputError(
                f"images of shape {tuple(imgs.shape)}; expected (N, {c.in_chans}, {c.img_size}, {c.img_size})"
            )

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), pixel order (row, col, channel) inside a patch, as upstream."""
        p = self.cfg.patch_size
        n, c, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.cfg.patch_size, self.cfg.in_chans
        h = w = int(math.isqrt(x.shape[1]))
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def mask_noise(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniform noise (n, L) whose argsort picks the kept patches."""
        return torch.rand(n, self.num_patches, generator=generator, device=device)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Keep ``int(L * (1 - mask_ratio))`` tokens per sample: ``(kept, mask (1 = removed), ids_restore)``."""
        n, L, d = x.shape
        keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(n, L, device=x.device, dtype=x.dtype)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return kept, mask, ids_restore

    # ------------------------------------------------------------------ forward parts
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        if noise is not None and x.shape[0] == 1 and noise.shape[0] > 1:
            x = x.expand(noise.shape[0], -1, -1)  # one image, n masks: patch embedding computed once
        if mask_ratio != 0:
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        else:
            mask = ids_restore = None
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = self._run(blk, x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        n, t, d = x.shape
        masked = ids_restore.shape[1] + 1 - t
        tokens = torch.cat([x[:, 1:, :], self.mask_token.expand(n, masked, -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([x[:, :1, :], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred.float() - target.float()) ** 2
        loss = loss.mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward_head(self, latent: torch.Tensor) -> torch.Tensor:
        """Logits from the encoder's tokens (all of them: classification uses mask ratio 0)."""
        if self.cfg.head_type == "linear":
            return self.head(self.bn(latent[:, 0]))
        x = self.classifier_embed(latent)
        if x.shape[1] != 1 + self.num_patches:
            raise InvalidInputError(
                f"vit_head needs all {self.num_patches} patch tokens + CLS, got {x.shape[1]} (mask ratio must be 0)"
            )
        x = x + self.classifier_pos_embed
        for blk in self.classifier_blocks:
            x = self._run(blk, x)
        x = self.classifier_norm(x)
        return self.classifier_pred(x[:, 0])

    def mae_loss(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """MAE loss of ``imgs`` (N, C, H, W) with masks from ``noise`` (N, L).  One image (N = 1) with
        ``noise`` of n > 1 rows is n identical copies with their own masks (single-crop TTT): the patch
        embedding and the normalised targets are computed once and broadcast, the same loss up to float
        rounding of the summed gradients."""
        if not 0 < mask_ratio < 1:
            raise InvalidInputError(f"mask_ratio={mask_ratio}; the MAE loss needs 0 < mask_ratio < 1")
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask)

    def mae_loss_lean(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """:meth:`mae_loss` (same value and gradients up to float rounding) without the work whose result
        the loss cannot read (the fast TTT paths use it; the upstream-style reference keeps
        :meth:`mae_loss`).  Exact cuts:

        - tokens stay in shuffled order, ``[cls, kept..., masked...]``, with the positional embeddings
          gathered to match: no scatter of the encoder's tokens back to patch order, and the decoder's
          attention, being a sum over all tokens, is the same up to summation order;
        - the last decoder block computes queries, attention output, projection, MLP, then
          ``decoder_norm`` and ``decoder_pred`` for the masked tokens only (the loss reads only those;
          keys and values still come from every token);
        - the first decoder block's LayerNorm + qkv of the mask tokens, ``mask_token + pos[j]`` (equal in
          every copy), once per patch position instead of once per masked token of every copy;
        - one image with ``n`` masks (single crop): the first encoder block's LayerNorm + qkv of every
          patch (and the CLS token) once, gathered per copy (in every copy a kept patch is the same
          token), besides the patch embedding and the normalised targets computed once;
        - the pixel targets are normalised after gathering the masked patches (one image: once for all
          patches before gathering).
        """
        if not 0 < mask_ratio < 1:
            raise InvalidInputError(f"mask_ratio={mask_ratio}; the MAE loss needs 0 < mask_ratio < 1")
        L = self.num_patches
        tm = self.token_major_max_tokens
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # (N, L, D), N = 1 or n
        N = x.shape[0]
        n = noise.shape[0] if noise is not None else N
        if noise is None:
            noise = torch.rand(n, L, device=x.device)
        keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_keep, ids_masked = ids_shuffle[:, :keep], ids_shuffle[:, keep:]
        cls = self.cls_token + self.pos_embed[:, :1, :]
        tok_ids = torch.cat([ids_keep.new_zeros(n, 1), ids_keep + 1], dim=1)  # (n, 1 + keep): cls, kept
        blocks = list(self.blocks)
        if N == 1 and n > 1:  # one image, n masks: block 0's LayerNorm + qkv once per token
            tokens = torch.cat([cls, x], dim=1)  # (1, 1 + L, D)
            qkv = blocks[0].attn.qkv(blocks[0].norm1(tokens))
            h = _take(tokens, tok_ids)
            h = _block(blocks[0], h, qkv=_take(qkv, tok_ids), token_major=tm)
            blocks = blocks[1:]
        else:
            h = torch.cat([cls.expand(n, -1, -1), _take(x, ids_keep)], dim=1)
        for blk in blocks:
            h = self._run(blk, h)
        latent = self.norm(h)

        # decoder on [cls, kept (in shuffled order), masked (in shuffled order)]
        dpos = self.decoder_pos_embed  # (1, 1 + L, Dd)
        h = self.decoder_embed(latent) + _take(dpos, tok_ids)
        masked_in = self.mask_token + dpos[:, 1:, :]  # (1, L, Dd): the masked token of each position
        dblocks = list(self.decoder_blocks)
        first = dblocks[0]
        qkv_masked = _take(first.attn.qkv(first.norm1(masked_in)), ids_masked)
        qkv = torch.cat([first.attn.qkv(first.norm1(h)), qkv_masked], dim=1)
        h = torch.cat([h, _take(masked_in, ids_masked)], dim=1)
        t = 1 + keep  # first masked token
        last = len(dblocks) - 1
        h = _block(first, h, qkv=qkv, out_from=t if last == 0 else 0, token_major=tm)
        for i, blk in enumerate(dblocks[1:], start=1):
            h = _block(blk, h, out_from=t, token_major=tm) if i == last else self._run(blk, h)
        pred = self.decoder_pred(self.decoder_norm(h))  # (n, L - keep, P): the masked patches only

        target = self.patchify(imgs)
        if N == 1 and n > 1:
            target = _take(self._norm_pix(target), ids_masked)
        else:
            target = self._norm_pix(_take(target, ids_masked))
        return ((pred.float() - target.float()) ** 2).mean()

    def _norm_pix(self, target: torch.Tensor) -> torch.Tensor:
        if not self.cfg.norm_pix_loss:
            return target
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        return (target - mean) / (var + 1.0e-6) ** 0.5

    def _run(self, blk: Block, x: torch.Tensor) -> torch.Tensor:
        """``blk(x)``, or with the token-major attention for at most ``token_major_max_tokens`` tokens."""
        return _block(blk, x, token_major=True) if x.shape[1] <= self.token_major_max_tokens else blk(x)

    def classify(self, imgs: torch.Tensor) -> torch.Tensor:
        latent, _, _ = self.forward_encoder(imgs, 0.0)
        return self.forward_head(latent)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None,
                mode: str = "mae"):  # fmt: skip
        """``mode="mae"``: the MAE loss (scalar); ``"mae_lean"``: the same through :meth:`mae_loss_lean`;
        ``"classify"``: logits with mask ratio 0; ``"both"``:
        ``(mae loss, logits)`` from two encoder passes."""
        if mode == "mae":
            return self.mae_loss(imgs, mask_ratio, noise)
        if mode == "mae_lean":
            return self.mae_loss_lean(imgs, mask_ratio, noise)
        if mode == "classify":
            return self.classify(imgs)
        if mode == "both":
            return self.mae_loss(imgs, mask_ratio, noise), self.classify(imgs)
        raise InvalidInputError(f"mode={mode!r}; expected 'mae', 'mae_lean', 'classify' or 'both'")


def _take(x: torch.Tensor, ids: torch.Tensor, lookup: bool | None = None) -> torch.Tensor:
    """Rows ``ids`` (n, k) of ``x`` (n or 1, T, C) along the token axis: (n, k, C).

    One row set (x of batch 1) for n > 1 row lists: on the CPU (``lookup``, the default there) a look-up,
    ``embedding``, whose backward adds into (T, C) instead of an (n, T, C) scatter; on other devices a
    gather from the broadcast ``x``, whose backward scatters into (n, T, C) and sums over n.  The CUDA
    ``embedding`` backward of more than a few thousand indices (here n x k = 6,400 and 18,816 per ViT-L
    TTT step) sorts them and reads segment counts back to the host, a host sync per call, four per eager
    step; the gather needs none, and with every row list free of repeats its backward is deterministic.
    Both give the same values and gradients up to float summation order (tested)."""
    if x.shape[0] == 1 and ids.shape[0] != 1:
        if x.device.type == "cpu" if lookup is None else lookup:
            return F.embedding(ids, x[0])
        x = x.expand(ids.shape[0], -1, -1)
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _block(blk: Block, x: torch.Tensor, qkv: torch.Tensor | None = None, out_from: int = 0,
           token_major: bool | int = False) -> torch.Tensor:  # fmt: skip
    """timm ``Block.forward`` on ``x`` (B, T, C), optionally with its qkv (B, T, 3C) given, returning only
    the tokens ``out_from:`` (their queries alone are computed; keys and values come from all tokens).
    ``token_major`` (True, or the most tokens T for which to do so): attention in the (B, T, H, hd)
    layout of the qkv projection (see :func:`_token_major_attention`)."""
    a = blk.attn
    B, T, C = x.shape
    H, hd = a.num_heads, a.head_dim
    Tq = T - out_from
    if token_major is True or (token_major and T <= token_major):
        if qkv is None and out_from:
            hx = blk.norm1(x)
            w, b = a.qkv.weight, a.qkv.bias
            q = F.linear(hx[:, out_from:], w[:C], None if b is None else b[:C]).reshape(B, Tq, H, hd)
            k, v = F.linear(hx, w[C:], None if b is None else b[C:]).reshape(B, T, 2, H, hd).unbind(2)
        else:
            if qkv is None:
                qkv = a.qkv(blk.norm1(x))
            q, k, v = qkv.reshape(B, T, 3, H, hd).unbind(2)
            q = q[:, out_from:]
        o = _token_major_attention(a.q_norm(q), a.k_norm(k), v, a.scale)
        o = a.proj_drop(a.proj(a.norm(o.reshape(B, Tq, C))))
        x = x[:, out_from:] + blk.drop_path1(blk.ls1(o))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    if qkv is None and out_from:
        hx = blk.norm1(x)
        w, b = a.qkv.weight, a.qkv.bias
        q = F.linear(hx[:, out_from:], w[:C], None if b is None else b[:C])
        kv = F.linear(hx, w[C:], None if b is None else b[C:])
        q = q.reshape(B, Tq, H, hd).transpose(1, 2)
        k, v = kv.reshape(B, T, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        if qkv is None:
            qkv = a.qkv(blk.norm1(x))
        q, k, v = qkv.reshape(B, T, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        q = q[:, :, out_from:]
    q, k = a.q_norm(q), a.k_norm(k)
    if a.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v)
    else:
        o = ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    o = a.proj_drop(a.proj(a.norm(o.transpose(1, 2).reshape(B, Tq, C))))
    x = x[:, out_from:] + blk.drop_path1(blk.ls1(o))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def _token_major_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v for tiny heads, every tensor in the token-major layout of the qkv
    projection: q (B, Tq, H, hd), k and v (B, S, H, hd) -> (B, Tq, H, hd).  Written as broadcast products
    and sums, so that under ``torch.compile`` inductor fuses each product into its reduction and no
    (B, H, T, hd) permute copies are made, forward or backward (the gradients of q, k and v land in the
    qkv projection's layout).  Eager, it materialises (B, Tq, S, H, hd) products: compiled paths only."""
    s = ((q * scale)[:, :, None] * k[:, None]).sum(-1)  # (B, Tq, S, H)
    p = s.softmax(dim=2)
    return (p[..., None] * v[:, None]).sum(2)  # (B, Tq, H, hd)


def build_model(name: str, fused_attn: bool = True, **overrides) -> MaskedAutoencoderViT:
    """A named architecture (see :data:`ARCHS`) with :class:`MAEConfig` overrides."""
    return MaskedAutoencoderViT(model_config(name, **overrides), fused_attn=fused_attn)


def config_dict(cfg: MAEConfig) -> dict:
    return asdict(cfg)


def check_mask_ratio(mask_ratio: float) -> float:
    if not 0 <= float(mask_ratio) < 1:
        raise InvalidInputError(f"mask_ratio={mask_ratio}; expected a value in [0, 1)")
    return float(mask_ratio)
