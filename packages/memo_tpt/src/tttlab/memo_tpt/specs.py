"""Methods of tttlab-memo-tpt for the ``tttlab.methods`` registry (strings only: imports no framework).

``evaluate`` runs :func:`tttlab.memo_tpt.evaluate.run` with ``method=<name>`` on a core benchmark (default
``mnist_c`` severity 5) with the tiny MNIST CLIP / CNN of the profile, trained on first use and cached.
"""

from tttlab.core.registry import MethodSpec

_EVAL = "tttlab.memo_tpt.evaluate:run"
_TPT = "Shu et al. 2022, NeurIPS (shu2022tpt)"
_MEMO = "Zhang, Levine, Finn 2022, NeurIPS (zhang2022memo)"

SPECS = [
    MethodSpec(name="memo_tpt.clip_zeroshot", package="memo_tpt", framework="torch", evaluate=_EVAL,
               paper="Radford et al. 2021 (radford2021clip)",
               description="zero-shot CLIP with the prompt 'a photo of a {class}.' (tiny MNIST CLIP offline)"),
    MethodSpec(name="memo_tpt.tpt", package="memo_tpt", framework="torch", evaluate=_EVAL, paper=_TPT,
               description="TPT: CoOp context tuned per image on the marginal entropy of the 10% most "
                           "confident of 64 views, one AdamW step"),
    MethodSpec(name="memo_tpt.tpt_ensemble", package="memo_tpt", framework="torch", evaluate=_EVAL,
               paper=_TPT + " + seed 002 (view-ensemble)",
               description="CLIP view-ensemble: mean softmax over the 10% most confident views, no tuning"),
    MethodSpec(name="memo_tpt.memo", package="memo_tpt", framework="torch", evaluate=_EVAL, paper=_MEMO,
               description="MEMO: marginal entropy over AugMix views, BN prior N=16, one step per image "
                           "(small MNIST CNN offline)"),
]  # fmt: skip
