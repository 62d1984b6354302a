"""Fake test-time methods for the compare tests: importable by the evaluate subprocesses (PYTHONPATH).

``run`` follows the evaluate contract: it writes the core records of every domain (corruptions x severities) of the
benchmark it is given into ``out_dir``.  The accuracy of a domain is a fixed function of (method, setting, seed, corruption,
severity), so that tests can recompute every number; ``wall_time_s`` is 1 ms per image.  Each call appends
one JSON line to the file named by ``$TTTLAB_FAKE_CALLS`` (what the resume tests count).  Keys of the
``fake`` mapping (via compare's ``overrides``): ``crash`` (raise after printing to stderr), ``exit``
(os._exit with that status), ``no_records`` (return without writing), ``sleep`` (seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from tttlab.core.records import RunDir


def accuracy(method: str, setting: str, seed: int, corruption: str, severity: int) -> float:
    h = hashlib.sha256(f"{method}|{setting}|{seed}|{corruption}|{severity}".encode()).digest()
    return round(0.3 + 0.6 * h[0] / 255, 4)


def run(cfg=None, **overrides):
    c = {**(cfg or {}), **overrides}
    fake = c.get("fake") or {}
    calls = os.environ.get("TTTLAB_FAKE_CALLS")
    b = c["benchmark"]
    if calls:
        with open(calls, "a") as f:
            f.write(
                json.dumps(
                    {
                        "method": c["method"],
                        "setting": b["setting"],
                        "seed": c["seed"],
                        "corruptions": b["corruptions"],
                        "severities": b["severities"],
                        "dirichlet_delta": b.get("dirichlet_delta", "absent"),
                    }
                )
                + "\n"
            )
    if os.environ.get("TTTLAB_FAKE_PIDFILE"):
        Path(os.environ["TTTLAB_FAKE_PIDFILE"]).write_text(str(os.getpid()))
    if fake.get("sleep"):
        time.sleep(float(fake["sleep"]))
    if fake.get("crash"):
        print("fake evaluate: about to fail", file=sys.stderr)
        raise RuntimeError(fake["crash"] if isinstance(fake["crash"], str) else f"boom in {c['method']}")
    if fake.get("exit"):
        os._exit(int(fake["exit"]))
    rd = RunDir(c["out_dir"], c, other_config="error")  # as every subpackage's evaluate
    if fake.get("no_records"):
        return rd.records_path
    n = int(b["num_examples"])
    domains = [(cr, s) for cr in b["corruptions"] for s in b["severities"]]
    with rd.writer(method=c["method"], package=c["method"].split(".")[0], framework="numpy", model="fake",
                   dataset=b["name"], setting=b["setting"], seed=int(c["seed"])) as w:  # fmt: skip
        accs = []
        for corruption, severity in domains:
            acc = accuracy(c["method"], b["setting"], int(c["seed"]), corruption, severity)
            wall = 0.001 * n
            w.write(metric="accuracy", value=acc, corruption=corruption, severity=severity, n=n,
                    wall_time_s=wall)  # fmt: skip
            w.write(metric="s_per_image", value=wall / n, corruption=corruption, severity=severity, n=n)
            accs.append(acc)
        w.write(metric="accuracy", value=sum(accs) / len(accs), corruption="mean", n=n * len(accs))
    return rd.records_path
