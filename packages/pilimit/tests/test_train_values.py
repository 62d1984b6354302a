"""train.py's wiring, value by value (added by a mutation audit; the kill/resume test compares a run with
another run of the same code, so these mistakes passed it): every epoch draws a new order of the data,
lr-drop milestones are given in epochs and converted to steps, and Gproj is used by the sampled finite
nets only (never by the muP baseline)."""

from __future__ import annotations

import pytest
import torch

from tttlab.pilimit import InfMLP
from tttlab.pilimit import train as T

SMOKE = ["logging.progress=false", "threads=1"]


def test_each_epoch_draws_a_new_order_of_the_training_data(tmp_path, monkeypatch):
    n = 32

    def fake_load_flat(name, split, root=None, num_examples=None, classes=None):
        x = torch.zeros(n, 784)
        x[:, 0] = torch.arange(n, dtype=torch.float32)  # example i is recognisable by x[:, 0] == i
        return x, torch.arange(n) % 10

    seen: list[list[int]] = []
    orig = InfMLP.forward

    def spy(self, x):
        if torch.is_grad_enabled():  # training batches (evaluation runs under no_grad)
            seen.append(x[:, 0].round().long().tolist())
        return orig(self, x)

    monkeypatch.setattr(T, "load_flat", fake_load_flat)
    monkeypatch.setattr(InfMLP, "forward", spy)
    over = [*SMOKE, "data.num_examples=32", "train.epochs=3", "train.num_test=8", f"out_dir={tmp_path}"]
    T.run(T.train_config("smoke", over))
    steps = n // 16
    epochs = [sum(seen[e * steps : (e + 1) * steps], []) for e in range(3)]
    assert len(seen) == 3 * steps
    for order in epochs:
        assert sorted(order) == list(range(n))  # every example once per epoch
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


def test_lr_drop_milestones_are_epochs_converted_to_steps():
    c = T.train_config("smoke", [*SMOKE, "optim.scheduler=multistep", "optim.lr=0.8",
                                 "optim.lr_drop_milestones=[0.5,1.5]", "optim.lr_drop_ratio=0.25"])  # fmt: skip
    net = InfMLP(4, 2, r=2, depth=0)
    opt, sched = T.build_optimizer(c, net, steps_per_epoch=10, total_steps=20)
    lrs = []
    for _ in range(16):
        sched.step()
        lrs.append(opt.lr)
    assert lrs[:4] == [0.8] * 4
    assert lrs[4:14] == pytest.approx([0.2] * 10)  # dropped at step 5 (epoch 0.5)
    assert lrs[14:] == pytest.approx([0.05] * 2)  # and at step 15 (epoch 1.5)


@pytest.mark.parametrize(("kind", "gproj", "want"), [
    ("finite", True, True), ("finite", False, False), ("mup", True, False), ("inf", True, False),
])  # fmt: skip
def test_gproj_only_for_sampled_finite_nets(kind, gproj, want):
    c = T.train_config("smoke", [*SMOKE, f"model.kind={kind}", "model.width=8", f"optim.gproj={gproj}"])
    net = T.build_model(c, 12, 3, torch.device("cpu"))
    opt, _ = T.build_optimizer(c, net, steps_per_epoch=4, total_steps=8)
    assert opt.gproj is want


