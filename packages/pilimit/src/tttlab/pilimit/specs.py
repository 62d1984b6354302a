"""Methods of tttlab-pilimit for the ``tttlab.methods`` registry (strings only: imports no framework).

``evaluate`` runs :func:`tttlab.pilimit.evaluate.run`: a pi-net MLP trained on flattened MNIST (cached)
predicts a core benchmark (default ``mnist_c``).  A plain classifier has no test-time adaptation, so
evaluation is prediction; the paper's test-time adaptation (MAML readout adaptation on few-shot tasks)
is ``tttlab-pilimit-train +experiment=maml_mnist`` and reported in the package README.  This module must
import nothing but ``tttlab.core.registry``.
"""

from tttlab.core.registry import MethodSpec

_EVAL = "tttlab.pilimit.evaluate:run"
_PAPER = "Yang, Santacroce, Hu 2022, ICLR (yang2022pinets): infinite-width pi-nets that learn features"

SPECS = [
    MethodSpec(name="pilimit.inf_pinet", package="pilimit", framework="torch", evaluate=_EVAL, paper=_PAPER,
               description="infinite-width pi-net MLP (A/B/Amult rows, PiSGD); evaluation is prediction, "
                           "no test-time adaptation"),
    MethodSpec(name="pilimit.finite_pinet", package="pilimit", framework="torch", evaluate=_EVAL, paper=_PAPER,
               description="finite pi-net sampled from the infinite one, trained with Gproj; evaluation is "
                           "prediction, no test-time adaptation"),
    MethodSpec(name="pilimit.mup", package="pilimit", framework="torch", evaluate=_EVAL, paper=_PAPER,
               description="muP baseline: Gaussian-initialised finite MLP, no Gproj; evaluation is "
                           "prediction, no test-time adaptation"),
    MethodSpec(name="pilimit.baseline", package="pilimit", framework="torch", evaluate=_EVAL, paper=_PAPER,
               description="the package's reference for compare: same as pilimit.mup (a standard finite "
                           "net); evaluation is prediction"),
]  # fmt: skip
