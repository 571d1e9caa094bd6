"""The noise scale of an FSDP2-sharded transformer on 2 CPU processes (gloo, loopback only).

Every rank trains its shard on its own batches of a synthetic language (fresh data every step);
every 5th step is measured twice: by GradStats with ``gather_sharded`` (per-example norms of all
ranks' examples) and by the two-batch hook (no per-example norms). Run it directly; it spawns
its two processes itself (under ``torchrun --nproc-per-node 2`` call ``train()`` on each rank).
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

from gradnoise.stats.engine import GradStats
from gradnoise.stats.fsdp import FSDPNoiseScaleHook, gather_sharded
from gradnoise.stats.running import NoiseScale
from gradnoise.testing.models import lm_loss, make_gpt
from gradnoise.workloads.markov import MarkovLanguage

WORLD, LOCAL_BATCH, STEPS, EVERY = 2, 8, 60, 5
VOCAB, CONTEXT = 24, 32


def train(rank: int) -> None:
    torch.manual_seed(0)  # the same initial weights on every rank
    model, _, _ = make_gpt(LOCAL_BATCH, vocab=VOCAB, dim=32, layers=2, context=CONTEXT)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    hook = FSDPNoiseScaleHook(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    language = MarkovLanguage.build(VOCAB, seed=0)
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
    per_example, two_batch = NoiseScale(), NoiseScale()
    for step in range(1, STEPS + 1):
        sequences = language.sample(LOCAL_BATCH, CONTEXT + 1, generator=generator)
        tokens, targets = sequences[:, :-1], sequences[:, 1:]
        optimizer.zero_grad()
        if step % EVERY:
            lm_loss(model, tokens, targets).backward()
        else:
            with GradStats(model) as stats:
                lm_loss(model, tokens, targets).backward()
            per_example.update(gather_sharded(stats))
            two_batch.update(hook.record(local_batch_size=LOCAL_BATCH))
        optimizer.step()
    for name, noise in (("per-example (GradStats)", per_example), ("two-batch hook", two_batch)):
        reading = noise.estimate()
        if rank == 0:
            print(
                f"{name}: B_simple {reading.b_simple:.1f} "
                f"[{reading.ci_low:.1f}, {reading.ci_high:.1f}] over {noise.steps} steps"
            )


def _worker(rank: int, port: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        train(rank)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port,), nprocs=WORLD, join=True)
