"""torchrun-style runs with 2 gloo processes on CPU (spawned, env:// rendezvous)."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tttlab.core.records import load_records


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str, cache: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist

    from tttlab.ttt_mae import evaluate as E
    from tttlab.ttt_mae import train as T
    from tttlab.ttt_mae.common import compose

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        c = compose("pretrain", "smoke_pretrain", {"out_dir": f"{root}/ddp", "epochs": 1, "batch_size": 16,
                                                   "data": {"num_examples": 32}, "logging": {"progress": False}})  # fmt: skip
        T.run(c, "pretrain")
        E.run({"method": "ttt_mae.ttt", "profile": "smoke", "out_dir": f"{root}/ttt", "cache_dir": cache,
               "progress": False, "benchmark": {"corruptions": ["fog"], "num_examples": 3}})  # fmt: skip
    finally:
        dist.destroy_process_group()


def _two_rank_initial_loss(root: str) -> float:
    from tttlab.ttt_mae import train as T
    from tttlab.ttt_mae.common import compose, normalization
    from tttlab.ttt_mae.views import Normalizer, to_unit

    c = compose("pretrain", "smoke_pretrain", {"out_dir": f"{root}/ref", "epochs": 1, "batch_size": 16,
                                               "data": {"num_examples": 32}})  # fmt: skip
    ds = T.load_dataset(c)
    torch.manual_seed(int(c["seed"]))
    model = T.build(c, "pretrain")
    norm = Normalizer(*normalization(c, "mnist"))
    losses = []
    with torch.no_grad():
        for rank in (0, 1):
            g = T.epoch_generator(int(c["seed"]), 0, rank)
            images, _ = ds.take(T.shard_indices(len(ds), int(c["seed"]), 0, rank, 2)[:16])
            x = norm(T.augment(to_unit(images), c, g))
            noise = model.mask_noise(len(x), g)
            losses.append(float(model(x, mask_ratio=float(c["mask_ratio"]), noise=noise, mode="mae")))
    return float(np.mean(losses))


def test_two_gloo_processes_shard_ttt_and_train_ddp(tmp_path, smoke_cache):
    from tttlab.ttt_mae import evaluate as E

    cache = smoke_cache
    bench = {"corruptions": ["fog"], "num_examples": 3}
    single = E.run({"method": "ttt_mae.ttt", "profile": "smoke", "out_dir": str(tmp_path / "one"),
                    "cache_dir": cache, "progress": False, "benchmark": bench})  # fmt: skip
    # fork: the workers reuse the parent's imports (spawn would import torch and timm again in each)
    mp.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path), cache), nprocs=2, join=True, start_method="fork"
    )
    assert (tmp_path / "ddp" / "checkpoint.pth").exists()
    trained = load_records(tmp_path / "ddp", metric="train_loss")
    assert trained.n.tolist() == [32]  # 2 ranks x 1 step x 16 images
    # the recorded loss is the mean over both ranks' images (was rank 0's only): one step, so it is the
    # initial model's MAE loss on each rank's shard with that rank's masks
    assert trained.value.iloc[0] == pytest.approx(_two_rank_initial_loss(str(tmp_path)), rel=1e-5)
    images = tmp_path / "ttt" / "images"
    assert not list(images.glob("records-rank*.jsonl"))  # merged
    one = load_records(single.parent / "images")
    two = load_records(images)

    def key(df):
        return sorted(
            (r.corruption, r.extra["index"], tuple(r.extra["predictions"])) for r in df.itertuples()
        )

    assert key(one) == key(two) and len(two) == 3
    a, b = load_records(single), load_records(tmp_path / "ttt" / "records.jsonl")
    cols = ["metric", "corruption", "step", "value", "n"]
    a, b = a[a.metric != "s_per_image"][cols], b[b.metric != "s_per_image"][cols]
    a, b = a.sort_values(cols[:3]).reset_index(drop=True), b.sort_values(cols[:3]).reset_index(drop=True)
    assert a[["metric", "corruption", "step", "n"]].equals(b[["metric", "corruption", "step", "n"]])
    assert np.allclose(a.value.to_numpy(float), b.value.to_numpy(float), atol=1e-6)
