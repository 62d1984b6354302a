"""Tests share one persistent XLA compilation cache (the same tiny programs are compiled by several
tests and subprocesses), and XLA:CPU compiles them without LLVM's optimisation passes
(``--xla_backend_optimization_level=0``) unless ``XLA_FLAGS`` already sets a level: the tests' models are
tiny, so compiling dominates their time, and much of it went into LLVM optimising the unrolled threefry
rounds of parameter initialisation (a TINY T=2 SGD ViT, cold, 2-core machine at a load of ~3:
``jax.jit(model.init)`` 7.2 s -> 1.2 s, its training step 11.9 s -> 6.2 s, eval step 3.0 s -> 2.3 s).
The trade-offs: the compiled code runs slower (felt by the tests that train several steps once the
cache is warm), and while the code under test is the same HLO, its float results can differ from the
default level's in the last bits (a 2-epoch TINY run: train loss 2.302847981 vs 2.302848101); every test
compares runs made under the same flags or uses tolerances.
``XLA_FLAGS=--xla_backend_optimization_level=2 pytest ...`` runs them at the default level.  JAX keys
cache entries by the flags, so the two levels never share an entry.  Set before JAX creates its
backend; subprocesses inherit both."""

from tttlab.core.testing import fast_xla_compiles_for_tests, hydra_state_kept

fast_xla_compiles_for_tests()

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


@pytest.fixture(autouse=True)
def _hydra_state_kept():
    """Every test leaves Hydra's and logging's process-wide state as it found it: a command run in this process
    leaves its HydraConfig, log handlers and levels behind (:func:`tttlab.core.testing.hydra_state_kept`)."""
    with hydra_state_kept():
        yield
