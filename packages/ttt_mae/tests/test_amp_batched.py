"""amp=bf16 in the batched (group_size > 1) adapter (mutation audit: a BatchedTTT loss outside autocast
passed every earlier test; they checked amp on the one-image adapter only).

The audit also found that the batched per-step prediction, then ``vmap(self._logits)``, ran its Linear layers
in float32 under amp=bf16: in this torch, autocast inside a bare ``torch.func.vmap`` does not cast
``F.linear`` (it does under ``vmap(grad(...))``, the loss path).  ``BatchedTTT._group_logits`` now loops over
the images under bf16; the second test checks it."""

import torch

from tttlab.ttt_mae.ttt import BatchedTTT, image_generator


def _adapt_recording(tiny, norm, settings, images):
    b = BatchedTTT(tiny(), settings(steps_per_example=2, amp="bf16"))
    seen, phase = [], ["?"]
    b.model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append((phase[0], o.dtype)))
    for name in ("_loss", "_logits"):
        real = getattr(b, name)

        def wrapped(*a, _real=real, _name=name, **k):
            phase[0] = _name
            try:
                return _real(*a, **k)
            finally:
                phase[0] = "?"

        setattr(b, name, wrapped)
    out = b.adapt(images(2), [image_generator(0, 4, i) for i in range(2)], norm)
    assert len(out) == 2 and all(len(r.predictions) == 3 for r in out)
    assert {p for p, _ in seen} == {"_loss", "_logits"}, seen
    assert all(p.dtype == torch.float32 for p in b.model.parameters())
    return seen


def test_batched_adapter_loss_runs_under_bf16(tiny, norm, settings, images):
    seen = _adapt_recording(tiny, norm, settings, images)
    assert {d for p, d in seen if p == "_loss"} == {torch.bfloat16}


def test_batched_adapter_prediction_runs_under_bf16(tiny, norm, settings, images):
    seen = _adapt_recording(tiny, norm, settings, images)
    assert {d for p, d in seen if p == "_logits"} == {torch.bfloat16}
