"""Pi-net classifiers on a core corruption benchmark (default ``mnist_c``), writing core records.

    tttlab-pilimit-evaluate method=pilimit.inf_pinet profile=quick     # -> runs/pilimit/eval/inf_pinet-quick
    tttlab-pilimit-evaluate train_run=runs/pilimit/mnist/finite1024-seed0   # your own run -> <run>/eval
    keys: method, profile (smoke|quick|full), train_run, out_dir, cache_dir, seed, device, threads, progress,
          logging.level (DEBUG|INFO|WARNING|ERROR|CRITICAL, as tttlab-pilimit-train's), amp (none|bf16),
          compile (false|true|a torch.compile mode),
          benchmark.{name,corruptions,severities,setting,num_examples,batch_size}, train_overrides
    python -c "from tttlab.pilimit.evaluate import run; print(run({'method': 'pilimit.mup'}))"

Paper: Yang, Santacroce, Hu, ICLR 2022 (``yang2022pinets``); upstream github.com/santacml/pilim.  A
plain classifier has no test-time adaptation: evaluation is prediction with the trained net (the
paper's test-time adaptation is the few-shot MAML readout adaptation, ``train.task=maml``).  Methods:
``pilimit.inf_pinet`` (infinite-width pi-net), ``pilimit.finite_pinet`` (finite pi-net sampled from it,
trained with Gproj), ``pilimit.mup`` / ``pilimit.baseline`` (Gaussian-initialised finite net, no Gproj).

The model is ``train_run`` (a ``tttlab-pilimit-train`` run directory) or, when that is null, the
``mnist`` experiment sized by ``profile`` (smoke / quick / full), trained on first use and cached under
``cache_dir`` keyed by the hash of its training config (atomic checkpoint writes, a file lock so that
one process trains while another waits and then reuses the finished run).  ``amp`` / ``compile`` (see
:mod:`tttlab.pilimit.precision`) apply to the prediction and, when the profile's model is trained here,
to that training too (``amp`` is part of the cached model's key; ``train_overrides=[amp=none]`` evaluates
the float32-trained model under bf16); a given ``train_run`` was trained with its own.  Records per domain: ``accuracy`` (``n``, ``wall_time_s`` = prediction time) and
``s_per_image``; then the mean accuracy over corruptions (``corruption="mean"``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tttlab.core.errors import CheckpointError, ConfigError
from tttlab.core.records import RunDir, check_run_dir, config_hash, write_domain_summary

from . import precision
from . import train as T
from .data import MNIST_MEAN, MNIST_STD, flatten_images

log = logging.getLogger("tttlab.pilimit.evaluate")

METHODS = {
    "pilimit.inf_pinet": "inf",
    "pilimit.finite_pinet": "finite",
    "pilimit.mup": "mup",
    "pilimit.baseline": "mup",
}

#: training overrides of the ``mnist`` experiment per profile (threads=1: small ops, shared CPUs)
PROFILES = {
    "smoke": ["model.r=16", "model.depth=1", "model.width=64", "data.num_examples=320", "data.batch_size=16",
              "train.num_test=200", "model.chunk_size=512"],
    "quick": ["model.r=48", "model.depth=2", "model.width=256", "data.num_examples=2400", "data.batch_size=16",
              "train.num_test=1000"],
    "full": ["model.r=96", "model.depth=2", "model.width=512", "data.num_examples=6000", "data.batch_size=16",
             "train.num_test=2000"],
}  # fmt: skip
#: images per domain when the caller does not say (keeps ``full`` under 90 s on 2 cores)
DEFAULT_NUM_EXAMPLES = {"smoke": 64, "quick": 200, "full": 500}
KNOWN = {"method", "out_dir", "benchmark", "profile", "cache_dir", "seed", "device", "progress", "train_run",
         "train_overrides", "threads", "batch_size", "amp", "compile", "logging"}  # fmt: skip


def default_out_dir(method: str, profile: str) -> str:
    """The run folder of an evaluation without ``out_dir`` (nor ``train_run``, whose default is
    ``<train_run>/eval``): ``runs/pilimit/eval/<method>-<profile>``, e.g. ``runs/pilimit/eval/mup-quick``."""
    return f"runs/pilimit/eval/{method.split('.', 1)[1]}-{profile}"


def _config(cfg: Mapping | None, overrides: dict) -> dict[str, Any]:
    c = {**(T.to_dict(cfg) if cfg is not None else {}), **overrides}
    unknown = sorted(set(c) - KNOWN)
    if unknown:
        raise ConfigError(f"unknown evaluate keys {unknown}; expected some of {sorted(KNOWN)}")
    if c.get("method") is not None and c["method"] not in METHODS:
        raise ConfigError(f"method={c['method']!r}; expected one of {sorted(METHODS)}")
    if c.get("train_run"):  # the method and the default out_dir follow the trained run
        kind = _run_kind(c["train_run"])
        if kind is not None and c.get("method") is not None and METHODS[c["method"]] != kind:
            raise ConfigError(
                f"method={c['method']} but {c['train_run']} trained model.kind={kind} "
                f"({T.KINDS.get(kind, kind)}); drop method= or pick the matching one"
            )
        if kind in T.KINDS:
            c.setdefault("method", T.KINDS[kind])
        c.setdefault("out_dir", str(Path(c["train_run"]) / "eval"))
    c.setdefault("method", "pilimit.inf_pinet")
    c.setdefault("profile", "full")
    if c["profile"] not in PROFILES:
        raise ConfigError(f"profile={c['profile']!r}; expected one of {sorted(PROFILES)}")
    # one folder per method and profile (runs/pilimit/eval/<method> was shared by the profiles: their records
    # went into one file and config.yaml was overwritten with a warning)
    c.setdefault("out_dir", default_out_dir(c["method"], c["profile"]))
    c.setdefault("cache_dir", "runs/pilimit/models")
    c.setdefault("seed", 0)
    if isinstance(c["seed"], bool) or not isinstance(c["seed"], int) or c["seed"] < 0:
        raise ConfigError(f"seed={c['seed']!r}; expected an integer >= 0")
    if Path(c["cache_dir"]).exists() and not Path(c["cache_dir"]).is_dir():
        raise ConfigError(f"cache_dir={c['cache_dir']!r} is a file; expected a directory (or a new path)")
    c.setdefault("device", "cpu")
    c.setdefault("progress", True)
    c.setdefault("threads", 1 if c["device"] == "cpu" else None)
    if c["threads"] is not None and (isinstance(c["threads"], bool) or not isinstance(c["threads"], int)
                                     or c["threads"] < 1):  # fmt: skip
        raise ConfigError(f"threads={c['threads']!r}; expected null or an integer >= 1")
    if not isinstance(c["progress"], bool):
        raise ConfigError(f"progress={c['progress']!r}; expected true or false")
    _check_logging(c.get("logging"))
    c.setdefault("amp", "none")
    c.setdefault("compile", False)
    c["amp"], c["compile"] = precision.check(c["amp"], c["compile"])
    if c.get("train_run") and c.get("train_overrides"):
        raise ConfigError(
            f"train_overrides={c['train_overrides']!r} configure the cached training run, but train_run="
            f"{c['train_run']} is given (already trained); drop one of them"
        )
    b = dict(c.get("benchmark") or {})
    b.setdefault("name", "mnist_c")
    b.setdefault("corruptions", "common")
    b.setdefault("severities", [5])
    b.setdefault("setting", "reset_each_shift")
    b.setdefault("batch_size", 64)
    b.setdefault("seed", int(c["seed"]))
    if b.get("num_examples") is None:
        b["num_examples"] = DEFAULT_NUM_EXAMPLES[c["profile"]]
    if b.get("num_examples") == "all":
        b["num_examples"] = None
    c["benchmark"] = b
    return c


def _check_logging(node) -> None:
    """``logging.level`` as tttlab-pilimit-train takes it (evaluate's only ``logging`` key: its progress bar is
    the top-level ``progress``); absent: INFO.  A ConfigError naming a bad key or value."""
    from tttlab.core.config import LOG_LEVELS

    if node is None:
        return
    if not isinstance(node, Mapping):
        raise ConfigError(
            f"logging={node!r}; expected a mapping with the key level, e.g. logging.level=DEBUG"
        )
    for key in node:
        if key != "level":
            hint = " (evaluate's progress bar is the top-level key progress)" if key == "progress" else ""
            raise ConfigError(f"unknown config key 'logging.{key}'{hint} (known keys in 'logging': level)")
    level = node.get("level")
    if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
        raise ConfigError(f"config key 'logging.level'={level!r}: expected one of {', '.join(LOG_LEVELS)}")


def _run_kind(run_dir) -> str | None:
    """``model.kind`` from a train run's ``config.yaml`` (None when it cannot be read: load_trained reports)."""
    try:
        from omegaconf import OmegaConf

        return str(OmegaConf.load(Path(run_dir) / "config.yaml").model.kind)
    except Exception:  # noqa: BLE001 - a missing/odd run directory is reported by load_trained
        return None


