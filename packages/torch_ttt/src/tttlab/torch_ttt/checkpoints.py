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
no part in evaluation), as ``load_state_dict`` itself allows for such files.  Reading and checking are
core's (:func:`tttlab.core.torch.read_state_dict`, :func:`~tttlab.core.torch.check_state_dict`), shared
with memo_tpt's weight loader.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from tttlab.core.errors import ConfigError
from tttlab.core.torch import check_state_dict, read_state_dict

__all__ = ["build_reference", "check_state_dict", "load_pretrained", "pretrained_state", "read_state_dict"]


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
    state = read_state_dict(path, weights_only=weights_only, option="model_checkpoint.weights_only=false")
    arch = name + (f"({', '.join(f'{k}={v}' for k, v in sorted(kwargs.items()))})" if kwargs else "")
    return check_state_dict(reference, state, str(path), arch)


def load_pretrained(name: str, path: str | os.PathLike, *, weights_only: bool = True, **kwargs) -> nn.Module:
    """Registered model ``name`` (built with ``kwargs``) with the weights of ``path``, in eval mode."""
    from .models import build_model

    state = pretrained_state(name, path, weights_only=weights_only, **kwargs)
    model = build_model(name, **kwargs)
    model.load_state_dict(state)
    return model.eval()
