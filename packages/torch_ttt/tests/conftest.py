"""One torch thread for the whole test directory; Hydra's process-wide state put back after each test.

The models here are tiny: a second intra-op thread gains nothing, and on a loaded or shared CPU the
threads' barriers cost up to 25x per forward (measured on the 2-core CI machine at load ~13: 46 ms vs
1.16 s per batch of 32 through ``tutorial_net``).  Results are checked against each other within one
thread count, so the checks are the same.
"""

import pytest
import torch

from tttlab.core.testing import hydra_state_kept

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _hydra_state_kept():
    """Every test leaves Hydra's and logging's process-wide state as it found it: a command run in this process
    leaves its HydraConfig, log handlers and levels behind (:func:`tttlab.core.testing.hydra_state_kept`)."""
    with hydra_state_kept():
        yield
