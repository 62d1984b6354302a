"""Hydra configs of the paper commands; importing registers their ``${memo_tpt_run_dir:}`` resolver."""

from tttlab.memo_tpt import run_dirs as _run_dirs  # noqa: F401  (registers the resolver)
