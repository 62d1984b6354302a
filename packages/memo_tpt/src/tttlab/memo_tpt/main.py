"""Command-line runs on the paper test sets (Hydra), with seed 002's options.

    tttlab-memo-tpt-tpt arch=RN50 pretrained=/ckpt/RN50.pt datasets_root=datasets data_to_test=a
    tttlab-memo-tpt-tpt +experiment=paper_tpt_vit_b16_imagenet_a pretrained=/ckpt/ViT-B-16.pt
    tttlab-memo-tpt-memo arch=resnet50 checkpoint=/ckpt/resnet50.pth data_to_test=both top_k=0.1
    tttlab-memo-tpt-ensemble +experiment=paper_ensemble_memo_tpt_imagenet_a datasets_root=datasets
    tttlab-memo-tpt-tpt +experiment=mnist          # the offline proxy (tiny CLIP on mnist_c)

Seed 002's options map one to one: ``arch``, ``base_prompt``, ``tts``, ``augs`` (views incl. the
original), ``single_context`` (one shared context; false = class-specific), ``augmix``, ``align_steps``,
``ensemble`` (view-ensemble), ``datasets_root``, ``data_to_test`` (a | v2 | both | r | sketch | all |
mnist_c), ``num_images`` (seed 002's ``test_stop``: the first ``num_images`` of a seeded random order,
:func:`image_order`), ``verbose`` (log every n images).  Ours: ``amp``
(``auto`` | ``none`` | ``bf16`` | ``fp16``) and ``compile`` (:mod:`tttlab.memo_tpt.precision`; an ensemble
member may set its own; with ``data_to_test=mnist_c`` both go to the proxy's evaluate).  Results go to
``out_dir/records.jsonl`` (core schema: per dataset ``accuracy`` and ``s_per_image``, ``step`` = the adaptation
steps per image: TPT ``tts``, the paper's prompt-tuning ``tta_steps`` (0 with ``ensemble=true``), MEMO
``steps``, the ensemble ``niter`` (0 with ``simple_ensemble``); seed 002's ``align_steps``, when > 0, in
``extra.align_steps``, not in ``step``); ``out_dir`` defaults to
``runs/memo_tpt/<method>/<arch>-<data_to_test>-<config hash>``, one folder per config
(:mod:`tttlab.memo_tpt.run_dirs`).  A killed run resumes
from ``out_dir/checkpoints/progress-<dataset>.json`` (written every ``save_every`` images, atomically) with the
same numbers: every image is adapted from the source weights and the view generator's state is saved (a
progress file of the same config that went past ``num_images`` is not reused: the run starts again).
Bad input (a :class:`~tttlab.core.errors.TTTLabError`) ends the command with its one-line message and exit
status 2.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from tttlab.core._io import atomic_write_json
from tttlab.core.cli import check_hydra_command, user_errors
from tttlab.core.errors import ConfigError

from . import data as D
from .run_dirs import run_key

log = logging.getLogger("tttlab.memo_tpt")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


#: the order a paper run visits a test set in, recorded in its progress files (a file without it was
#: written in file order and is not resumed)
ORDER = "seeded permutation"


def image_order(n: int, seed: int) -> np.ndarray:
    """The order a paper run visits the ``n`` images of a test set: a permutation seeded by ``seed`` (core's
    benchmark order), so that ``num_images`` is a seeded random subset, as seed 002's ``test_stop`` (its
    scripts shuffle the test set with a fixed seed, then stop after ``test_stop`` images).  The folders are
    sorted by class: the first ``num_images`` in file order were the first classes only (ImageNet-A holds
    ~37 images per class).  Each image is adapted from the source weights, so a full run's accuracy does
    not depend on the order (the views drawn for an image do)."""
    return np.random.default_rng([int(seed), 0x5EED]).permutation(n)


#: keys of conf/<method>.yaml that the mnist_c proxy uses (the rest configure the paper runs only)
PROXY_KEYS = ("method", "ensemble")  # and tts=0 (zero-shot CLIP)
#: keys a paper run of <method> takes that conf/<method>.yaml leaves out (given with Hydra's +), with the
#: value that changes nothing; the mnist_c proxy would ignore any other value just as a shipped key's
OPTIONAL_KEYS = {"memo": {"include_original": False}, "ensemble": {"include_original": False}}


#: the methods of the paper commands (``method`` of conf/<command>.yaml)
PAPER_METHODS = ("tpt", "memo", "ensemble")


def known_keys(method: str) -> set[str]:
    """The keys a paper command of ``method`` takes: conf/common.yaml, conf/<method>.yaml and
    :data:`OPTIONAL_KEYS`; an ensemble's members also read the memo/tpt keys from the top level (``build``
    merges them under each member's own)."""
    from tttlab.core.config import package_yaml

    known = set(package_yaml("tttlab.memo_tpt.conf", "common.yaml")) | set(OPTIONAL_KEYS.get(method, {}))
    for name in {"ensemble": ("ensemble", "memo", "tpt")}.get(method, (method,)):
        known |= set(package_yaml("tttlab.memo_tpt.conf", f"{name}.yaml"))
    return known - {"defaults", "hydra"}


