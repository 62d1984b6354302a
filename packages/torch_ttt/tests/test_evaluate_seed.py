"""The evaluation's ``seed`` also seeds the model it trains (tttlab-compare 'seeds=[0,1,2]': one model per seed)."""

from __future__ import annotations

from tttlab.core.records import config_hash
from tttlab.torch_ttt import evaluate as E
from tttlab.torch_ttt import train as T


class _OneRank:
    rank, world = 0, 1

    def barrier(self):
        pass


def test_each_evaluation_seed_trains_its_own_cached_model(monkeypatch):
    """Seed k trains with ``train_experiment``'s seed + k: seed 0 keeps the experiment's model and its cache
    key (mnist_bn: the tutorial's seed 7), seeds 1 and 2 get models of their own, and a seed given in
    ``train_overrides`` wins.  Until 2026-12-02 every seed evaluated the seed-7 model, so compare's "mean
    +- std over seeds" left out the model's variance for torch_ttt only."""
    trained = []
    monkeypatch.setattr(T, "run", lambda tc: trained.append(tc))
    experiment_seed = T.train_config("mnist_bn", [])["seed"]
    assert experiment_seed == 7
    c = E.eval_config({"engine": "tent"}, ["cache_dir=/nonexistent-cache"])
    paths = {seed: E.training_run({**c, "seed": seed}, _OneRank()) for seed in (0, 1, 2)}
    assert [tc["seed"] for tc in trained] == [7, 8, 9]
    assert len(set(paths.values())) == 3
    # seed 0: the experiment's own config, so the models cached before this change are reused
    plain = T.train_config("mnist_bn", ["train.engine=ttt", "eval.enabled=false", "device=cpu"])
    assert paths[0].name.endswith(config_hash(T._training_part(plain)))
    # an explicit training seed is taken as given, whatever the evaluation's seed
    assert E.cached_training_config({**c, "seed": 2, "train_overrides": ["seed=3"]})[0]["seed"] == 3
