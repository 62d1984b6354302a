"""``eval.checkpoint=best_val`` (MAML): the paper's Omniglot numbers come from upstream's best-validation
checkpoint (meta/train.py keeps the net of the best meta-validation accuracy, meta/test.py tests it).

Validation classes are held out of meta-training; after every epoch their few-shot accuracy is recorded
(``val_fewshot_accuracy``), the net of the best one is written to ``checkpoints/best_val.ckpt``, and after
training that net alone is tested on the meta-test classes (``fewshot_accuracy`` at the last epoch).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tttlab.core.errors import ConfigError
from tttlab.core.records import config_hash, load_records
from tttlab.pilimit import train as T
from tttlab.pilimit.maml import evaluate_fewshot

EPOCHS = 3


def _config(root, out, *extra):
    over = ["logging.progress=false", "threads=1", f"maml.root={root}", "model.r=8", f"train.epochs={EPOCHS}",
            "maml.num_batches=3", "maml.num_test_batches=3", "maml.meta_batch_size=2", "maml.num_ways=3",
            "train.checkpoint_every=2", "eval.checkpoint=best_val", "eval.val_fraction=0.5", f"out_dir={out}",
            *extra]  # fmt: skip
    return T.train_config("paper_omniglot", over)


def _best(out):
    return T.load_checkpoint(out / "checkpoints" / "best_val.ckpt")


def assert_same_result(part, full) -> None:
    """The resumed run ``part`` ends as the uninterrupted ``full``: the same validation curve and test
    number, and the same best checkpoint (epoch, validation accuracy, weights bitwise)."""
    assert _values(part, "val_fewshot_accuracy") == _values(full, "val_fewshot_accuracy")
    assert _values(part, "fewshot_accuracy") == _values(full, "fewshot_accuracy")
    a, b = _best(full), _best(part)
    assert (a["epoch"], a["val_accuracy"]) == (b["epoch"], b["val_accuracy"])
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])


def _values(out, metric):
    r = load_records(out, metric=metric).sort_values("step")
    return list(r.step), list(r.value)


def test_the_best_checkpoint_is_the_argmax_of_the_validation_curve(tmp_path, omniglot_root, monkeypatch):
    """Validation accuracies made up as 0.4, 0.7, 0.7 (a tie after the best): the checkpoint holds the net
    after epoch 2 (the first of the highest), bitwise, and the test number is that net's."""
    curve = iter([0.4, 0.7, 0.7])
    after_epoch: list[dict] = []
    tested: list[dict] = []
    real = T.evaluate_fewshot

    def fake(net, classes, m, num_episodes, seed, device=None):
        state = copy.deepcopy(net.state_dict())
        if seed == 20_000:  # validation (seed 0)
            after_epoch.append(state)
            return {"accuracy": next(curve), "ci95": 0.0, "episodes": num_episodes}
        tested.append(state)
        return real(net, classes, m, num_episodes, seed, device)

    monkeypatch.setattr(T, "evaluate_fewshot", fake)
    out = T.run(_config(omniglot_root, tmp_path / "run"))
    assert _values(out, "val_fewshot_accuracy") == ([1, 2, 3], [0.4, 0.7, 0.7])
    best = _best(out)
    assert (best["epoch"], best["val_accuracy"]) == (2, 0.7)
    assert len(after_epoch) == EPOCHS and len(tested) == 1  # no test number before training ends
    for want in (after_epoch[1], tested[0]):
        assert want.keys() == best["model_state"].keys()
        assert all(torch.equal(want[k], best["model_state"][k]) for k in want)
    last = after_epoch[
        2
    ]  # the net kept by eval.checkpoint=last is another one: the check can tell them apart
    assert any(v.shape != best["model_state"][k].shape or not torch.equal(v, best["model_state"][k])
               for k, v in last.items())  # fmt: skip
    rec = load_records(out, metric="fewshot_accuracy")
    assert len(rec) == 1 and int(rec.step.iloc[0]) == EPOCHS
    assert rec.extra.iloc[0]["checkpoint"] == "best_val" and rec.extra.iloc[0]["best_epoch"] == 2


def test_best_val_on_a_real_curve(tmp_path, omniglot_root):
    """Without made-up numbers: the best epoch is the argmax of the recorded curve (first maximum), the
    checkpoint's net scores that maximum again on the validation episodes, and the test number is its
    accuracy on the meta-test classes; validation classes are not meta-trained on."""
    c = _config(omniglot_root, tmp_path / "run")
    out = T.run(c)
    steps, vals = _values(out, "val_fewshot_accuracy")
    assert steps == [1, 2, 3]
    best = _best(out)
    assert best["epoch"] == int(np.argmax(vals)) + 1 and best["val_accuracy"] == max(vals)
    m = c["maml"]
    train, test = T._maml_classes(m)
    meta_train, val = T.split_validation(train, 0.5, 3)
    assert len(meta_train) == len(val) == 3 and not {id(x) for x in meta_train} & {id(x) for x in val}
    net, _ = T.load_best_val(out / "checkpoints" / "best_val.ckpt", c, 28 * 28, torch.device("cpu"))
    assert evaluate_fewshot(net, val, m, 3 * 2, seed=20_000)["accuracy"] == max(vals)
    rec = load_records(out, metric="fewshot_accuracy")
    assert len(rec) == 1
    assert float(rec.value.iloc[0]) == evaluate_fewshot(net, test, m, 3 * 2, seed=10_000)["accuracy"]
    assert T.load_checkpoint(out / "checkpoints" / "last.ckpt")["done"]


