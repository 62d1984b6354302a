"""tttlab-pilimit: infinite-width pi-nets that learn features (Yang, Santacroce, Hu, ICLR 2022).

Upstream: github.com/santacml/pilim (``pilimit_lib``).  See the package README for commands, numbers
and deviations.
"""

from .functional import f02, pi_layer_closed_form, pi_update_norm, v_prime, v_transform
from .layers import InfPiInput, InfPiLinear
from .nets import FinPiMLP, InfMLP, load_net, mup_baseline, save_net
from .optim import CosineLR, MultiStepLR, PiSGD, make_scheduler

__all__ = [
    "CosineLR", "FinPiMLP", "InfMLP", "InfPiInput", "InfPiLinear", "MultiStepLR", "PiSGD", "f02",
    "load_net", "make_scheduler", "mup_baseline", "save_net", "pi_layer_closed_form", "pi_update_norm", "v_prime", "v_transform",
]  # fmt: skip