def _check_known_keys(c: dict[str, Any]) -> None:
    """Hydra's ``+`` adds any key, and these configs are plain YAML: a misspelt ``+include_orignal=true`` (or
    ``+include_original=true`` on TPT, which has no such option) ran without it.  The keys a command takes:
    :func:`known_keys`.  A ``method`` of none of the commands (``method=mem``) is refused here too, with a
    did-you-mean, before any test set or model is read."""
    import difflib

    from tttlab.core.config import package_yaml

    method = c.get("method")
    if method not in PAPER_METHODS:
        close = difflib.get_close_matches(str(method), PAPER_METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"method={method!r}{hint}; expected one of {', '.join(PAPER_METHODS)}")
    known = known_keys(method)
    unknown = sorted(set(c) - known)

    # `tttlab-memo-tpt-tpt method=memo`: every key of conf/tpt.yaml is there (and a key memo lacks, or one of
    # conf/memo.yaml missing: `tttlab-memo-tpt-tpt method=ensemble` has no `models`), so the config is tpt's
    def shipped(m):
        return set(package_yaml("tttlab.memo_tpt.conf", f"{m}.yaml")) - {"defaults", "hydra"}

    owner = [m for m in PAPER_METHODS if m != method and shipped(m) <= set(c)]
    missing = sorted(shipped(method) - set(c))
    if owner and (unknown or missing):
        why = f"its key {unknown[0]!r}" if unknown else f"without {method}'s key {missing[0]!r}"
        raise ConfigError(
            f"method={method!r} on the config of method {owner[0]!r} ({why}): each paper command runs its own "
            f"method; run tttlab-memo-tpt-{method} for {method}"
        )
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        raise ConfigError(
            f"unknown config key {key!r} for method={method!r}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; expected one of {', '.join(sorted(known))}"
        )


def _plain(cfg) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def view_fraction(key: str, value) -> float | None:
    """``selection`` / ``top_k`` of the commands: the fraction of the views kept, in (0, 1], as the configs
    document it and as seed 002's ``confidence`` / ``top`` (``1`` = every view: its view-ensemble and MEMO
    runs without selection), or null (every view).  Hydra reads ``selection=1`` as the integer 1, which
    the Python API (:func:`~tttlab.memo_tpt.losses.select_confident`) takes as a count: one view kept
    instead of all.  Here it is the fraction 1.0; any other value outside (0, 1] is a ConfigError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(
            f"{key}={value!r}; expected a fraction of the views in (0, 1] (1 = every view, as seed 002's "
            "confidence / top) or null"
        )
    return float(value)


def tpt_options(c: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~tttlab.memo_tpt.tpt.TPT` keyword arguments of a config (``build_tpt``'s)."""
    return dict(
        base_prompt=c["base_prompt"], n_views=int(c["augs"]), selection=view_fraction("selection", c["selection"]),
        tts=int(c["tts"]), lr=float(c["lr"]), class_specific_context=not c["single_context"],
        augmix=c["augmix"], ensemble=bool(c["ensemble"]), align_steps=int(c["align_steps"]),
        amp=c.get("amp", "auto"), compile=c.get("compile", False),
    )  # fmt: skip


def build_tpt(c: dict[str, Any], classnames, device, seed: int):
    from .models import build_clip
    from .tpt import TPT

    model = build_clip(c["arch"], pretrained=c.get("pretrained"), device=device)
    return TPT(model, classnames, seed=seed, **tpt_options(c))


