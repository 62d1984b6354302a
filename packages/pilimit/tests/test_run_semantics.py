"""The run identity covers the code's training semantics (train.SEMANTICS), not only the config.

Since 2026-12-01 an epoch keeps its partial last batch; a run killed under the code before that (epochs of
floor(N / batch) steps) has a checkpoint whose identity hash equals what that code computed for the config.
Such a checkpoint must not resume with the new epoch length: it is refused with an error that names the
folder and what to do, or resumed where the two semantics train the same (classify without a partial batch).
"""

from __future__ import annotations

import pytest
import torch

from tttlab.core.errors import CheckpointError, TTTLabError
from tttlab.core.records import config_hash
from tttlab.pilimit import evaluate as E
from tttlab.pilimit import train as T

SMOKE = ["logging.progress=false", "threads=1", "train.num_test=32", "train.checkpoint_every=2"]


def _old_identity(c) -> str:
    """The identity hash the code before the semantics version wrote for config ``c``: the training part
    without its ``semantics`` entry (written without ``training_part``'s ``semantics`` argument, so that
    it is the same computation on the old code)."""
    return config_hash({k: v for k, v in T.training_part(c).items() if k != "semantics"})


def _make_old(path, c) -> None:
    """Turn the checkpoint at ``path`` into one the code before the semantics version wrote."""
    ck = torch.load(path, weights_only=False)
    ck["config_hash"] = _old_identity(c)
    ck.pop("semantics", None)
    torch.save(ck, path)


def test_the_old_identity_is_the_hash_runs_had_and_the_new_one_differs():
    """The version-1 part is exactly what runs had before (pinned: smoke's training-part hash on main,
    test_compile_modes.MAIN_HASHES), and the version-2 identity is another hash."""
    c = T.train_config("smoke")
    assert config_hash(T.training_part(c, semantics=1)) == _old_identity(c) == "242710fc9e24"
    assert T.training_part(c)["semantics"] == T.SEMANTICS == 2
    assert config_hash(T.training_part(c)) != "242710fc9e24"


def test_a_checkpoint_of_the_old_epoch_semantics_is_refused_when_the_epochs_differ(tmp_path):
    """120 examples at batch 16: the old code's epochs were 7 steps (8 examples dropped), ours are 8.  A run
    killed under the old code is refused (before anything in its folder is rewritten), with the folder,
    both epoch lengths and the way out; train.resume=false starts it again."""
    out = tmp_path / "run"
    c = T.train_config("smoke", [*SMOKE, "data.num_examples=120", f"out_dir={out}"])
    T.run({**c, "train": {**c["train"], "stop_after_steps": 3}})
    ckpt = out / "checkpoints" / "last.ckpt"
    _make_old(ckpt, c)
    before = (ckpt.read_bytes(), (out / "config.yaml").read_bytes())
    with pytest.raises(CheckpointError) as e:
        T.run(c)
    assert isinstance(e.value, TTTLabError)
    msg = str(e.value)
    assert str(out) in msg and "train.resume=false" in msg
    assert "7 steps of 16" in msg and "8 of the 120 examples" in msg and "8 steps an epoch" in msg
    assert (ckpt.read_bytes(), (out / "config.yaml").read_bytes()) == before
    T.run({**c, "train": {**c["train"], "resume": False}})
    ck = T.load_checkpoint(ckpt)
    assert (
        ck["done"] and ck["state"]["step"] == 2 * 8 and ck["config_hash"] == config_hash(T.training_part(c))
    )


def test_an_old_checkpoint_resumes_where_both_semantics_train_the_same(tmp_path):
    """128 examples at batch 16: no partial batch, the same run under both semantics; the old checkpoint
    resumes, ends bitwise as an uninterrupted run, and is rewritten with the new identity."""
    full = T.run(T.train_config("smoke", [*SMOKE, "data.num_examples=128", f"out_dir={tmp_path / 'full'}"]))
    out = tmp_path / "part"
    c = T.train_config("smoke", [*SMOKE, "data.num_examples=128", f"out_dir={out}"])
    T.run({**c, "train": {**c["train"], "stop_after_steps": 5}})
    _make_old(out / "checkpoints" / "last.ckpt", c)
    T.run(c)
    a, b = (
        T.load_checkpoint(full / "checkpoints" / "last.ckpt"),
        T.load_checkpoint(out / "checkpoints" / "last.ckpt"),
    )
    assert b["done"] and b["config_hash"] == config_hash(T.training_part(c)) and b["semantics"] == T.SEMANTICS
    assert a["model_state"].keys() == b["model_state"].keys()
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    assert a["history"]["test_accuracy"] == b["history"]["test_accuracy"]


def test_an_old_maml_checkpoint_is_refused(tmp_path, omniglot_root):
    """MAML's outer step (summed gradient, clip norm) and its evaluation count also changed on 2026-12-01
    without moving the identity: an old MAML checkpoint may come from either side and is refused."""
    out = tmp_path / "run"
    over = ["logging.progress=false", "threads=1", f"maml.root={omniglot_root}", "model.r=8", "train.epochs=1",
            "maml.num_batches=3", "maml.num_test_batches=2", "maml.meta_batch_size=2", "maml.num_ways=3",
            f"out_dir={out}"]  # fmt: skip
    c = T.train_config("paper_omniglot", over)
    T.run({**c, "train": {**c["train"], "stop_after_steps": 1}})
    _make_old(out / "checkpoints" / "last.ckpt", c)
    with pytest.raises(CheckpointError, match=r"MAML's outer step.*train.resume=false") as e:
        T.run(c)
    assert str(out) in str(e.value)
    T.run({**c, "train": {**c["train"], "resume": False}})
    ck = T.load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert ck["done"] and ck["state"]["step"] == 3 and ck["config_hash"] == config_hash(T.training_part(c))


def test_evaluate_keeps_a_model_cached_under_the_old_identity_when_it_is_the_same(tmp_path, monkeypatch):
    """The evaluate contract's cached models are keyed by the identity: a finished model cached under the old
    key is used when its epochs had no partial batch (every profile), and retrained under the new key
    otherwise."""
    trained = []
    monkeypatch.setattr(T, "run", lambda tc: trained.append(tc["out_dir"]))

    def cache(overrides):
        c = E._config({"profile": "smoke", "cache_dir": str(tmp_path), "train_overrides": overrides}, {})
        tc = T.train_config("mnist", [*E.PROFILES["smoke"], "model.kind=inf", "seed=0", "amp=none",
                                      "compile=false", "threads=1", *overrides])  # fmt: skip
        old = tmp_path / f"pilimit-inf-{_old_identity(tc)}"
        (old / "checkpoints").mkdir(parents=True)
        torch.save({"format": "tttlab.pilimit/1", "done": True}, old / "checkpoints" / "last.ckpt")
        return E.training_run(c), old, tmp_path / f"pilimit-inf-{config_hash(T.training_part(tc))}"

    got, old, new = cache([])  # 320 examples at batch 16
    assert got == old and trained == [] and old != new
    got, old, new = cache(["data.batch_size=48"])  # 320 = 6 x 48 + 32: the old model had 6 steps an epoch
    assert got == new and trained == [str(new)]
