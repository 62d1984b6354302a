"""Command-line helpers of the ``tttlab-mttt-*`` scripts.

* :func:`translate_upstream_args`: upstream's big_vision-style flags (``--config config_patch.py
  --config.inner.TTT.inner_itr=4 --config.inner.TTT.inner_lr='(1.,1.,1.,1.)' --workdir ./exp/x``) become
  the Hydra overrides of ``tttlab-mttt-train`` (``experiment=paper_patch inner.TTT.inner_itr=4
  inner.TTT.inner_lr=[1.,1.,1.,1.] out_dir=./exp/x``), so a command copied from the upstream README runs.
* :func:`user_errors` (from :mod:`tttlab.core.cli`): a :class:`~tttlab.core.errors.TTTLabError` (bad path, bad value, missing optional
  dependency) ends the command with ``<prog>: error: <Type>: <message>`` and exit status 2, not a traceback.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import PurePath

from tttlab.core.cli import user_errors

from .errors import MTTTConfigError

#: upstream config file -> our experiment
UPSTREAM_CONFIGS = {"config_patch.py": "paper_patch", "config_pixel.py": "paper_pixel"}


def _value(v: str) -> str:
    """Upstream values are Python literals: tuples become Hydra lists, ``True``/``False`` lower case."""
    s = v.strip()
    if s.startswith("(") and s.endswith(")"):
        items = [x.strip() for x in s[1:-1].split(",") if x.strip()]
        return "[" + ",".join(items) + "]"
    if s in ("True", "False", "None"):
        return {"True": "true", "False": "false", "None": "null"}[s]
    return s


def translate_upstream_args(argv: list[str]) -> tuple[list[str], bool]:
    """``(overrides, translated)``: ``argv`` with upstream's ``--config``/``--config.<key>``/``--workdir``
    flags replaced by Hydra overrides; other arguments pass through unchanged.

    Raises :class:`MTTTConfigError` for a config file other than upstream's two, a big_vision
    ``config.py:<arg>`` argument (upstream's configs take none) or a flag without a value.
    """
    out: list[str] = []
    translated = False
    i = 0
    while i < len(argv):
        a = argv[i]
        flag, eq, val = a.partition("=")
        if flag in ("--config", "--workdir") or flag.startswith("--config."):
            translated = True
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise MTTTConfigError(f"upstream flag {flag} needs a value (e.g. {flag}=<value>)")
                val = argv[i + 1]
                i += 1
            if flag == "--config":
                path, _, arg = val.partition(":")
                name = PurePath(path).name
                if name not in UPSTREAM_CONFIGS:
                    raise MTTTConfigError(
                        f"--config {val}: expected one of upstream's {sorted(UPSTREAM_CONFIGS)} (-> experiment="
                        f"{'|'.join(UPSTREAM_CONFIGS.values())}), or pick an experiment directly: "
                        "experiment=paper_patch|paper_pixel|mnist_patch|mnist_pixel|smoke"
                    )
                if arg:
                    raise MTTTConfigError(
                        f"--config {val}: upstream's {name} takes no ':{arg}' argument; pass settings as "
                        "Hydra overrides (e.g. model=tiny input.accum_time=2)"
                    )
                out.insert(0, f"experiment={UPSTREAM_CONFIGS[name]}")
            elif flag == "--workdir":
                out.append(f"out_dir={val}")
            else:
                key = flag.removeprefix("--config.")
                if not key:
                    raise MTTTConfigError(f"{a}: expected --config.<key>=<value>")
                out.append(f"{key}={_value(val)}")
        else:
            out.append(a)
        i += 1
    return out, translated


def apply_upstream_translation(prog: str) -> None:
    """Rewrite ``sys.argv`` in place (see :func:`translate_upstream_args`) and say what it became."""
    with user_errors(prog):
        args, translated = translate_upstream_args(sys.argv[1:])
    if translated:
        print(f"{prog}: upstream flags translated to: {prog} {shlex.join(args)}", file=sys.stderr)
        sys.argv[1:] = args


__all__ = ["UPSTREAM_CONFIGS", "apply_upstream_translation", "translate_upstream_args", "user_errors"]
