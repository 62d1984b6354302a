"""Config schemas (Hydra structured configs over core ``RunConfig``), config composition, devices,
``torch.distributed`` set-up and progress bars shared by the four entry points.

Flag names follow the upstream README (seed 001): ``model``, ``input_size``, ``batch_size``,
``accum_iter``, ``epochs``, ``warmup_epochs``, ``blr``, ``lr``, ``min_lr``, ``weight_decay``,
``mask_ratio``, ``norm_pix_loss``, ``head_type``, ``classifier_depth``, ``finetune``, ``smoothing``,
``steps_per_example``, ``optimizer_type``, ``optimizer_momentum``, ``finetune_mode``, ``single_crop``,
``resume_model``, ``resume_finetune``.  As upstream, ``lr = blr * effective batch / 256`` when ``lr`` is
null (effective batch: ``batch_size * accum_iter * world_size`` for training, ``batch_size`` copies for
TTT, which runs one image per process).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tttlab.core.config import RunConfig, package_yaml, to_plain
from tttlab.core.errors import ConfigError
from tttlab.core.lazy import lazy_exports

if TYPE_CHECKING:
    import torch

#: core's torch helpers, re-exported for ``train`` / ``evaluate``: loaded on first use (``tttlab.core.torch``
#: imports torch, 1.3-2.5 s, which ``--help`` and Hydra's checks do not need)
_CORE_TORCH = ("AMP_MODES", "COMPILE_MODES", "Dist", "check_amp", "check_compile", "compile_kwargs",
               "init_distributed", "resolve_device")  # fmt: skip
__getattr__, __dir__ = lazy_exports(globals(), dict.fromkeys(_CORE_TORCH, "tttlab.core.torch"))


log = logging.getLogger("tttlab.ttt_mae")

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class AugConfig:
    enabled: bool = True
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop scale
    flip: bool = True


@dataclass
class ModelConfig:
    model: str = "mae_vit_large_patch16"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # MAEConfig fields
    input_size: int = 224
    norm_pix_loss: bool = True
    head_type: str = "vit_head"  # linear | vit_head
    classifier_depth: int = 12
    fused_attn: bool = True  # scaled_dot_product_attention
    amp: str = "none"  # none | bf16 (torch.autocast to bfloat16; parameters and optimizer state stay fp32)
    # false | true (torch's default mode) | a torch.compile mode (default, reduce-overhead, max-autotune,
    # max-autotune-no-cudagraphs): torch.compile of the step's forward + loss (pretrain/probe: the model)
    compile: Any = False
    normalize: str = "auto"  # auto (by dataset) | imagenet | mnist | none
    num_threads: int | None = None  # torch intra-op threads on CPU; null: torch's default


@dataclass
class PretrainConfig(RunConfig, ModelConfig):
    experiment_name: str = "pretrain"
    mask_ratio: float = 0.75
    batch_size: int = 64  # per process
    accum_iter: int = 1
    epochs: int = 800
    warmup_epochs: int = 40
    blr: float = 1e-3
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    aug: AugConfig = field(default_factory=AugConfig)
    save_ckpt_freq: int = 1  # epochs between checkpoints
    # true: start over in out_dir (its checkpoints, stats and the records of every config removed) instead of
    # resuming or refusing it; an action, no part of the run's config or hashes (compose leaves it out when
    # false, train.run drops it)
    start_over: bool = False


@dataclass
class ProbeConfig(PretrainConfig):
    experiment_name: str = "probe"
    finetune: str = ""  # the MAE pretraining checkpoint (encoder used, decoder dropped)
    weights_only: bool = True  # false: also unpickle other objects in finetune (trusted files only)
    epochs: int = 20
    warmup_epochs: int = 5
    blr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.2
    smoothing: float = 0.1
    drop_path: float = 0.0


@dataclass
class TTTConfig(RunConfig, ModelConfig):
    experiment_name: str = "ttt"
    resume_model: str = ""  # MAE pretraining checkpoint (encoder + decoder)
    resume_finetune: str = ""  # head checkpoint (probe)
    weights_only: bool = True  # false: also unpickle other objects in those files (trusted files only)
    steps_per_example: int = 20
    batch_size: int = 128  # copies of the test image per step
    mask_ratio: float = 0.75
    blr: float = 1e-2
    lr: float | None = None
    optimizer_type: str = "sgd"  # sgd | adam | adam_w
    optimizer_momentum: float = 0.9
    finetune_mode: str = "encoder"  # encoder | all | encoder_no_cls_no_msk
    single_crop: bool = True
    # the test image as upstream's eval transform makes it: shorter side to this (bicubic) + centre crop
    # input_size (upstream: Resize(256) + CenterCrop(224), even of the 224 px ImageNet-C files); null: as stored
    test_resize: int | None = None
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    flip: bool = True
    group_size: int = 1  # images adapted at once (vmap); 1: the one-image loop
    per_image_records: bool = True


@dataclass
class EvalConfig(TTTConfig):
    """``tttlab.ttt_mae.evaluate.run``: TTT or the baseline on a benchmark, with a cached trained model."""

    method: str = "ttt_mae.ttt"
    profile: str = "full"  # smoke | quick | full
    cache_dir: str = "runs/ttt_mae/models"
    progress: bool | None = None  # shortcut for logging.progress


SCHEMAS = {
    "tttlab_ttt_mae_pretrain": PretrainConfig, "tttlab_ttt_mae_probe": ProbeConfig,
    "tttlab_ttt_mae_ttt": TTTConfig, "tttlab_ttt_mae_eval": EvalConfig,
}  # fmt: skip


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=name, node=node)


def to_dict(cfg) -> dict[str, Any]:
    """A plain dict of an OmegaConf / dataclass / mapping config (``None`` -> {})."""
    return to_plain(cfg)


def conf_yaml(relative: str) -> dict[str, Any]:
    """A YAML file of the shipped ``conf/`` (``defaults`` and ``hydra`` keys dropped), unresolved."""
    return package_yaml("tttlab.ttt_mae.conf", relative)


def compose(entry: str, experiment: str | None = None, cfg=None, overrides: list[str] | None = None,
            schema=None) -> dict[str, Any]:  # fmt: skip
    """``conf/<entry>.yaml`` + ``conf/experiment/<experiment>.yaml`` + ``cfg`` + ``overrides``, validated
    against the entry's schema (unknown keys are errors).  The overrides mean what the same flags mean on
    the ``tttlab-ttt-mae-<entry>`` command line (:func:`tttlab.core.config.apply_overrides`): ``key=value``,
    ``+key=value``, ``++key=value``, ``~key``, ``~key=value``, values read by Hydra's grammar."""
    from omegaconf import OmegaConf

    from tttlab.core.config import apply_overrides, validate

    schema = schema or {"pretrain": PretrainConfig, "probe": ProbeConfig, "ttt": TTTConfig,
                        "baseline": TTTConfig}[entry]  # fmt: skip
    parts = [conf_yaml(f"{entry}.yaml")]
    if experiment:
        parts.append(conf_yaml(f"experiment/{experiment}.yaml"))
    parts.append(to_dict(cfg))
    merged = apply_overrides(OmegaConf.merge(*[OmegaConf.create(p) for p in parts]), overrides, schema)
    c = to_dict(validate(OmegaConf.to_container(merged, resolve=True), schema))
    from tttlab.core.torch import check_compile

    if "compile" in c:  # typed Any in the schema (false | true | a torch.compile mode): core's rule here
        c["compile"] = check_compile(c["compile"])
    if c.get("start_over") is False:  # an action, not part of the run: the config (and its hash) as before
        del c["start_over"]
    return c