def test_episodes_have_disjoint_support_and_query_and_permuted_labels():
    """N-way K-shot episodes: support and query images of a class never overlap, each class gives K
    support and Q query images under one label, and which class gets which label changes per episode."""
    import numpy as np

    from tttlab.pilimit.maml import sample_episode

    # class c, image i is the constant 10 * c + i (recognisable after flattening)
    classes = [np.full((6, 2, 2), 10 * c + np.arange(6)[:, None, None], np.uint8) for c in range(5)]
    rng = np.random.default_rng(0)
    mappings = set()
    for _ in range(30):
        ep = sample_episode(classes, 3, 2, 3, rng)
        ids_s = (ep.xs[:, 0] * 255).round().long()
        ids_q = (ep.xq[:, 0] * 255).round().long()
        assert ep.ys.tolist() == [0, 0, 1, 1, 2, 2] and ep.yq.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert not set(ids_s.tolist()) & set(ids_q.tolist())
        label_to_class = []
        for label in range(3):
            cs = {int(i) // 10 for i in ids_s[ep.ys == label]} | {int(i) // 10 for i in ids_q[ep.yq == label]}
            assert len(cs) == 1  # one class per label
            label_to_class.append(cs.pop())
        assert len(set(label_to_class)) == 3
        mappings.add(tuple(label_to_class))
    # labels are a random assignment: the same 3 classes do not always get labels in class order
    assert any(list(m) != sorted(m) for m in mappings)


def test_prediction_accuracy_per_domain_does_not_depend_on_the_setting(tmp_path):
    """pilimit's methods predict without adapting, so a domain's accuracy is the same whether its images
    come alone (reset_each_shift) or shuffled with the other domains' (mixed): the per-domain accounting
    of mixed batches is right."""
    import json

    from tttlab.pilimit.evaluate import run as evaluate

    def accs(setting):
        cfg = {"method": "pilimit.inf_pinet", "out_dir": str(tmp_path / setting), "profile": "smoke",
               "cache_dir": str(tmp_path / "cache"), "seed": 0, "progress": False,
               "benchmark": {"name": "mnist_c", "corruptions": ["gaussian_noise", "fog", "contrast"],
                             "severities": [5], "setting": setting, "num_examples": 24, "batch_size": 16,
                             "seed": 0}}  # fmt: skip
        recs = [json.loads(line) for line in open(evaluate(cfg))]
        return {(r["corruption"], r["n"]): r["value"] for r in recs if r["metric"] == "accuracy"}

    episodic, mixed = accs("reset_each_shift"), accs("mixed")
    assert len(episodic) == 4 and ("fog", 24) in episodic  # 3 domains and the mean
    assert mixed == pytest.approx(episodic)
    assert len(set(v for (c, _), v in episodic.items() if c != "mean")) > 1  # the domains differ


def test_resume_refuses_a_checkpoint_of_another_seed(tmp_path):
    """The seed decides the initialisation and the data order: a checkpoint of seed 0 must not be
    continued as seed 1."""
    from tttlab.core.errors import TTTLabError

    over = [*SMOKE, "data.num_examples=64", "train.num_test=16", f"out_dir={tmp_path}"]
    T.run(T.train_config("smoke", [*over, "train.stop_after_steps=2"]))
    with pytest.raises(TTTLabError, match="seed"):
        T.run(T.train_config("smoke", [*over, "seed=1"]))


def test_an_epoch_ends_with_the_partial_batch_as_upstreams_loader(tmp_path, monkeypatch):
    """Upstream's DataLoader keeps the last, smaller batch (drop_last=False): CIFAR-10 at batch 32 is 1,563
    steps an epoch, the last of 16 images.  40 examples at batch 16: batches of 16, 16 and 8, every example
    once per epoch, and the infinite net appends a row per example (M = r + 40 per epoch); the lr
    milestones in epochs count those steps (upstream: int(epochs x len(loader)))."""
    n = 40

    def fake_load_flat(name, split, root=None, num_examples=None, classes=None):
        x = torch.zeros(n, 784)
        x[:, 0] = torch.arange(n, dtype=torch.float32)
        return x, torch.arange(n) % 10

    seen: list[list[int]] = []
    orig = InfMLP.forward

    def spy(self, x):
        if torch.is_grad_enabled():
            seen.append(x[:, 0].round().long().tolist())
        return orig(self, x)

    built = {}
    real_build = T.build_optimizer

    def build_spy(c, net, steps_per_epoch, total_steps):
        built.update(steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        return real_build(c, net, steps_per_epoch, total_steps)

    monkeypatch.setattr(T, "load_flat", fake_load_flat)
    monkeypatch.setattr(InfMLP, "forward", spy)
    monkeypatch.setattr(T, "build_optimizer", build_spy)
    over = [*SMOKE, "train.epochs=2", "train.num_test=8", f"out_dir={tmp_path}"]
    out = T.run(T.train_config("smoke", over))
    assert [len(b) for b in seen] == [16, 16, 8] * 2
    for e in range(2):
        assert sorted(sum(seen[3 * e : 3 * e + 3], [])) == list(range(n))
    assert built == {"steps_per_epoch": 3, "total_steps": 6}
    net, _, _ = T.load_trained(out)
    assert net.M == 16 + 2 * n
