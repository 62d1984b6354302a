"""The cross-package tests share the persistent XLA compilation cache of MTTT's tests (the same folder as
``packages/mttt_jax/tests/conftest.py``), set in the environment, so that the JAX evaluate subprocesses that
test_compare_installed.py starts use it: its second comparison (the label-correlated stream) then loads the
``predict`` program the first one compiled, and a run after an earlier one (or after ``make test-jax`` of
the same JAX) loads MTTT's training programs too (~25 s of XLA compiles on 2 cores; JAX keys each entry by
the program, the JAX/XLA version, the flags and the device, so a hit is the same executable)."""

import os
import tempfile

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tttlab_mttt_jax_test_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
