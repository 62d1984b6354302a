"""Methods of tttlab-torch-ttt for the ``tttlab.methods`` registry (strings only: imports no framework).

One spec per engine, named ``torch_ttt.<engine registry name>``.  ``evaluate`` runs
:func:`tttlab.torch_ttt.evaluate.run` with ``engine=<name>``: the engine on a core benchmark (default
``mnist_c`` severity 5), on a model loaded from a ``tttlab-torch-ttt-train`` run or trained and cached
on first use.  This module must import nothing but ``tttlab.core.registry`` (the registry loads it from
its file without running the package's ``__init__``).
"""

from tttlab.core.registry import MethodSpec

_EVAL = "tttlab.torch_ttt.evaluate:run"

#: engine registry name -> (paper, description)
ENGINES = {
    "source": ("", "no adaptation: the trained model as it is"),
    "bn": ("Schneider et al. 2020 / Nado et al. 2020 (test-batch BN statistics)",
           "BatchNorm with the test batch's statistics, no parameter update"),
    "ttt": ("Sun et al. 2020, ICML (sun2020ttt)", "TTT: rotation prediction head trained jointly, "
            "test-time steps on the rotation loss"),
    "ttt_pp": ("Liu et al. 2021, NeurIPS (liu2021ttt++)",
               "TTT++: contrastive head + feature mean/covariance alignment to training statistics"),
    "tent": ("Wang et al. 2021, ICLR (wang2021tent)",
             "TENT: entropy minimisation of normalisation affine parameters, test-batch statistics"),
    "eata": ("Niu et al. 2022, ICML (niu2022eata)",
             "EATA: TENT with entropy/redundancy sample filters and a Fisher regulariser"),
    "memo": ("Zhang et al. 2022, NeurIPS (zhang2022memo)",
             "MEMO: marginal entropy over augmented views, BN prior"),
    "actmad": ("Mirza et al. 2023, CVPR (mirza2023actmad)",
               "ActMAD: multi-layer activation mean/variance alignment to training statistics"),
    "deyo": ("Lee et al. 2024, ICLR (lee2024deyo)",
             "DeYO: entropy + pseudo-label probability difference filters on patch-shuffled images"),
    "sar": ("Niu et al. 2023, ICLR (niu2023sar)",
            "SAR: reliable (entropy-filtered) sharpness-aware entropy minimisation with model recovery"),
    "ittt": ("Durasov et al. 2025, ICML (durasov2025it3)",
             "IT3: idempotent test-time training (prediction fed back through an embedder)"),
    "masked_ttt": ("Gandelsman et al. 2022, NeurIPS (gandelsman2022ttt-mae)",
                   "masked TTT: masked-patch pixel reconstruction head, test-time steps on its loss"),
}  # fmt: skip

SPECS = [
    MethodSpec(name=f"torch_ttt.{name}", package="torch_ttt", framework="torch", evaluate=_EVAL,
               paper=paper, description=description)
    for name, (paper, description) in ENGINES.items()
]  # fmt: skip
