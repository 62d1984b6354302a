"""tttlab-ttt-mae: test-time training with masked autoencoders (Gandelsman et al., NeurIPS 2022).

Modules: ``model`` (MAE ViT + decoder + head), ``checkpoint`` (official files), ``ttt`` (per-image and
batched adaptation), ``reference`` (the upstream-style sequential path, for tests and benchmarks),
``train`` (pretrain / probe), ``evaluate`` (benchmarks, records, the evaluate contract).

The names below load their module on first use: importing a submodule (the console scripts' ``cli``:
``--help``, Hydra's checks) does not import timm (with torchvision and torch._dynamo, ~2-3 s) before a
model is built.
"""

from __future__ import annotations

import importlib

#: name -> the submodule that defines it
_EXPORTS = {
    "ARCHS": "model", "MAEConfig": "model", "MaskedAutoencoderViT": "model", "build_model": "model",
    "model_config": "model", "BatchedTTT": "ttt", "TTTAdapter": "ttt", "TTTSettings": "ttt",
}  # fmt: skip

__all__ = [
    "ARCHS", "BatchedTTT", "MAEConfig", "MaskedAutoencoderViT", "TTTAdapter", "TTTSettings", "build_model",
    "model_config",
]  # fmt: skip


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    # a set: a name loaded once is in globals() too (it was listed twice)
    return sorted(set(globals()) | set(_EXPORTS))
