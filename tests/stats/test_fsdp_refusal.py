"""FSDP2 (``fully_shard``) runs on CPU with gloo in this torch; GradStats refuses its sharded
parameters with a clear error instead of a misleading "no backward pass" (2 processes)."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradnoise.errors import UnsupportedModuleError
from gradnoise.stats.engine import GradStats

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
        fully_shard(model)
        model(torch.randn(4, 6)).pow(2).mean().backward()  # FSDP2 itself trains on CPU
        sharded = all(p.grad is not None for p in model.parameters())
        try:
            GradStats(model)
            message = "no error"
        except UnsupportedModuleError as error:
            message = str(error)
        if rank == 0:
            torch.save({"sharded_backward_ran": sharded, "message": message}, out)
    finally:
        dist.destroy_process_group()


def test_gradstats_refuses_fsdp2_shards_with_a_fix(tmp_path):
    out = tmp_path / "fsdp.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    result = torch.load(out)
    assert result["sharded_backward_ran"]
    assert result["message"].startswith(
        "GradStats parameter '0.weight': expected unsharded parameters"
    )
    assert "a DTensor shard (FSDP2 fully_shard" in result["message"]
    assert "Measure under DDP (gradnoise.stats.NoiseScaleHook)" in result["message"]
