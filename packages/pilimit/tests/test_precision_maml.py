"""amp=bf16 reaches MAML's meta-training step and its few-shot evaluation (mutation audit: a meta-loss left
outside autocast passed every earlier test; they ran amp on the classify task only)."""

import pytest
import torch

from tttlab.pilimit import train as T


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_maml_meta_loss_and_fewshot_eval_run_under_amp(tmp_path, monkeypatch, amp):
    seen = []
    for name in ("meta_loss", "evaluate_fewshot"):
        real = getattr(T, name)

        def spy(*a, _real=real, _name=name, **k):
            seen.append((_name, torch.is_autocast_enabled("cpu")))
            return _real(*a, **k)

        monkeypatch.setattr(T, name, spy)
    over = ["logging.progress=false", "threads=1", "model.r=8", "model.dtype=float32", "maml.num_batches=2",
            "maml.num_test_batches=2", "maml.meta_batch_size=2", "maml.num_ways=3", "train.epochs=1",
            f"amp={amp}", f"out_dir={tmp_path / 'run'}"]  # fmt: skip
    T.run(T.train_config("maml_mnist", over))
    assert {n for n, _ in seen} == {"meta_loss", "evaluate_fewshot"}
    assert {on for _, on in seen} == {amp == "bf16"}
