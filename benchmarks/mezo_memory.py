"""Peak memory of MeZO vs inference vs backprop on the W3-shaped GPT, and MeZO's training loss.

Model: ``gradnoise.testing.models.make_gpt`` (TinyGPT, vocab 1000, dim 256, 2 layers, T=128),
batch 16, float32, CPU, one thread.

**How memory is measured.** Each configuration runs in a fresh Python process (``--worker``):
it imports torch, runs every configuration once on a toy model (so lazy imports and thread pools
exist before the baseline), reads its resident
high-water mark ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` as the baseline, then builds the
model and batch and runs ``--steps`` steps. The figure is ``ru_maxrss(after) - baseline``: the
peak resident memory the model, its batch and the step add on top of an idle torch process.
RSS (not a torch allocator counter) because CPU torch has no ``max_memory_allocated``; a fresh
process per configuration because ``ru_maxrss`` is a high-water mark that never goes down (the
parent's ``RUSAGE_CHILDREN`` would be the max over all children). Workers run with
``MALLOC_MMAP_THRESHOLD_=65536`` so glibc serves every tensor above 64 KB by ``mmap`` and returns it
on free: RSS then tracks live tensors instead of heap fragmentation (glibc's dynamic threshold
otherwise moves 1-8 MB tensors onto the heap after the first free). Each configuration is repeated
``--repeats`` times and the median is reported.

**Training.** In this process: MeZO on a small task (sequences over a 20-token sub-vocabulary,
so a model that learns the sub-vocabulary drops from ln(1000)=6.9 nats toward ln(20)=3.0); the
loss on a held-out batch is logged every few steps.

    python benchmarks/mezo_memory.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from gradnoise.optim import MeZO
from gradnoise.testing.models import lm_loss, make_gpt

WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
CONFIGS = ["inference", "mezo", "mezo_sparse", "mezo_momentum", "backprop_sgd", "backprop_adamw"]


def _step_fn(config: str, model, tokens, targets):
    loss = lambda: lm_loss(model, tokens, targets)  # noqa: E731
    if config == "inference":
        return torch.no_grad()(loss)
    if config.startswith("mezo"):
        options = {"mezo_sparse": {"density": 0.25}, "mezo_momentum": {"momentum": 0.9}}
        opt = MeZO(model.parameters(), lr=1e-4, **options.get(config, {}))
        return lambda: opt.step(loss)
    opt_cls = torch.optim.SGD if config == "backprop_sgd" else torch.optim.AdamW
    opt = opt_cls(model.parameters(), lr=1e-4)

    def backprop():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    return backprop


def _load_code_paths() -> None:
    """Run every code path once on a toy model, so lazy imports (torch.optim pulls in
    torch._dynamo on first step, ~50 MB of modules) land before the baseline, not in the figure."""
    model, (tokens, targets), _ = make_gpt(2, vocab=8, dim=8, layers=1, context=4)
    for config in CONFIGS:
        _step_fn(config, model, tokens, targets)()


def worker(config: str, steps: int) -> None:
    torch.set_num_threads(1)
    _load_code_paths()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, (tokens, targets), _ = make_gpt(16, generator=torch.Generator().manual_seed(0))
    step = _step_fn(config, model, tokens, targets)
    for _ in range(steps):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"config": config, "peak_mb": (peak - base) / 1024}))


def measure(config: str, steps: int, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--worker", config, "--steps", str(steps)],
            check=True, capture_output=True, text=True, env=WORKER_ENV,
        )  # fmt: skip
        runs.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])
    return {"config": config, "peak_mb_median": statistics.median(runs), "peak_mb_runs": runs}


def sub_vocabulary_batch(batch: int, generator: torch.Generator, words: int = 20):
    tokens = torch.randint(0, words, (batch, 129), generator=generator) * (1000 // words)
    return tokens[:, :-1], tokens[:, 1:]


def train(steps: int, lr: float, every: int) -> list[dict]:
    """MeZO on the sub-vocabulary task; held-out loss every ``every`` steps."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model, _, _ = make_gpt(16, generator=generator)
    held_out = sub_vocabulary_batch(16, torch.Generator().manual_seed(2))
    opt = MeZO(model.parameters(), lr=lr, eps=1e-3, seed=0)
    curve = []
    with torch.no_grad():
        for step in range(steps + 1):
            if step % every == 0:
                curve.append({"step": step, "held_out_loss": float(lm_loss(model, *held_out))})
            if step < steps:
                tokens, targets = sub_vocabulary_batch(16, generator)
                opt.step(lambda t=tokens, y=targets: lm_loss(model, t, y))
    return curve


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = results["memory"]
    left.bar([r["config"] for r in rows], [r["peak_mb_median"] for r in rows])
    left.set_ylabel("peak RSS added (MB, median)")
    left.set_title("W3 GPT, batch 16: peak memory")
    left.tick_params(axis="x", rotation=30)
    curve = results["training"]
    right.plot([c["step"] for c in curve], [c["held_out_loss"] for c in curve])
    right.set_xlabel("MeZO step")
    right.set_ylabel("held-out loss (nats)")
    right.set_title("MeZO on the 20-token sub-vocabulary task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=CONFIGS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 60 training steps")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    repeats, train_steps = (1, 60) if args.quick else (args.repeats, args.train_steps)
    start = time.perf_counter()
    memory = [measure(config, args.steps, repeats) for config in CONFIGS]
    inference = memory[0]["peak_mb_median"]
    for row in memory:
        row["ratio_to_inference"] = row["peak_mb_median"] / inference
        print(f"{row['config']:>15}: {row['peak_mb_median']:7.1f} MB  "
              f"{row['ratio_to_inference']:.2f}x inference")  # fmt: skip
    curve = train(train_steps, args.lr, every=max(1, train_steps // 20))
    print(
        f"MeZO held-out loss: {curve[0]['held_out_loss']:.3f} -> {curve[-1]['held_out_loss']:.3f}"
    )
    results = {
        "model": "TinyGPT vocab 1000, dim 256, 2 layers, T=128, batch 16, float32, 1 thread",
        "memory_method": "ru_maxrss(after steps) - ru_maxrss(after torch import), fresh process",
        "repeats": repeats,
        "memory": memory,
        "training": curve,
        "train_lr": args.lr,
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (
        "mezo_memory_quick" if args.quick else "mezo_memory"
    )  # --quick never overwrites full results
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    plot(results, out / f"{stem}.png")


if __name__ == "__main__":
    main()
