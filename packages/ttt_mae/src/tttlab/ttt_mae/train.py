"""MAE pretraining and head probing (upstream ``main_pretrain.py`` / ``main_prob.py``), one loop for both.

- pretrain: the MAE loss (``mask_ratio``, ``norm_pix_loss``) on RandomResizedCrop(0.2, 1) + flip views;
  AdamW (0.9, 0.95), weight decay on every tensor of 2+ dims (weights, cls / mask tokens), not on biases
  and norms (upstream's ``optim_factory.add_weight_decay`` with no skip list);
- probe: the encoder frozen (checkpoint ``finetune``, decoder and mask token dropped, as upstream), only the
  ``classifier*`` parameters (``vit_head``) or ``head``/``bn`` (``linear``) train with label-smoothed
  cross-entropy (``smoothing``) on the encoder's tokens at mask ratio 0; AdamW (0.9, 0.999), weight decay
  ``weight_decay`` on all head parameters (upstream passes them all to AdamW).

Both: ``lr = blr * batch_size * accum_iter * world_size / 256`` unless ``lr`` is set, linear warm-up over
``warmup_epochs`` then half-cosine to ``min_lr``, adjusted every iteration (fractional epoch), as upstream.

Run directory (``out_dir``, core ``RunDir``): ``config.yaml``, ``env.json``, ``stats.json`` (per-epoch
loss/lr), ``records.jsonl`` (per-epoch ``train_loss`` records, ``probe`` also ``accuracy`` on the clean
test split), ``checkpoints/last.ckpt`` (model, optimizer, epoch: written atomically every
``save_ckpt_freq`` epochs and at the end) and ``checkpoint.pth`` = ``{"model": state dict}`` (upstream's
layout: the pretraining file is a ``resume_model``, the probe file a ``resume_finetune``).  Random numbers
(data order, views, masks) come from generators seeded by ``(seed, epoch, rank)``, so a run killed
mid-epoch and started again in the same directory resumes from the last checkpoint and ends bitwise equal
(CPU) to an uninterrupted one (the same training config only: see Resuming below).  ``torchrun``:
DistributedDataParallel, each rank a disjoint shard of each epoch's permutation (padded to equal length, as
DistributedSampler).

Data come from ``tttlab.core.data``.  ImageNet, as upstream (torchvision ``ImageFolder``): each
training view is a RandomResizedCrop of the whole decoded file (its scale range relative to the file's
area), the evaluation view ``Resize(256)`` bicubic + ``CenterCrop(input_size)`` of the file (also the
training view with ``aug.enabled=false``); MNIST, digits and CIFAR-10 are fixed-size arrays, cropped as
they are.  Differences from upstream: the crop is resized bicubically on tensors (``views.py``; upstream
resizes the PIL image); probing evaluates the clean held-out split at the end only (ImageNet: all of
``val``, as upstream; other datasets: the first 2,000 ``test`` images).  With ``accum_iter > 1`` an
epoch whose iteration count is not a multiple of ``accum_iter`` ends with one optimizer step on its last,
partial group of batches (its loss still divided by ``accum_iter``); upstream drops those gradients (its
next epoch starts with ``zero_grad``).  The paper's probe is unaffected: 1,281,167 images over 8 ranks
of 32 give 5,004 iterations per epoch, a multiple of 4.  ``head_type=linear`` probing is ours: upstream's ``main_prob.py``
asserts ``vit_head`` (its LARS branch for the linear head never runs), and here the linear head (``bn`` +
``head``) trains with the same AdamW recipe, not MAE's LARS linear-probe recipe.  Head keys
(``classifier*``, ``head.*``, ``bn.*``) in the ``finetune`` file are ignored, so the head always starts
from its own initialisation (upstream's non-strict load would take same-named head tensors; its own
pretraining files hold only the unused ``linear`` head's keys, which a ``vit_head`` model lacks).

Options (not upstream): ``amp`` (``none`` | ``bf16``: the forward and loss under
``torch.autocast(device.type, bfloat16)``, also the probe's clean-accuracy pass; parameters, gradients and
AdamW state stay float32; no GradScaler, which bf16 does not need) and ``compile`` (``true``:
``torch.compile`` in torch's default mode, or a mode's name, e.g. ``reduce-overhead``; of the training
step's forward + loss, i.e. the model called through its DDP wrapper when there is one; backward runs
through the compiled graph, the optimizer step stays eager; the probe's final clean-accuracy pass
runs eager).  Both are config keys, so they enter the run's ``config_hash`` and its training identity
(below): a run directory is not resumed with another value.

Resuming: ``checkpoints/last.ckpt`` is resumed only by a run of the same command and training config
(:func:`training_identity`: every key but the display keys, :data:`RESUMABLE_KEYS` and
:data:`PLACEMENT_KEYS`, i.e. ``out_dir``, ``save_ckpt_freq``, ``device``, ``num_threads``, ...) on as many
processes, and a probe only while its ``finetune`` file still holds the encoder it froze; otherwise a
``CheckpointError`` names the differing keys (or the changed file) before anything is written (use another
``out_dir``, or ``start_over=true``).  A folder without that checkpoint but with the records of another
training config is refused the same way (``RunDirConflictError``): its epochs were taken as done.
``start_over=true`` starts over in the folder instead: its checkpoints (``checkpoints/last.ckpt``,
``checkpoint.pth``), ``stats.json`` and the records of every config are removed, another config's
``config.yaml`` replaced, with one warning naming what went (core ``RunDir(start_over=...)``, as the other
packages' ``resume=false``); the key is an action, no part of the run's config (left out of
``config.yaml``, the checkpoints and every hash).  Only records of the run's own config (``config_hash``)
count as done.  A run whose config differs from the folder's only in display keys or
:data:`RESUMABLE_KEYS` (which change no number) is the same run: its records are re-tagged with the new
hash, without a warning; one that differs in :data:`PLACEMENT_KEYS` resumes with a warning, and the records
of each part keep their hash.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tttlab.core.config import config_diff
from tttlab.core.errors import CheckpointError, ConfigError, InvalidInputError
from tttlab.core.records import DISPLAY_KEYS, RunDir, check_run_dir, read_jsonl, without_keys
from tttlab.core.torch import autocast

from .checkpoint import HEAD_PREFIXES, atomic_save, read_checkpoint, state_dict_of
from .common import (
    CROP_SCALE,
    Dist,
    check_amp_compile,
    check_values,
    compile_kwargs,
    crop_scale_ok,
    finite_nonneg,
    init_distributed,
    model_overrides,
    normalization,
    progress_bar,
    resolve_device,
    set_threads,
)  # fmt: skip
from .model import MaskedAutoencoderViT, build_model, check_mask_ratio
from .views import Normalizer, random_resized_crop_views, to_unit

log = logging.getLogger("tttlab.ttt_mae.train")
FINAL = "checkpoint.pth"


def load_dataset(c: dict[str, Any], split: str | None = None, full_images: bool = False):
    """The training (or ``split``) dataset of ``c['data']`` from ``tttlab.core.data``.

    ImageNet files come as upstream's evaluation transform makes them, ``Resize(256)`` bicubic (shorter
    side) + ``CenterCrop(input_size)``, or with ``full_images`` as decoded, each at its own size (read them
    with ``take_list``), for training crops drawn from the whole photo.  The other datasets are arrays of
    one size (MNIST 28 px, CIFAR-10 32 px: already the full images)."""
    from tttlab.core import data

    d = c["data"]
    name, split = d["name"], split or d["split"]
    if name == "mnist":
        ds = data.mnist(split)
    elif name == "digits":
        ds = data.digits(split)
    elif name in ("imagenet", "cifar10"):
        if not d.get("root"):
            raise ConfigError(f"data.name={name!r} needs data.root=<path to the dataset>")
        if name == "imagenet":
            size = int(c.get("input_size") or 224)
            transform = None if full_images else data.resize_center_crop(256, size, interpolation="bicubic")
            ds = data.imagenet(d["root"], split=split, transform=transform)
        else:
            ds = data.cifar10(d["root"], split=split)
    else:
        raise ConfigError(f"data.name={name!r}; expected mnist, digits, imagenet or cifar10")
    k = d.get("num_examples")
    if k is not None and int(k) < len(ds):
        k = int(k)
        # ImageNet's files are sorted by class: evenly spaced ones, so that a subset spans every class;
        # the other datasets are not class-sorted and keep their first k
        ds = ds.subset(np.arange(k) * len(ds) // k if name == "imagenet" else np.arange(k))
    return ds


def lr_at(c: dict[str, Any], epoch_float: float, base_lr: float) -> float:
    """Linear warm-up then half-cosine to ``min_lr`` (upstream's ``adjust_learning_rate``)."""
    warm, total, min_lr = float(c["warmup_epochs"]), float(c["epochs"]), float(c["min_lr"])
    if epoch_float < warm:
        return base_lr * epoch_float / warm
    span = max(total - warm, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch_float - warm) / span))


