"""Default run folders of the paper commands (``tttlab-memo-tpt-tpt`` / ``-memo`` / ``-ensemble``).

Without ``out_dir`` a run writes to ``runs/memo_tpt/<method>/<arch>-<data_to_test>-<key>``, e.g.
``runs/memo_tpt/tpt/ViT-B-16-a-1f0c3a9e42d7`` (an ensemble names its members' architectures,
``resnet50+RN50``).  ``<key>`` is :func:`run_key`, the hash of the run's settings that also keys its resume
files (``checkpoints/progress-<dataset>.json``): one folder per config, so another architecture, test set
or option no longer overwrites the first run's progress file (and its resume point) and config.yaml in a
shared ``runs/memo_tpt/<method>``, while the same command started again (after a kill, or with another
``num_images``, ``verbose``, ``save_every`` or ``progress``) finds its own folder and resumes there.  An
``out_dir`` given on the command line wins.

``conf/common.yaml`` reads it through the OmegaConf resolver ``${memo_tpt_run_dir:}`` (registered on
import of this module, which ``tttlab.memo_tpt.conf`` and ``tttlab.memo_tpt.main`` import).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: keys that change neither the numbers nor where a run resumes: not in :func:`run_key`
NOT_IN_KEY = ("out_dir", "progress", "verbose", "save_every", "num_images")


def run_key(c: Mapping[str, Any]) -> str:
    """The 12-hex-digit hash of a paper run's config without :data:`NOT_IN_KEY` (core ``config_hash``)."""
    from tttlab.core.records import config_hash

    return config_hash({k: v for k, v in c.items() if k not in NOT_IN_KEY})


def arch_name(c: Mapping[str, Any]) -> str:
    """``arch`` (an ensemble: its members' joined with ``+``), safe as a folder name (``timm:x`` -> ``timm_x``)."""
    if c.get("method") == "ensemble" and c.get("models"):
        archs = [str((m or {}).get("arch", c.get("arch"))) for m in c["models"]]
    else:
        archs = [str(c.get("arch"))]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "+".join(archs))


def default_out_dir(c: Mapping[str, Any]) -> str:
    """``runs/memo_tpt/<method>/<arch>-<data_to_test>-<run_key>`` of a (resolved) paper-run config."""
    return f"runs/memo_tpt/{c['method']}/{arch_name(c)}-{c['data_to_test']}-{run_key(c)}"


def _resolve_run_dir(*, _root_) -> str:
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(_root_, resolve=False)
    raw.pop("out_dir", None)  # the key being resolved
    raw.pop("hydra", None)  # Hydra's own node while it resolves hydra.run.dir; the task's config has none
    return default_out_dir(OmegaConf.to_container(OmegaConf.create(raw), resolve=True))


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("memo_tpt_run_dir", _resolve_run_dir, replace=True)


register_resolvers()
