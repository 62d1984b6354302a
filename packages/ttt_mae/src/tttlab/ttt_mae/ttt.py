"""Test-time training with masked autoencoders, per image, as upstream's ``engine_test_time.py`` does it.

Paper: Gandelsman et al., "Test-Time Training with Masked Autoencoders", NeurIPS 2022
(``gandelsman2022testtime``); upstream github.com/yossigandelsman/test_time_training_mae.

Per test image (:meth:`TTTAdapter.adapt`):

1. reset the trainable parameters to the base weights and start a fresh optimizer (SGD, momentum 0.9,
   weight decay 0, ``lr = blr * batch_size / 256``);
2. ``steps_per_example`` times: build a batch of ``batch_size`` views of the image (identical copies with
   ``single_crop``, else RandomResizedCrop(0.2, 1) + flip), each with its own random mask
   (``mask_ratio``), take one optimizer step on the MAE loss (train mode), then classify the image
   (eval mode, mask ratio 0) and record the prediction after that step.

``finetune_mode`` (upstream's rule): ``encoder`` freezes parameters whose name starts with ``decoder``
(cls token, mask token and patch embedding still train); ``all`` trains everything;
``encoder_no_cls_no_msk`` also freezes ``cls_token`` and ``mask_token``.  The head's parameters are
trainable in upstream's optimizer but never receive a gradient from the MAE loss, so SGD leaves them
untouched; we leave them out of the optimizer (same result, less work).

What differs from upstream and why:

- *no deep copy per image*: the trainable tensors are restored in place from one snapshot
  (``torch._foreach_copy_``) and the optimizer state is cleared (a fresh optimizer has none); upstream
  deep-copies the full state dict into a second model for every image;
- *one host sync per image*: each step's loss and prediction stay on the device until the image is done
  (upstream reads both back after every step), the masks' noise goes to the GPU from page-locked memory
  without blocking, the normaliser keeps its constants on the device and, on a GPU, the lean loss's
  token look-ups avoid ``embedding``'s backward (which reads counts back to the host), so the host queues
  step ``k + 1`` while the device still runs step ``k``;
- upstream wraps the fp32 step in a ``GradScaler`` (scale 2**16, unscaled before the step): power-of-two
  scaling is exact in fp32 unless a gradient overflows, so plain ``loss.backward()`` is the same step;
- *exact FLOP cuts* (``exact_cuts``, default on): the MAE loss through
  :meth:`~tttlab.ttt_mae.model.MaskedAutoencoderViT.mae_loss_lean`, which skips what the loss cannot read
  (the last decoder block and the prediction head on the kept tokens and CLS; the mask tokens' first
  decoder qkv once per position; with single-crop copies passed as one image with ``n`` masks, the first
  encoder block's qkv once per patch): ~18 % fewer FLOP per step at 32 copies of the MNIST proxy, the
  same losses, gradients and predictions up to float rounding (tested against the reference);
- options: ``amp="bf16"`` autocast, ``scaled_dot_product_attention`` (default) or the explicit softmax
  attention (``fused_attn=False``), a foreach/fused optimizer, ``torch.compile`` of the MAE loss
  (:class:`TTTAdapter`) or of the whole batched step (:class:`BatchedTTT`), and of the prediction
  (``compile_predict``; the baseline, 0 steps, compiles the prediction only); in the compiled batched step on
  CPU, attention over at most ``token_major_tokens`` tokens (the encoder's 1 + 4 kept tokens on the MNIST
  proxy) as broadcast products in the qkv projection's layout (no head permutes, no batched products of
  5x16x5 matrices; 2.3x faster per attention, 5 % per step there), the same up to float rounding;
- random numbers come from a per-image generator seeded by ``(seed, domain, image index)``, so a result
  does not depend on the order, the number of processes or batching;
- :class:`BatchedTTT` adapts ``G`` images at once, each with its own weights and momentum
  (``torch.func.functional_call`` + ``vmap`` + ``grad``), for small models whose one-image batch leaves
  the machine idle; it equals :class:`TTTAdapter` up to float rounding (tested).

Step indexing: ``predictions[k]`` is the prediction after ``k`` steps (``k = 0``: no adaptation, the
baseline); upstream's ``accuracy.txt`` line ``i`` is our step ``i + 1``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from tttlab.core.errors import ConfigError, InvalidInputError
from tttlab.core.torch import autocast, check_amp, compile_kwargs

from .model import MaskedAutoencoderViT, check_mask_ratio
from .views import make_views

FINETUNE_MODES = ("encoder", "all", "encoder_no_cls_no_msk")
OPTIMIZERS = ("sgd", "adam", "adam_w")
HEAD_PREFIXES = ("classifier", "head.", "bn.")


@dataclass
class TTTSettings:
    steps_per_example: int = 20
    batch_size: int = 128  # copies of the image per step
    mask_ratio: float = 0.75
    lr: float = 5e-3  # absolute: blr * batch_size / 256
    optimizer_type: str = "sgd"
    optimizer_momentum: float = 0.9
    finetune_mode: str = "encoder"
    single_crop: bool = True
    crop_scale: tuple[float, float] = (0.2, 1.0)
    flip: bool = True
    amp: str = "none"  # none | bf16
    compile: bool = False  # TTTAdapter: the MAE loss; BatchedTTT: the whole step (grads + SGD update)
    # torch.compile mode: None (torch's default) or one of core's COMPILE_MODES ("reduce-overhead": CUDA
    # graphs, the measured GPU fast path; "max-autotune-no-cudagraphs", ...); the configs' compile=<mode>
    compile_mode: str | None = None
    foreach: bool | None = True  # None: torch's default; False: the plain per-tensor loop
    fused: bool = False  # the fused optimizer kernel (CUDA only; ignored on CPU); overrides foreach
    exact_cuts: bool = True  # the lean MAE loss (MaskedAutoencoderViT.mae_loss_lean): same result, fewer FLOP
    compile_predict: bool = True  # with compile: the per-step prediction compiled as well (always at 0 steps)
    # BatchedTTT with compile, on CPU: attention over at most this many tokens (the encoder's kept tokens)
    # as broadcast products in the qkv layout, no permutes (MaskedAutoencoderViT.token_major_max_tokens); 0: off
    token_major_tokens: int = 8
    # BatchedTTT with compile: once its graphs are compiled, call them for groups of the compiled size with
    # dynamo's guard evaluation skipped (torch.compiler.set_stance(skip_guard_eval_unsafe=True)); the
    # inputs' shapes, dtypes and the model's flags are fixed by this class, so the guards cannot fail there
    skip_guards: bool = True

    def check(self) -> TTTSettings:
        if int(self.steps_per_example) < 0:
            raise InvalidInputError(f"steps_per_example={self.steps_per_example}; expected >= 0")
        if int(self.batch_size) < 1:
            raise InvalidInputError(f"batch_size={self.batch_size}; expected >= 1")
        if self.steps_per_example > 0 and not 0 < float(self.mask_ratio) < 1:
            raise InvalidInputError(f"mask_ratio={self.mask_ratio}; TTT needs a value in (0, 1)")
        check_mask_ratio(self.mask_ratio)
        if self.finetune_mode not in FINETUNE_MODES:
            raise ConfigError(f"finetune_mode={self.finetune_mode!r}; expected one of {FINETUNE_MODES}")
        if self.optimizer_type not in OPTIMIZERS:
            raise ConfigError(f"optimizer_type={self.optimizer_type!r}; expected one of {OPTIMIZERS}")
        self.amp = check_amp(self.amp)
        if self.compile_mode is not None:
            compile_kwargs(self.compile_mode, "compile_mode")  # a ConfigError unless a torch.compile mode
        return self


def trainable_names(model: MaskedAutoencoderViT, finetune_mode: str) -> list[str]:
    """Parameters the TTT optimizer updates (upstream's rule, minus the head, which gets no gradient)."""
    if finetune_mode not in FINETUNE_MODES:
        raise ConfigError(f"finetune_mode={finetune_mode!r}; expected one of {FINETUNE_MODES}")
    names = []
    for name, _ in model.named_parameters():
        if name.startswith(HEAD_PREFIXES):
            continue
        if finetune_mode in ("encoder", "encoder_no_cls_no_msk") and name.startswith("decoder"):
            continue
        if finetune_mode == "encoder_no_cls_no_msk" and name in ("cls_token", "mask_token"):
            continue
        names.append(name)
    return names


def image_generator(seed: int, domain_index: int, image_index: int) -> torch.Generator:
    """The per-image generator (views, then masks, step by step)."""
    g = torch.Generator()
    g.manual_seed(int(seed) * 1_000_003 + int(domain_index) * 100_000_007 + int(image_index) + 1)
    return g


@dataclass
class ImageResult:
    predictions: list[int]  # after 0..steps steps
    losses: list[float]  # MAE loss of each step (before its update)


class TTTAdapter:
    """Per-image test-time training of one model (see the module docstring)."""

    def __init__(self, model: MaskedAutoencoderViT, settings: TTTSettings, device: torch.device | str = "cpu",
                 input_size: int | None = None):  # fmt: skip
        self.s = settings.check()
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.size = input_size or model.cfg.img_size
        if self.s.steps_per_example > 0 and not hasattr(model, "decoder_pred"):
            raise ConfigError("test-time training needs the MAE decoder; the model was built with no_decoder")
        names = set(trainable_names(model, self.s.finetune_mode))
        self.params = []
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)
            if name in names:
                self.params.append(p)
        self.snapshot = [p.detach().clone() for p in self.params]
        self.optimizer = self._make_optimizer()
        self._loss = self.model.mae_loss_lean if self.s.exact_cuts else self.model.mae_loss
        self._classify = self.model.classify
        if self.s.compile:
            if self.s.steps_per_example > 0:  # the lean loss too (exact_cuts): the same graph-break-free code
                self._loss = torch.compile(self._loss, mode=self.s.compile_mode)
            if self.s.compile_predict or self.s.steps_per_example == 0:  # the baseline: prediction only
                self._classify = torch.compile(self.model.classify, mode=self.s.compile_mode)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        s = self.s
        kw = {}
        if s.fused and self.device.type == "cuda":  # the CPU fused kernel is far slower than foreach
            kw["fused"] = True
        elif s.foreach is not None:
            kw["foreach"] = bool(s.foreach)
        if s.optimizer_type == "sgd":
            return torch.optim.SGD(self.params, lr=s.lr, momentum=s.optimizer_momentum, **kw)
        cls = torch.optim.Adam if s.optimizer_type == "adam" else torch.optim.AdamW
        return cls(self.params, lr=s.lr, betas=(0.9, 0.95), **kw)

    @torch.no_grad()
    def reset(self) -> None:
        """Base weights back, optimizer state dropped (= a fresh optimizer)."""
        torch._foreach_copy_(self.params, self.snapshot)
        self.optimizer.state.clear()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with autocast(self.device, self.s.amp):
            return self._classify(images.to(self.device)).float()

    def step(self, views: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the MAE loss of ``views`` with the masks of ``noise``; returns the loss (before
        the update) as a 0-dim tensor on the model's device, without waiting for the device (no host sync)."""
        self.model.train()
        if self.s.single_crop and self.s.exact_cuts:
            views = views[:1]  # one image, n masks (patch embedding, block 0's qkv, targets once)
        if self.s.compile:  # a new step for CUDA-graph trees (compile_mode="reduce-overhead"): the last
            torch.compiler.cudagraph_mark_step_begin()  # step's graph outputs were all read already
        with autocast(self.device, self.s.amp):
            loss = self._loss(views, self.s.mask_ratio, noise)
        value = loss.detach().float().clone()  # a copy: a CUDA-graph output is overwritten by the next replay
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def draw(
        self, raw: torch.Tensor, generator: torch.Generator, normalize
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's views (normalised, on ``raw``'s device) and mask noise (on the model's device) of an
        image, drawn from its generator (a CPU generator: the same numbers on any device).  Single-crop
        copies are a stride-0 expansion of one normalised image (no 128 x C x H x W host copy)."""
        if self.s.single_crop:
            views = normalize(raw[None]).expand(self.s.batch_size, -1, -1, -1)
        else:
            views = normalize(make_views(raw, self.s.batch_size, single_crop=False, size=self.size,
                                         generator=generator, scale=self.s.crop_scale, flip=self.s.flip))  # fmt: skip
        noise = self.model.mask_noise(self.s.batch_size, generator)
        if self.device.type == "cuda":  # page-locked: the copy is queued on the stream, the host runs on
            noise = noise.pin_memory().to(self.device, non_blocking=True)
        else:
            noise = noise.to(self.device)
        return views, noise

    def adapt(self, raw: torch.Tensor, generator: torch.Generator, normalize) -> ImageResult:
        """TTT on one image ``raw`` (C, H, W) in [0, 1]; the model is reset first (and left adapted)."""
        if raw.shape[-1] != self.size or raw.shape[-2] != self.size:
            raise InvalidInputError(
                f"image of size {tuple(raw.shape[-2:])}; expected {self.size}x{self.size}"
            )
        self.reset()
        raw = raw.to(self.device)
        test = normalize(raw[None])
        # predictions and losses stay on the device until the image is done: one host sync per image, so
        # the host queues step k + 1 (and draws its views and masks) while the device still runs step k
        preds = [self.predict(test).argmax(1)]
        losses = []
        for _ in range(self.s.steps_per_example):
            views, noise = self.draw(raw, generator, normalize)
            losses.append(self.step(views, noise))
            preds.append(self.predict(test).argmax(1))
        pred_list = torch.cat(preds).tolist()
        loss_list = torch.stack(losses).tolist() if losses else []
        return ImageResult(pred_list, loss_list)


class BatchedTTT:
    """``G`` images adapted at once, each with its own copy of the trainable weights and its own SGD
    momentum (``vmap`` over ``functional_call``); equal to :class:`TTTAdapter` image by image."""

    def __init__(self, model: MaskedAutoencoderViT, settings: TTTSettings, device: torch.device | str = "cpu",
                 input_size: int | None = None):  # fmt: skip
        self.s = settings.check()
        if self.s.optimizer_type != "sgd":
            raise ConfigError(
                f"batched adaptation supports optimizer_type='sgd', got {self.s.optimizer_type!r}"
            )
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.size = input_size or model.cfg.img_size
        self.names = trainable_names(model, self.s.finetune_mode)
        named = dict(model.named_parameters())
        self.base = {n: named[n].detach() for n in self.names}
        self.frozen = {n: p.detach() for n, p in named.items() if n not in self.base}
        self.frozen.update(dict(model.named_buffers()))
        self._helper = TTTAdapter.__new__(TTTAdapter)
        self._helper.s, self._helper.model, self._helper.size = self.s, model, self.size
        self._helper.device = self.device
        self._compiled_step = None
        self._compiled_logits = None
        self._compiled_groups: set[int] = set()

    def _step_fn(self, params, bufs, views, noise):
        """One SGD step of every image (functional): per-image grads of the MAE loss (``vmap`` of
        ``grad``), momentum ``b = m b + g`` (``b = 0`` before the first step gives torch's ``b = g``
        exactly), ``p = p - lr b``; returns ``(params, bufs, losses)``.  ``torch.compile`` fuses it."""
        from torch.func import grad, vmap

        grads, loss = vmap(grad(self._loss, has_aux=True))(params, views, noise)
        lr, mom = self.s.lr, self.s.optimizer_momentum
        new_b = {k: bufs[k] * mom + grads[k] for k in params} if mom != 0 else grads
        new_p = {k: params[k] - lr * new_b[k] for k in params}
        return new_p, new_b, loss

    def _loss(self, params, views, noise):
        from torch.func import functional_call

        with autocast(self.device, self.s.amp):
            mode = "mae_lean" if self.s.exact_cuts else "mae"
            loss = functional_call(self.model, (params, self.frozen), (views,),
                                   {"mask_ratio": self.s.mask_ratio, "noise": noise, "mode": mode})  # fmt: skip
        return loss.float(), loss.detach().float()

    def _logits(self, params, image):
        from torch.func import functional_call

        with autocast(self.device, self.s.amp):
            return functional_call(self.model, (params, self.frozen), (image[None],), {"mode": "classify"})[
                0
            ].float()

    def _group_logits(self, params, images):
        """Each image's logits under its own weights: ``vmap`` over the group; under ``amp=bf16`` a loop over
        the images instead, because autocast inside a bare ``torch.func.vmap`` leaves ``F.linear`` in float32
        in this torch (it does cast under ``vmap(grad(...))``, the loss path)."""
        from torch.func import vmap

        if self.s.amp == "bf16":
            return torch.stack(
                [
                    self._logits({k: v[i] for k, v in params.items()}, images[i])
                    for i in range(images.shape[0])
                ]
            )
        return vmap(self._logits)(params, images)

    def adapt(
        self, raws: list[torch.Tensor], generators: list[torch.Generator], normalize
    ) -> list[ImageResult]:
        """Adapt ``len(raws)`` images at once.  On CPU, attention under ``vmap`` uses the explicit softmax
        form (``vmap`` has no batching rule for the CPU flash kernel and would loop over the images)."""
        flags = [(m, m.fused_attn) for m in self.model.modules() if hasattr(m, "fused_attn")]
        token_major = self.model.token_major_max_tokens
        if self.device.type == "cpu":
            self.model.set_fused_attn(False)
            if self.s.compile:
                self.model.token_major_max_tokens = int(self.s.token_major_tokens)
        try:
            if self.s.compile:  # steps_per_example 0 (the baseline): the compiled prediction only
                return self._adapt_compiled(raws, generators, normalize)
            return self._adapt(raws, generators, normalize)
        finally:
            for m, f in flags:
                m.fused_attn = f
            self.model.token_major_max_tokens = token_major

    def _adapt(
        self, raws: list[torch.Tensor], generators: list[torch.Generator], normalize
    ) -> list[ImageResult]:
        from torch.func import grad, vmap

        G = len(raws)
        raws = [r.to(self.device) for r in raws]
        test = normalize(torch.stack(raws))
        params = {n: b.unsqueeze(0).repeat(G, *([1] * b.dim())) for n, b in self.base.items()}
        bufs: dict[str, torch.Tensor] | None = None
        logits_fn = self._group_logits
        grad_fn = vmap(grad(self._loss, has_aux=True))
        self.model.eval()
        with torch.no_grad():  # predictions and losses stay on the device until the end (one host sync)
            preds = [logits_fn(params, test).argmax(-1)]
        losses: list[torch.Tensor] = []
        lr, mom = self.s.lr, self.s.optimizer_momentum
        keys = list(params)
        one = self.s.single_crop and self.s.exact_cuts  # one image + n masks
        for _ in range(self.s.steps_per_example):
            drawn = [self._helper.draw(r, g, normalize) for r, g in zip(raws, generators)]
            views = torch.stack([d[0][:1] if one else d[0] for d in drawn])
            noise = torch.stack([d[1] for d in drawn])
            self.model.train()
            grads, loss = grad_fn(params, views, noise)
            with torch.no_grad():
                g_list = [grads[k] for k in keys]
                p_list = [params[k] for k in keys]
                if mom != 0:
                    if bufs is None:
                        bufs = {k: grads[k].clone() for k in keys}
                    else:
                        b_list = [bufs[k] for k in keys]
                        torch._foreach_mul_(b_list, mom)
                        torch._foreach_add_(b_list, g_list)
                    g_list = [bufs[k] for k in keys]
                torch._foreach_add_(p_list, g_list, alpha=-lr)
            losses.append(loss.detach().float())
            self.model.eval()
            with torch.no_grad():
                preds.append(logits_fn(params, test).argmax(-1))
        return _group_results(preds, losses, G)

    def _adapt_compiled(
        self, raws: list[torch.Tensor], generators: list[torch.Generator], normalize
    ) -> list[ImageResult]:
        """:meth:`_adapt` with the step compiled (``settings.compile``).  Shapes are static: a group smaller
        than the first one is padded with copies of its first image (their results are dropped), so one
        compiled graph serves every group.  Single-crop steps pass the image once with ``batch_size``
        masks (the model broadcasts it: patch embedding and targets computed once per image)."""

        warm = self._compiled_step is not None
        if self._compiled_step is None:
            self._compiled_step = torch.compile(self._step_fn, mode=self.s.compile_mode, dynamic=False)
            # the per-step prediction (eval mode, no grad) too: eager vmap costs ~1/8 of a compiled step
            self._compiled_logits = self._group_logits
            if self.s.compile_predict:
                self._compiled_logits = torch.compile(
                    self._compiled_logits, mode=self.s.compile_mode, dynamic=False
                )
            self._group = len(raws)
            self._compiled_sig = {(tuple(r.shape), r.dtype) for r in raws}
        n = len(raws)
        G = max(self._group, n)
        pad = G - n
        # guards are skipped only where they would pass: the group size and every image's shape and dtype
        # are those the graphs were compiled for (anything else goes through dynamo's checks/recompiles)
        same = G == self._group and {(tuple(r.shape), r.dtype) for r in raws} <= self._compiled_sig
        with contextlib.ExitStack() as stack:
            if self.s.skip_guards and warm and same:  # the graphs of this very shape exist
                stack.enter_context(torch.compiler.set_stance("default", skip_guard_eval_unsafe=True))
            return self._run_compiled(raws, generators, normalize, G, pad)

    def _run_compiled(self, raws, generators, normalize, G: int, pad: int) -> list[ImageResult]:
        n = len(raws)
        raws = [r.to(self.device) for r in raws] + [raws[0].to(self.device)] * pad
        generators = list(generators) + [torch.Generator().manual_seed(0) for _ in range(pad)]
        test = normalize(torch.stack(raws))
        params = {k: b.unsqueeze(0).repeat(G, *([1] * b.dim())) for k, b in self.base.items()}
        bufs = {k: torch.zeros_like(v) for k, v in params.items()}
        logits_fn = self._compiled_logits
        self.model.eval()
        with torch.no_grad():  # predictions and losses stay on the device until the end (one host sync)
            preds = [logits_fn(params, test).argmax(-1)]
        losses: list[torch.Tensor] = []
        single = self.s.single_crop
        for _ in range(self.s.steps_per_example):
            drawn = [self._helper.draw(r, g, normalize) for r, g in zip(raws, generators)]
            views = torch.stack([d[0][:1] if single else d[0] for d in drawn])
            noise = torch.stack([d[1] for d in drawn])
            self.model.train()
            params, bufs, loss = self._compiled_step(params, bufs, views, noise)
            losses.append(loss.detach().float().clone())  # a copy: CUDA-graph outputs are overwritten
            self.model.eval()
            with torch.no_grad():
                logits = logits_fn(params, test)
            preds.append(logits.argmax(-1))
        return _group_results(preds, losses, n)


def _group_results(preds: list[torch.Tensor], losses: list[torch.Tensor], n: int) -> list[ImageResult]:
    """Per-image results of the first ``n`` images of a group from the per-step device tensors
    (``preds[k]``: (G,) after ``k`` steps; ``losses[k]``: (G,) of step ``k + 1``), read in one transfer."""
    p = torch.stack(preds).tolist()
    loss = torch.stack(losses).tolist() if losses else []
    return [ImageResult([row[i] for row in p], [float(row[i]) for row in loss]) for i in range(n)]