def memo_options(c: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~tttlab.memo_tpt.memo.Memo` keyword arguments of a config (``build_memo``'s)."""
    return dict(
        arch=c["arch"], n_augmentations=int(c["augs"]), steps=int(c["steps"]),
        prior_strength=c["prior_strength"], optimizer=c["optimizer"], lr=c["lr"], weight_decay=c["weight_decay"],
        top_k=view_fraction("top_k", c["top_k"]), augmentation=c["augmentation"], size=int(c.get("image_size", 224)),
        test_resize=c.get("test_resize"), include_original=c.get("include_original", False),
        amp=c.get("amp", "auto"), compile=c.get("compile", False),
    )  # fmt: skip


def build_memo(c: dict[str, Any], class_indices, device, seed: int, num_classes: int | None = None):
    from .memo import Memo
    from .models import build_classifier

    model = build_classifier(c["arch"], checkpoint=c.get("checkpoint"), num_classes=num_classes).to(device)
    return Memo(model, class_indices=class_indices, seed=seed, **memo_options(c))


def _check_adapter_options(c: dict[str, Any]) -> None:
    """The option values of the adapter(s) ``build`` will make (an ensemble: each member, merged as there),
    checked by the methods' own model-free checks before any test set or model is read: a bad value is
    the error the user sees, not a missing dataset folder."""
    import inspect

    from . import memo, tpt

    if c["method"] == "ensemble":
        members = [(m.get("type"), {**c, **m}) for m in c.get("models") or []]
    else:
        members = [(c["method"], c)]
    if any(kind == "tpt" for kind, _ in members):  # no open_clip: one line naming the install command, now
        from .models import require_open_clip

        require_open_clip()
    for i, (kind, m) in enumerate(members):
        if kind not in ("tpt", "memo"):
            continue  # build() names a bad method or member type
        options = (tpt_options if kind == "tpt" else memo_options)(m)
        module, cls = (tpt, tpt.TPT) if kind == "tpt" else (memo, memo.Memo)
        defaults = inspect.signature(cls).parameters  # what the adapter uses for an option not in the config
        params = inspect.signature(module.check_options).parameters
        module.check_options(**{k: options[k] if k in options else defaults[k].default for k in params})
        if c["method"] == "ensemble" and kind == "tpt":  # the member's own modes the ensemble never runs
            from .ensemble import check_member

            check_member(f"models[{i}].", options["align_steps"], options["ensemble"])


def build(c: dict[str, Any], dataset, device, seed: int):
    """The adapter (callable image -> logits) and a model name, for ``c['method']``."""
    method = c["method"]
    if method == "tpt":
        names = D.class_names(dataset, c.get("classnames_file"))
        return build_tpt(c, names, device, seed), c["arch"]
    if method == "memo":
        return build_memo(c, getattr(dataset, "class_indices", None), device, seed), c["arch"]
    if method == "ensemble":
        from .ensemble import Ensemble

        members, names = [], []
        for i, m in enumerate(c["models"]):
            m = {**c, **m}
            if m.get("amp") == "fp16":  # one backward through every member and no GradScaler step
                raise ConfigError(
                    f"models[{i}].amp='fp16': the ensemble steps its members without a GradScaler; expected "
                    "auto (TPT members: fp16 autocast on CUDA as before), none or bf16"
                )
            if m["type"] == "tpt":
                members.append(
                    build_tpt(m, D.class_names(dataset, m.get("classnames_file")), device, seed + i)
                )
            elif m["type"] == "memo":
                members.append(build_memo(m, getattr(dataset, "class_indices", None), device, seed + i))
            else:
                raise ConfigError(f"models[{i}].type={m['type']!r}; expected tpt or memo")
            names.append(f"{m['type']}:{m['arch']}")
        return Ensemble(
            members, c["temps"], steps=int(c["niter"]), simple=bool(c["simple_ensemble"])
        ), "+".join(names)
    raise ConfigError(f"method={method!r}; expected tpt, memo or ensemble")


def evaluate_dataset(
    c: dict[str, Any], name: str, out: Path, device, dataset=None, built=None
) -> dict[str, Any]:
    """Adapt + predict every image of one test set; resumable; returns the counts.

    ``dataset`` (the test set, read from ``datasets_root`` when None) and ``built`` (``build``'s adapter and
    model name for it, built when None) let the caller check them before it makes the run directory."""
    import torch  # here, not at the top: the commands' --help and config checks need no torch (~1.5 s)

    from ._progress import progress_bar

    ds = D.load_test_set(name, c["datasets_root"]) if dataset is None else dataset
    seed = int(c["seed"])
    adapter, model_name = build(c, ds, device, seed) if built is None else built
    n = len(ds) if c.get("num_images") is None else min(int(c["num_images"]), len(ds))
    order = image_order(len(ds), seed)
    progress_file = out / "checkpoints" / f"progress-{name}.json"
    key = run_key(c)  # also names the default out_dir (run_dirs.default_out_dir)
    state = {"index": 0, "correct": 0, "seconds": 0.0, "key": key, "order": ORDER}
    members = getattr(adapter, "members", [adapter])
    if progress_file.exists():
        saved = json.loads(progress_file.read_text())
        if saved.get("key") == key and int(saved["index"]) > n:
            log.info("%s: the progress file holds %d images, more than num_images=%d; starting again", name,
                     int(saved["index"]), n)  # fmt: skip
        elif saved.get("key") == key and saved.get("order") != ORDER:
            log.info("%s: the progress file was written in file order; starting again", name)
        elif saved.get("key") == key:
            state = saved
            for m, g in zip(members, saved["generators"]):
                m.generator.set_state(torch.tensor(g, dtype=torch.uint8))
            log.info("%s: resuming at image %d", name, state["index"])
    torch.manual_seed(seed)
    with progress_bar(n, f"{c['method']} {name}", c["progress"], initial=state["index"]) as bar:
        for i in range(state["index"], n):
            image, label = ds[int(order[i])]
            t0 = time.perf_counter()
            pred = int(adapter(image).argmax(1))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            state["seconds"] += time.perf_counter() - t0
            state["correct"] += int(pred == int(label))
            state["index"] = i + 1
            bar.update(1)
            if c["verbose"] and (i + 1) % int(c["verbose"]) == 0:
                log.info("%s %d/%d: accuracy %.2f%%", name, i + 1, n, 100 * state["correct"] / (i + 1))
            if (i + 1) % int(c["save_every"]) == 0 or i + 1 == n:
                state["generators"] = [m.generator.get_state().tolist() for m in members]
                atomic_write_json(progress_file, state)  # fsync + rename: trusted by a resume
    # the adaptation steps per image, for the records' step (not in state: the progress file stays as it was)
    steps = getattr(adapter, "adaptation_steps", None)
    align = int(getattr(adapter, "alignment_steps", 0))  # seed 002's visual alignment, not in step
    return {"dataset": name, "model": model_name, "n": n, "steps": steps, "align_steps": align, **state}


def run_paper(cfg) -> Path:
    from tttlab.core.records import DISPLAY_KEYS, RunDir

    c = _plain(cfg)
    _check_known_keys(c)
    from .precision import AMP_MODES, check_compile

    for i, m in enumerate([c, *(c.get("models") or [])]):  # before any data or model is read
        where = "" if i == 0 else f"models[{i - 1}]."
        if "amp" in m and (not isinstance(m["amp"], str) or m["amp"] not in AMP_MODES):
            raise ConfigError(f"{where}amp={m['amp']!r}; expected one of {', '.join(AMP_MODES)}")
        if "compile" in m:  # false | true | a torch.compile mode (core's rule)
            m["compile"] = check_compile(m["compile"], f"{where}compile")
    for key, minimum, expected in (("seed", 0, "an integer >= 0"),
                                   ("num_images", 1, "null or an integer >= 1"),
                                   ("save_every", 1, "an integer >= 1"),
                                   ("verbose", 0, "an integer >= 0 (0: never)")):  # fmt: skip
        value = c.get(key)
        if value is None and key == "num_images":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key}={value!r}; expected {expected}")
    if c["data_to_test"] == "mnist_c":
        from tttlab.core.config import package_yaml

        from .evaluate import run as proxy

        # the proxy runs the profile's tiny models and settings: a method option given here would be ignored
        shipped = package_yaml("tttlab.memo_tpt.conf", f"{c['method']}.yaml")
        if c["method"] not in ("tpt", "memo"):
            raise ConfigError(
                f"data_to_test=mnist_c has no offline proxy of method={c['method']!r}; expected tpt or memo "
                "(or the paper test sets: data_to_test=a | v2 | r | sketch | both | all)"
            )
        # and the keys given with + (a +include_original=true was ignored silently)
        shipped = {**OPTIONAL_KEYS.get(c["method"], {}), **shipped}
        ignored = [f"{k}={c[k]!r}" for k in shipped
                   if k not in PROXY_KEYS and k in c and c[k] != shipped[k] and not (k == "tts" and c[k] == 0)]  # fmt: skip
        if ignored:
            raise ConfigError(
                f"data_to_test=mnist_c runs the offline proxy with the models and settings of profile={c.get('profile')!r}"
                f": {', '.join(ignored)} would be ignored. Use the paper test sets for them, or "
                "tttlab-memo-tpt-evaluate method=memo_tpt.<method> with its tpt=/memo= overrides"
            )

        method = {"tpt": "memo_tpt.tpt", "memo": "memo_tpt.memo"}[c["method"]]
        if c["method"] == "tpt" and c["ensemble"]:
            method = "memo_tpt.tpt_ensemble"
        elif c["method"] == "tpt" and int(c["tts"]) == 0:
            method = "memo_tpt.clip_zeroshot"
        from .evaluate import default_out_dir, summary

        # the experiment's default folder is that of the method that runs (tts=0: clip_zeroshot, ensemble=true:
        # tpt_ensemble), as tttlab-memo-tpt-evaluate's: their records went into TPT's, config.yaml overwritten
        out_dir, profile = c["out_dir"], c.get("profile", "full")
        if out_dir == f"runs/memo_tpt/eval/{c['method']}-{profile}":
            out_dir = default_out_dir(method, profile)
        path = proxy(method=method, profile=c.get("profile", "full"), out_dir=out_dir, seed=c["seed"],
                     device=c["device"], progress=c["progress"], cache_dir=c.get("cache_dir", "runs/memo_tpt/models"),
                     amp=c.get("amp", "auto"), compile=c.get("compile", False))  # fmt: skip
        print(summary(path))
        return path
    _check_adapter_options(c)
    from tttlab.core.torch import resolve_device

    device = resolve_device(c["device"])
    names = D.subsets_for(c["data_to_test"])
    out = Path(c["out_dir"])
    # the run directory only once every test set and the first adapter (checkpoint, model, class names) are
    # known to be good: a mistyped datasets_root or checkpoint path leaves no half-made run (config.yaml)
    datasets = {name: D.load_test_set(name, c["datasets_root"]) for name in names}
    first = build(c, datasets[names[0]], device, int(c["seed"]))
    # the log frequency (verbose), like the progress bar, changes only what is shown: the same run
    rd = RunDir(out, c, display_keys=(*DISPLAY_KEYS, "verbose"))
    results = [evaluate_dataset(c, name, out, device, datasets[name], first if i == 0 else None)
               for i, name in enumerate(names)]  # fmt: skip
    rd.drop_records()  # run again (e.g. after a kill): replace, not append twice
    with rd.writer(method=f"memo_tpt.{c['method']}", package="memo_tpt", framework="torch", setting="episodic",
                   seed=int(c["seed"])) as w:  # fmt: skip
        for r in results:
            n = max(r["n"], 1)
            extra = {"correct": r["correct"], "reset": "per_image"}
            if r["align_steps"]:
                extra["align_steps"] = r["align_steps"]
            fields = dict(model=r["model"], dataset=r["dataset"], n=r["n"], wall_time_s=r["seconds"], step=r["steps"],
                          extra=extra)  # fmt: skip
            w.write(metric="accuracy", value=r["correct"] / n, **fields)
            w.write(metric="s_per_image", value=r["seconds"] / n, **fields)
            print(
                f"{c['method']} {r['model']} {r['dataset']}: top-1 {100 * r['correct'] / n:.2f}% on {r['n']} images"
            )
    return rd.records_path


def _main(config_name: str) -> None:
    import hydra

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    @hydra.main(config_path="conf", config_name=config_name, version_base=None)
    def entry(cfg) -> None:
        with user_errors(f"tttlab-memo-tpt-{config_name}"):  # the user's bad input: one line, no traceback
            path = run_paper(cfg)
            print(path)  # inside user_errors: `| head` ends it quietly, not in Hydra's error report

    # the config is plain YAML and the command checks its keys itself (_check_known_keys): a key it lacks is
    # core's one line with a did-you-mean, not Hydra's '+key=value' (refused next); the keys it takes that
    # conf/<method>.yaml leaves out (+include_original=true) keep Hydra's '+'
    check_hydra_command(f"tttlab-memo-tpt-{config_name}", "tttlab.memo_tpt.conf", config_name,
                        free_keys=sorted(known_keys(config_name)))  # fmt: skip
    entry()


def tpt_main() -> None:
    _main("tpt")


def memo_main() -> None:
    _main("memo")


def ensemble_main() -> None:
    _main("ensemble")