def build(c: dict[str, Any], kind: str) -> MaskedAutoencoderViT:
    extra = {"no_decoder": True, "drop_path_rate": float(c["drop_path"])} if kind == "probe" else {}
    model = build_model(c["model"], fused_attn=bool(c["fused_attn"]), **model_overrides(c, **extra))
    if kind == "probe":
        if not c["finetune"]:
            raise ConfigError("probe needs finetune=<path of the MAE pretraining checkpoint>")
        sd = state_dict_of(read_checkpoint(c["finetune"], "finetune", c["weights_only"]), c["finetune"])
        sd = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}
        sd = {k: v for k, v in sd.items() if not k.startswith(("classifier", "head.", "bn."))}
        expected = model.state_dict()
        body = [k for k in expected if not k.startswith(("classifier", "head.", "bn."))]
        missing = [k for k in body if k not in sd]
        unexpected = [k for k in sd if k not in expected]
        bad = [f"{k} {tuple(sd[k].shape)} != {tuple(expected[k].shape)}" for k in sd
               if k in expected and sd[k].shape != expected[k].shape]  # fmt: skip
        if missing or unexpected or bad:
            raise CheckpointError(
                f"finetune={c['finetune']}: does not fit model {c['model']}: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}, shape mismatch {bad[:8]}"
            )
        model.load_state_dict(sd, strict=False)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("classifier", "head.", "bn.")))
    else:  # MAE pretraining: the head gets no gradient (and DDP needs every trained parameter used)
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(("classifier", "head.", "bn.")))
    return model


