"""One torch thread for the whole test directory.

The models here are tiny: a second intra-op thread gains nothing, and on a loaded or shared CPU the
threads' barriers cost up to 25x per forward (measured on the 2-core CI machine at load ~13: 46 ms vs
1.16 s per batch of 32 through ``tutorial_net``).  Results are checked against each other within one
thread count, so the checks are the same.
"""

import torch

torch.set_num_threads(1)
