"""TTT-MAE and its baseline on a core corruption benchmark, writing core records; the evaluate contract.

Paper: Gandelsman et al. 2022 (``gandelsman2022testtime``); upstream ``main_test_time_training.py`` and
``test_without_adaptation.py`` (github.com/yossigandelsman/test_time_training_mae).

:func:`run_benchmark` (behind ``tttlab-ttt-mae-ttt`` / ``tttlab-ttt-mae-baseline``) loads the model from
``resume_model`` + ``resume_finetune`` (official files or this package's ``checkpoint.pth``), streams every
domain of ``benchmark`` (any number of images), adapts each image from the base weights
(:mod:`tttlab.ttt_mae.ttt`; the baseline is 0 steps) and writes

- ``<out_dir>/images/records.jsonl``: one record per image (``metric="correct"`` after the last step,
  ``extra``: image index, label, the prediction after every step, the MAE loss of every step) -- upstream's
  ``results_*.npy`` / ``losses_*.npy``; a run started again skips the images already recorded under the
  same config and ends with the same numbers (per-image random numbers depend on the seed, the domain and
  the image index only);
- ``<out_dir>/records.jsonl``: per domain ``accuracy`` (after ``steps_per_example`` steps; ``n`` images,
  ``wall_time_s`` of adaptation + prediction), ``s_per_image``, ``accuracy_curve`` (``step`` k = 0..steps:
  the accuracy after k steps, upstream's ``accuracy.txt`` with k = line + 1, plus the unadapted k = 0),
  ``mae_loss`` per step, and the mean ``accuracy`` over corruptions (``corruption="mean"``).

``test_resize`` (``paper_*``: 256): each test image is first resized (shorter side, bicubic) and
centre-cropped to ``input_size`` as upstream's evaluation transform does, even to the 224 px ImageNet-C
files; the prediction and the single-crop TTT copies see that view.

TTT resets per image whatever ``benchmark.setting`` says (the method is episodic by construction); the
setting is only copied into the records, and ``benchmark.batch_size`` is not used
(``group_size`` sets how many images are adapted at once).  ``torchrun``: rank r adapts images ``r, r + W, ...`` of every
domain and writes ``images/records-rank<r>.jsonl``; rank 0 merges them (core ``merge_records``) and
writes the summary from all images, equal to a one-process run.

:func:`run` is the contract of ``tools/compare.py`` (methods ``ttt_mae.ttt`` and ``ttt_mae.baseline``):
with no checkpoints given it pretrains + probes a small MAE on MNIST (profile ``smoke`` | ``quick`` |
``full``), caches it under ``cache_dir`` keyed by the hash of the training configs, then evaluates.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tttlab.core.errors import ConfigError, DatasetNotFoundError
from tttlab.core.records import RunDir, config_hash, load_records, merge_records, write_domain_summary

from .checkpoint import load_official
from .common import (
    CROP_SCALE,
    EvalConfig,
    check_amp_compile,
    check_values,
    compile_kwargs,
    compose,
    crop_scale_ok,
    finite_nonneg,
    init_distributed,
    model_overrides,
    normalization,
    progress_bar,
    resolve_device,
    set_threads,
    to_dict,
)  # fmt: skip
from .model import build_model
from .ttt import OPTIMIZERS, BatchedTTT, TTTAdapter, TTTSettings, image_generator
from .views import Normalizer, resize_center_crop, to_unit

log = logging.getLogger("tttlab.ttt_mae.evaluate")
METHODS = ("ttt_mae.ttt", "ttt_mae.baseline")


def settings_of(c: dict[str, Any]) -> TTTSettings:
    lr = float(c["lr"]) if c["lr"] is not None else float(c["blr"]) * int(c["batch_size"]) / 256
    if not lr >= 0:  # also NaN
        which = f"lr={c['lr']}" if c["lr"] is not None else f"blr={c['blr']} (lr = blr * batch_size / 256)"
        raise ConfigError(f"{which}; expected a learning rate >= 0")
    if int(c["group_size"]) < 1:
        raise ConfigError(f"group_size={c['group_size']}; expected >= 1 (images adapted at once)")
    check_values(c, {
        "seed": (lambda v: v >= 0, "an integer >= 0"),
        "optimizer_momentum": (finite_nonneg, "a finite number >= 0"),
        "crop_scale": (crop_scale_ok, CROP_SCALE),
        "test_resize": (lambda v: v is None or (not isinstance(v, bool) and v >= int(c["input_size"])),
                        f"null or an integer >= input_size={c['input_size']} (resize, then centre crop)"),
    })  # fmt: skip
    if c.get("test_resize") is not None and not c["single_crop"] and int(c["steps_per_example"]) > 0:
        raise ConfigError(
            f"test_resize={c['test_resize']} with single_crop=false: upstream predicts the resized view but "
            "crops its random views from the stored image, which is not implemented; use single_crop=true "
            "(the paper's) or test_resize=null"
        )
    check_amp_compile(c)
    compiled = compile_kwargs(c["compile"])  # torch.compile's arguments: None (eager), {} or {"mode": ...}
    if c["optimizer_type"] not in OPTIMIZERS:  # a typo first, not the batched path's SGD-only advice
        raise ConfigError(f"optimizer_type={c['optimizer_type']!r}; expected one of {OPTIMIZERS}")
    if int(c["group_size"]) > 1 and int(c["steps_per_example"]) > 0 and c["optimizer_type"] != "sgd":
        raise ConfigError(
            f"optimizer_type={c['optimizer_type']!r} with group_size={c['group_size']}: the batched path "
            "(group_size > 1) runs SGD only; set group_size=1 for adam / adam_w"
        )
    return TTTSettings(
        steps_per_example=int(c["steps_per_example"]), batch_size=int(c["batch_size"]),
        mask_ratio=float(c["mask_ratio"]), lr=lr, optimizer_type=c["optimizer_type"],
        optimizer_momentum=float(c["optimizer_momentum"]), finetune_mode=c["finetune_mode"],
        single_crop=bool(c["single_crop"]), crop_scale=tuple(float(s) for s in c["crop_scale"]),
        flip=bool(c["flip"]), amp=c["amp"], compile=compiled is not None,
        compile_mode=(compiled or {}).get("mode"),
    ).check()  # fmt: skip


def load_model(c: dict[str, Any], device: torch.device):
    model = build_model(c["model"], fused_attn=bool(c["fused_attn"]), **model_overrides(c))
    if not c["resume_model"]:
        raise ConfigError("resume_model=<path> is required (the MAE pretraining checkpoint)")
    load_official(model, c["resume_model"], c["resume_finetune"] or None, weights_only=c["weights_only"])
    return model.to(device).eval()


def make_bench(c: dict[str, Any]):
    from tttlab.core.benchmark import from_config

    b = c["benchmark"]
    return from_config(b)  # every benchmark key, checked by core


def identity(c: dict[str, Any]) -> dict[str, Any]:
    """The keys of a TTT config that identify its records: not where it runs or how fast (a run resumes
    its per-image records on another device, group size or compile mode); a folder with the records of
    another identity is refused (core's ``RunDir(other_config="error")``)."""
    return {k: v for k, v in c.items()
            if k not in ("out_dir", "logging", "device", "group_size", "compile", "weights_only")}  # fmt: skip


def _done(images_dir: Path, chash: str) -> set[tuple]:
    if not images_dir.exists():
        return set()
    df = load_records(images_dir, metric="correct")
    if len(df) == 0:
        return set()
    df = df[df["config_hash"] == chash]
    return {(str(r.corruption), int(r.severity) if r.severity == r.severity else None, int(r.extra["index"]))
            for r in df.itertuples(index=False)}  # fmt: skip


def run_benchmark(c: dict[str, Any], method: str = "ttt_mae.ttt") -> Path:
    """Evaluate per the composed TTT config ``c``; returns ``<out_dir>/records.jsonl`` (rank 0)."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r}; expected one of {METHODS}")
    if method == "ttt_mae.baseline":
        c = {**c, "steps_per_example": 0}
    s = settings_of(c)
    dist = init_distributed()
    device = resolve_device(c["device"])
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", dist.rank)) % torch.cuda.device_count()
        )
    set_threads(c, device)
    bench = make_bench(c)
    model = load_model(c, device)
    stats = normalization(c, c["benchmark"]["name"])
    norm = Normalizer(*stats) if stats else (lambda x: x)
    group = max(int(c["group_size"]), 1)
    adapter = BatchedTTT(model, s, device) if group > 1 else TTTAdapter(model, s, device)
    out = Path(c["out_dir"])
    ident = identity(c)
    chash = config_hash({**ident, "method": method})
    images_dir = out / "images"
    img_run = RunDir(images_dir, {**c, "method": method}, rank=dist.rank if dist.world_size > 1 else None,
                     other_config="error", identity=identity)  # fmt: skip
    done = _done(images_dir, chash) if dist.rank == 0 or dist.world_size > 1 else set()
    defaults = dict(method=method, package="ttt_mae", framework="torch", model=c["model"],
                    dataset=c["benchmark"]["name"], setting=c["benchmark"]["setting"], seed=int(c["seed"]),
                    config_hash=chash)  # fmt: skip
    progress = bool(c["logging"]["progress"]) and dist.rank == 0
    domains = bench.domains
    counted = 0  # images of the domains seen so far (the bar's total: those + this domain's x the rest)
    with img_run.writer(**defaults) as writer, progress_bar(None, method, progress) as bar:
        for d_idx, dom in enumerate(domains):
            ds = bench.domain_dataset(dom)
            mine = [i for i in range(dist.rank, len(ds), dist.world_size)
                    if (str(dom.corruption), dom.severity, i) not in done]  # fmt: skip
            bar.total = counted + len(mine) * (len(domains) - d_idx)
            counted += len(mine)
            bar.set_postfix_str(str(dom), refresh=True)
            for start in range(0, len(mine), group):
                idx = mine[start : start + group]
                images, labels = ds.take(np.asarray(idx))
                if c.get("test_resize") is not None:  # upstream's eval view (and single-crop TTT views)
                    images = resize_center_crop(
                        np.asarray(images), int(c["test_resize"]), int(c["input_size"])
                    )
                raws = list(to_unit(images))
                gens = [image_generator(int(c["seed"]), d_idx, i) for i in idx]
                t0 = time.perf_counter()
                if group > 1:
                    results = adapter.adapt(raws, gens, norm)
                else:
                    results = [adapter.adapt(raws[0], gens[0], norm)]
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                secs = (time.perf_counter() - t0) / len(idx)
                for i, label, r in zip(idx, np.asarray(labels).tolist(), results):
                    correct = [int(p == label) for p in r.predictions]
                    extra = {"index": int(i), "label": int(label), "predictions": r.predictions}
                    if c["per_image_records"]:
                        extra["losses"] = [round(x, 6) for x in r.losses]
                    writer.write(metric="correct", value=correct[-1], corruption=dom.corruption,
                                 severity=dom.severity, step=s.steps_per_example, n=1, wall_time_s=secs,
                                 extra=extra)  # fmt: skip
                bar.update(len(idx))
    dist.barrier()
    if dist.world_size > 1 and dist.rank == 0:
        merge_records(images_dir, world_size=dist.world_size)
    if dist.rank == 0:
        summarize(out, c, method, chash, domains, s.steps_per_example, defaults)
    dist.barrier()
    return out / "records.jsonl"


def summarize(out: Path, c: dict[str, Any], method: str, chash: str, domains, steps: int, defaults) -> None:
    """Per-domain ``accuracy`` and ``s_per_image`` and the mean accuracy over corruptions (core's
    :func:`~tttlab.core.records.write_domain_summary`, at ``step=steps``; no mean for a single corruption),
    then per domain the accuracy-vs-step curve (``accuracy_curve``) and the MAE loss per step (``mae_loss``)."""
    df = load_records(out / "images", metric="correct")
    df = df[df["config_hash"] == chash]
    rd = RunDir(out, {**c, "method": method}, other_config="error", identity=identity)
    _drop_summary(rd.records_path, chash)
    totals: dict[Any, tuple] = {}
    for dom in domains:
        sev = dom.severity
        sel = df[
            (df["corruption"] == dom.corruption) if dom.corruption is not None else df["corruption"].isna()
        ]
        sel = sel[(sel["severity"] == sev) if sev is not None else sel["severity"].isna()]
        seen = {}
        for r in sel.itertuples(index=False):
            seen[int(r.extra["index"])] = r
        if not seen:
            continue
        rows = list(seen.values())
        flags = np.array([[int(p == r.extra["label"]) for p in r.extra["predictions"]] for r in rows])
        losses = None
        if steps > 0 and all("losses" in r.extra for r in rows):
            losses = np.mean([r.extra["losses"] for r in rows], axis=0)
        secs = float(sum(float(r.wall_time_s) for r in rows))
        totals[dom] = (int(flags[:, -1].sum()), len(rows), secs, flags.mean(axis=0), losses)
    extra = {"steps_per_example": steps, "batch_size": int(c["batch_size"]), "reset": "per_image"}
    with rd.writer(**defaults, step=steps) as w:
        write_domain_summary(w, totals, extra, min_domains_for_mean=2)
        for dom, (_, n, _, curve, losses) in totals.items():
            fields = dict(corruption=dom.corruption, severity=dom.severity, n=n)
            for k, v in enumerate(curve.tolist()):
                w.write(metric="accuracy_curve", value=float(v), step=k, **fields)
            if losses is not None:
                for k, v in enumerate(losses.tolist()):
                    w.write(metric="mae_loss", value=float(v), step=k + 1, **fields)
    for dom, (correct, n, secs, curve, _) in totals.items():
        log.info("%s %s: accuracy %.1f %% (%d/%d images, %d steps; %.1f before adapting), %.3f s/image",
                 method, dom, 100 * correct / n, correct, n, steps, 100 * curve[0], secs / n)  # fmt: skip
    accs = [t[0] / t[1] for d, t in totals.items() if d.corruption is not None]
    if len(accs) >= 2:
        log.info("%s: mean accuracy over %d corruptions %.1f %% (records: %s)", method, len(accs),
                 100 * float(np.mean(accs)), rd.records_path)  # fmt: skip


def _drop_summary(path: Path, chash: str) -> None:
    """Remove an earlier summary of the same config (a rerun rewrites it instead of appending twice)."""
    import json

    from tttlab.core._io import atomic_write_text

    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("config_hash") == chash:
                continue
        except json.JSONDecodeError:
            continue  # a torn last line
        keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(keep))


# ----------------------------------------------------------------------------------------------------------
# the evaluate contract

#: profile -> (pretrain overrides, probe overrides, TTT overrides, default images per domain)
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(experiment="smoke", num_examples=3),
    "quick": dict(experiment="quick", num_examples=16),
    "full": dict(experiment="full", num_examples=24),
}


def trained_model(profile: str, cache_dir: str | os.PathLike, seed: int, device: str, progress: bool,
                  dist=None) -> tuple[Path, Path]:  # fmt: skip
    """``(pretrain checkpoint, probe checkpoint)`` of the profile's MNIST model, trained on first use and
    cached under ``cache_dir/<model>-<hash>`` (atomic files; a finished run is reused)."""
    from . import train as T

    exp = PROFILES[profile]["experiment"]
    pre = compose("pretrain", f"{exp}_pretrain", {"seed": seed, "device": device})
    # amp / compile of the evaluate config apply to the adaptation, not to this model (always trained fp32
    # eager, so fp32 and bf16 evaluations share it); ``compile`` (always false here) stays out of the key so
    # the caches made before pretrain had that key stay valid; so does ``start_over`` (an action: train.run
    # drops it)
    drop = ("out_dir", "logging", "device", "experiment_name", "compile", "start_over")
    key = config_hash({k: v for k, v in pre.items() if k not in drop})
    root = Path(cache_dir) / f"{pre['model']}-{key}"
    pre["out_dir"], pre["logging"]["progress"] = str(root / "pretrain"), progress
    pre_ckpt = root / "pretrain" / T.FINAL
    probe = compose("probe", f"{exp}_probe", {"seed": seed, "device": device, "finetune": str(pre_ckpt),
                                              "out_dir": str(root / "probe")})  # fmt: skip
    probe["logging"]["progress"] = progress
    probe_ckpt = root / "probe" / T.FINAL
    rank = dist.rank if dist is not None else 0
    if rank == 0:
        if not pre_ckpt.exists():
            log.info("pretraining the %s MAE into %s (cached)", profile, root)
            T.run(pre, "pretrain")
        if not probe_ckpt.exists():
            T.run(probe, "probe")
    if dist is not None:
        dist.barrier()
    return pre_ckpt, probe_ckpt


def eval_config(cfg: Mapping | None = None, **overrides) -> dict[str, Any]:
    user = {**to_dict(cfg), **overrides}
    profile = user.get("profile", "full")
    if profile not in PROFILES:
        raise ConfigError(f"profile={profile!r}; expected one of {list(PROFILES)}")
    method = user.get("method", "ttt_mae.ttt")
    if method not in METHODS:
        raise ConfigError(f"method={method!r}; expected one of {METHODS}")
    c = compose("ttt", f"{PROFILES[profile]['experiment']}_ttt", user, schema=EvalConfig)
    if "out_dir" not in user:  # the profile's experiment folder is shared by both methods: one each
        c["out_dir"] = f"runs/ttt_mae/eval/{method.split('.', 1)[1]}-{profile}"
    if c["benchmark"]["num_examples"] is None and "num_examples" not in (user.get("benchmark") or {}):
        c["benchmark"]["num_examples"] = PROFILES[profile]["num_examples"]
    if c["progress"] is not None:
        c["logging"]["progress"] = bool(c["progress"])
    check_amp_compile(c)  # now, not after training the cached model
    return c


def run(cfg: Mapping | None = None, **overrides) -> Path:
    """The evaluate contract: ``method`` (``ttt_mae.ttt`` | ``ttt_mae.baseline``), ``out_dir``,
    ``benchmark``, ``profile``, ``cache_dir``, ``seed``, ``device``, ``progress``; returns the records
    file.  Without ``resume_model`` the profile's MNIST model is trained (or taken from the cache)."""
    c = eval_config(cfg, **overrides)
    dist = init_distributed()
    if not c["resume_model"]:
        if c["benchmark"]["name"] not in ("mnist_c", "digits_c"):
            raise DatasetNotFoundError(
                f"benchmark {c['benchmark']['name']!r} needs resume_model/resume_finetune (the cached models "
                "are MNIST models)"
            )
        pre, probe = trained_model(c["profile"], c["cache_dir"], int(c["seed"]), c["device"],
                                   bool(c["logging"]["progress"]), dist)  # fmt: skip
        c["resume_model"], c["resume_finetune"] = str(pre), str(probe)
    method = c.pop("method")
    for k in ("profile", "cache_dir", "progress"):
        c.pop(k)
    return run_benchmark(c, method)
