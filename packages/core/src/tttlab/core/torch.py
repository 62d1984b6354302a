"""PyTorch adapter: numpy uint8 NHWC batches -> float NCHW tensors, datasets -> ``torch.utils.data``.

Needs the ``[torch]`` extra (``pip install -c constraints.txt -e 'packages/core[torch]'``).  Only this module imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .data import ImageDataset
from .errors import ConfigError, InvalidInputError, require

torch = require("torch", "torch")

#: Normalisation constants people use.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


def resolve_device(name) -> torch.device:
    """A user's ``device`` setting as a torch device: ``auto``/``gpu`` (CUDA when there is one, else the
    CPU), ``cpu``, ``cuda``, ``cuda:N``, or any other name torch accepts.  An unknown name, a CUDA device on
    a machine without one, or an index beyond the GPUs present is a :class:`ConfigError` naming the value
    (torch would only fail later, with a driver traceback)."""
    name = str(name)
    if name in ("auto", "gpu"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"device={name!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={name!r}, but torch finds no CUDA device; use device=cpu or device=auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r}, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


#: The values of every torch entry point's ``amp`` option: no autocast, or bfloat16 autocast (CPU and CUDA;
#: bfloat16 needs no gradient scaler, so float16 is left to methods whose upstream uses it).
AMP_MODES = ("none", "bf16")


def check_amp(value, key: str = "amp") -> str:
    """``amp`` as ``"none"`` or ``"bf16"`` (``None`` and any letter case accepted); anything else is a
    :class:`ConfigError` naming ``key`` and the allowed values."""
    if value is None:
        return "none"
    if isinstance(value, str) and value.strip().lower() in AMP_MODES:
        return value.strip().lower()
    raise ConfigError(f"{key}={value!r}; expected one of {list(AMP_MODES)}")


#: The ``mode`` values of ``torch.compile`` a ``compile`` option may name (``true`` is torch's default mode
#: without naming it; ``reduce-overhead`` adds CUDA graphs, the fast path measured on a GPU).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_kwargs(value, key: str = "compile") -> dict | None:
    """A ``compile`` config value as ``torch.compile`` keyword arguments: ``false``/``None`` -> ``None`` (not
    compiled), ``true`` -> ``{}`` (torch's default mode, as ``compile: true`` always meant), one of
    :data:`COMPILE_MODES` -> ``{"mode": value}``.  Anything else (``"yes"``, ``1``, ``"fast"``) is a
    :class:`ConfigError` naming ``key``, the value and the allowed values."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, str) and value in COMPILE_MODES:
        return {"mode": value}
    raise ConfigError(
        f"{key}={value!r}; expected true or false, or a torch.compile mode: one of {list(COMPILE_MODES)}"
    )


def check_compile(value, key: str = "compile") -> bool | str:
    """``compile`` checked by :func:`compile_kwargs` (its errors): ``False`` (also for ``None``), ``True`` or
    the mode's name, so the value is truthy exactly when something is compiled."""
    kwargs = compile_kwargs(value, key)
    return False if kwargs is None else kwargs.get("mode", True)


def autocast(device, amp: str):
    """``torch.autocast(<device type>, dtype=torch.bfloat16)`` for ``amp="bf16"``, else a null context.

    ``device``: a ``torch.device`` or a name (``"cpu"``, ``"cuda:1"``).  Parameters, gradients and
    optimizer states are untouched: run the backward and the optimizer step outside the context."""
    import contextlib

    if amp not in ("none", "bf16"):  # checked values go straight through (this runs once per forward)
        amp = check_amp(amp)
    if amp == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


#: Weights files from elsewhere: how many key names an error lists per kind of mismatch, the prefix
#: ``torch.nn.DataParallel`` adds, the containers a state dict is found under, and the buffers a file may
#: lack (BatchNorm counters: absent from files older than torch 0.4.1, unused in evaluation).
STATE_DICT_SHOWN = 5
DATA_PARALLEL_PREFIX = "module."
STATE_DICT_CONTAINERS = ("state_dict", "model_state", "model")
OPTIONAL_STATE_SUFFIXES = ("num_batches_tracked",)


def _key_names(keys, shown: int = STATE_DICT_SHOWN) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def state_dict_from(obj, source) -> dict:
    """The state dict in a loaded weights file: ``obj`` itself or what it holds under ``state_dict`` /
    ``model_state`` / ``model``, with ``module.`` prefixes removed.  Anything that is not a non-empty
    mapping of tensors is a :class:`CheckpointError` naming ``source``."""
    from collections.abc import Mapping

    from .errors import CheckpointError

    for key in STATE_DICT_CONTAINERS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = (
            type(obj).__name__ if not isinstance(obj, Mapping) else f"a mapping with keys {_key_names(obj)}"
        )
        raise CheckpointError(
            f"{source}: holds {what}; expected a state dict (parameter name -> tensor) or a mapping with one "
            f"under one of {list(STATE_DICT_CONTAINERS)}"
        )
    return {k.removeprefix(DATA_PARALLEL_PREFIX): v for k, v in obj.items()}


def read_torch_file(
    path,
    weights_only: bool = True,
    *,
    allow=(),
    option: str | None = "weights_only=false",
    what: str = "checkpoint",
):
    r"""What a local ``torch.save`` file holds, read on the CPU.

    ``weights_only=True`` reads tensors and plain containers only, plus the classes in ``allow`` (e.g.
    ``argparse.Namespace``, which training scripts save as ``args``): no pickled code runs.  A file that
    pickles other objects is a :class:`CheckpointError` naming the first one and ``option``, the setting
    that reads it as a full pickle (trusted files only; there is no silent fallback; ``option=None``: there
    is no such setting, the message says to save the tensors alone).  A missing file, an HTML page saved
    under the weights' name (a failed download) and an unreadable file (random bytes, a truncated or
    corrupt file: :func:`unreadable_checkpoint`) are :class:`CheckpointError`\ s naming ``what`` and the
    path."""
    import contextlib
    import re
    import warnings
    from pathlib import Path

    from .errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(f"{what} {path} {state}; expected a local torch.save file")
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        raise CheckpointError(
            f"{what} {path} is an HTML page, not a torch.save file (a failed download saved under the "
            "checkpoint's name?); download the weights file itself"
        )
    allowed = (
        torch.serialization.safe_globals(list(allow)) if allow and weights_only else contextlib.nullcontext()
    )
    try:
        with allowed, warnings.catch_warnings():
            # torch's "Detected pickle protocol N ... please file an issue" on a foreign pickle: noise
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # pickle, zip and weights-only errors come in many types
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text) if weights_only else None
        if found:
            remedy = (
                f"if you trust the file, read it with {option} (unpickling runs code)"
                if option
                else "save the tensors alone (e.g. torch.save(model.state_dict(), path))"
            )
            raise CheckpointError(
                f"{what} {path} pickles objects other than tensors and plain containers ({found.group(1)}), "
                f"which the safe reader refuses; {remedy}"
            ) from None
        raise unreadable_checkpoint(path, exc, what) from None


