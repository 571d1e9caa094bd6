"""Overhead of NoiseScaleHook on a DDP training step (2 CPU processes, gloo).

Each rank holds three identical DDP replicas of an MLP: ``plain`` (DDP's built-in C++
all-reduce), ``python_hook`` (the same mean all-reduce as a Python comm hook: the floor for any
Python hook) and ``hooked`` (:class:`gradnoise.stats.distributed.NoiseScaleHook` plus ``record``
and ``NoiseScale.update`` every step, as a user would run them). Steps rotate between the three
(interleaved, so drifts in machine load hit all alike), each after a barrier; rank 0 times
forward + backward + optimizer step. Reported: median step times and the median of the per-round
ratios against ``plain``.

    python benchmarks/ddp_overhead.py [--quick] [--out benchmarks/results/ddp_overhead.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradnoise.stats.distributed import NoiseScaleHook
from gradnoise.stats.running import NoiseScale

WORLD = 2
VARIANTS = ("plain", "python_hook", "hooked")


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def python_allreduce(state, bucket):
    """DDP's mean all-reduce written as a Python comm hook (torch's ``allreduce_hook``)."""
    buffer = bucket.buffer().div_(WORLD)
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])


def timed_step(ddp, optimizer, x, y, after=None) -> float:
    dist.barrier()
    start = time.perf_counter()
    nn.functional.cross_entropy(ddp(x), y).backward()
    if after is not None:
        after()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    return time.perf_counter() - start


def worker(rank: int, port: int, config: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    base = make_model(config["width"], config["depth"])
    models = {k: nn.parallel.DistributedDataParallel(copy.deepcopy(base)) for k in VARIANTS}
    models["python_hook"].register_comm_hook(None, python_allreduce)
    hook, noise = NoiseScaleHook(models["hooked"]), NoiseScale()
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()}
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(config["batch"], config["width"], generator=gen)
    y = torch.randint(0, 10, (config["batch"],), generator=gen)
    afters = {"hooked": lambda: noise.update(hook.record(local_batch_size=config["batch"]))}
    times = {k: [] for k in VARIANTS}
    for step in range(config["warmup"] + config["steps"]):
        for k in VARIANTS:
            elapsed = timed_step(models[k], opts[k], x, y, afters.get(k))
            if step >= config["warmup"]:
                times[k].append(elapsed)
    if rank == 0:
        Path(out).write_text(json.dumps({**times, "b_simple": noise.estimate().b_simple}))
    dist.destroy_process_group()


def summarize(times: dict, config: dict) -> dict:
    ratios = {
        k: [t / p for t, p in zip(times[k], times["plain"], strict=True)] for k in VARIANTS[1:]
    }
    params = sum(p.numel() for p in make_model(config["width"], config["depth"]).parameters())
    return {
        "benchmark": "ddp_overhead",
        "config": {**config, "world_size": WORLD, "backend": "gloo", "parameters": params},
        "torch": torch.__version__,
        "median_step_s": {k: statistics.median(times[k]) for k in VARIANTS},
        "median_ratio_over_plain": {k: statistics.median(r) for k, r in ratios.items()},
        "ratio_quartiles": {k: statistics.quantiles(r, n=4) for k, r in ratios.items()},
        "rounds": len(times["plain"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps (a smoke run)")
    parser.add_argument("--out", default="benchmarks/results/ddp_overhead.json")
    parser.add_argument("--batch", type=int, default=256, help="examples per rank and step")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 150)")
    args = parser.parse_args()
    steps, warmup = (10, 3) if args.quick else (150, 10)
    steps = args.steps or steps
    config = {"width": 512, "depth": 4, "batch": args.batch, "steps": steps, "warmup": warmup}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "times.json"
        mp.spawn(worker, args=(port, config, str(raw)), nprocs=WORLD, join=True)
        times = json.loads(raw.read_text())
    result = summarize(times, config)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
