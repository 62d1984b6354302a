"""The tiny CLIP trainer under amp=bf16 computes its InfoNCE loss in float32 (mutation audit: logits left in
bfloat16, i.e. a bfloat16 log-softmax, passed every earlier test; autocast does not upcast log_softmax on
the CPU, and the float32 targets made the loss itself float32 either way)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tttlab.memo_tpt import tiny_clip as T


class LogSoftmaxDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ == "_log_softmax":
            self.dtypes.append(out.dtype)
        return out


def test_clip_trainer_loss_is_float32_under_bf16(tiny_clip):
    size = tiny_clip.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(4, 3, size, size, generator=g)
    text = torch.randint(1, 400, (4, tiny_clip.context_length), generator=g)
    same = torch.eye(4)
    with torch.no_grad():
        want = T._clip_loss(tiny_clip, imgs, text, same)
    rec = LogSoftmaxDtypes()
    with torch.no_grad(), rec, torch.autocast("cpu", dtype=torch.bfloat16):
        got = T._clip_loss(tiny_clip, imgs, text, same)
    assert len(rec.dtypes) == 2 and set(rec.dtypes) == {torch.float32}
    assert got.dtype == torch.float32 and abs(float(got) - float(want)) <= 0.05 * abs(float(want))
