"""TPT / zero-shot CLIP / view-ensemble / MEMO on a core corruption benchmark (the offline MNIST proxies).

    tttlab-memo-tpt-evaluate method=memo_tpt.tpt profile=full
    tttlab-memo-tpt-evaluate method=memo_tpt.memo benchmark.corruptions=[fog,contrast] benchmark.num_examples=200
    python -c "from tttlab.memo_tpt.evaluate import run; print(run(method='memo_tpt.clip_zeroshot'))"

Methods (``tttlab.methods`` specs): ``memo_tpt.clip_zeroshot`` (tiny CLIP, prompt "a photo of a {digit}.",
no adaptation), ``memo_tpt.tpt`` (TPT, 64 views, 10% selection, 1 AdamW step lr 5e-3),
``memo_tpt.tpt_ensemble`` (seed 002's view-ensemble), ``memo_tpt.memo`` (MEMO on a small BatchNorm
MNIST CNN: AugMix views, BN prior N=16, one step).  Models are the tiny CLIP / CNN of
:mod:`tttlab.memo_tpt.tiny_clip` for ``profile`` (smoke / quick / full), trained on first use and cached
under ``cache_dir``.  MEMO and TPT adapt per image and reset after every image whatever the benchmark
setting (the methods are episodic by definition); records carry ``extra.reset = "per_image"``.  Without
``out_dir`` the run folder is ``runs/memo_tpt/eval/<method>-<profile>`` (e.g. ``runs/memo_tpt/eval/tpt-full``).

Records (core schema): per domain ``accuracy`` (``n``, ``wall_time_s`` = adaptation + prediction) and
``s_per_image``, then ``accuracy`` with ``corruption="mean"``; ``step`` is the adaptation steps per image
(``adaptation_steps`` of the method: TPT ``tpt.tts``, the paper's prompt-tuning ``tta_steps``, MEMO
``memo.steps``, 0 for ``clip_zeroshot`` and the view-ensemble ``tpt_ensemble``), as torch_ttt's records
carry their engine's steps; seed 002's visual alignment steps (``tpt.align_steps > 0``) go to
``extra.align_steps``, not into ``step``.  MEMO records also carry the unadapted model's accuracy on the same images
(``extra.source_accuracy``, under the same ``amp``).

``amp`` (``auto`` | ``none`` | ``bf16`` | ``fp16``) and ``compile`` (:mod:`tttlab.memo_tpt.precision`) apply
to the adaptation and prediction; the cached tiny models are trained float32 and eager whatever they say
(so runs with different ``amp`` compare the same model; ``tttlab-memo-tpt-train-tiny-clip --amp/--compile``
trains others).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tttlab.core.errors import ConfigError

# torch (and .precision, tttlab.core.torch, which import it) is imported where it is used: ``--help`` needs
# none of it (2.2 s -> 0.3 s)
if TYPE_CHECKING:
    import torch

log = logging.getLogger("tttlab.memo_tpt.evaluate")

METHODS = ("memo_tpt.tpt", "memo_tpt.clip_zeroshot", "memo_tpt.tpt_ensemble", "memo_tpt.memo")
PROFILES = ("smoke", "quick", "full")
#: images per domain and default corruptions per profile (when the benchmark does not say)
PROFILE_DATA = {
    "smoke": {"num_examples": 4, "corruptions": ["gaussian_noise", "fog"]},
    "quick": {"num_examples": 24, "corruptions": ["gaussian_noise", "shot_noise", "fog", "contrast"]},
    "full": {"num_examples": 60, "corruptions": "common"},
}
PROFILE_VIEWS = {"smoke": 8, "quick": 32, "full": 64}

DEFAULTS: dict[str, Any] = {
    "method": "memo_tpt.tpt",
    "out_dir": None,  # null: runs/memo_tpt/eval/<method>-<profile> (default_out_dir), e.g. .../tpt-full
    "profile": "full",
    "cache_dir": "runs/memo_tpt/models",
    "seed": 0,
    "device": "cpu",
    "progress": True,
    "amp": "auto",  # auto | none | bf16 | fp16 (tttlab.memo_tpt.precision); the adaptation, not the cached model
    # false | true (torch's default mode) | a torch.compile mode (default, reduce-overhead, max-autotune,
    # max-autotune-no-cudagraphs): torch.compile of the per-step work (TPT: image encoder + text path;
    # MEMO: the CNN)
    "compile": False,
    "threads": 1,  # the tiny proxy models run fastest on one thread (and shared cores do not oversubscribe)
    "benchmark": {
        "name": "mnist_c",
        "corruptions": None,
        "severities": [5],
        "setting": "episodic",
        "num_examples": None,
        "batch_size": 64,
        "seed": 0,
        "cache_dir": None,
        "root": None,
        "include_clean": False,
        "shuffle": True,  # False: each domain's images in file order
        "dirichlet_delta": None,  # label-correlated order (tttlab.core.benchmark): None i.i.d., 0 sorted, > 0
        "stream_order": "tttlab",  # mariodoebler: that benchmark's visits (tttlab.core.benchmark)
    },  # fmt: skip
    "tpt": {
        "n_views": None,
        "tts": 1,
        "selection": 0.1,
        "lr": 5e-3,
        "base_prompt": "a photo of a",
        "class_specific_context": False,
        "augmix": False,
        "align_steps": 0,
        "flip": False,
        "scale": [0.5, 1.0],
    },  # fmt: skip
    "memo": {
        "n_augmentations": None,
        "steps": 1,
        "prior_strength": 16.0,
        "optimizer": "sgd",
        "lr": 0.005,
        "top_k": None,
        "augmentation": "augmix",
        "flip": False,
        "scale": [0.5, 1.0],
    },  # fmt: skip
    "logging": {"progress": True},
}


def _did_you_mean(value, choices) -> str:
    """``" (did you mean 'memo_tpt.memo'?)"`` for a ``value`` whose name (without a package: ``mem``,
    ``memo_tpt.mem``) is one of ``choices``' names, close to one, or the start of only one
    (``clip``: ``memo_tpt.clip_zeroshot``), else ``""``.  The names alone: the shared ``memo_tpt.`` made any
    two methods look alike."""
    import difflib

    names = {str(c).rpartition(".")[2]: c for c in choices}
    name = str(value).rpartition(".")[2]
    starts = [n for n in names if name and n.startswith(name)]
    close = (
        ([name] if name in names else [])
        or difflib.get_close_matches(name, list(names), n=1)
        or (starts if len(starts) == 1 else [])
    )
    return f" (did you mean {names[close[0]]!r}?)" if close else ""


def _merge(base: dict, user: Mapping, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in user.items():
        if k not in base:
            from tttlab.core.config import closest_key

            close = closest_key(DEFAULTS, f"{path}{k}")  # a key next to it, or the one anywhere: severities
            hint = f" (did you mean {close!r}?)" if close else ""
            where = f" in {path[:-1]!r}" if path else ""
            raise ConfigError(f"unknown config key {path + k!r}{hint} (known keys{where}: {', '.join(base)})")
        if isinstance(base[k], dict) and isinstance(v, Mapping):
            out[k] = _merge(base[k], v, f"{path}{k}.")
        else:
            out[k] = v
    return out


def _plain(cfg) -> dict:
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return {k: (_plain(v) if isinstance(v, Mapping) else v) for k, v in dict(cfg).items()}


def default_out_dir(method: str, profile: str) -> str:
    """The run folder of an evaluation without ``out_dir``: ``runs/memo_tpt/eval/<method>-<profile>``, e.g.
    ``runs/memo_tpt/eval/tpt-full`` (one ``runs/memo_tpt/eval`` for all was shared by the methods and
    profiles: their records went into one file and config.yaml was overwritten with a warning)."""
    return f"runs/memo_tpt/eval/{method.split('.', 1)[1]}-{profile}"


def eval_config(cfg: Mapping | None = None, **overrides) -> dict[str, Any]:
    from .precision import AMP_MODES, check_compile

    c = _merge(DEFAULTS, {**_plain(cfg), **overrides})
    for key, choices in (("method", METHODS), ("profile", PROFILES)):
        if c[key] not in choices:
            raise ConfigError(
                f"{key}={c[key]!r}{_did_you_mean(c[key], choices)}; expected one of {', '.join(choices)}"
            )
    if c["out_dir"] is None:
        c["out_dir"] = default_out_dir(c["method"], c["profile"])
    b = c["benchmark"]
    prof = PROFILE_DATA[c["profile"]]
    if b["corruptions"] is None:
        b["corruptions"] = prof["corruptions"]
    if b["num_examples"] is None:
        b["num_examples"] = prof["num_examples"]
    c["tpt"]["n_views"] = c["tpt"]["n_views"] or PROFILE_VIEWS[c["profile"]]
    c["memo"]["n_augmentations"] = c["memo"]["n_augmentations"] or PROFILE_VIEWS[c["profile"]]
    if not isinstance(c["amp"], str) or c["amp"] not in AMP_MODES:
        raise ConfigError(f"amp={c['amp']!r}; expected one of {', '.join(AMP_MODES)}")
    c["compile"] = check_compile(c["compile"])
    if not isinstance(c["progress"], bool):
        raise ConfigError(f"progress={c['progress']!r}; expected true or false")
    c["progress"] = c["progress"] and bool(c["logging"].get("progress", True))
    if Path(c["cache_dir"]).exists() and not Path(c["cache_dir"]).is_dir():
        raise ConfigError(f"cache_dir={c['cache_dir']!r} is a file; expected a directory (or a new path)")
    return c


def build_method(c: dict[str, Any], device: torch.device):
    """``(callable image -> logits (1, 10), model name, source model or None)``."""
    from . import tiny_clip as T

    method, seed = c["method"], int(c["seed"])
    if method == "memo_tpt.memo":
        from .memo import Memo

        net, path = T.load_or_train_cnn(c["profile"], c["cache_dir"], seed, c["progress"])
        m = c["memo"]
        memo = Memo(
            net.to(device), arch="mnist_cnn", n_augmentations=int(m["n_augmentations"]), steps=int(m["steps"]),
            prior_strength=m["prior_strength"], optimizer=m["optimizer"], lr=m["lr"], top_k=m["top_k"],
            augmentation=m["augmentation"], size=28, mean=T.MNIST_MEAN, std=T.MNIST_STD, flip=bool(m["flip"]),
            scale=tuple(m["scale"]), test_resize=28, seed=seed, amp=c["amp"], compile=c["compile"],
        )  # fmt: skip
        return memo, f"mnist_cnn:{path.stem}", memo
    from .tpt import TPT

    model, path = T.load_or_train_clip(c["profile"], c["cache_dir"], seed, c["progress"])
    t = c["tpt"]
    tpt = TPT(
        model.to(device), list(T.DIGIT_WORDS), base_prompt=t["base_prompt"], n_views=int(t["n_views"]),
        selection=t["selection"], tts=0 if method == "memo_tpt.clip_zeroshot" else int(t["tts"]), lr=t["lr"],
        class_specific_context=bool(t["class_specific_context"]), augmix=t["augmix"],
        ensemble=method == "memo_tpt.tpt_ensemble", mean=T.MNIST_MEAN,
        # zero-shot CLIP predicts the batch as it is (TPT.zero_shot): no alignment runs, none is counted
        align_steps=0 if method == "memo_tpt.clip_zeroshot" else int(t["align_steps"]),
        std=T.MNIST_STD, flip=bool(t["flip"]), scale=tuple(t["scale"]), seed=seed, amp=c["amp"],
        compile=c["compile"],
    )  # fmt: skip
    return tpt, f"tiny_clip:{path.stem}", None


def _images(batch) -> torch.Tensor:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch.images)).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.float().div(255)


def run(cfg: Mapping | None = None, **overrides) -> Path:
    """Evaluate per ``cfg`` (keys of :data:`DEFAULTS`, partial is fine); returns the records file."""
    import torch

    from tttlab.core.benchmark import from_config
    from tttlab.core.records import RunDir, check_run_dir, write_domain_summary
    from tttlab.core.torch import resolve_device

    from ._progress import progress_bar
    from .precision import autocast, resolve_amp

    c = eval_config(cfg, **overrides)
    # the CLIP methods: without open_clip, one line naming the install command before any model or data
    if c["method"] != "memo_tpt.memo":
        from .models import require_open_clip

        require_open_clip()
    if c["threads"]:
        torch.set_num_threads(int(c["threads"]))
    device = resolve_device(c["device"])
    if isinstance(c["seed"], bool) or not isinstance(c["seed"], int) or c["seed"] < 0:
        raise ConfigError(f"seed={c['seed']!r}; expected an integer >= 0")
    resolve_amp(c["amp"], device, "memo" if c["method"] == "memo_tpt.memo" else "tpt")  # before any training
    b = c["benchmark"]
    bench = from_config(b)  # every benchmark key, checked by core (a missing root) before any training
    torch.manual_seed(int(c["seed"]))
    adapt, model_name, memo = build_method(c, device)  # checks the method's values (the model is cached)
    # another config's records there: refused now, not after the evaluation, but after the values are
    # checked (a bad value, e.g. benchmark.severities=[7] or memo.steps=-1, is reported as itself, not as
    # a config that differs from the folder's)
    check_run_dir(c["out_dir"], c)
    totals: dict[Any, list] = {d: [0, 0, 0.0, 0] for d in bench.domains}
    zero_shot = c["method"] == "memo_tpt.clip_zeroshot"
    with progress_bar(len(bench), c["method"], c["progress"], leave=False) as bar:
        for batch in bench.batches():
            x = _images(batch).to(device)
            y = np.asarray(batch.labels)
            t0 = time.perf_counter()
            if zero_shot:
                pred = adapt.zero_shot(x).argmax(1).cpu().numpy()
            else:
                pred = np.array([int(adapt(img).argmax(1)) for img in x])
            secs = time.perf_counter() - t0
            src_hit = np.zeros(len(y), bool)
            if memo is not None:  # the unadapted model (eval-mode BatchNorm) on the same images
                memo.reset()
                with torch.no_grad(), autocast(memo.precision, device):
                    src_hit = memo.model((x - memo.mean) / memo.std).argmax(1).cpu().numpy() == y
            hit = pred == y
            ids = batch.domain_ids
            for i in np.unique(ids):
                sel = ids == i
                acc = totals[bench.domains[int(i)]]
                acc[0] += int(hit[sel].sum())
                acc[1] += int(sel.sum())
                acc[2] += secs * float(sel.sum()) / len(hit)
                acc[3] += int(src_hit[sel].sum())
            bar.update(1)
    # only now: a bad benchmark or model leaves no half-made run behind
    rd = RunDir(Path(c["out_dir"]), c, other_config="error")
    extra = {"reset": "per_image", "profile": c["profile"]}
    if getattr(adapt, "alignment_steps", 0):  # seed 002's visual alignment: not in step (the prompt steps)
        extra["align_steps"] = int(adapt.alignment_steps)
    rd.drop_records()  # run again (e.g. after a kill): replace, not append twice
    with rd.writer(method=c["method"], package="memo_tpt", framework="torch", model=model_name, dataset=b["name"],
                   setting=b["setting"], step=adapt.adaptation_steps, seed=int(c["seed"])) as w:  # fmt: skip
        source = (lambda dom, row: {"source_accuracy": row[3] / row[1]}) if memo is not None else None
        write_domain_summary(w, totals, extra, domain_extra=source, min_domains_for_mean=2)
    return rd.records_path


USAGE = """usage: tttlab-memo-tpt-evaluate [key=value ...]

