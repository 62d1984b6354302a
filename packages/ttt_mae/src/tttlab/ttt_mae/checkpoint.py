"""Checkpoints: the official TTT-MAE files from local paths, and this package's own (atomic) files.

Official files (no network: pass local paths as ``resume_model`` / ``resume_finetune``):

``mae_pretrain_vit_large_full.pth`` (facebookresearch/mae, MAE ViT-L/16 with its decoder): a dict with key
``model`` -> state dict (float32) of::

    cls_token                         (1, 1, 1024)
    pos_embed                         (1, 197, 1024)      fixed 2-D sin-cos, CLS row zero
    mask_token                        (1, 1, 512)
    patch_embed.proj.weight / .bias   (1024, 3, 16, 16) / (1024,)
    blocks.{0..23}.norm1.weight/.bias (1024,)
    blocks.{i}.attn.qkv.weight/.bias  (3072, 1024) / (3072,)
    blocks.{i}.attn.proj.weight/.bias (1024, 1024) / (1024,)
    blocks.{i}.norm2.weight/.bias     (1024,)
    blocks.{i}.mlp.fc1.weight/.bias   (4096, 1024) / (4096,)
    blocks.{i}.mlp.fc2.weight/.bias   (1024, 4096) / (1024,)
    norm.weight / norm.bias           (1024,)
    decoder_embed.weight / .bias      (512, 1024) / (512,)
    decoder_pos_embed                 (1, 197, 512)
    decoder_blocks.{0..7}.*           as blocks.* at width 512 (qkv (1536, 512), fc1 (2048, 512), ...)
    decoder_norm.weight / .bias       (512,)
    decoder_pred.weight / .bias       (768, 512) / (768,)      768 = 16 * 16 * 3

``prob_lr1e-3_wd.2_blk12_ep20.pth`` (the trained ``vit_head``, upstream ``main_prob.py`` with
``no_decoder=True``): key ``model`` -> the encoder keys above without the decoder ones, plus::

    classifier_embed.weight / .bias        (768, 1024) / (768,)
    classifier_pos_embed                   (1, 197, 768)
    classifier_blocks.{0..11}.*            as blocks.* at width 768 (qkv (2304, 768), fc1 (3072, 768))
    classifier_norm.weight / .bias         (768,)
    classifier_pred.weight / .bias         (1000, 768) / (1000,)

and training state (``optimizer``, ``epoch``, ``scaler``, ``args``) that is not used.  As upstream, only
the ``classifier*`` keys are taken from the head file (its encoder copy is the frozen pretrained encoder).
A ``linear`` head file holds ``head.0.running_mean`` / ``head.0.running_var`` (BatchNorm without affine)
and ``head.1.weight`` / ``head.1.bias``; they become ``bn.*`` / ``head.*``.

Every key of the model must come from the files with the model's shape, the pretraining file may not
hold encoder/decoder keys the model lacks (a checkpoint of another architecture), and the head file may not
hold head keys the model lacks (e.g. more ``classifier_blocks`` than ``classifier_depth``): otherwise
:class:`~tttlab.core.errors.CheckpointError` names the missing, unexpected and mismatched keys.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tttlab.core.errors import CheckpointError
from tttlab.core.torch import read_torch_file

from .model import MaskedAutoencoderViT

HEAD_PREFIXES = ("classifier", "head.", "bn.")
#: buffers a file may lack (filled from the model)
OPTIONAL = ("bn.num_batches_tracked",)
LINEAR_HEAD_KEYS = {
    "head.0.running_mean": "bn.running_mean", "head.0.running_var": "bn.running_var",
    "head.0.num_batches_tracked": "bn.num_batches_tracked", "head.1.weight": "head.weight",
    "head.1.bias": "head.bias",
}  # fmt: skip


def read_checkpoint(
    path: str | os.PathLike, what: str = "checkpoint", weights_only: bool = True
) -> dict[str, Any]:
    """What a local ``.pth`` file holds, by core's reader: tensors, plain containers and the
    ``argparse.Namespace`` the official files save as ``args``; anything else pickled in the file is a
    ``CheckpointError`` naming it and ``weights_only=false`` (a full unpickle: trusted files only), as is a
    missing or unreadable file."""
    return read_torch_file(
        path, weights_only, allow=[argparse.Namespace], option="weights_only=false", what=what
    )


def state_dict_of(ckpt: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("model"), Mapping):
        return dict(ckpt["model"])
    if isinstance(ckpt, Mapping) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt)
    keys = list(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
    raise CheckpointError(f"{path}: expected a dict with key 'model' (a state dict), got keys {keys}")


def _names(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def combine_state_dicts(
    model: MaskedAutoencoderViT, pretrained: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor] | None,
    *, model_path: str = "resume_model", head_path: str = "resume_finetune",
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The model's full state dict from the pretraining file (all but head keys) and the head file
    (``classifier*`` or the linear ``head.{0,1}`` keys), checked against the model (names + shapes)."""
    expected = model.state_dict()
    own = "classifier" if model.cfg.head_type == "vit_head" else ("head.", "bn.")
    swapped = ""  # the pretraining file given as the head and the head file as the model: say so
    if (
        head is not None
        and any(k.startswith("decoder") for k in head)
        and not any(k.startswith("decoder") for k in pretrained)
    ):
        swapped = (
            f"; {head_path} holds the MAE decoder and {model_path} does not: are the two files swapped? "
            "resume_model takes the pretraining checkpoint, resume_finetune the probe's (the head): "
            f"resume_model={head_path} resume_finetune={model_path}"
        )
    out: dict[str, torch.Tensor] = {}
    unexpected, extra_head = [], []
    for k, v in pretrained.items():
        if k.startswith(HEAD_PREFIXES):
            if head is None and k in expected:  # a file with everything (e.g. our own ttt snapshot)
                out[k] = v
            elif head is None and k.startswith(own) and k not in OPTIONAL:
                extra_head.append(k)
            continue
        if k in expected:
            out[k] = v
        else:
            unexpected.append(k)
    if unexpected:
        raise CheckpointError(
            f"{model_path}: keys the model ({model.cfg.embed_dim}-d, {model.cfg.depth} blocks, "
            f"head {model.cfg.head_type}) does not have: {_names(unexpected)}; is it a checkpoint of "
            "another architecture?"
        )
    if head is not None:
        for k, v in head.items():
            k = LINEAR_HEAD_KEYS.get(k, k) if model.cfg.head_type == "linear" else k
            if k.startswith(HEAD_PREFIXES) and k in expected:
                out[k] = v
            elif k.startswith(own) and k not in OPTIONAL:
                extra_head.append(k)
    if extra_head:  # e.g. a 12-block head file into classifier_depth=8: never drop trained blocks silently
        raise CheckpointError(
            f"{head_path if head is not None else model_path}: head keys the model (head_type "
            f"{model.cfg.head_type}, classifier_depth {model.cfg.classifier_depth}) does not have: {_names(extra_head)}; does classifier_depth "
            "(or head_type) match the file?" + swapped
        )
    missing = [k for k in expected if k not in out and k not in OPTIONAL]
    mismatched = [
        f"{k} {tuple(out[k].shape)} != {tuple(expected[k].shape)}"
        for k in out
        if tuple(out[k].shape) != tuple(expected[k].shape)
    ]
    if missing or mismatched:
        parts = []
        if missing:
            src = {"head": head_path, "body": model_path}
            head_missing = [k for k in missing if k.startswith(HEAD_PREFIXES)]
            body_missing = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
            if body_missing:
                parts.append(f"missing in {src['body']}: {_names(body_missing)}")
            if head_missing:
                parts.append(
                    f"missing in {src['head'] if head is not None else src['body']}: {_names(head_missing)}"
                )
        if mismatched:
            parts.append(f"shape mismatch (file != model): {_names(mismatched)}")
        raise CheckpointError("checkpoint does not fit the model; " + "; ".join(parts) + swapped)
    for k in OPTIONAL:
        if k in expected and k not in out:
            out[k] = expected[k]
    return out


def load_official(
    model: MaskedAutoencoderViT,
    resume_model: str | os.PathLike,
    resume_finetune: str | os.PathLike | None = None,
    *,
    weights_only: bool = True,
) -> MaskedAutoencoderViT:
    """Load ``resume_model`` (MAE pretraining file) and ``resume_finetune`` (head file) into ``model``
    (``weights_only``: :func:`read_checkpoint`)."""
    pre = state_dict_of(read_checkpoint(resume_model, "resume_model", weights_only), resume_model)
    head = None
    if resume_finetune:
        head = state_dict_of(
            read_checkpoint(resume_finetune, "resume_finetune", weights_only), resume_finetune
        )
    sd = combine_state_dicts(model, pre, head, model_path=str(resume_model),
                             head_path=str(resume_finetune) if resume_finetune else "resume_finetune")  # fmt: skip
    model.load_state_dict(sd, strict=True)
    return model


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through core's atomic write (temp file next to ``path``, fsync, rename; the temp file
    of a killed write is removed when the run directory is opened again)."""
    from tttlab.core._io import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