def param_groups(model: torch.nn.Module, weight_decay: float, kind: str):
    if kind == "probe":
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # upstream (and MAE): timm's add_weight_decay without a skip list: no decay on 1-D tensors and biases;
        # the (1, 1, D) cls / mask tokens are decayed
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(c: dict[str, Any], model: torch.nn.Module, kind: str, world_size: int = 1):
    """``(AdamW, base lr)``: ``lr = blr * batch_size * accum_iter * world_size / 256`` unless ``lr`` is set;
    betas (0.9, 0.95) for pretraining (MAE), (0.9, 0.999) for probing (upstream ``main_prob.py``)."""
    eff = int(c["batch_size"]) * int(c["accum_iter"]) * int(world_size)
    base_lr = float(c["lr"]) if c["lr"] is not None else float(c["blr"]) * eff / 256
    betas = (0.9, 0.95) if kind == "pretrain" else (0.9, 0.999)
    opt = torch.optim.AdamW(param_groups(model, float(c["weight_decay"]), kind), lr=base_lr, betas=betas)
    return opt, base_lr


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed) * 7919 + int(epoch) * 104_729 + int(rank) * 15_485_863 + 17)
    return g


def shard_indices(n: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """This rank's part of the epoch's permutation (padded by wrapping so all ranks get the same count)."""
    perm = np.random.default_rng([int(seed), int(epoch), 0xDA7A]).permutation(n)
    per = math.ceil(n / world)
    perm = np.concatenate([perm, perm[: per * world - n]])
    return perm[rank::world]


def crops_from_files(c: dict[str, Any]) -> bool:
    """Whether the training views are cropped from each decoded file (ImageNet with augmentation), as
    upstream's ``ImageFolder`` + ``RandomResizedCrop`` do, rather than from a fixed-size array."""
    return c["data"]["name"] == "imagenet" and bool(c["aug"]["enabled"])


def augment(x: torch.Tensor | list[np.ndarray], c: dict[str, Any], g: torch.Generator) -> torch.Tensor:
    """The training views (N, C, input_size, input_size) in [0, 1]: RandomResizedCrop(``aug.crop_scale``,
    aspect (3/4, 4/3)) + flip of each image, drawn from ``g`` in order; ``x`` is a float (N, C, H, W)
    batch, or a list of uint8 (H, W, C) images of any sizes (the decoded files), the crop then taken
    from the whole image and its scale relative to the whole image's area."""
    aug = c["aug"]
    if not aug["enabled"]:
        return x
    size = int(c["input_size"])
    scale = tuple(float(s) for s in aug["crop_scale"])
    if isinstance(x, list):  # torch.tensor copies: a decoded file's array may be read-only
        x = [torch.tensor(im).permute(2, 0, 1) for im in x]
    return torch.cat(
        [random_resized_crop_views(im, 1, size, g, scale=scale, flip=bool(aug["flip"])) for im in x]
    )


def run(c: dict[str, Any], kind: str, stop_after_steps: int | None = None) -> Path:
    """Train per the composed config ``c`` (``kind``: ``pretrain`` | ``probe``); returns ``checkpoint.pth``.

    ``stop_after_steps``: return after that many optimizer steps without saving (simulates a kill)."""
    if kind not in ("pretrain", "probe"):
        raise ConfigError(f"kind={kind!r}")
    # an action, not a property of the run: out of config.yaml, the checkpoints and every hash, so runs and
    # caches made before the key existed keep theirs
    start_over = c.get("start_over", False)
    if not isinstance(start_over, bool):
        raise ConfigError(f"start_over={start_over!r}; expected true or false")
    c = {k: v for k, v in c.items() if k != "start_over"}
    check_mask_ratio(c["mask_ratio"])
    if not float(c["lr"] if c["lr"] is not None else c["blr"]) > 0:  # also NaN
        which = (
            f"lr={c['lr']}" if c["lr"] is not None else f"blr={c['blr']} (lr = blr * effective batch / 256)"
        )
        raise ConfigError(f"{which}; expected a learning rate > 0")
    check_values(c, {
        "seed": (lambda v: v >= 0, "an integer >= 0"),
        "epochs": (lambda v: v >= 1, "an integer >= 1"),
        "warmup_epochs": (lambda v: v >= 0, "an integer >= 0"),
        "accum_iter": (lambda v: v >= 1, "an integer >= 1 (batches per optimizer step)"),
        "save_ckpt_freq": (lambda v: v >= 1, "an integer >= 1 (epochs between checkpoints)"),
        "min_lr": (finite_nonneg, "a finite number >= 0"),
        "weight_decay": (finite_nonneg, "a finite number >= 0"),
        "smoothing": (lambda v: v is None or 0 <= v < 1, "a label smoothing in [0, 1)"),
        "drop_path": (lambda v: v is None or 0 <= v < 1, "a drop-path rate in [0, 1)"),
        "aug.crop_scale": (lambda v: not c["aug"]["enabled"] or crop_scale_ok(v), CROP_SCALE),
        "data.root": (lambda v: v is None or c["data"]["name"] not in ("mnist", "digits"),
                      f"null: data.name={c['data']['name']!r} is embedded and read from no path"),
    })  # fmt: skip
    check_amp_compile(c)
    dist: Dist = init_distributed()
    device = resolve_device(c["device"])
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.rank % torch.cuda.device_count())
    set_threads(c, device)
    out = Path(c["out_dir"])
    from_files = crops_from_files(c)
    ds = load_dataset(c, full_images=from_files)
    stats = normalization(c, c["data"]["name"])
    norm = Normalizer(*stats) if stats else (lambda x: x)
    seed = int(c["seed"])
    torch.manual_seed(seed)
    model = build(c, kind).to(device)
    # input_size was checked against the patch size by model_overrides (common.py)
    # the run directory only once the data, the checkpoint to probe and the model are known to be good: a
    # mistyped path leaves no half-made run behind
    # a checkpoint of another training config is refused before RunDir rewrites config.yaml (it resumed,
    # mixing two configs' epochs in one model and one folder)
    ckpt_path = RunDir.checkpoint_path_in(out, "last")
    ck = None
    if ckpt_path.exists() and not start_over:  # start_over: removed unread (it may be another config's)
        ck = read_checkpoint(ckpt_path, "resume checkpoint")  # tensors and plain containers only
        check_resumable(ck, c, kind, dist.world_size, ckpt_path)
        if kind == "probe":  # the same finetune path, but another file there (e.g. pretrained again)
            frozen = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIXES)}
            changed = [k for k, v in frozen.items()
                       if k not in ck["model"] or not torch.equal(ck["model"][k].cpu(), v.cpu())]  # fmt: skip
            if changed:
                raise CheckpointError(
                    f"{ckpt_path} was written by a probe of another encoder than finetune={c['finetune']} "
                    f"holds now ({len(changed)} of its {len(frozen)} frozen tensors differ, e.g. {changed[0]}): "
                    "the file changed since; use another out_dir, or start_over=true to probe it there from the "
                    "start"
                )
    if ck is None and not start_over:  # no checkpoint to resume: a folder holding another training config's
        # records is refused too (their epochs were taken as done, its stats.json kept); records of this
        # config (a kill between an epoch's record and its checkpoint) are this run's
        check_run_dir(out, c, identity=training_identity, resumable_keys=RESUMABLE_KEYS, append_env=False,
                      start_over="start_over=true")  # fmt: skip
    starting_over = start_over and dist.rank == 0  # rank 0 writes the folder's files; the others read none
    rd = RunDir(out, c, rank=dist.rank if dist.world_size > 1 else None, resumable_keys=RESUMABLE_KEYS,
                start_over="start_over=true" if starting_over else None,
                removed=_remove_previous_run(out) if starting_over else ())  # fmt: skip
    opt, base_lr = make_optimizer(c, model, kind, dist.world_size)
    start_epoch, history = 0, []
    ckpt_path = rd.checkpoint_path("last")
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, history = int(ck["epoch"]) + 1, list(ck.get("history", []))
        if dist.rank == 0 and start_epoch >= int(c["epochs"]):
            log.info("%s already finished (%d epochs) in %s; delete that folder or set another out_dir to "
                     "train again", kind, start_epoch, out)  # fmt: skip
        elif dist.rank == 0:
            log.info("resuming %s from %s (epoch %d of %d)", kind, ckpt_path, start_epoch, int(c["epochs"]))
    net = model
    if dist.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if c["compile"]:  # the step's forward + loss (DDP's module compiled through the wrapper: DDPOptimizer
        # splits the graph at the gradient buckets); the checkpoints keep saving ``model`` (no _orig_mod keys)
        net = torch.compile(net, **compile_kwargs(c["compile"]))
    bs, accum = int(c["batch_size"]), int(c["accum_iter"])
    progress = bool(c["logging"]["progress"]) and dist.rank == 0
    steps_done = 0
    epochs = int(c["epochs"])
    for epoch in range(start_epoch, epochs):
        g = epoch_generator(seed, epoch, dist.rank)
        idx = shard_indices(len(ds), seed, epoch, dist.rank, dist.world_size)
        n_iter = max(len(idx) // bs, 1)
        model.train()
        total, count, t0 = 0.0, 0, time.perf_counter()
        with progress_bar(n_iter, f"{kind} epoch {epoch}", progress) as bar:
            for it in range(n_iter):
                sel = idx[it * bs : (it + 1) * bs]
                if from_files:  # each file at its own size, cropped from the whole photo
                    images, labels = ds.take_list(sel)
                    x = norm(augment(images, c, g)).to(device)
                else:
                    images, labels = ds.take(sel)
                    x = norm(augment(to_unit(images), c, g)).to(device)
                if it % accum == 0:
                    for group in opt.param_groups:
                        group["lr"] = lr_at(c, epoch + it / n_iter, base_lr)
                with autocast(device, c["amp"]):
                    if kind == "pretrain":
                        noise = model.mask_noise(len(x), g).to(device)
                        loss = net(x, mask_ratio=float(c["mask_ratio"]), noise=noise, mode="mae")
                    else:
                        y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
                        logits = net(x, mode="classify")
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=float(c["smoothing"]))
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise InvalidInputError(f"{kind}: loss is {value} at epoch {epoch} iteration {it}")
                (loss / accum).backward()
                if (it + 1) % accum == 0 or it + 1 == n_iter:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    steps_done += 1
                    if stop_after_steps is not None and steps_done >= stop_after_steps:
                        return ckpt_path
                total, count = total + value * len(x), count + len(x)
                bar.update(1)
        if dist.world_size > 1:  # the loss of all ranks' images (rank 0 logs and records it)
            t = torch.tensor([total, count], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t)
            total, count = float(t[0]), int(t[1])
        entry = {"epoch": epoch, "train_loss": total / max(count, 1), "lr": opt.param_groups[-1]["lr"],
                 "seconds": time.perf_counter() - t0}  # fmt: skip
        history.append(entry)
        if dist.rank == 0:
            log.info("%s epoch %d: loss %.4f (%.1f s)", kind, epoch, entry["train_loss"], entry["seconds"])
        last = epoch + 1 == epochs
        if dist.rank == 0:
            # every epoch's stats and record, each once, then (every save_ckpt_freq epochs) the checkpoint: a
            # kill before it redoes the epochs since the previous one, whose lines are there already.  They
            # were written at checkpoint epochs only, so save_ckpt_freq=2 recorded every other epoch
            if epoch not in rd.read_stats().get("epoch", []):
                rd.append_stats({"epoch": epoch, "train_loss": entry["train_loss"], "lr": entry["lr"]})
            if not _recorded(rd, "train_loss", epoch):
                with rd.writer(method=f"ttt_mae.{kind}", package="ttt_mae", framework="torch",
                               model=c["model"], dataset=c["data"]["name"], seed=seed) as w:  # fmt: skip
                    w.write(metric="train_loss", value=entry["train_loss"], step=epoch, n=count,
                            wall_time_s=entry["seconds"])  # fmt: skip
        if dist.rank == 0 and (last or (epoch + 1) % max(int(c["save_ckpt_freq"]), 1) == 0):
            atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                         "history": history, "config": c, "kind": kind,
                         "world_size": dist.world_size}, ckpt_path)  # fmt: skip
        dist.barrier()
    final = out / FINAL
    if dist.rank == 0:
        if kind == "probe" and not _recorded(rd, "accuracy", epochs):  # once (a kill before the final
            # checkpoint.pth below recomputed it and recorded it twice)
            acc, n = clean_accuracy(model, c, device, norm)
            if n == 0:  # no test/val split next to the training data: nothing to record (was a NaN record)
                log.info("probe: no test split of data.name=%s found; clean accuracy not measured",
                         c["data"]["name"])  # fmt: skip
            else:
                with rd.writer(method="ttt_mae.probe", package="ttt_mae", framework="torch", model=c["model"],
                               dataset=c["data"]["name"], seed=seed) as w:  # fmt: skip
                    w.write(metric="accuracy", value=acc, n=n, step=epochs, extra={"split": "test"})
                log.info("probe: clean test accuracy %.4f on %d images", acc, n)
        atomic_save({"model": model.state_dict(), "epoch": epochs - 1, "config": c}, final)
    dist.barrier()
    return final


