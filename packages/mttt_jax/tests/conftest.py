"""Tests share one persistent XLA compilation cache (the same tiny programs are compiled by several
tests and subprocesses); set before JAX compiles anything."""

import os
import tempfile

_CACHE = os.path.join(tempfile.gettempdir(), "tttlab_mttt_jax_test_xla_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
