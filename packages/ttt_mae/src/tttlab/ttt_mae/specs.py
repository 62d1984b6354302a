"""Methods of tttlab-ttt-mae for the ``tttlab.methods`` registry (strings only: imports no framework).

``ttt_mae.ttt``: test-time training with masked autoencoders, per image; ``ttt_mae.baseline``: the same
model without adaptation.  Both run :func:`tttlab.ttt_mae.evaluate.run` (default ``mnist_c`` severity 5 on
a small MAE trained on MNIST and cached on first use; ``resume_model``/``resume_finetune`` for others).
"""

from tttlab.core.registry import MethodSpec

_EVAL = "tttlab.ttt_mae.evaluate:run"
_PAPER = "Gandelsman, Sun, Chen, Efros 2022, NeurIPS (gandelsman2022testtime)"

SPECS = [
    MethodSpec(
        name="ttt_mae.ttt", package="ttt_mae", framework="torch", evaluate=_EVAL, paper=_PAPER,
        description="TTT-MAE: per test image, reset to the base weights, SGD steps on the MAE loss of "
        "masked copies, then classify",
    ),
    MethodSpec(
        name="ttt_mae.baseline", package="ttt_mae", framework="torch", evaluate=_EVAL, paper=_PAPER,
        description="the MAE encoder + probed head without adaptation (mask ratio 0)",
    ),
]  # fmt: skip