#: config keys beside core's ``DISPLAY_KEYS`` that change no number a pretrain/probe run computes (core
#: ``RunDir(resumable_keys=...)``): where its folder is and its default name, how often it checkpoints, how
#: ``finetune`` is read (the same tensors either way) and the evaluate section it does not use.  A run that
#: differs from its folder's config only in them (and display keys) is the same run.  Paths to data
#: (``data.root``, ``finetune``) are not among them: another path may hold other data.
RESUMABLE_KEYS = ("out_dir", "experiment_name", "save_ckpt_freq", "weights_only", "benchmark")
#: where a run computes (``device``, ``num_threads``): a checkpoint resumes across them, but they change the
#: float rounding (on CPU the thread count changes the sums), so they stay in the records' identity.
PLACEMENT_KEYS = ("device", "num_threads")


def training_identity(c: dict[str, Any]) -> dict[str, Any]:
    """What a pretrain/probe run's weights depend on: ``c`` without the display keys,
    :data:`RESUMABLE_KEYS` and :data:`PLACEMENT_KEYS`."""
    return without_keys(c, (*DISPLAY_KEYS, *RESUMABLE_KEYS, *PLACEMENT_KEYS))


def check_resumable(ck: Any, c: dict[str, Any], kind: str, world_size: int, path: Path) -> None:
    """Raise :class:`~tttlab.core.errors.CheckpointError` unless the resume checkpoint ``ck`` (read from
    ``path``) was written by a ``kind`` run of the same training config (:func:`training_identity`) and,
    where it says, the same number of processes (they set the lr and the data shards)."""
    old = ck.get("config") if isinstance(ck, dict) else None
    if not isinstance(old, dict) or not all(k in ck for k in ("model", "optimizer", "epoch")):
        raise CheckpointError(
            f"{path}: not a tttlab-ttt-mae {kind} checkpoint (expected keys config, model, optimizer, "
            "epoch); use another out_dir, or start_over=true to train there from the start"
        )
    diff = config_diff(training_identity(old), training_identity(c))
    if ck.get("kind", kind) != kind:
        diff.insert(0, f"command: {ck['kind']!r} -> {kind!r}")
    if ck.get("world_size", world_size) != world_size:
        diff.append(f"processes: {ck['world_size']} -> {world_size}")
    if diff:
        shown = "; ".join(diff[:8]) + (f"; ... ({len(diff) - 8} more)" if len(diff) > 8 else "")
        raise CheckpointError(
            f"{path} was written by a run with another training config ({shown}); resuming it would mix "
            "the two configs in one model: use another out_dir, or start_over=true to train this config there "
            "from the start"
        )


