"""Evaluate a trained run on a core corruption benchmark: ``tttlab-mttt-evaluate run_dir=<dir> [benchmark.*]``
(or ``+method=mttt_jax.<mixer> [+profile=...]``: a compare profile's model, trained once and cached).

MTTT's test-time training happens inside every forward pass (each TTT layer runs its inner loop on the
tokens of each image), so there are no weights to adapt or reset between batches: every setting of
``tttlab.core.benchmark`` gives the same numbers, and one record per domain is written (``accuracy``,
``error`` and, as ``extra``, the last layer's inner loss at its last step averaged over the domain's
images) plus a ``mean`` summary, in ``<out_dir>/records.jsonl`` (default ``<run_dir>/eval``).  The
command prints them as a table (``tttlab.core.cli.domain_table``: accuracy in % and ms/image per domain,
clean first, the mean over corruptions last), then the records path.

``run(cfg)`` is the ``evaluate`` target of the ``tttlab.methods`` specs (a mapping with the keys of
``evaluate_conf/evaluate.yaml``: a config folder of its own, without the training's ``experiment`` group).

``dtype`` (``float32`` | ``bfloat16`` | ``float16``; default: the training run's) is the compute dtype of
the evaluation's forward passes (parameters stay float32; the TTT layers' inner losses are computed in
float32); in the compare path (``method`` + ``profile``) it is also the compute dtype of the profile's
model trained there (part of the cached model's key).  ``device`` (``auto`` | ``cpu`` | ``gpu`` | ``cuda``
| ``cuda:N`` | ``tpu``) pins the evaluation -- and the training of a cached model -- to those JAX devices:
the mesh, the parameters and every jitted computation (``jax.default_device``); a device JAX does not
have here is a ConfigError.  Everything runs under ``jax.jit`` (JAX's compiler), so there is no separate
compile option.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tttlab.core.errors import CheckpointError, ConfigError
from tttlab.core.jax import data_mesh, replicate, shard
from tttlab.core.records import RunDir, config_hash, write_domain_summary

from . import data as mdata
from . import train as T
from .inner_loop import InnerConfig

log = logging.getLogger("tttlab.mttt_jax.evaluate")


def load_run(run_dir, step: int | None = None, dtype: str | None = None, device=None):
    """``(config dict, model, params)`` of a training run directory (newest checkpoint by default).
    ``dtype``: the model's compute dtype (default: the run's); ``device``: restore the parameters there
    (default: JAX's default device)."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise CheckpointError(f"{cfg_path} does not exist; expected a run directory of tttlab-mttt-train")
    try:
        c = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
    except Exception as exc:  # noqa: BLE001 - YAML and interpolation errors have many types
        raise CheckpointError(f"{cfg_path} is not a readable config: {exc}") from None
    missing = [
        k
        for k in ("model", "tokens", "image_size", "inner", "input")
        if not isinstance(c, dict) or k not in c
    ]
    if missing:
        raise CheckpointError(
            f"{cfg_path} lacks {missing}: not the config of a tttlab-mttt-train run (another package's run "
            "directory?); expected run_dir=<a tttlab-mttt-train out_dir>"
        )
    model = T.model_from_config({**c, "dtype": dtype or c.get("dtype", "float32")})
    channels = 1 if c["input"]["dataset"] in ("mnist", "digits") else 3
    dummy = jnp.zeros((1, *model.image_size, channels), jnp.float32)
    # only the shapes and dtypes of the state are needed (the checkpoint holds the values): eval_shape
    # traces model.init without compiling it (jax.jit(model.init) compiled the whole forward, TTT inner
    # loop included: ~12 s of every evaluation on 2 CPU cores, 0.3 s traced)
    params = jax.eval_shape(
        model.init, {"params": jax.random.PRNGKey(0), "idx": jax.random.PRNGKey(0)}, dummy
    )["params"]
    tx = T.make_optimizer(c, params, 1)
    state = {"params": params, "opt_state": jax.eval_shape(tx.init, params)}
    mngr = T.checkpoint_manager(run_dir / "checkpoints", c.get("keep_checkpoints", 2))
    try:
        if step is not None:  # a step that is not there: name it and the ones there are
            steps = sorted(mngr.all_steps())
            if isinstance(step, bool) or str(step).strip() not in {str(s) for s in steps}:
                raise CheckpointError(
                    f"checkpoint_step={step!r}: {run_dir / 'checkpoints'} holds no checkpoint of that step; "
                    f"expected one of {steps} (or null: the newest)"
                )
        step = mngr.latest_step() if step is None else int(step)
        if step is None:
            raise CheckpointError(
                f"{run_dir / 'checkpoints'} holds no checkpoint; train first (tttlab-mttt-train)"
            )
        sharding = jax.sharding.SingleDeviceSharding(device) if device is not None else None
        abstract = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state
        )
        state, _ = T.restore_checkpoint(mngr, step, abstract)
    finally:
        mngr.close()
    return c, model, state["params"]


