"""WideResNet-28-10 as RobustBench's ``cifar10`` / ``corruptions`` / ``Standard`` checkpoint expects it.

This is the source model of the CIFAR-10-C test-time adaptation literature: TENT's ``cifar10c`` example,
EATA and the mariodoebler/test-time-adaptation benchmark all load RobustBench's ``Standard`` model
(Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016, bibtex ``zagoruyko2016wrn``; the
definition follows the TRADES code RobustBench took it from; upstream RobustBench/robustbench,
``model_zoo/architectures/wide_resnet.py``, entry ``Standard`` = ``WideResNet(depth=28,
widen_factor=10)`` for both the ``Linf`` and the ``corruptions`` threat models, one file).  Written
here from those facts, not copied.

Architecture (pre-activation wide residual network; inputs ``(N, 3, 32, 32)`` in ``[0, 1]``: **no**
mean/std normalisation in front, the ``Standard`` model was trained on raw ``[0, 1]`` pixels):

* ``conv1``: 3x3 conv 3 -> 16, stride 1, no bias;
* ``block1``, ``block2``, ``block3``: ``n = (depth - 4) / 6`` basic blocks each (4 for depth 28), widths
  ``16k, 32k, 64k`` (``k = widen_factor``: 160, 320, 640), strides 1, 2, 2 (the first block of a stage
  carries the stride);
* basic block ``x -> bn1 -> relu -> conv1 (3x3, stride) -> bn2 -> relu -> conv2 (3x3)`` plus a shortcut.
  When the block keeps the width (``in == out``) the shortcut is the identity on the *raw* input ``x``;
  when it changes the width, ``convShortcut`` (1x1, stride, no bias) is applied to the *pre-activated*
  input ``relu(bn1(x))``, and ``conv1`` reads that same pre-activated tensor.  No dropout
  (``dropRate=0``), no ``sub_block1``;
* head: ``bn1 -> relu -> 8x8 average pool -> fc`` (640 -> 10, with bias).

BatchNorm layers are PyTorch's defaults (eps 1e-5, momentum 0.1, affine).  The ReLUs are separate
modules (``relu1``/``relu2`` per block, ``relu`` in the head, as upstream, so hooks can name them) but
not in place: upstream's in-place ReLU overwrites a BatchNorm's output, which a forward hook on that
BatchNorm (ActMAD, feature statistics) would then read after the fact.  The values are identical.

State dict keys (``WideResNet(28, 10)``: 36,479,194 parameters; 155 entries, of which 25 are the
BatchNorm ``num_batches_tracked`` counters)::

    conv1.weight                                   (16, 3, 3, 3)
    block{1,2,3}.layer.{0..3}.bn1.{weight,bias,running_mean,running_var,num_batches_tracked}
    block{1,2,3}.layer.{0..3}.conv1.weight          (out, in, 3, 3)
    block{1,2,3}.layer.{0..3}.bn2.{weight,bias,running_mean,running_var,num_batches_tracked}
    block{1,2,3}.layer.{0..3}.conv2.weight          (out, out, 3, 3)
    block{1,2,3}.layer.0.convShortcut.weight       (out, in, 1, 1)   block1: (160, 16), block2: (320, 160),
                                                                      block3: (640, 320)
    bn1.{weight,bias,running_mean,running_var,num_batches_tracked}   (640,)
    fc.weight (10, 640), fc.bias (10,)

On disk (``Standard.pt``, what RobustBench's ``load_model`` reads): a ``torch.save`` file holding either
``{"state_dict": <state dict>, ...}`` or the state dict itself, keys possibly prefixed ``module.``
(``torch.nn.DataParallel``); RobustBench reads ``checkpoint["state_dict"]`` when present and strips
``module.`` (and ``model.``, which some other entries of its zoo carry).
:func:`tttlab.torch_ttt.checkpoints.read_state_dict` accepts these layouts, ``model.`` prefixes excepted
(a ``CheckpointError`` names the unknown keys).  The exact
layout of the released file could not be inspected here (no network): both are tested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WideResNet", "WideBasicBlock", "WideStage", "wrn28_10"]


class WideBasicBlock(nn.Module):
    """Pre-activation basic block (see the module docstring for the two shortcut cases)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        else:
            self.convShortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        residual = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + residual


class WideStage(nn.Module):
    """``num_blocks`` basic blocks in ``self.layer`` (the name the checkpoint keys carry)."""

    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(num_blocks)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 inputs in [0, 1]; returns logits.

    ``depth`` must be ``6 n + 4``.  ``WideResNet()`` is RobustBench's ``Standard`` (28-10); smaller
    instances (e.g. ``depth=10, widen_factor=1``: one block per stage, 77,850 parameters) run the same
    code for tests.  Initialisation as the reference: conv weights ``N(0, 2 / (k*k*out))``, BatchNorm
    weight 1 / bias 0, linear bias 0 (the weights of a pretrained model are loaded over it anyway).
    """

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(
                f"WideResNet depth must be 6 n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}"
            )
        if widen_factor < 1 or num_classes < 1:
            raise ValueError(f"widen_factor and num_classes must be >= 1, got {widen_factor}, {num_classes}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.depth, self.widen_factor, self.num_channels = depth, widen_factor, widths[3]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], 1)
        self.block2 = WideStage(n, widths[1], widths[2], 2)
        self.block3 = WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[3], num_classes)
        if self.fc.weight.is_meta:  # shapes only (checkpoint checks): nothing to draw; meta normal_ is slow
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, out.shape[-1])  # 8x8 for 32x32 inputs, as the reference's fixed pool
        return self.fc(out.flatten(1))


def wrn28_10(**kwargs) -> WideResNet:
    """RobustBench's ``Standard`` architecture (``WideResNet(28, 10)``); kwargs override the shape (tests)."""
    return WideResNet(**{"depth": 28, "widen_factor": 10, **kwargs})
