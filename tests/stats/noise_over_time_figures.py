"""The figures quoted in docs/noise_over_time.md (same problems and seeds as the tests).

OMP_NUM_THREADS=1 python -m tests.stats.noise_over_time_figures
"""

import math
import tempfile

import torch
import torch.multiprocessing as mp

import tests.stats.test_distributed as ddp_test
from gradnoise.stats.running import NoiseScale
from gradnoise.stats.twobatch import MicroBatchNorms
from gradnoise.testing.problems import LinearGaussian
from tests.stats.conftest import per_example_grads, step_moments

PROBLEM = LinearGaussian()  # B_simple = 17


def run(steps: int, batch: int, seed: int, **config) -> NoiseScale:
    noise = NoiseScale(**config)
    for record in step_moments(per_example_grads(PROBLEM, steps, batch, seed)):
        noise.update(record)
    return noise


def coverage() -> None:
    hits = {0.9: 0, 0.95: 0}
    for rep in range(200):
        noise = run(100, 16, 1000 + rep)
        for level in hits:
            reading = noise.estimate(confidence=level)
            hits[level] += reading.ci_low <= 17 <= reading.ci_high
    print("coverage, 200 runs (beta=0.95, 100 steps, B=16):", {k: v / 200 for k, v in hits.items()})


def accuracy() -> None:
    errors = [
        abs(run(400, 128, seed, window=400).estimate().b_simple / 17 - 1) for seed in range(20)
    ]
    print("window=400, B=128, seed 0:", run(400, 128, 0, window=400).estimate())
    print(f"20 seeds: median |rel err| {sorted(errors)[10]:.4f}, max {max(errors):.4f}")


def ratio_pitfall() -> None:
    traces, sqs = [], []
    for record in step_moments(per_example_grads(PROBLEM, 400, 16, 0)):
        one = NoiseScale(window=2)
        one.update(record)
        reading = one.estimate()
        traces.append(reading.trace_sigma)
        sqs.append(reading.grad_sq_norm)
    ratios = [t / q for t, q in zip(traces, sqs, strict=True) if q > 0]
    print(
        f"B=16, 400 steps: ratio of averages {sum(traces) / sum(sqs):.2f}, mean of defined "
        f"per-step ratios {sum(ratios) / len(ratios):.2f}, steps with q <= 0: {400 - len(ratios)}"
    )


def accumulation() -> None:
    estimates, covered = [], 0
    for seed in range(20):
        model, noise = PROBLEM.model(), NoiseScale(window=300)
        gen = torch.Generator().manual_seed(seed)
        with MicroBatchNorms(model) as micro:
            for _ in range(300):
                for _ in range(4):
                    x, y = PROBLEM.sample(16, generator=gen)
                    (PROBLEM.loss(model, x, y) / 4).backward()
                noise.update(micro.record(micro_batch_size=16))
                model.zero_grad()
        reading = noise.estimate()
        estimates.append(reading.b_simple)
        covered += reading.ci_low < 17 < reading.ci_high
    t = torch.tensor(estimates)
    print(
        f"accumulation K=4 b=16, 20 seeds: relative sd {float(t.std() / 17):.4f}, worst "
        f"{float((t - 17).abs().max() / 17):.4f}, 90% interval covered 17 in {covered}/20"
    )


def ddp_equality() -> None:
    reference = ddp_test.reference
    wrapped = getattr(reference, "_get_wrapped_function", None)
    records, _, reading = (wrapped() if wrapped else reference.__pytest_wrapped__.obj)()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(ddp_test._worker, args=(ddp_test._free_port(), out), nprocs=2, join=True)
        results = [torch.load(f"{out}/rank{r}.pt", weights_only=False) for r in range(2)]
    worst = 0.0
    for result in results:
        for got, want in zip(result["records"], records, strict=True):
            for name in want.small_sq_norms:
                for a, b in (
                    (got.small_sq_norms, want.small_sq_norms),
                    (got.big_sq_norms, want.big_sq_norms),
                ):
                    worst = max(worst, abs(float(a[name]) / float(b[name]) - 1))
        print("DDP b_simple", result["reading"].b_simple, "one process", reading.b_simple)
    print("largest relative difference of per-parameter norms:", worst, math.ulp(1.0))


if __name__ == "__main__":
    coverage()
    accuracy()
    ratio_pitfall()
    accumulation()
    ddp_equality()
