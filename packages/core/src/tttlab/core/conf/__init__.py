"""Hydra configuration shipped with tttlab-core (``compare.yaml``: the ``tttlab-compare`` tool)."""
