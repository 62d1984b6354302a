"""tttlab.mttt_jax: MTTT (Sun, Li, Dalal et al., 2023) in JAX/Flax.

Importing this package imports no framework (the ``tttlab.methods`` entry point loads ``specs`` through
it); the modules ``inner_loop``, ``model``, ``train``, ``evaluate`` import JAX.
"""

__version__ = "0.1.0"