def unreadable_checkpoint(path, exc: BaseException, what: str = "checkpoint"):
    """The :class:`CheckpointError` for a file ``torch.load`` (or ``torch.jit.load``) could not read:
    it names ``what`` and ``path``, says the file is not a readable PyTorch checkpoint, and keeps torch's
    short diagnosis but never its advice (a corrupt or truncated file is not cured by
    ``weights_only=False``, which torch suggests for any unpickling failure)."""
    from .errors import CheckpointError

    return CheckpointError(
        f"{what} {path} is not a readable PyTorch checkpoint ({_torch_error_detail(exc)}); expected a "
        "complete file written by torch.save (is it truncated, corrupt or another format?)"
    )


def _torch_error_detail(exc: BaseException) -> str:
    """``Type: diagnosis`` of a torch loading error, one line, without torch's advice text."""
    import re

    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text, re.S)
    if found:
        text = found.group(1)
    line = re.split(r"(?<=[.!?])\s", " ".join(text.split()), maxsplit=1)[0].rstrip(".")  # the diagnosis
    if not line or re.search(r"weights_only|file an issue|trusted source", line, re.I):
        return type(exc).__name__
    return f"{type(exc).__name__}: {line[:160]}"


def read_state_dict(path, weights_only: bool = True, *, option: str = "weights_only=false") -> dict:
    """The state dict of a local ``torch.save`` file (:func:`state_dict_from`), read by
    :func:`read_torch_file` (its errors; ``option`` names the setting that turns ``weights_only`` off)."""
    obj = read_torch_file(path, weights_only, option=option)
    return state_dict_from(obj, f"checkpoint {path}")


