"""amp=bf16 reaches MAML's meta-training step and its few-shot evaluation (mutation audit: a meta-loss left
outside autocast passed every earlier test; they ran amp on the classify task only); the few-shot
evaluation's size (num_test_batches batches of meta_batch_size episodes, as upstream)."""

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


def test_fewshot_evaluation_counts_batches_of_meta_batch_size_episodes(tmp_path, monkeypatch):
    """Upstream evaluates ``--num-test-batches`` batches of ``--batch-size`` tasks (500 x 8 = 4,000 episodes in
    the paper's commands), not ``--num-test-batches`` tasks: 3 batches of 2 episodes here."""
    counts = []
    real = T.evaluate_fewshot

    def spy(net, classes, m, num_episodes, *a, **k):
        counts.append(num_episodes)
        return real(net, classes, m, num_episodes, *a, **k)

    monkeypatch.setattr(T, "evaluate_fewshot", spy)
    over = ["logging.progress=false", "threads=1", "model.r=8", "model.dtype=float32", "maml.num_batches=2",
            "maml.num_test_batches=3", "maml.meta_batch_size=2", "maml.num_ways=3", "train.epochs=1",
            f"out_dir={tmp_path / 'run'}"]  # fmt: skip
    out = T.run(T.train_config("maml_mnist", over))
    assert counts == [6]
    from tttlab.core.records import load_records

    recs = load_records(out, metric="fewshot_accuracy")
    assert int(recs.n.iloc[0]) == 6 * 3 * 1  # episodes x ways x query images per class