def training_config(c: dict[str, Any]) -> dict[str, Any]:
    """The validated training config of the profile's cached model (``train_overrides`` applied)."""
    kind = METHODS[c["method"]]
    # one CPU thread, whatever the evaluation's `threads`: the weights of this recipe depend on the float
    # summation order (the muP model of the full profile: MNIST-C 70.5 trained on 1 thread, 76.0 on 2), and
    # the cache key cannot hold a machine's thread count; every evaluation of a profile gets the same model
    overrides = [*PROFILES[c["profile"]], f"model.kind={kind}", f"seed={int(c['seed'])}", f"amp={c['amp']}",
                 f"compile={str(c['compile']).lower()}", "threads=1", *(c.get("train_overrides") or [])]  # fmt: skip
    return T.train_config("mnist", overrides)


def training_run(c: dict[str, Any]) -> Path:
    """The train run directory: ``train_run``, or the cached profile-sized ``mnist`` run (trained now)."""
    if c.get("train_run"):
        return Path(c["train_run"])
    kind = METHODS[c["method"]]
    tc = training_config(c)
    key = config_hash(T.training_part(tc))
    path = Path(c["cache_dir"]) / f"pilimit-{kind}-{key}"
    # a model cached before the run semantics joined the key (T.SEMANTICS): the same model when its epochs
    # had no partial batch (every profile: num_examples a multiple of batch_size), so it is kept
    legacy = Path(c["cache_dir"]) / f"pilimit-{kind}-{config_hash(T.training_part(tc, semantics=1))}"
    d, whole = tc["data"], {"train": 60_000, "test": 10_000}.get(tc["data"].get("split") or "train", 0)
    n = min(int(d["num_examples"] or whole), whole)  # the MNIST examples of an epoch
    even = (
        n > 0
        and d["name"] == "mnist"
        and tc["train"].get("classes") is None
        and n % int(d["batch_size"]) == 0
    )
    if even and not path.exists() and legacy.exists():
        path = legacy
    tc["out_dir"] = str(path)
    tc["logging"]["progress"] = bool(c["progress"])
    tc["device"] = c["device"]
    ckpt = RunDir.checkpoint_path_in(path, T.CHECKPOINT)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:  # one trainer per cached model
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (ckpt.exists() and T.load_checkpoint(ckpt).get("done")):
            log.info("training %s into %s (cached for later evaluations)", c["method"], path)
            T.run(tc)
    return path


