"""torchrun-style runs with 2 gloo processes on CPU (spawned, env:// rendezvous)."""

import os
import socket

import numpy as np
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
