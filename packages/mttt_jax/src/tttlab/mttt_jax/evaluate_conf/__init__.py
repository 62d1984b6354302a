"""Hydra configuration of ``tttlab-mttt-evaluate`` (``evaluate.yaml``), a folder of its own: the training
configuration's folder (``tttlab.mttt_jax.conf``) has the ``experiment`` group, which evaluate does not take and
would otherwise list in its ``--help``."""