def _remove_previous_run(out: Path) -> list[str]:
    """Delete what a previous pretrain/probe run left in ``out`` besides records and config (a run that
    starts over: its checkpoints, which a later run would resume or evaluate would take as trained, and
    ``stats.json``, whose epochs a new run would skip); return their names for the start over's warning."""
    gone = []
    for path in (RunDir.checkpoint_path_in(out, "last"), out / FINAL, out / "stats.json"):
        if path.is_file():
            path.unlink()
            gone.append(path.relative_to(out).as_posix())
    return [f"the previous run's {gone[0]}", *gone[1:]] if gone else []


def _recorded(rd: RunDir, metric: str, step: int) -> bool:
    """Whether ``rd``'s records of this run's config (its ``config_hash``) already hold ``metric`` at
    ``step`` (a resumed run writes it once; another config's record there is not this run's)."""
    return any(r["metric"] == metric and r["step"] == step and r["config_hash"] == rd.config_hash
               for r in read_jsonl(rd.records_path))  # fmt: skip


@torch.no_grad()
def clean_accuracy(model: MaskedAutoencoderViT, c: dict[str, Any], device, norm, limit: int = 2000):
    """Top-1 on the held-out split; ``(nan, 0)`` when there is none.  ImageNet: all of ``val`` at
    upstream's evaluation transform (``Resize(256)`` bicubic + ``CenterCrop(input_size)``), as upstream's
    probe evaluates it (its files are sorted by class: a first-``limit`` cut would cover only
    the first classes, 40 of the 1000 at 2,000 images); other datasets: the first ``limit`` images of
    ``test`` (MNIST's, the digits' and CIFAR-10's test sets are not sorted by class)."""
    split = "val" if c["data"]["name"] == "imagenet" else "test"
    try:
        ds = load_dataset({**c, "data": {**c["data"], "num_examples": None}}, split=split)
    except Exception:  # noqa: BLE001 - no test split (e.g. an ImageNet folder with train only)
        return float("nan"), 0
    n = len(ds) if split == "val" else min(len(ds), limit)
    model.eval()
    correct = 0
    for s in range(0, n, 256):
        images, labels = ds.take(np.arange(s, min(s + 256, n)))
        x = norm(to_unit(images)).to(device)
        with autocast(device, c["amp"]):
            pred = model.classify(x).argmax(1).cpu().numpy()
        correct += int((pred == np.asarray(labels)).sum())
    return correct / n, n
