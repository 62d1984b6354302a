"""Tests share one persistent XLA compilation cache (the same tiny programs are compiled by several
tests and subprocesses); set before JAX compiles anything."""

import os
import tempfile

_CACHE = os.path.join(tempfile.gettempdir(), "tttlab_mttt_jax_test_xla_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402

#: the shared training run: TINY (test_train.py) at batch 8, 2 epochs of 2 steps, T=2 SGD inner loop, an
#: in-epoch checkpoint at step 3.  Trained once per session and only read (tests that resume or refuse copy it
#: first): it is the uninterrupted reference of the kill/resume test and the model of the evaluate/plot/resume
#: tests.
SHARED_RUN = ["input.batch_size=8", "total_epochs=2", "checkpoint_every_steps=3", "inner.TTT.inner_itr=2",
              "inner.TTT.SGD=true"]  # fmt: skip


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """``(run directory, stats returned by train)`` of :data:`SHARED_RUN`."""
    from tttlab.mttt_jax import train as T

    from .test_train import TINY, compose

    out = tmp_path_factory.mktemp("shared_run")
    stats = T.train(compose([*TINY, *SHARED_RUN, f"out_dir={out}"]))
    return out, stats
