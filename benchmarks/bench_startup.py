"""Start-up cost of the console scripts: ``--help``, ``--cfg job`` and a config check, per source tree.

    .venv/bin/python benchmarks/bench_startup.py --reps 3                        # this checkout
    .venv/bin/python benchmarks/bench_startup.py --reps 3 --tree before=/work/main --tree after=.

Each console script of ``packages/*/pyproject.toml`` ([project.scripts]) runs in a fresh interpreter, as
its entry point (``from <module> import <function>; <function>()``), with ``PYTHONPATH`` set to a tree's
``packages/*/src`` (so one environment times the sources of two checkouts: the installed, editable
packages come after them on the path).  Modes:

* ``help``: ``--help`` (what a user waits for to read the options);
* ``cfg``: ``--cfg job`` on the command's smoke experiment (Hydra composes and prints the config: the
  module's imports, core's checks of the command line, Hydra; no run directory, no data);
* ``check``: a smoke command line with one bad value that the command's own validation refuses (exit
  status 2 and the expected message, else the cell says ``n/a``): everything a run does before its work.

The repetitions are interleaved (rep 1 of every tree and command, then rep 2, ...), so a load that comes
and goes on a shared machine falls on every column alike; the table gives the median and the range.
Nothing is written outside a temporary folder (``out_dir``/``cache_dir`` point there).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("help", "cfg", "check")

#: script -> (the smoke command line for ``cfg``, the bad override for ``check``, text its error names);
#: a script absent here gets ``--help`` only (its ``cfg``/``check`` cells say ``-``).
SMOKE = {
    "tttlab-torch-ttt-train": (["+experiment=smoke"], "train.optimizer=adan", "train.optimizer='adan'"),
    # refused by the last check before the model (after the optimizer settings' check)
    "tttlab-torch-ttt-evaluate": (["train_experiment=smoke"], "+engine.kwargs.foo=1",
                                  "engine 'tent' has no argument(s) ['foo']"),
    "tttlab-pilimit-train": (["+experiment=smoke"], "optim.lr=-1", "lr=-1.0: expected"),
    "tttlab-ttt-mae-pretrain": (["+experiment=smoke_pretrain"], "mask_ratio=1.0", "mask_ratio=1.0; expected"),
    "tttlab-ttt-mae-ttt": (["+experiment=smoke_ttt"], "mask_ratio=1.0", "mask_ratio=1.0; TTT needs"),
    "tttlab-memo-tpt-tpt": (["+experiment=smoke"], "selection=6", "selection=6 would be ignored"),
    "tttlab-memo-tpt-evaluate": ([], "amp=xx", "amp='xx'"),
    "tttlab-mttt-train": (["experiment=smoke"], "lr=-1", "lr=-1; expected"),
}  # fmt: skip
#: commands that read key=value themselves (no Hydra: no ``--cfg job``)
PLAIN = ("tttlab-memo-tpt-evaluate",)


def scripts(root: Path) -> dict[str, str]:
    """``{console script: "module:function"}`` of every package of ``root``, sorted by name."""
    out = {}
    for pyproject in sorted(root.glob("packages/*/pyproject.toml")):
        text = pyproject.read_text()
        block = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", text, re.M | re.S)
        for name, target in re.findall(r'^([\w.-]+)\s*=\s*"([\w.:]+)"', block[1] if block else "", re.M):
            out[name] = target
    return dict(sorted(out.items()))


def command(script: str, target: str, mode: str, tmp: Path) -> tuple[list[str], str | None] | None:
    """The argv after the interpreter and the text a ``check`` run's error must contain (None: any exit 0)."""
    module, function = target.split(":")
    code = (f"import sys; sys.argv[0] = {script!r}; from {module} import {function}; "
            f"sys.exit({function}())")  # fmt: skip
    if mode == "help":
        return ["-c", code, "--help"], None
    if script not in SMOKE:
        return None
    smoke, bad, needle = SMOKE[script]
    if mode == "cfg":  # tttlab-memo-tpt-evaluate is no Hydra command
        return None if script in PLAIN else (["-c", code, *smoke, "--cfg", "job"], None)
    return ["-c", code, *smoke, f"out_dir={tmp / 'out'}", bad], needle


def time_once(python: str, argv: list[str], tree: Path, needle: str | None, tmp: Path) -> float | None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in sorted(tree.glob("packages/*/src")))
    start = time.perf_counter()
    res = subprocess.run([python, *argv], env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    ok = res.returncode == 0 if needle is None else (res.returncode == 2 and needle in res.stderr)
    return seconds if ok else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                    help="a checkout whose packages/*/src go first on PYTHONPATH (repeat to compare; "
                         "default: this checkout)")  # fmt: skip
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every cell (interleaved)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--scripts", nargs="+", metavar="NAME", help="only these console scripts")
    ap.add_argument("--python", default=sys.executable, help="the interpreter (default: this one)")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps {args.reps}: expected at least 1")
    trees = {}
    for spec in args.tree or [f"tree={ROOT}"]:
        name, sep, path = spec.partition("=")
        if not sep or not name or not (Path(path) / "packages").is_dir():
            ap.error(f"--tree {spec!r}: expected NAME=PATH of a tttlab checkout (with packages/)")
        trees[name] = Path(path).resolve()
    known = scripts(ROOT)
    chosen = args.scripts or list(known)
    unknown = [s for s in chosen if s not in known]
    if unknown:
        ap.error(f"--scripts: unknown {unknown}; known: {', '.join(known)}")

    times: dict[tuple[str, str, str], list[float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp_name:
        tmp = Path(tmp_name)
        for rep in range(args.reps):
            for script in chosen:
                for mode in args.modes:
                    cmd = command(script, known[script], mode, tmp)
                    if cmd is None:
                        continue
                    for name, tree in trees.items():
                        t = time_once(args.python, cmd[0], tree, cmd[1], tmp)
                        times.setdefault((script, mode, name), []).append(t)
            print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)

    def cell(values: list[float | None] | None) -> str:
        if not values:
            return "-"
        if any(v is None for v in values):
            return "n/a"
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    cols = [f"{mode} {name}" for mode in args.modes for name in trees]
    print(f"| script | {' | '.join(cols)} |")
    print("|---|" + "---:|" * len(cols))
    for script in chosen:
        cells = [cell(times.get((script, mode, name))) for mode in args.modes for name in trees]
        print(f"| {script} | {' | '.join(cells)} |")
    print(f"\nseconds of wall time per run: median (min-max) of {args.reps}; "
          f"n/a: a run did not end as expected (exit status, message)")  # fmt: skip


if __name__ == "__main__":
    main()