def run(cfg: Mapping | None = None, **overrides) -> Path:
    """Evaluate per ``cfg`` (the evaluate contract's keys); returns the records file."""
    from tttlab.core.benchmark import from_config

    c = _config(cfg, overrides)
    if c.get("logging"):  # as tttlab-pilimit-train's logging.level (a display key: the same run)
        from tttlab.core.cli import apply_log_level

        apply_log_level(c["logging"]["level"])
    device = T.resolve_device(str(c["device"]))
    bench = from_config(c["benchmark"])  # every benchmark key (a missing root) checked before any training
    if not c.get("train_run"):
        training_config(c)  # a bad train_overrides entry: its own error now
    # another config's records there: refused now, not after the evaluation, but after the values are
    # checked (a bad value, e.g. benchmark.severities=[7], is reported as itself, not as a config change)
    check_run_dir(c["out_dir"], c)
    if c.get("threads") and str(c["device"]) == "cpu":
        torch.set_num_threads(int(c["threads"]))
    run_dir = training_run(c)
    net, tc, ck = T.load_trained(run_dir, device)
    if not ck.get("done"):
        raise CheckpointError(f"{run_dir}: training did not finish; run tttlab-pilimit-train there again")
    if tc["train"]["task"] != "classify" or tc["data"]["name"] not in ("mnist", "digits"):
        raise ConfigError(f"{run_dir} trained task={tc['train']['task']} on {tc['data']['name']}; expected a "
                          "classifier on mnist (the benchmark's images are 28x28 digits)")  # fmt: skip
    precision.check(
        c["amp"],
        c["compile"],
        tc["model"]["dtype"],
        tc["model"]["impl"] if tc["model"]["kind"] == "inf" else None,
    )
    if c["compile"]:
        precision.compile_net(net, c["compile"])
    totals: dict[Any, list] = {d: [0, 0, 0.0] for d in bench.domains}
    with torch.no_grad(), T.progress_bar(len(bench), c["method"], bool(c["progress"])) as bar:
        for batch in bench.batches():
            x = flatten_images(np.asarray(batch.images), MNIST_MEAN, MNIST_STD).to(device)
            t0 = time.perf_counter()
            with precision.autocast(device, c["amp"]):
                pred = net(x).argmax(1).cpu().numpy()
            secs = time.perf_counter() - t0
            hit = pred == np.asarray(batch.labels)
            ids = np.asarray(batch.domain_ids)
            for i in np.unique(ids):
                sel = ids == i
                acc = totals[bench.domains[int(i)]]
                acc[0] += int(hit[sel].sum())
                acc[1] += int(sel.sum())
                acc[2] += secs * float(sel.sum()) / len(hit)
            bar.update(1)
    rd = RunDir(c["out_dir"], c, other_config="error")
    defaults = dict(method=c["method"], package="pilimit", framework="torch", model=f"{tc['model']['kind']}_pinet_mlp",
                    dataset=bench.name, setting=c["benchmark"]["setting"], step=0, seed=int(c["seed"]))  # fmt: skip
    extra = {"train_run": str(run_dir), "adaptation": "none (prediction)", "rows": int(getattr(net, "M", 0))}
    rd.drop_records()  # run again (e.g. after a kill): replace, not append twice
    with rd.writer(**defaults) as writer:
        written = write_domain_summary(writer, totals, extra)
    for r in written:
        if r["metric"] == "accuracy" and r.get("corruption") == "mean":
            log.info("%s: mean accuracy %.4f over %d corruption domains", c["method"], float(r["value"]),
                     sum(d.corruption is not None for d in totals))  # fmt: skip
    return rd.records_path


def main() -> None:
    import sys

    from tttlab.core.cli import quiet_closed_stdout

    quiet_closed_stdout()  # `--help | head`: no BrokenPipeError traceback
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from tttlab.core.cli import domain_table, dotlist_config

    with T.user_errors("tttlab-pilimit-evaluate"):
        # +logging.level=DEBUG said "unknown evaluate keys ['+logging']"; -m, --cfg job: a Hydra command's options
        path = run(dotlist_config(sys.argv[1:], (
            "expected key=value, no options (this command is no Hydra app: one evaluation per command; see "
            "tttlab-pilimit-evaluate --help)"
        )))  # fmt: skip
    print("\n".join(domain_table(path)))  # the result as a table, not only the mean in a log line
    print(path)


if __name__ == "__main__":
    main()
