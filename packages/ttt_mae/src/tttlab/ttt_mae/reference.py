"""The upstream-style sequential TTT path, kept as the reference for tests and the speed benchmark.

It does per image what ``engine_test_time.py`` does: load a deep copy of the base model's state dict into
a clone model, mark the parameters of ``finetune_mode`` trainable, build a new optimizer over them (the
plain per-tensor loop: ``foreach=False``), then ``steps_per_example`` steps, each followed by an
eval-mode prediction.  Attention is whatever the model was built with (the benchmark builds it with the
explicit softmax attention, ``fused_attn=False``, as upstream's timm version had).  Random numbers come
from the same per-image generator, in the same order, as :class:`tttlab.ttt_mae.ttt.TTTAdapter`, so the
two paths see the same views and masks and must give the same per-step predictions.
"""

from __future__ import annotations

import copy

import torch

from .model import MaskedAutoencoderViT
from .ttt import ImageResult, TTTSettings
from .views import make_views


def upstream_parameters(model: MaskedAutoencoderViT, finetune_mode: str) -> list[torch.nn.Parameter]:
    """Upstream's ``get_prameters_from_args``: freeze ``decoder*`` (and cls/mask tokens)."""
    if finetune_mode == "all":
        return list(model.parameters())
    for name, p in model.named_parameters():
        frozen = name.startswith("decoder")
        if finetune_mode == "encoder_no_cls_no_msk":
            frozen = frozen or name in ("cls_token", "mask_token")
        if frozen:
            p.requires_grad = False
    return [p for p in model.parameters() if p.requires_grad]


class ReferenceTTT:
    def __init__(self, base_model: MaskedAutoencoderViT, settings: TTTSettings, device="cpu"):
        self.base = base_model.to(device)
        self.s = settings.check()
        self.device = torch.device(device)
        self.clone = copy.deepcopy(base_model).to(device)
        self.size = base_model.cfg.img_size

    def _reinitialize(self):
        self.clone.load_state_dict(copy.deepcopy(self.base.state_dict()))
        self.clone.train(True)
        params = upstream_parameters(self.clone, self.s.finetune_mode)
        if self.s.optimizer_type == "sgd":
            opt = torch.optim.SGD(params, lr=self.s.lr, momentum=self.s.optimizer_momentum, foreach=False)
        elif self.s.optimizer_type == "adam":
            opt = torch.optim.Adam(params, lr=self.s.lr, betas=(0.9, 0.95), foreach=False)
        else:
            opt = torch.optim.AdamW(params, lr=self.s.lr, betas=(0.9, 0.95), foreach=False)
        opt.zero_grad()
        return opt

    def adapt(self, raw: torch.Tensor, generator: torch.Generator, normalize) -> ImageResult:
        opt = self._reinitialize()
        model = self.clone
        test = normalize(raw[None]).to(self.device)
        with torch.no_grad():
            model.eval()
            preds = [int(model.classify(test).argmax(1))]
            model.train()
        losses = []
        for _ in range(self.s.steps_per_example):
            views = make_views(raw, self.s.batch_size, single_crop=self.s.single_crop, size=self.size,
                               generator=generator, scale=self.s.crop_scale, flip=self.s.flip)  # fmt: skip
            noise = model.mask_noise(self.s.batch_size, generator)
            loss = model.mae_loss(normalize(views).to(self.device), self.s.mask_ratio, noise.to(self.device))
            losses.append(float(loss.item()))
            loss.backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                model.eval()
                preds.append(int(model.classify(test).argmax(1)))
                model.train()
        return ImageResult(preds, losses)
