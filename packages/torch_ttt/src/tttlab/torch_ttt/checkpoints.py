"""Pretrained weights from a local file (no network): read, check against the architecture, load.

:func:`load_pretrained` builds a registered model (:mod:`tttlab.torch_ttt.models`) and loads a state dict
saved by someone else, e.g. RobustBench's ``Standard.pt`` for ``wrn28_10``.  Accepted on-disk layouts
(those RobustBench's ``load_model`` reads): a ``torch.save`` file holding the state dict itself or a
mapping with the state dict under ``"state_dict"`` (other entries, e.g. an epoch counter, are ignored);
keys may carry ``torch.nn.DataParallel``'s ``module.`` prefix, which is removed.  The file is read with
``torch.load(weights_only=True)``: tensors and plain containers only, no pickled code.  A training
script's checkpoint may also pickle other objects (``argparse.Namespace``, numpy scalars), which that
refuses: the error says so, and ``weights_only=False`` (``model_checkpoint.weights_only=false``) reads
such a file, for files one trusts only (unpickling runs code).  A file that is an HTML page (what a
failed Google Drive download leaves under the checkpoint's name, a known RobustBench pitfall) is named
as such.

Every problem is a :class:`~tttlab.core.errors.CheckpointError` naming the path and what was expected:
missing file, unreadable file, no tensors, keys missing from the file or unknown to the model (the first
few of each, with their counts), tensors of the wrong shape (checkpoint vs model).  BatchNorm
``num_batches_tracked`` counters may be absent (files written before torch 0.4.1 have none; they play
no part in evaluation), as ``load_state_dict`` itself allows for such files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tttlab.core.errors import CheckpointError, ConfigError

__all__ = ["build_reference", "check_state_dict", "load_pretrained", "pretrained_state", "read_state_dict"]

#: How many key names an error message lists per kind of mismatch.
SHOWN = 5
DATA_PARALLEL_PREFIX = "module."
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def _names(keys, shown: int = SHOWN) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def read_state_dict(path: str | os.PathLike, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (layouts above), ``module.`` prefixes removed, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; expected a torch.save file with the model's state dict "
            "(e.g. RobustBench's Standard.pt)"
        )
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        raise CheckpointError(
            f"checkpoint {path} is an HTML page, not a torch.save file (a failed download saved under the "
            "checkpoint's name?); download the weights file itself"
        )
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # pickle, zip and weights-only errors come in many types
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text) if weights_only else None
        if found:
            raise CheckpointError(
                f"checkpoint {path} pickles objects other than tensors and plain containers ({found.group(1)}), "
                "which the safe reader refuses; if you trust the file, read it with "
                "model_checkpoint.weights_only=false (unpickling runs code)"
            ) from None
        raise CheckpointError(
            f"checkpoint {path}: not readable as a torch.save file of tensors ({type(exc).__name__}: "
            f"{text[:200]})"
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = type(obj).__name__ if not isinstance(obj, Mapping) else f"a mapping with keys {_names(obj)}"
        raise CheckpointError(
            f"checkpoint {path}: holds {what}; expected a state dict (parameter name -> tensor) or a "
            "mapping with one under 'state_dict'"
        )
    return {
        (k[len(DATA_PARALLEL_PREFIX) :] if k.startswith(DATA_PARALLEL_PREFIX) else k): v
        for k, v in obj.items()
    }


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``model``'s keys (optional counters
    aside) with the same shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the file: {_names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} key(s) the model does not have: {_names(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} tensor(s) of the wrong shape: {'; '.join(wrong[:SHOWN])}")
    raise CheckpointError(
        f"checkpoint {source} does not fit {arch} ({len(expected)} entries, e.g. {_names(expected, 3)}): "
        + "; ".join(parts)
    )


def build_reference(name: str, **kwargs) -> nn.Module:
    """Registered model ``name`` built with ``kwargs`` on the meta device (shapes, no memory, no RNG draw);
    a bad argument is a :class:`ConfigError`."""
    from .models import build_model

    try:
        with torch.device("meta"):
            return build_model(name, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {name!r} with arguments {kwargs}: {exc}") from None


def pretrained_state(
    name: str, path: str | os.PathLike, *, weights_only: bool = True, **kwargs
) -> dict[str, torch.Tensor]:
    """The state dict of ``path`` checked against registered model ``name`` (built with ``kwargs`` on the
    meta device: shapes only, no memory), absent counters filled with 0: ready for a strict
    ``load_state_dict``."""
    reference = build_reference(name, **kwargs)
    state = read_state_dict(path, weights_only=weights_only)
    arch = name + (f"({', '.join(f'{k}={v}' for k, v in sorted(kwargs.items()))})" if kwargs else "")
    check_state_dict(reference, state, str(path), arch)
    for key, value in reference.state_dict().items():
        if key not in state:  # an optional counter (check_state_dict let nothing else through)
            state[key] = torch.zeros(value.shape, dtype=value.dtype)
    return state


def load_pretrained(name: str, path: str | os.PathLike, *, weights_only: bool = True, **kwargs) -> nn.Module:
    """Registered model ``name`` (built with ``kwargs``) with the weights of ``path``, in eval mode."""
    from .models import build_model

    state = pretrained_state(name, path, weights_only=weights_only, **kwargs)
    model = build_model(name, **kwargs)
    model.load_state_dict(state)
    return model.eval()