#: ``method`` of the compare contract (spec name without ``mttt_jax.``) -> Hydra overrides of the mixer
MIXER_FLAGS: dict[str, list[str]] = {
    "mttt_mlp": ["inner.layer_type=TTT"],
    "mttt_linear": [
        "inner.layer_type=TTT", "inner.TTT.inner_encoder=mlp_1", "inner.TTT.inner_encoder_init=zero",
        "inner.TTT.inner_encoder_bias=false", "inner.TTT.decoder_LN=false", "inner.TTT.train_init=false",
    ],
    "linear_attention": ["inner.layer_type=linear_attention", "inner.linear_attention.elu=false",
                         "inner.linear_attention.normalizer=constant"],
    "linear_attention_katharopoulos": ["inner.layer_type=linear_attention", "inner.linear_attention.elu=true",
                                       "inner.linear_attention.normalizer=adaptive"],
    "self_attention": ["inner.layer_type=self_attention"],
}  # fmt: skip
#: ``profile`` of the compare contract -> the training run trained on first use (cached in ``cache_dir``).
#: quick / full: the ``mnist_patch`` recipe (7x7 patches = 16 tokens, width-64 ViT, learned pos-emb,
#: non-zero head, Adam 3e-3, batch 64) for one epoch on the first 6,400 / 20,000 training images
#: (100 / 312 steps; full is the README's proxy row).  smoke: the width-16 smoke ViT with learned
#: pos-emb, non-zero head and Adam 1e-2 on 1,024 images (32 steps of 32; ~20-30 % clean: a CI check, not
#: a model).  The first profiles (4,000 / 10,000 images, 4x4 patches, sincos pos-emb, zero head, lr 1e-3,
#: batch 128, i.e. 31 / 78 steps) left every mixer near chance.
PROFILES: dict[str, list[str]] = {
    "smoke": ["experiment=smoke", "total_epochs=1", "input.num_examples=1024", "input.batch_size=32",
              "posemb=learn", "head_zeroinit=false", "lr=0.01", "warmup_steps=5", "evals.num_examples=256"],
    "quick": ["experiment=mnist_patch", "total_epochs=1", "input.num_examples=6400", "evals.num_examples=1000"],
    "full": ["experiment=mnist_patch", "total_epochs=1", "input.num_examples=20000", "evals.num_examples=2000"],
}  # fmt: skip


def compose_train(overrides: list[str]) -> dict:
    """The training config (``conf/config.yaml`` + overrides) composed with Hydra, also inside a running
    Hydra app (``tttlab-mttt-evaluate``, whose config folder is another: that app's Hydra is put back after)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    running = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="tttlab.mttt_jax.conf", version_base=None):
            return T.to_dict(compose(config_name="config", overrides=overrides))
    finally:
        if running is not None:  # the instance now is another object (Hydra's backup of the cleared one)
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(running)


def check_method(method: str, profile: str | None = None) -> str:
    """``method`` (``mttt_jax.<mixer>`` or ``<mixer>``) -> the mixer's name; a :class:`ConfigError` unless it is
    a mixer of :data:`MIXER_FLAGS` and ``profile`` (when given) one of :data:`PROFILES`.  The message names the
    value as given, a close mixer and the command's form."""
    name = str(method).removeprefix("mttt_jax.")
    form = (
        f"+method=mttt_jax.<mixer> [+profile={'|'.join(PROFILES)}], <mixer> one of {', '.join(MIXER_FLAGS)}"
    )
    if name not in MIXER_FLAGS:
        close = difflib.get_close_matches(name, list(MIXER_FLAGS), n=1)
        hint = f" (did you mean 'mttt_jax.{close[0]}'?)" if close else ""
        raise ConfigError(f"method={method!r}: no such MTTT method{hint}; expected {form}")
    if profile is not None and profile not in PROFILES:
        raise ConfigError(f"profile={profile!r}; expected one of {', '.join(PROFILES)} ({form})")
    return name


