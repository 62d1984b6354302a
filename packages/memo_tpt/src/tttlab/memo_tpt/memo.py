"""MEMO: test-time robustness via adaptation and augmentation, for any torchvision/timm classifier.

Paper: Zhang, Levine, Finn, "MEMO: Test Time Robustness via Adaptation and Augmentation", NeurIPS 2022
(bibtex ``zhang2022memo``).  Upstream: https://github.com/zhangmarvin/memo; seed 002
(DavidC001/MEMO-TPT-DL2024, ``EasyMemo``) adds top-k confident views and the ``cut`` augmentation.

Per test image (episodic): restore the source weights; draw B augmented views (random resized crop +
flip, then AugMix: width 3, depth 1-3, severity 1, upstream's nine operations, rotate/shear/translate filled
as upstream's PIL ``fillcolor=128``, i.e. (128, 0, 0) on RGB images; or ``cut``: crop + flip only); loss =
entropy of the marginal ``mean_b softmax(f(x_b))`` (logsumexp); ``steps`` optimizer steps on all
parameters; then predict the single clean view (upstream's ``Resize(256)`` + ``CenterCrop(224)``, bilinear:
``test_resize``; ``test_resize=size`` for images already cropped to the model's size, upstream's ImageNet-C
transform).  With a BN prior of strength N every BatchNorm normalises with ``N/(N+1) * source +
1/(N+1) * batch`` statistics during adaptation and prediction (:func:`tttlab.memo_tpt.losses.bn_prior`).
Optimizer per architecture family as in the paper and upstream's ``script_test_in.py``
(:data:`tttlab.memo_tpt.models.OPTIMIZERS`: SGD lr 2.5e-4 wd 0 for ResNets, AdamW lr 1e-5 wd 0.01 for RVT and
ResNeXt).  ``class_indices`` restricts logits to a class subset (ImageNet-A/R's 200 classes, from core's
``class_indices``), for the loss and the prediction as upstream.  ``top_k`` keeps the most confident views
(seed 002).  ``include_original`` makes the clean test view the first of the B views (seed 002's
``EasyMemo``: its data loader returns the clean view followed by ``augs - 1`` crops, and the loss and the
top-k selection run over all of them; upstream MEMO's B views are all augmented).

Deviations (deliberate):

* a fresh optimizer per image.  Upstream builds its optimizer once before the loop and only reloads the
  weights per image: identical for the ResNets' SGD without momentum (stateless), but for AdamW (RVT,
  ResNeXt) upstream carries the moments and the step count (hence Adam's bias correction) from one test
  image to the next.  The paper's method is episodic; resetting keeps every image independent of the
  order and the runs resumable with the same numbers;
* the BN prior patches every BatchNorm1d/2d/3d of the model (upstream: the ``nn.BatchNorm2d`` class;
  the same for its conv nets); a layer that sees one value per channel keeps its source statistics (upstream
  would fail there);
* views are built on the model's device from the 8-bit image (:mod:`tttlab.memo_tpt.augment`: the crop
  draw exactly, resampling within one grey level of PIL's, the AugMix operations with PIL's arithmetic);
* the reset restores a snapshot in place instead of reloading the checkpoint (bit-exact, tested).

Options (not upstream): ``amp`` (``auto``/``none``: float32 as upstream; ``bf16``: bfloat16 autocast of the
forward) and ``compile`` (``true`` or a ``torch.compile`` mode: ``torch.compile`` of the forward under the BN
prior); see
:mod:`tttlab.memo_tpt.precision`.

``tttlab.torch_ttt.MemoEngine`` implements MEMO for batches of small images inside that engine library;
this module is standalone (per image, any resolution, top-k, class subsets, ensemble hooks) and does not
import torch_ttt.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn

from tttlab.core.errors import ConfigError, InvalidInputError

from . import augment as A
from .losses import bn_prior, check_rates, check_selection, marginal_entropy, select_confident
from .models import IMAGENET_MEAN, IMAGENET_STD, OPTIMIZERS, optimizer_family
from .precision import autocast, check_compile, compile_fn, resolve_amp

__all__ = ["Memo", "make_optimizer"]

#: augmix: the MEMO paper's (crop + flip + AugMix); cut: seed 002's crop + flip; seed002_augmix: seed 002's
#: aug_type='augmix' (torchvision's AugMix() of the whole image + resize + centre crop, augment.seed002_augmix_views)
AUGMENTATIONS = ("augmix", "cut", "seed002_augmix")


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.0):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer {name!r}; expected one of sgd, adamw, adam")


def check_options(
    *, augmentation: str, n_augmentations: int, steps: int, lr, weight_decay, momentum, prior_strength,
    top_k, size: int, include_original, test_resize: int | None,
) -> None:  # fmt: skip
    """The checks of :class:`Memo`'s option values that need no model: ``Memo`` runs them, and the paper
    command runs them before it reads any test set (a bad value is named before a missing folder)."""
    if augmentation not in AUGMENTATIONS:
        raise ConfigError(f"augmentation={augmentation!r}; expected one of {AUGMENTATIONS}")
    for key, value, least, what in (
        ("n_augmentations", n_augmentations, 1, "augmented views per image"),
        ("steps", steps, 0, "optimizer steps per image; 0: no weight update"),
    ):
        if value < least:
            raise ConfigError(f"{key}={value}: expected an integer >= {least} ({what})")
    check_rates(lr=lr, weight_decay=weight_decay, momentum=momentum, prior_strength=prior_strength)
    if prior_strength is not None and 0 < float(prior_strength) < 1:
        # seed 002's key of the same name is the mixing weight p itself (0.94); ours is MEMO's N.
        p = float(prior_strength) / (float(prior_strength) + 1)
        warnings.warn(
            f"prior_strength={prior_strength} is MEMO's N (weight of the training statistics p = N/(N+1) = "
            f"{p:.3f}); seed 002's prior_strength is p itself: its 0.94 is N = 0.94/0.06 = 15.67",
            UserWarning,
            stacklevel=3,
        )
    check_selection("top_k", top_k)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"size={size!r}; expected the view resolution in pixels (an integer >= 1)")
    if not isinstance(include_original, bool):  # bool("false") would be True
        raise ConfigError(f"include_original={include_original!r}; expected true or false")
    if test_resize is not None and int(test_resize) < size:
        raise ConfigError(f"test_resize={test_resize} must be >= size={size} (resize, then centre crop)")


class Memo:
    """MEMO around ``model`` (modified in place while adapting; :meth:`reset` restores it).

    Args:
        model: a classifier taking normalised NCHW images.
        n_augmentations: B, views per test image (paper 64; seed 002 student 64 with ``top_k=0.1``).
        steps: optimizer steps per image (paper 1).
        prior_strength: N of the BN prior (paper 16); ``None`` keeps eval-mode BatchNorm.
        optimizer: ``auto`` (by ``arch``), ``sgd``, ``adamw`` or ``adam``; ``lr``/``weight_decay`` default
            to the family's paper values.
        top_k: keep this fraction (float) or number (int) of lowest-entropy views; ``None`` = all.
        augmentation: ``augmix`` (paper), ``cut`` (seed 002: crop + flip only) or ``seed002_augmix`` (seed
            002's ``augmix``: torchvision's ``AugMix()`` of the whole image, then ``Resize(size)`` bicubic +
            ``CenterCrop(size)``, no random crop or flip).
        include_original: the clean test view (:meth:`original`) is the first of the ``n_augmentations``
            views, followed by ``n_augmentations - 1`` augmented ones (seed 002's ``EasyMemo``); default
            False: all B views augmented (MEMO).
        fill: what AugMix's rotate/shear/translate write outside the image: upstream MEMO passes PIL
            ``fillcolor=128``, which Pillow reads on RGB images as the packed colour (128, 0, 0) (on one-channel
            images: grey 128); the default reproduces that; ``0`` = AugMix's / TPT's black.
        class_indices: logit subset (e.g. ImageNet-A's 200 of 1000).
        size: view resolution; ``mean``/``std``: the model's input normalisation.
        amp: ``auto`` / ``none`` (float32, upstream), ``bf16`` (bfloat16 autocast of the forward on any
            device; loss, parameters and optimizer state float32); ``fp16`` is a ConfigError
            (:mod:`tttlab.memo_tpt.precision`).
        compile: ``torch.compile`` the model's forward under the BN prior (the B views' forward + backward
            every step and the clean view's forward), static shapes.
        test_resize: the clean test view is the shorter side resized to this (bilinear, antialiased as PIL)
            and centre-cropped to ``size``; default ``round(size * 256 / 224)`` (256 at 224: upstream's
            ``Resize(256)`` + ``CenterCrop(224)``); ``size`` = centre crop only (pre-cropped images).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        arch: str = "",
        n_augmentations: int = 64,
        steps: int = 1,
        prior_strength: float | None = 16.0,
        optimizer: str = "auto",
        lr: float | None = None,
        weight_decay: float | None = None,
        momentum: float = 0.0,
        top_k: float | int | None = None,
        augmentation: str = "augmix",
        severity: float = 1.0,
        class_indices: Sequence[int] | None = None,
        size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        flip: bool = True,
        scale: tuple[float, float] = (0.08, 1.0),
        test_resize: int | None = None,
        fill: int | Sequence[int] = (128, 0, 0),
        include_original: bool = False,
        seed: int = 0,
        amp: str = "auto",
        compile: bool = False,
    ):
        check_options(
            augmentation=augmentation, n_augmentations=n_augmentations, steps=steps, lr=lr,
            weight_decay=weight_decay, momentum=momentum, prior_strength=prior_strength, top_k=top_k, size=size,
            include_original=include_original, test_resize=test_resize,
        )  # fmt: skip
        self.model = model.eval()  # upstream adapts and predicts in eval mode (BN through the prior)
        self.arch = arch
        self.n_augmentations, self.steps, self.top_k = int(n_augmentations), int(steps), top_k
        self.prior = None if prior_strength is None else float(prior_strength) / (float(prior_strength) + 1)
        family = optimizer_family(arch) if optimizer == "auto" else optimizer
        defaults = OPTIMIZERS.get(family, OPTIMIZERS["adamw"])
        self.opt_args = dict(
            name=family, lr=float(defaults["lr"] if lr is None else lr),
            weight_decay=float(defaults["weight_decay"] if weight_decay is None else weight_decay),
            momentum=float(momentum),
        )  # fmt: skip
        self.augmentation, self.severity, self.size, self.flip, self.scale = (
            augmentation,
            severity,
            size,
            flip,
            scale,
        )
        self.fill = fill
        self.include_original = include_original
        self.test_resize = round(size * 256 / 224) if test_resize is None else int(test_resize)
        self.device = next(model.parameters()).device
        self.precision = resolve_amp(amp, self.device, "memo")
        self.compile = check_compile(compile)
        self._forward, self._bn_forwards = model, None
        if self.compile:  # the BN prior's patched forwards are made once, so the compiled guards hold
            self._forward, self._bn_forwards = compile_fn(model, self.compile), {}
        self.class_indices = (
            None if class_indices is None else torch.as_tensor(class_indices, device=self.device)
        )
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.optimizer = self._new_optimizer()

    # -- state -------------------------------------------------------------------------------------------
    @property
    def adaptation_steps(self) -> int:
        """Optimizer steps per image (``steps``), as records' ``step``."""
        return self.steps

    def _new_optimizer(self):
        a = self.opt_args
        params = [p for p in self.model.parameters() if p.requires_grad]
        return make_optimizer(params, a["name"], a["lr"], a["weight_decay"], a["momentum"])

    @torch.no_grad()
    def reset(self) -> None:
        """Source weights and buffers back, bit for bit, and a fresh optimizer."""
        for k, v in self.model.state_dict().items():
            v.copy_(self._snapshot[k])
        self.optimizer = self._new_optimizer()

    # -- pieces (also used by the ensemble) ----------------------------------------------------------------
    def views(self, image) -> torch.Tensor:
        """The B views in [0, 1]: augmented ones, or with ``include_original`` the clean view first and
        B - 1 augmented ones."""
        k = self.n_augmentations - int(self.include_original)
        crops = None
        if k > 0 and self.augmentation == "seed002_augmix":
            crops = A.seed002_augmix_views(image, k, self.size, generator=self.generator, device=self.device)
        elif k > 0:
            crops = A.make_views(
                image, k, self.size, include_original=False,
                augmix_views=self.augmentation == "augmix", flip=self.flip, scale=self.scale,
                severity=self.severity, generator=self.generator, device=self.device, fill=self.fill,
            )  # fmt: skip
        if not self.include_original:
            return crops
        clean = self.original(image)
        return clean if crops is None else torch.cat([clean, crops])

    def original(self, image) -> torch.Tensor:
        """The clean test view in [0, 1]: shorter side to ``test_resize`` (bilinear) + centre crop ``size``."""
        return A.original_view(
            image, self.size, device=self.device, resize=self.test_resize, interpolation="bilinear"
        )

    def logits(self, views: torch.Tensor) -> torch.Tensor:
        """Logits of [0, 1] views under the BN prior, restricted to ``class_indices``."""
        with bn_prior(self.model, self.prior, self._bn_forwards), autocast(self.precision, self.device):
            out = self._forward((views - self.mean) / self.std)
        out = out.float() if self.precision != "none" else out
        if self.class_indices is None:
            return out
        if int(self.class_indices.max()) >= out.shape[-1] or int(self.class_indices.min()) < 0:
            raise InvalidInputError(
                f"class_indices range {int(self.class_indices.min())}..{int(self.class_indices.max())}, but the "
                f"model has {out.shape[-1]} outputs; expected indices into its classes"
            )
        return out[:, self.class_indices]

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        return select_confident(logits, self.top_k)

    def parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    # -- MEMO ---------------------------------------------------------------------------------------------
    def adapt(self, image) -> list[float]:
        """``steps`` marginal-entropy steps on fresh views of ``image``; the losses."""
        losses = []
        self.model.eval()
        for _ in range(self.steps):
            logits = self.logits(self.views(image))
            loss = marginal_entropy(logits[self.select(logits)])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
        return losses

    @torch.no_grad()
    def predict(self, image) -> torch.Tensor:
        """Logits (1, classes) of the clean view."""
        return self.logits(self.original(image))

    def __call__(self, image, reset: bool = True) -> torch.Tensor:
        """Episodic MEMO on one image: reset, adapt, predict."""
        if reset:
            self.reset()
        self.adapt(image)
        return self.predict(image)


# python -m tttlab.memo_tpt.memo: the tttlab-memo-tpt-memo command (it imported this module and did nothing)
if __name__ == "__main__":
    from tttlab.memo_tpt.main import memo_main

    memo_main()
