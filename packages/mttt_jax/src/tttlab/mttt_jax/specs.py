"""Methods of tttlab-mttt-jax for the ``tttlab.methods`` registry (strings only: imports no framework).

One spec per token mixer.  ``evaluate`` runs :func:`tttlab.mttt_jax.evaluate.run` with the run directory of
a model trained with that mixer (``tttlab-mttt-train``): MTTT adapts inside every forward pass (the
inner loop), so evaluation on a corruption benchmark is a plain forward pass per batch.
"""

from tttlab.core.registry import MethodSpec

_PAPER = "Sun, Li, Dalal et al., Learning to (Learn at Test Time), 2023 (sun2023learning)"
_EVAL = "tttlab.mttt_jax.evaluate:run"


def _spec(method: str, description: str) -> MethodSpec:
    return MethodSpec(name=f"mttt_jax.{method}", package="mttt_jax", framework="jax", evaluate=_EVAL, paper=_PAPER,
                      description=description)  # fmt: skip


SPECS = [
    _spec("mttt_mlp", "ViT whose attention is a TTT layer with an MLP inner model (inner.layer_type=TTT, mlp_2)"),
    _spec("mttt_linear", "TTT layer with a linear inner model and W0=0 (one step = linear attention)"),
    _spec("linear_attention", "baseline: linear attention, identity features, constant normalizer"),
    _spec("linear_attention_katharopoulos",
          "baseline: linear attention of Katharopoulos et al. (elu+1 features, adaptive normalizer)"),
    _spec("self_attention", "baseline: softmax self-attention ViT"),
]  # fmt: skip