def cached_run(method: str, profile: str, cache_dir, progress: bool = False, seed: int = 0,
               dtype: str | None = None, mesh=None) -> Path:  # fmt: skip
    """The run directory of ``method`` trained with ``profile``: trained now if absent or unfinished
    (resuming from its last checkpoint), reused otherwise.  Keyed by the hash of the training config
    (``dtype``: the compute dtype, default the profile's; ``mesh``: the devices to train on)."""
    check_method(method, profile)
    tc = compose_train(
        [
            *PROFILES[profile],
            *MIXER_FLAGS[method],
            f"logging.progress={str(progress).lower()}",
            f"seed={int(seed)}",
            *([f"dtype={dtype}"] if dtype else []),
        ]
    )
    key = config_hash({k: v for k, v in tc.items() if k not in ("out_dir", "logging", "resume")})
    out = Path(cache_dir) / f"{method}-{profile}-{key}"
    stats = out / "stats.json"
    done = stats.exists() and len(json.loads(stats.read_text()).get("val/prec@1", [])) >= int(
        tc["total_epochs"]
    )
    if not done:
        log.info("training %s (%s profile) into %s (cached for later evaluations)", method, profile, out)
        T.train({**tc, "out_dir": str(out)}, mesh=mesh)
    return out


#: keys of :func:`run` (the evaluate contract's, those of ``evaluate_conf/evaluate.yaml``)
EVALUATE_KEYS = {"method", "out_dir", "benchmark", "profile", "cache_dir", "seed", "device", "progress", "run_dir",
                 "checkpoint_step", "logging", "dtype"}  # fmt: skip

#: ``device`` values -> JAX platform
PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}


def resolve_devices(device: str) -> list:
    """The JAX devices ``device`` names (``auto``: JAX's default backend; ``cuda:N``: the N-th GPU);
    a ConfigError naming ``device`` for a value JAX cannot honour here."""
    device = str(device)
    if not re.fullmatch(r"cpu|auto|gpu|tpu|cuda(:\d+)?", device):
        raise ConfigError(f"device={device!r}; expected cpu, gpu, cuda, cuda:N, tpu or auto")
    if device == "auto":
        return list(jax.devices())
    name, _, index = device.partition(":")
    try:
        devices = list(jax.devices(PLATFORMS[name]))
    except RuntimeError:
        devices = []
    if not devices:
        raise ConfigError(
            f"device={device!r}, but JAX finds no {PLATFORMS[name]} device here (backend: "
            f"{jax.default_backend()}, devices: {[d.platform for d in jax.devices()]}); use device=cpu or auto"
        )
    if index:
        if int(index) >= len(devices):
            raise ConfigError(
                f"device={device!r}, but JAX finds {len(devices)} GPU(s) here (cuda:0..cuda:{len(devices) - 1})"
            )
        devices = [devices[int(index)]]
    return devices


def run(cfg: Mapping | None = None, **overrides) -> Path:
    """Evaluate a trained run on ``cfg['benchmark']``; returns the records file.

    The model: ``run_dir`` (a ``tttlab-mttt-train`` run), or, for ``tools/compare.py``, ``method``
    (``mttt_jax.<mixer>``, see :data:`MIXER_FLAGS`) trained with ``profile`` (:data:`PROFILES`) on
    first use and cached under ``cache_dir``.  Records: per domain ``accuracy``/``error`` (``n``
    images, ``wall_time_s`` of the forward passes, in which the TTT layers adapt) and ``s_per_image``,
    then the mean accuracy over corruptions (``n`` = images).
    """
    c = {**T.to_dict(cfg or {}), **overrides}
    unknown = sorted(set(c) - EVALUATE_KEYS)
    if unknown:
        raise ConfigError(f"unknown evaluate keys {unknown}; expected some of {sorted(EVALUATE_KEYS)}")
    # +logging.level=DEBUG passed Hydra (the '+' adds a key) and was ignored: no mttt_jax command has a log
    # level (tttlab-mttt-train refuses it too), so the same line as without the '+'
    if not isinstance(c.get("logging") or {}, Mapping):
        raise ConfigError(f"logging={c['logging']!r}; expected a mapping with the key progress")
    for key in c.get("logging") or {}:
        if key != "progress":
            raise ConfigError(f"unknown config key 'logging.{key}' (known keys in 'logging': progress)")
    seed = c.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"seed={seed!r}; expected an integer >= 0")
    if "progress" in c and not isinstance(c["progress"], bool):
        raise ConfigError(f"progress={c['progress']!r}; expected true or false")
    devices = resolve_devices(c.get("device") or "auto")
    dtype = c.get("dtype")
    if dtype is not None and dtype not in T.DTYPES:
        raise ConfigError(f"dtype={dtype!r}; expected null (the training run's) or one of {list(T.DTYPES)}")
    T.quiet_absl()
    with jax.default_device(devices[0]):
        return _run(c, seed, devices)