The evaluate contract of tools/compare.py on core mnist_c with the offline tiny models (trained on first
use, cached under cache_dir).  Keys (dotted for nested ones): method ({methods}), profile ({profiles}),
out_dir (default runs/memo_tpt/eval/<method>-<profile>), cache_dir, seed, device, threads, progress,
amp (auto | none | bf16 | fp16),
compile (false | true | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs),
benchmark.corruptions, benchmark.severities,
benchmark.num_examples, tpt.*, memo.*.  Example:

    tttlab-memo-tpt-evaluate method=memo_tpt.memo profile=quick
"""


def summary(path: Path) -> str:
    """What the commands print: the table of core's ``domain_table`` (per domain accuracy % and ms/image,
    then the mean), then one line per method of a records file: the mean accuracy over corruptions (or the
    one domain's) and the number of images."""
    from tttlab.core.cli import domain_table
    from tttlab.core.records import load_records

    df = load_records(path, metric="accuracy")
    lines = []
    for method, part in df.groupby("method", sort=False):
        mean = part[part.corruption == "mean"]
        row = mean.iloc[-1] if len(mean) else part.iloc[-1]
        where = "mean over corruptions" if len(mean) else f"{row.corruption}-{row.severity}"
        lines.append(f"{method}: accuracy {100 * float(row.value):.2f}% ({where}, {int(row.n)} images)")
    return "\n".join([*domain_table(path), *lines])


def main() -> None:
    import sys

    from tttlab.core.cli import quiet_closed_stdout, user_errors

    quiet_closed_stdout()  # `--help | head`: no BrokenPipeError traceback
    args = sys.argv[1:]
    if any(a in ("-h", "--help", "help") for a in args):
        print(USAGE.format(methods=" | ".join(METHODS), profiles=" | ".join(PROFILES)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with user_errors("tttlab-memo-tpt-evaluate"):
        from tttlab.core.cli import dotlist_config

        # +logging.level=DEBUG said "unknown config key '+logging' (did you mean 'logging'?)"
        path = run(dotlist_config(args, "expected key=value (see tttlab-memo-tpt-evaluate --help)"))
        # inside user_errors: reading the records back (pandas missing: a MissingDependencyError) is one line
        print(summary(path))
        print(path)


if __name__ == "__main__":
    main()
