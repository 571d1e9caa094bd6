"""The extra communication of gradnoise's FSDP2 measurements: bytes and time per measured step.

Two CPU processes (gloo, loopback), each with the same FSDP2-sharded W3-shaped GPT (``make_gpt``:
vocab 1000, d 256, 2 blocks, T 128; ``fully_shard`` per block and on the root), its own batch of
``--batch`` sequences, AdamW. Three step kinds rotate round by round (interleaved, each after a
barrier, timed on rank 0): ``plain`` (forward, backward, step), ``two_batch``
(:class:`~gradnoise.stats.fsdp.FSDPNoiseScaleHook` attached, ``record`` every step) and
``per_example`` (a ``GradStats`` block and :func:`~gradnoise.stats.fsdp.gather_sharded`).
gradnoise's own collectives are counted while they run (payload bytes each rank sends, and their
wall time), beside FSDP2's parameter traffic per step (two all-gathers and one reduce-scatter of
the parameters' bytes).

    python benchmarks/fsdp_comm.py [--quick] [--rounds 15] [--out benchmarks/results/fsdp_comm.json]

Loopback gloo measures the payload and the per-collective latency of this machine, not a
network: on NCCL over NVLink or InfiniBand the few-kilobyte collectives cost latency only.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradnoise.stats.engine import GradStats
from gradnoise.stats.fsdp import FSDPNoiseScaleHook, gather_sharded
from gradnoise.testing.models import lm_loss, make_gpt

WORLD = 2
KINDS = ("plain", "two_batch", "per_example")
HERE = Path(__file__).resolve().parent


class Traffic:
    """Counts gradnoise's collectives while :meth:`watch` is active (bytes sent, time)."""

    def __init__(self) -> None:
        self.calls, self.bytes, self.seconds = 0, 0, 0.0
        self._originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}

    @contextmanager
    def watch(self):
        def counted(name):
            original = self._originals[name]

            def call(tensor_or_list, *args, **kwargs):
                tensor = args[0] if name == "all_gather" else tensor_or_list
                self.calls += 1
                self.bytes += tensor.numel() * tensor.element_size()
                start = time.perf_counter()
                try:
                    return original(tensor_or_list, *args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            return call

        for name in self._originals:
            setattr(dist, name, counted(name))
        try:
            yield self
        finally:
            for name, original in self._originals.items():
                setattr(dist, name, original)


def _model(args):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model, _, _ = make_gpt(args.batch, dim=args.dim, context=args.context)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _batch(args, rank: int, step: int):
    generator = torch.Generator().manual_seed(10_000 * rank + step)
    tokens = torch.randint(0, 1000, (args.batch, args.context + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def _step(kind: str, model, optimizer, batch, traffic: Traffic) -> float:
    dist.barrier()
    start = time.perf_counter()
    optimizer.zero_grad()
    if kind == "per_example":
        with GradStats(model) as stats:
            lm_loss(model, *batch).backward()
        with traffic.watch():
            gather_sharded(stats).noise_scale()
    elif kind == "two_batch":
        hook = FSDPNoiseScaleHook(model)
        lm_loss(model, *batch).backward()
        with traffic.watch():
            hook.record(local_batch_size=len(batch[0]))
        hook.remove()
    else:
        lm_loss(model, *batch).backward()
    optimizer.step()
    return time.perf_counter() - start


def _worker(rank: int, port: int, args, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _model(args)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        params = sum(p.numel() * p.element_size() for p in model.parameters())  # DTensor: global
        traffic = {kind: Traffic() for kind in KINDS}
        times = {kind: [] for kind in KINDS}
        step = 0
        for kind in KINDS:  # warm-up, untimed
            _step(kind, model, optimizer, _batch(args, rank, step), Traffic())
            step += 1
        for round_ in range(args.rounds):
            order = KINDS[round_ % len(KINDS) :] + KINDS[: round_ % len(KINDS)]
            for kind in order:
                batch = _batch(args, rank, step)
                times[kind].append(_step(kind, model, optimizer, batch, traffic[kind]))
                step += 1
        if rank == 0:
            counts = {k: (t.calls, t.bytes, t.seconds) for k, t in traffic.items()}
            torch.save({"times": times, "traffic": counts, "param_bytes": params}, out)
    finally:
        dist.destroy_process_group()


def _summary(raw: dict, args) -> dict:
    times, traffic, rounds = raw["times"], raw["traffic"], args.rounds
    plain = times["plain"]
    rows = {}
    for kind in KINDS:
        ratios = [t / p for t, p in zip(times[kind], plain, strict=True)]
        calls, sent, seconds = traffic[kind]
        rows[kind] = {
            "median_step_s": statistics.median(times[kind]),
            "median_ratio_to_plain": statistics.median(ratios),
            "collectives_per_step": calls / rounds,
            "bytes_per_step": sent / rounds,
            "collective_ms_per_step": 1e3 * seconds / rounds,
        }
    fsdp_bytes = 3 * raw["param_bytes"]  # 2 all-gathers + 1 reduce-scatter of all parameters
    return {
        "benchmark": "fsdp_comm",
        "model": f"make_gpt(dim={args.dim}, context={args.context}), 2 blocks, fully_shard each",
        "world": WORLD,
        "local_batch": args.batch,
        "rounds": rounds,
        "fsdp_parameter_bytes_per_step": fsdp_bytes,
        "kinds": rows,
        "extra_bytes_share_of_fsdp": {
            kind: rows[kind]["bytes_per_step"] / fsdp_bytes for kind in KINDS if kind != "plain"
        },
        "torch": torch.__version__,
        "backend": "gloo (CPU, loopback)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 rounds")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fsdp_comm.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.dim, args.context, args.batch = 3, 32, 16, 4
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = str(Path(tmp) / "raw.pt")
        mp.spawn(_worker, args=(port, args, raw_path), nprocs=WORLD, join=True)
        raw = torch.load(raw_path, weights_only=False)
    report = _summary(raw, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for kind, row in report["kinds"].items():
        print(
            f"{kind:12s} step {row['median_step_s'] * 1e3:7.1f} ms"
            f"  x{row['median_ratio_to_plain']:.3f}  {row['collectives_per_step']:.0f} collectives,"
            f" {row['bytes_per_step']:.0f} B, {row['collective_ms_per_step']:.2f} ms"
        )
    fsdp_mib = report["fsdp_parameter_bytes_per_step"] / 2**20
    print(f"FSDP2's own parameter traffic: {fsdp_mib:.1f} MiB per step")


if __name__ == "__main__":
    main()