def _run(c: dict, seed, devices) -> Path:
    from tttlab.core.benchmark import from_config

    mesh = data_mesh(devices)
    dtype = c.get("dtype")
    # compare passes ``progress``; the command line has ``logging.progress`` (a bar on a terminal only)
    if "progress" in c:
        progress = bool(c["progress"])
    else:
        progress = bool((c.get("logging") or {}).get("progress", False)) and sys.stderr.isatty()
    # the benchmark first (core checks every key, a missing root): a bad one trains no model and
    # rewrites no earlier evaluation's config.yaml
    bcfg = dict(c.get("benchmark") or {})
    method = check_method(c["method"]) if c.get("method") else None  # also with run_dir: it names the records
    bench = from_config(bcfg)
    if method:
        if not c.get("run_dir"):
            cache = c.get("cache_dir") or "runs/mttt/models"
            c["run_dir"] = str(
                cached_run(
                    method,
                    str(c.get("profile") or "full"),
                    cache,
                    progress,
                    seed=int(seed or 0),
                    dtype=dtype,
                    mesh=mesh,
                )  # fmt: skip
            )
    if not c.get("run_dir"):
        raise CheckpointError(
            "evaluate needs run_dir=<directory of a tttlab-mttt-train run> or method=mttt_jax.<mixer>"
        )
    tc, model, params = load_run(c["run_dir"], c.get("checkpoint_step"), dtype=dtype, device=devices[0])
    if seed is not None and seed != int(tc.get("seed", 0)):
        raise ConfigError(
            f"seed={seed}, but {c['run_dir']} was trained with seed={tc.get('seed', 0)}: its records would carry "
            "the wrong seed; drop seed= or evaluate a run of that seed"
        )
    inner = InnerConfig.from_dict(tc["inner"])
    out = RunDir(c.get("out_dir") or Path(c["run_dir"]) / "eval", c, other_config="error")
    n_dev = mesh.devices.size
    params = replicate(params, mesh)
    key = jax.random.fold_in(jax.random.PRNGKey(int(tc.get("seed", 0))), 7)

    per_image = model.clone(per_example_inner=True)  # inner losses per image: pad rows and domains apart

    @jax.jit
    def predict(params, images):
        logits, inner_losses = per_image.apply({"params": params}, images, rngs={"idx": key})
        return jnp.argmax(logits, -1), inner_losses[:, -1, -1]  # last layer, last step

    lo, hi = (tc["input"].get("augment") or {}).get("value_range", (-1.0, 1.0))
    width = bench.batch_size + (-bench.batch_size) % n_dev  # every batch padded to one shape: one compile

    def prepare(images):
        x = mdata.value_range(mdata.downsample(images, model.image_size[0]), lo, hi)
        pad = width - x.shape[0]
        return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad > 0 else x

    # the benchmark's domains in its order (clean first, then the corruptions and severities as it lists them):
    # the records and the printed table follow it, as the other packages' do (a mixed stream's first batches
    # set the order otherwise); a domain no image came from writes no record
    per_domain: dict = {d: {"correct": 0, "n": 0, "inner": [], "secs": 0.0} for d in bench.domains}
    batches = iter(bench)
    first = next(batches, None)
    if first is not None:  # compile before timing
        jax.block_until_ready(predict(params, shard(prepare(first.images), mesh)))
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(bench) if hasattr(bench, "__len__") else None, desc=f"mttt_jax.{method or 'eval'}",
               disable=not progress) if tqdm else None  # fmt: skip
    for batch in _chain(first, batches):
        n = batch.images.shape[0]
        t0 = time.perf_counter()
        pred, last_inner = predict(params, shard(prepare(batch.images), mesh))
        pred, last_inner = np.asarray(pred)[:n], np.asarray(last_inner)[:n]  # the real images only
        secs = time.perf_counter() - t0
        ids = batch.domain_ids if batch.domain is None else np.zeros(n, np.int64)
        for i in np.unique(ids):
            dom = bench.domains[int(i)] if batch.domain is None else batch.domain
            sel = ids == i
            acc = per_domain.setdefault(dom, {"correct": 0, "n": 0, "inner": [], "secs": 0.0})
            acc["correct"] += int((pred[sel] == batch.labels[sel]).sum())
            acc["n"] += int(sel.sum())
            acc["secs"] += secs * float(sel.sum()) / n
            acc["inner"].extend(last_inner[sel].tolist())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    name = f"mttt_jax.{method}" if method else f"mttt_jax.{T.method_name(inner)}"
    # config_hash: the evaluation's (RunDir's default, as in the other packages; the model is extra.train_run),
    # so that the same evaluation run again (it starts from zero, e.g. after a kill that came after its last
    # record) replaces its records instead of appending a second copy
    out.drop_records()
    writer = out.writer(method=name, package="mttt_jax", framework="jax", model=f"vit-{tc['model']}-{tc['tokens']}",
                        dataset=bench.name, setting=getattr(bench, "setting", None),
                        seed=int(c.get("seed", tc.get("seed", 0))))  # fmt: skip
    with writer:
        write_records(writer, per_domain, ttt=inner.layer_type == "TTT", train_run=str(c["run_dir"]))
    return out.records_path


