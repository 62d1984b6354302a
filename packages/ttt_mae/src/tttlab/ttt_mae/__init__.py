"""tttlab-ttt-mae: test-time training with masked autoencoders (Gandelsman et al., NeurIPS 2022).

Modules: ``model`` (MAE ViT + decoder + head), ``checkpoint`` (official files), ``ttt`` (per-image and
batched adaptation), ``reference`` (the upstream-style sequential path, for tests and benchmarks),
``train`` (pretrain / probe), ``evaluate`` (benchmarks, records, the evaluate contract).
"""

from .model import ARCHS, MAEConfig, MaskedAutoencoderViT, build_model, model_config
from .ttt import BatchedTTT, TTTAdapter, TTTSettings

__all__ = [
    "ARCHS", "BatchedTTT", "MAEConfig", "MaskedAutoencoderViT", "TTTAdapter", "TTTSettings", "build_model",
    "model_config",
]  # fmt: skip
