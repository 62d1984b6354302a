"""Offline proxies: a tiny CLIP trained on embedded MNIST with captions, and a small MNIST CNN for MEMO.

No pretrained CLIP exists offline, so TPT's effect is shown on a CLIP trained here in seconds to minutes:
an open_clip ``CLIP`` built from a custom config (ViT on 28 px digits, patch 7; a 1-2 layer text
transformer with open_clip's BPE vocabulary) trained with the symmetric InfoNCE loss on MNIST digits and
captions drawn from templates such as "a photo of the number seven", "a handwritten digit seven",
"the number 7".  Test prompts use TPT's base prompt "a photo of a" + the class word ("a photo of a
seven."), which no training caption uses, so the prompt has something to learn.  Training images get mild
random resized crops (scale 0.6-1, no flips) so that TPT's crop views are in distribution.

Models are cached under ``cache_dir`` as ``<kind>-<hash of the training config>.pt`` (atomic write:
temporary file + rename) and reused; :func:`load_or_train_clip` / :func:`load_or_train_cnn`.  Training keeps
no checkpoint (it takes seconds to minutes): a run killed while training trains again from the start, to
the same weights.

    tttlab-memo-tpt-train-tiny-clip --profile full --cache-dir runs/memo_tpt/models [--amp bf16] [--compile]

``--amp bf16`` (``amp="bf16"``): the training loss's forward under bfloat16 autocast (weights and optimizer
state float32); ``--compile [MODE]``: ``torch.compile`` of the loss (forward + backward graph; MODE a
``torch.compile`` mode, e.g. ``reduce-overhead``; without it torch's default mode).  Both are part of
the cache key when set (another model); the evaluate contract always uses the float32 eager models.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tttlab.core.errors import CheckpointError
from tttlab.core.records import config_hash
from tttlab.core.torch import read_torch_file

from . import augment as A

log = logging.getLogger("tttlab.memo_tpt.tiny_clip")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a photo of the number {w}", "a photo of the digit {w}", "a handwritten digit {w}", "the number {w}",
    "a drawing of the number {w}", "a picture of a {w}", "the digit {d}", "a white {w} on black",
)  # fmt: skip
MNIST_MEAN, MNIST_STD = (0.1307,) * 3, (0.3081,) * 3

#: training settings per evaluate profile (smoke: CI seconds; quick / full: demos)
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(width=32, layers=1, text_width=32, text_layers=1, embed_dim=32, steps=8, batch_size=32,
                  num_train=512, lr=2e-3),
    "quick": dict(width=48, layers=2, text_width=48, text_layers=1, embed_dim=48, steps=250, batch_size=128,
                  num_train=20000, lr=3e-3),
    "full": dict(width=64, layers=2, text_width=64, text_layers=1, embed_dim=64, steps=500, batch_size=128,
                 num_train=60000, lr=3e-3),
}  # fmt: skip
CNN_PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(channels=8, steps=8, batch_size=32, num_train=512, lr=3e-3),
    "quick": dict(channels=16, steps=250, batch_size=128, num_train=20000, lr=3e-3),
    "full": dict(channels=16, steps=500, batch_size=128, num_train=60000, lr=3e-3),
}  # fmt: skip


def clip_config(p: dict[str, Any]) -> dict[str, Any]:
    """open_clip ``CLIP(**config)`` arguments of the tiny CLIP."""
    return dict(
        embed_dim=p["embed_dim"],
        vision_cfg=dict(image_size=28, layers=p["layers"], width=p["width"], patch_size=7, head_width=32),
        text_cfg=dict(
            context_length=16,
            vocab_size=49408,
            width=p["text_width"],
            heads=max(1, p["text_width"] // 32),
            layers=p["text_layers"],
        ),  # fmt: skip
    )


def captions(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    t = rng.integers(len(TEMPLATES), size=len(labels))
    return [TEMPLATES[i].format(w=DIGIT_WORDS[y], d=int(y)) for i, y in zip(t, labels)]


def mnist_rgb(split: str, num: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Embedded MNIST as float (N, 3, 28, 28) in [0, 1] and labels."""
    from tttlab.core.data import mnist

    ds = mnist(split)
    n = len(ds) if num is None else min(num, len(ds))
    x, y = ds.take(np.arange(n))
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255).expand(-1, 3, -1, -1).contiguous(), y