def write_records(writer, per_domain: dict, *, ttt: bool, train_run: str) -> list[dict]:
    """The compare-contract records via :func:`tttlab.core.records.write_domain_summary`, plus ``error``.

    ``per_domain`` maps a benchmark domain to ``{"correct", "n", "secs", "inner": [the last layer's inner loss
    at its last step for each of the domain's images]}``.  Per domain (in ``per_domain``'s order, which is the
    benchmark's in :func:`run`; the clean domain first): ``accuracy`` and
    ``s_per_image`` (``extra``: ``correct``, ``last_inner_loss`` for TTT mixers, ``train_run``), then
    ``accuracy`` with ``corruption="mean"`` over the corrupted domains; the clean domain is summarised on its
    own, so the mean's ``n``/``wall_time_s`` count the corrupted images only (as before the move to the core
    helper).  Every accuracy record gets an ``error`` = 1 - accuracy twin with the same fields.
    """
    totals = {dom: (a["correct"], a["n"], a["secs"], a["inner"]) for dom, a in per_domain.items() if a["n"]}

    def domain_extra(dom, row):
        return {"last_inner_loss": float(np.mean(row[3])) if ttt and row[3] else None, "train_run": train_run}

    clean = {d: r for d, r in totals.items() if d.corruption is None}
    corrupted = {d: r for d, r in totals.items() if d.corruption is not None}
    with writer.group():  # all records or none: a run killed midway is not half recorded (then twice)
        written = write_domain_summary(writer, clean, domain_extra=domain_extra)
        written += write_domain_summary(writer, corrupted, domain_extra=domain_extra)
        for r in list(written):
            if r["metric"] == "accuracy":
                keep = {k: r[k] for k in ("corruption", "severity", "n", "wall_time_s", "extra")}
                written.append(writer.write(metric="error", value=1.0 - float(r["value"]), **keep))
    for r in written:  # the per-domain numbers: the table the command prints (domain_table), and the records
        if r["metric"] == "accuracy" and r.get("corruption") == "mean":
            log.info("mean over %d corruption domains: accuracy %.4f", len(corrupted), float(r["value"]))
    return written


#: Where ``tttlab-mttt-evaluate +method=mttt_jax.<mixer> +profile=<p>`` (no ``run_dir``) puts its records and
#: Hydra's log by default: ``<EVAL_ROOT>/<mixer>-<p>`` (``evaluate.run``, called without ``out_dir``, writes into
#: the cached model's folder instead).
EVAL_ROOT = "runs/mttt/eval"


def eval_dir(out_dir=None, run_dir=None, method=None, profile=None) -> str:
    """The command's run directory (Hydra's ``hydra.run.dir``, made before the task runs: its log goes
    there): ``out_dir`` when given, else ``<run_dir>/eval`` (where :func:`run` writes the records), else, for
    ``+method=mttt_jax.<mixer>`` without ``run_dir``, ``runs/mttt/eval/<mixer>-<profile>`` (profile default
    ``full``, as :func:`run`), which the command then gives :func:`run` as ``out_dir``.  Neither ``run_dir``
    nor ``method``: a :class:`ConfigError` saying what the command takes (core's ``check_hydra_command``
    prints it as one line before Hydra starts, as a ``method`` or ``profile`` of no model: :func:`check_method`)."""
    if method:
        check_method(method, profile)  # before Hydra makes its folder (runs/mttt/eval/<mixer>-<profile>)
    if out_dir:
        return str(out_dir)
    if run_dir:
        return f"{run_dir}/eval"
    if method:
        return f"{EVAL_ROOT}/{str(method).removeprefix('mttt_jax.')}-{profile or 'full'}"
    raise ConfigError(
        "run_dir is not set: evaluate a tttlab-mttt-train run with run_dir=<its folder, the out_dir it wrote, "
        "e.g. runs/mttt/smoke>, or train one first (cached) with +method=mttt_jax.<mixer> "
        f"[+profile={'|'.join(PROFILES)}], <mixer> one of {', '.join(MIXER_FLAGS)}"
    )


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("mttt_eval_dir", eval_dir, replace=True)