def check_state_dict(model, state, source: str, arch: str) -> dict:
    """``state`` ready for a strict ``model.load_state_dict``: a :class:`CheckpointError` unless it has
    exactly ``model``'s keys (absent BatchNorm counters aside, filled with 0) with the same shapes; the
    message names the first keys of each kind of mismatch and their counts.  ``model`` may live on the
    meta device (only shapes are read)."""
    from .errors import CheckpointError

    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_STATE_SUFFIXES)]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) missing from the file: {_key_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} key(s) the model does not have: {_key_names(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} tensor(s) of the wrong shape: {'; '.join(wrong[:STATE_DICT_SHOWN])}")
        raise CheckpointError(
            f"checkpoint {source} does not fit {arch} ({len(expected)} entries, e.g. {_key_names(expected, 3)}): "
            + "; ".join(parts)
        )
    state = dict(state)
    for key, value in expected.items():
        if key not in state:  # an optional counter (nothing else got through)
            state[key] = torch.zeros(value.shape, dtype=value.dtype)
    return state


def check_finite(x, what: str = "input"):
    """Raise ``InvalidInputError`` if a tensor or array holds NaN or inf."""
    bad = (~torch.isfinite(x)).any().item() if isinstance(x, torch.Tensor) else not np.isfinite(x).all()
    if bad:
        raise InvalidInputError(f"{what} contains NaN or inf values; expected finite numbers")
    return x


def to_tensor(
    images: np.ndarray,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device=None,
    dtype=None,
    channels_last: bool = False,
):
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1], then ``(x - mean) / std`` if given.

    Float input is accepted when already in [0, 1] and finite (NaN/inf raise ``InvalidInputError``).
    """
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise InvalidInputError(
            f"images must be a numpy array of shape (N, H, W, C), got {getattr(images, 'shape', type(images))}"
        )
    t = torch.from_numpy(np.ascontiguousarray(images))
    if device is not None:
        t = t.to(device, non_blocking=True)
    dtype = dtype or torch.float32
    if images.dtype == np.uint8:
        t = t.to(dtype).div_(255.0)
    elif np.issubdtype(images.dtype, np.floating):
        check_finite(t, "images")
        if t.numel() and (float(t.min()) < 0.0 or float(t.max()) > 1.0):
            raise InvalidInputError(
                f"float images must be in [0, 1], got values in [{float(t.min()):g}, {float(t.max()):g}] "
                "(0..255 floats: pass them as uint8, or divide by 255)"
            )
        t = t.to(dtype)
    else:
        raise InvalidInputError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    t = t.permute(0, 3, 1, 2)
    if mean is not None or std is not None:
        c = t.shape[1]
        m = torch.as_tensor(mean if mean is not None else (0.0,) * c, dtype=dtype, device=t.device)
        s = torch.as_tensor(std if std is not None else (1.0,) * c, dtype=dtype, device=t.device)
        if m.numel() not in (1, c) or s.numel() not in (1, c):
            raise InvalidInputError(f"mean/std need 1 or {c} values, got {m.numel()} and {s.numel()}")
        if not bool(torch.isfinite(m).all()) or not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
            raise InvalidInputError(f"mean={mean!r}, std={std!r}: expected finite values and std > 0")
        t = (t - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)
    t = t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return t


class TorchDataset(torch.utils.data.Dataset):
    """A core ``ImageDataset`` as a map-style torch dataset of ``(float CHW tensor, int label)``."""

    def __init__(self, dataset: ImageDataset, transform=None, mean=None, std=None):
        self.dataset, self.transform, self.mean, self.std = dataset, transform, mean, std

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        if self.transform is not None:
            return self.transform(image), label
        return to_tensor(image[None], mean=self.mean, std=self.std)[0], label


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    distributed: bool = False,
    transform=None,
    mean=None,
    std=None,
):
    """A ``DataLoader`` over a core dataset; ``distributed=True`` shards it with ``DistributedSampler``."""
    ds = TorchDataset(dataset, transform=transform, mean=mean, std=std)
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed:
        sampler = torch.utils.data.DistributedSampler(ds, shuffle=shuffle, seed=seed, drop_last=drop_last)
        shuffle = False
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
        drop_last=drop_last, generator=generator, persistent_workers=num_workers > 0,
    )  # fmt: skip


def batch_to_torch(batch, *, mean=None, std=None, device=None):
    """A ``tttlab.core.benchmark.Batch`` -> ``(images tensor, labels tensor)``."""
    x = to_tensor(batch.images, mean=mean, std=std, device=device)
    y = torch.from_numpy(np.asarray(batch.labels, dtype=np.int64))
    return x, (y.to(device) if device is not None else y)


@dataclass
class Dist:
    """This process's place in a ``torchrun`` job (``rank``, ``world_size``); one process by default."""

    rank: int = 0
    world_size: int = 1
    initialized: bool = False

    def barrier(self) -> None:
        if self.initialized:
            torch.distributed.barrier()


def init_distributed() -> Dist:
    """Rank and world size from ``torchrun``'s environment (NCCL with CUDA, gloo on CPU), joining the
    process group once; a single process when ``WORLD_SIZE`` is unset or 1.  Use ``torchrun --standalone``
    on one machine (a ``--master_port=0`` rendezvous hangs with torch 2.14)."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), True)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), True)