def _weight_dependent_validation(monkeypatch):
    """The validation accuracy replaced by a number in [0, 1) that any change of the weights moves (the
    generated Omniglot images are noise: the real curve is flat at chance, so every epoch would tie)."""
    real = T.evaluate_fewshot

    def fake(net, classes, m, num_episodes, seed, device=None):
        if seed != 20_000:
            return real(net, classes, m, num_episodes, seed, device)
        total = sum(float(t.double().sum()) for t in net.state_dict().values())
        return {"accuracy": abs(total) * 1e4 % 1.0, "ci95": 0.0, "episodes": num_episodes}

    monkeypatch.setattr(T, "evaluate_fewshot", fake)


@pytest.mark.parametrize("stop", [2, 3, 7, EPOCHS * 3])
def test_a_killed_best_val_run_resumes_to_the_same_best_checkpoint_and_test_number(
    tmp_path, omniglot_root, monkeypatch, stop
):
    """Killed mid-epoch (2, 7), at an epoch's last step before its validation (3) or after the last epoch's
    steps (9), then started again: the same validation curve, best checkpoint (bitwise, the argmax of the
    curve) and test number as an uninterrupted run."""
    _weight_dependent_validation(monkeypatch)
    full = T.run(_config(omniglot_root, tmp_path / "full"))
    steps, vals = _values(full, "val_fewshot_accuracy")
    assert len(set(vals)) == EPOCHS and _best(full)["epoch"] == int(np.argmax(vals)) + 1
    # (on the CPU this was written on the curve peaks at epoch 2, neither the first nor the last)
    c = _config(omniglot_root, tmp_path / "part")
    T.run({**c, "train": {**c["train"], "stop_after_steps": stop}})
    part = T.run(c)
    assert_same_result(part, full)


def test_default_is_the_last_epoch_and_keeps_the_identity(tmp_path, omniglot_root):
    """eval.checkpoint=last (the default): no validation split, a test number every epoch, no best
    checkpoint, and the training part (the resume / model-cache key) as before the option."""
    c = _config(omniglot_root, tmp_path / "run", "eval.checkpoint=last")
    assert "eval" not in T.training_part(c)
    assert "eval" in T.training_part(_config(omniglot_root, tmp_path / "x"))
    out = T.run(c)
    assert _values(out, "fewshot_accuracy")[0] == [1, 2, 3]
    assert load_records(out, metric="val_fewshot_accuracy").empty
    assert not (out / "checkpoints" / "best_val.ckpt").exists()
    d = T.train_config("paper_omniglot", ["maml.root=/d"])
    assert config_hash(T.training_part(d, semantics=1)) == "500caf1d0a6d"  # test_omniglot_finite_rows' pin


def test_bad_eval_settings_are_config_errors(tmp_path, omniglot_root):
    with pytest.raises(ConfigError, match=r"eval.checkpoint='best'; expected one of \('last', 'best_val'\)"):
        T.train_config("paper_omniglot", ["maml.root=/d", "eval.checkpoint=best"])
    with pytest.raises(ConfigError, match=r"eval.checkpoint=best_val with train.task=classify"):
        T.train_config("smoke", ["eval.checkpoint=best_val"])
    with pytest.raises(ConfigError, match=r"eval.val_fraction=1.0: expected a number between 0 and 1"):
        T.train_config(
            "paper_omniglot", ["maml.root=/d", "eval.checkpoint=best_val", "eval.val_fraction=1.0"]
        )
    c = _config(omniglot_root, tmp_path / "run", "eval.val_fraction=0.2")  # 1 of 6 classes for 3 ways
    with pytest.raises(ConfigError, match=r"leaves 1 validation and 5 meta-train classes; expected at least"):
        T.run(c)
    assert not (tmp_path / "run").exists()


class _Killed(Exception):
    pass


def test_a_kill_between_the_best_and_the_last_checkpoint_resumes_to_the_same_result(
    tmp_path, omniglot_root, monkeypatch
):
    """Killed right after an epoch's best_val.ckpt is written, before its last.ckpt: the epoch is redone
    from the previous last.ckpt and rewrites the same best checkpoint; the result is an uninterrupted run's."""
    _weight_dependent_validation(monkeypatch)
    full = T.run(_config(omniglot_root, tmp_path / "full"))
    real, written = T.save_checkpoint, []

    def kill_after_best(path, state):
        real(path, state)
        if path.name == "best_val.ckpt":
            written.append(state["epoch"])
            raise _Killed

    monkeypatch.setattr(T, "save_checkpoint", kill_after_best)
    c = _config(omniglot_root, tmp_path / "part")
    with pytest.raises(_Killed):
        T.run(c)
    assert (
        written == [1]
        and T.load_checkpoint(tmp_path / "part" / "checkpoints" / "last.ckpt")["state"]["epoch"] == 0
    )
    monkeypatch.setattr(T, "save_checkpoint", real)
    part = T.run(c)
    assert_same_result(part, full)