register_resolvers()


def check_train_options(prog: str, argv: list[str] | None = None) -> None:
    """Stop the command when an override names a key of the training config that evaluate does not take
    (``experiment=smoke``, ``lr=0.1``, ``inner.TTT.inner_itr=4``): Hydra would say "use +experiment=smoke",
    which then fails in :func:`run` (``unknown evaluate keys``).  One ``ConfigError`` line saying it is a
    ``tttlab-mttt-train`` option and what evaluate takes instead (for ``experiment``, the folder that training
    writes), exit status 2.  Evaluate's own keys, ``hydra.*`` and flags pass."""
    train_keys: set | None = None
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.startswith("-"):
            continue
        key, sep, value = arg.lstrip("+~").partition("=")
        top = key.split(".")[0].split("/")[0]
        if not key or top in EVALUATE_KEYS or top == "hydra":
            continue
        if train_keys is None:
            try:
                train_keys = set(compose_train([])) | {"experiment"}
            except Exception:  # noqa: BLE001 - without the training config, Hydra reports the override
                return
        if top not in train_keys:
            continue
        example = "e.g. runs/mttt/smoke"
        if top == "experiment" and sep and value.strip():
            try:
                example = f"{compose_train([f'experiment={value.strip()}'])['out_dir']} after tttlab-mttt-train {arg.lstrip('+')}"
            except Exception:  # noqa: BLE001 - no such experiment: the generic example
                pass
        from tttlab.core.cli import refuse

        refuse(prog, ConfigError(
            f"{arg}: evaluate takes no {top} (a tttlab-mttt-train option); it evaluates a trained run: "
            f"run_dir=<the run's folder, {example}>, or +method=mttt_jax.<mixer> [+profile={'|'.join(PROFILES)}] "
            f"to train one (cached); its keys: {', '.join(sorted(EVALUATE_KEYS))}"
        ))  # fmt: skip


def _chain(first, rest):
    if first is not None:
        yield first
    yield from rest


def main() -> None:
    import hydra

    from tttlab.core.cli import check_hydra_command

    from .cli import user_errors

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    T.quiet_absl()

    # evaluate's own config folder: the training's (conf) has the experiment group, which --help would list
    @hydra.main(config_path="evaluate_conf", config_name="evaluate", version_base=None)
    def _main(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        from tttlab.core.cli import domain_table

        with user_errors("tttlab-mttt-evaluate"):
            if OmegaConf.is_missing(cfg, "run_dir"):  # +method=... without run_dir: a model to train
                cfg.run_dir = None
            if not cfg.run_dir and not cfg.out_dir:  # the records next to Hydra's log (eval_dir)
                cfg.out_dir = HydraConfig.get().run.dir
            path = run(cfg)
            # accuracy % and ms/image per domain, clean first, the mean last (inside user_errors: `| head`
            # ends it quietly, not in Hydra's error report)
            print("\n".join(domain_table(path)))
            print(path)

    check_train_options("tttlab-mttt-evaluate")
    # plain YAML, whose keys run() checks (EVALUATE_KEYS): a key it lacks is core's one line with a did-you-mean,
    # not Hydra's '+key=value' (refused next); the keys evaluate.yaml leaves out (+method=..., +seed=1) keep it
    check_hydra_command(
        "tttlab-mttt-evaluate",
        "tttlab.mttt_jax.evaluate_conf",
        "evaluate",
        compile_key=False,
        free_keys=sorted(EVALUATE_KEYS - {"benchmark", "logging"}),
        input_dirs={"run_dir": "the out_dir of a tttlab-mttt-train run, e.g. runs/mttt/smoke"},
    )
    _main()


if __name__ == "__main__":
    main()
