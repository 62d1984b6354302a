"""Helpers shared by the sweep and benchmark scripts in this folder (``sweep_*.py``, ``bench_*.py``; run as
``python benchmarks/<x>.py``, so this folder is on ``sys.path``)."""

from __future__ import annotations

import argparse
import difflib
import subprocess
import time


def names_subset(known, what: str):
    """An argparse ``type=`` for a comma-separated subset of the names ``known``: the names as a list, in the
    order given, each once (a repeated name is dropped: it would run the same thing twice).  An unknown name
    is argparse's usage error naming it, the closest known name and the choices::

        argument --modes: unknown mode 'fp16' (did you mean 'bf16'?); expected a comma-separated subset of
        fp32,bf16,compile

    ``what``: the singular of what the names are ("mode", "path", ...).  A string ``default`` goes through it
    too (argparse parses string defaults), so ``args.<option>`` is always the list."""
    known = list(known)

    def parse(text: str) -> list[str]:
        names = list(dict.fromkeys(text.split(",")))
        bad = []
        for name in names:
            if name not in known:
                # 'tpt' for 'memo_tpt.tpt': a dotted name's last part, else difflib's closest spelling
                close = [k for k in known if k.rsplit(".", 1)[-1] == name] or difflib.get_close_matches(
                    name, known, n=1
                )
                bad.append(f"unknown {what} {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        if bad:
            raise argparse.ArgumentTypeError(
                f"{'; '.join(bad)}; expected a comma-separated subset of {','.join(known)}"
            )
        return names

    parse.__name__ = f"{what} names"  # argparse's fallback message: "invalid <what> names value"
    return parse


def run_until(cmd, stop_at, env) -> subprocess.CompletedProcess:
    """``subprocess.run`` that kills the run at the monotonic time ``stop_at`` (rc -9, output kept)."""
    timeout = None if stop_at is None else max(1.0, stop_at - time.monotonic())
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return subprocess.CompletedProcess(cmd, -9, out, err + "\nkilled at the deadline")


def evaluate_modes(run, methods, modes, mode_config, config, first_domain, rounds=2, echo=None) -> list[dict]:
    """A package's evaluate contract (``run(cfg) -> records path``) for every method in every mode, the modes
    interleaved over ``rounds`` rounds with their order rotated each round, so that all modes see the same
    machine load.  ``mode_config[name]``: the keys of that mode (e.g. ``{"amp": "bf16"}``); ``config``: the
    keys common to all (profile, cache_dir, benchmark, ...).  Per method and mode: the mean accuracy (equal
    in every round, asserted), s/image over all domains of round 1 (a compiled mode's first domain holds its
    compiles) and the median over the rounds of s/image over the domains after ``first_domain`` (nan when
    ``first_domain`` is the only one)."""
    import math
    import statistics
    import tempfile

    from tttlab.core.records import load_records

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            got: dict[str, list] = {m: [] for m in modes}
            for k in range(rounds):
                for name in modes[k % len(modes) :] + modes[: k % len(modes)]:
                    cfg = {
                        **config,
                        **mode_config[name],
                        "method": method,
                        "out_dir": f"{tmp}/{method}-{name}-{k}",
                    }
                    df = load_records(run(cfg), metric="accuracy")
                    dom = df[df.corruption != "mean"]
                    warm = dom[dom.corruption != first_domain]
                    mean = df[df.corruption == "mean"].value
                    # one corruption: the evaluate commands write no "mean" record; the domain's is the mean
                    acc = float(mean.iloc[0]) if len(mean) else float(dom.value.mean())
                    got[name].append((acc, float(dom.wall_time_s.sum() / dom.n.sum()),
                                      float(warm.wall_time_s.sum() / warm.n.sum()) if len(warm) else math.nan))  # fmt: skip
            for name in modes:
                accs = {a for a, _, _ in got[name]}
                assert len(accs) == 1, f"{method} {name}: accuracy differs between rounds {accs}"
                rows.append(dict(method=method, mode=name, acc=accs.pop(), spi=got[name][0][1],
                                 warm=statistics.median(w for _, _, w in got[name])))  # fmt: skip
                if echo:
                    echo(rows[-1])
    return rows