def random_crops(x: torch.Tensor, scale=(0.6, 1.0), generator=None) -> torch.Tensor:
    """One random resized crop per image of a batch (no flip), at the input size."""
    n, _, h, w = x.shape
    boxes = A.random_resized_crop_boxes(n, h, w, scale=scale, generator=generator).double()
    a = torch.zeros(n, 2, 3, dtype=torch.float64)
    a[:, 0, 0], a[:, 0, 2] = boxes[:, 2] / w, boxes[:, 0]
    a[:, 1, 1], a[:, 1, 2] = boxes[:, 3] / h, boxes[:, 1]
    return A._warp(x, a, (h, w), padding="border")


def _atomic_save(obj, path: Path) -> None:
    from tttlab.core._io import atomic_path, remove_stale_temps

    remove_stale_temps(Path(path).parent)  # a model whose save a killed run left half-written
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _progress(total: int, desc: str, enabled: bool):
    from ._progress import progress_bar

    return progress_bar(total, desc, enabled, leave=False)


def _clip_loss(model, imgs: torch.Tensor, text: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with same-digit soft targets ``same`` (rows sum to 1)."""
    img_f = F.normalize(model.encode_image(imgs), dim=-1)
    txt_f = F.normalize(model.encode_text(text), dim=-1)
    logits = model.logit_scale.exp() * img_f @ txt_f.t()
    if logits.dtype != torch.float32:  # amp: the loss in float32
        logits = logits.float()
    return (
        -(same * logits.log_softmax(1)).sum(1).mean() - (same * logits.t().log_softmax(1)).sum(1).mean()
    ) / 2


def _train_options(amp, compile) -> str:
    from .precision import check_compile, resolve_amp

    check_compile(compile)  # false | true | a torch.compile mode
    return resolve_amp(amp, torch.device("cpu"), "train")


def train_clip(p: dict[str, Any], seed: int = 0, progress: bool = False, amp: str = "none",
               compile: bool = False):  # fmt: skip
    """Train the tiny CLIP; returns the model (eval mode).  ``amp``: ``none`` | ``bf16`` (autocast of the
    loss's forward; weights and AdamW state float32); ``compile``: ``torch.compile`` of the loss (both
    encoders + InfoNCE; backward through the compiled graph)."""
    from open_clip.tokenizer import SimpleTokenizer

    from .models import build_clip
    from .precision import autocast, compile_fn

    amp = _train_options(amp, compile)
    torch.manual_seed(seed)
    model = build_clip("tiny-mnist", config=clip_config(p))
    tok = SimpleTokenizer(context_length=16)
    x, y = mnist_rgb("train", p["num_train"])
    mean = torch.tensor(MNIST_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(MNIST_STD).view(1, 3, 1, 1)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=p["lr"], weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p["lr"], total_steps=p["steps"], pct_start=0.1)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = lambda *a: _clip_loss(model, *a)  # noqa: E731
    if compile:
        loss_fn = compile_fn(loss_fn, compile)
    model.train()
    with _progress(p["steps"], "tiny CLIP", progress) as bar:
        for _ in range(p["steps"]):
            idx = rng.integers(len(y), size=p["batch_size"])
            imgs = (random_crops(x[idx], generator=gen) - mean) / std
            text = tok(captions(y[idx], rng))
            # captions of the same digit are positives of each other only through the targets below
            target = torch.as_tensor(y[idx])
            same = (target[:, None] == target[None, :]).float()
            same = same / same.sum(1, keepdim=True)
            with autocast(amp, torch.device("cpu")):
                loss = loss_fn(imgs, text, same)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)
            bar.update(1)
    return model.eval()


class MnistCNN(nn.Module):
    """A small BatchNorm CNN for MEMO on MNIST (3-channel input so that the same views serve CLIP)."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.BatchNorm2d(4 * c), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(4 * c, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def train_cnn(p: dict[str, Any], seed: int = 0, progress: bool = False, amp: str = "none",
              compile: bool = False) -> MnistCNN:  # fmt: skip
    """Train the MEMO CNN (``amp`` / ``compile`` as :func:`train_clip`: the forward + cross-entropy)."""
    from .precision import autocast, compile_fn

    amp = _train_options(amp, compile)
    torch.manual_seed(seed)
    model = MnistCNN(p["channels"])
    loss_fn = lambda a, b: F.cross_entropy(model(a).float(), b)  # noqa: E731
    if compile:
        loss_fn = compile_fn(loss_fn, compile)
    x, y = mnist_rgb("train", p["num_train"])
    yt = torch.as_tensor(y)
    mean = torch.tensor(MNIST_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(MNIST_STD).view(1, 3, 1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=p["lr"])
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with _progress(p["steps"], "MNIST CNN", progress) as bar:
        for _ in range(p["steps"]):
            idx = rng.integers(len(y), size=p["batch_size"])
            views = (random_crops(x[idx], generator=gen) - mean) / std
            with autocast(amp, torch.device("cpu")):
                loss = loss_fn(views, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
    return model.eval()


def _cached(kind: str, p: dict[str, Any], seed: int, cache_dir, train, build, progress: bool,
            amp: str = "none", compile: bool = False):  # fmt: skip
    amp = _train_options(amp, compile)
    ident = {"kind": kind, "params": p, "seed": seed, "version": 1}
    # a bf16 / compiled model is another model; the fp32 eager key is the one caches have always had
    ident.update({"amp": amp} if amp != "none" else {}, **({"compile": compile} if compile else {}))
    key = config_hash(ident)
    path = Path(cache_dir) / f"{kind}-{key}.pt"
    if path.exists():
        model = build()
        try:
            state = read_torch_file(path, option=None, what="cached model")
        except CheckpointError as exc:  # a truncated or corrupt cache file: name it and the cure
            raise CheckpointError(f"{exc}; delete it and the model is trained again") from None
        model.load_state_dict(state)
        log.info("%s from the cache: %s", kind, path)
        return model.eval(), path
    t0 = time.perf_counter()
    model = train(p, seed, progress, amp=amp, compile=compile)
    _atomic_save(model.state_dict(), path)
    log.info("trained %s in %.1f s -> %s", kind, time.perf_counter() - t0, path)
    return model, path


def load_or_train_clip(profile: str = "full", cache_dir="runs/memo_tpt/models", seed: int = 0, progress=False,
                       overrides: dict | None = None, amp: str = "none", compile: bool = False):  # fmt: skip
    """``(model, path)``: the tiny CLIP of ``profile``, from the cache or trained now (``amp`` / ``compile``
    of the training: :func:`train_clip`; they are part of the cache key when not the defaults)."""
    from .models import build_clip

    p = {**PROFILES[profile], **(overrides or {})}
    return _cached("tiny_clip", p, seed, cache_dir, train_clip,
                   lambda: build_clip("tiny-mnist", config=clip_config(p)), progress, amp, compile)  # fmt: skip


def load_or_train_cnn(profile: str = "full", cache_dir="runs/memo_tpt/models", seed: int = 0, progress=False,
                      overrides: dict | None = None, amp: str = "none", compile: bool = False):  # fmt: skip
    p = {**CNN_PROFILES[profile], **(overrides or {})}
    return _cached("mnist_cnn", p, seed, cache_dir, train_cnn, lambda: MnistCNN(p["channels"]), progress,
                   amp, compile)  # fmt: skip


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="train (or find cached) the tiny MNIST CLIP and CNN")
    ap.add_argument("--profile", default="full", choices=sorted(PROFILES))
    ap.add_argument("--cache-dir", default="runs/memo_tpt/models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--amp", default="none", choices=["auto", "none", "bf16"],
                    help="training precision: none/auto = float32 (default), bf16 = bfloat16 autocast")  # fmt: skip
    ap.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                    help="torch.compile the training loss (torch's default mode, or MODE: default, "
                         "reduce-overhead, max-autotune, max-autotune-no-cudagraphs)")  # fmt: skip
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    kw = dict(progress=True, amp=args.amp, compile=args.compile)
    from tttlab.core.cli import user_errors

    with user_errors("tttlab-memo-tpt-train-tiny-clip"):  # e.g. --compile fast: one line, no traceback
        from .models import require_open_clip

        require_open_clip()  # before the first model is trained
        print(load_or_train_clip(args.profile, args.cache_dir, args.seed, **kw)[1])
        print(load_or_train_cnn(args.profile, args.cache_dir, args.seed, **kw)[1])


if __name__ == "__main__":
    main()
