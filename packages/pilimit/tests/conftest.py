"""Tests run with one intra-op thread: the ops here are tiny, and on a busy shared CPU torch's thread pool
makes them up to 100x slower."""

import torch

torch.set_num_threads(1)