def check_values(c: dict[str, Any], checks: dict[str, tuple[Any, str]]) -> None:
    """``{key: (predicate or bool, what was expected)}``: the first key whose value fails is a ConfigError."""
    for key, (ok, expected) in checks.items():
        value = c
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        try:
            good = bool(ok(value)) if callable(ok) else bool(ok)
        except (TypeError, ValueError):
            good = False
        if not good:
            raise ConfigError(f"{key}={value!r}; expected {expected}")


def check_amp_compile(c: dict[str, Any]) -> None:
    """``amp`` one of core's ``AMP_MODES`` and ``compile`` false, true or one of core's ``COMPILE_MODES``
    (both normalised in place), else a ConfigError naming the key (:func:`tttlab.core.torch.check_amp` /
    :func:`~tttlab.core.torch.check_compile`, the rules of every torch subpackage)."""
    from tttlab.core.torch import check_amp, check_compile

    c["amp"] = check_amp(c.get("amp"))
    c["compile"] = check_compile(c.get("compile"))


def finite_nonneg(v) -> bool:
    """A number >= 0 that is neither NaN nor infinite (not a bool)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0 <= v < math.inf


def crop_scale_ok(v) -> bool:
    """Two numbers ``0 < low <= high <= 1`` (RandomResizedCrop's area fractions)."""
    return (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(finite_nonneg(x) for x in v)
        and 0 < v[0] <= v[1] <= 1
    )


CROP_SCALE = "two area fractions [low, high] with 0 < low <= high <= 1"


def normalization(c: dict[str, Any], dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    mode = c.get("normalize", "auto")
    if mode == "auto":
        mode = "mnist" if dataset in ("mnist", "mnist_c", "digits", "digits_c") else "imagenet"
    if mode == "mnist":
        return MNIST_MEAN, MNIST_STD
    if mode == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if mode == "none":
        return None
    raise ConfigError(f"normalize={mode!r}; expected auto, imagenet, mnist or none")


def model_overrides(c: dict[str, Any], **extra) -> dict[str, Any]:
    """The :class:`~tttlab.ttt_mae.model.MAEConfig` overrides of a run config; ``input_size`` (the
    model's ``img_size``) is checked here, against the model's patch size, so that a bad value is
    reported under the key the user typed."""
    from .model import model_config

    size = c["input_size"]
    ov = {
        "norm_pix_loss": bool(c["norm_pix_loss"]),
        "head_type": c["head_type"], "classifier_depth": int(c["classifier_depth"]),
        **(c.get("model_overrides") or {}), **extra,
    }  # fmt: skip
    patch = model_config(c["model"], **{k: v for k, v in ov.items() if k != "img_size"}).patch_size
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % patch:
        raise ConfigError(
            f"input_size={size!r}; expected a positive integer divisible by the patch size {patch} of "
            f"model={c['model']!r}"
        )
    return {"img_size": int(size), **ov}


def set_threads(c: dict[str, Any], device: torch.device) -> None:
    """``num_threads`` on CPU (tiny models on a few busy cores run far faster on one thread)."""
    n = c.get("num_threads")
    if n is not None and device.type == "cpu":
        import torch

        torch.set_num_threads(max(int(n), 1))


def progress_bar(total: int | None, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not (enabled and sys.stderr.isatty()))


def setup_logging(level: str = "INFO") -> None:
    """``logging.level`` in effect also under Hydra (whose handlers made ``basicConfig`` a no-op)."""
    from tttlab.core.cli import apply_log_level

    apply_log_level(level)
