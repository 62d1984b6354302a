"""tttlab-ttt-mae: test-time training with masked autoencoders (Gandelsman et al., NeurIPS 2022).

Modules: ``model`` (MAE ViT + decoder + head), ``checkpoint`` (official files), ``ttt`` (per-image and
batched adaptation), ``reference`` (the upstream-style sequential path, for tests and benchmarks),
``train`` (pretrain / probe), ``evaluate`` (benchmarks, records, the evaluate contract).

The names below load their module on first use: importing a submodule (the console scripts' ``cli``:
``--help``, Hydra's checks) does not import timm (with torchvision and torch._dynamo, ~2-3 s) before a
model is built.
"""

from __future__ import annotations

from tttlab.core.lazy import lazy_exports

#: name -> the submodule that defines it
_EXPORTS = {
    "ARCHS": ".model", "MAEConfig": ".model", "MaskedAutoencoderViT": ".model", "build_model": ".model",
    "model_config": ".model", "BatchedTTT": ".ttt", "TTTAdapter": ".ttt", "TTTSettings": ".ttt",
}  # fmt: skip

__all__ = [
    "ARCHS", "BatchedTTT", "MAEConfig", "MaskedAutoencoderViT", "TTTAdapter", "TTTSettings", "build_model",
    "model_config",
]  # fmt: skip


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
