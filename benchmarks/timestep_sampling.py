"""Importance-sampled diffusion timesteps (TimestepSampler) against uniform timesteps.

Workload: ``gradnoise.workloads.diffusion``: DDPM epsilon-prediction (1000 steps, linear betas)
on a fresh 8-Gaussian mixture in 2-D (std 0.05 around the unit circle), the 37k-parameter
``Denoiser`` MLP, Adam (lr 1e-3), batch 64, K = 20 timestep buckets of 50 steps.

Methods, at equal batch size:

* ``uniform``: every timestep equally likely (the usual DDPM training);
* ``importance``: ``TimestepSampler(20, mix=0.2, smoothing=0.9)``: buckets drawn with
  p_k = 0.8 sqrt(m_k) / sum_j sqrt(m_j) + 0.2 / K, loss weights 1 / (K p_k), the estimates m_k of
  E_k ||grad l||^2 refreshed every step from the per-example squared norms GradStats gives in the
  training backward (no extra pass).

Measured per seed, every ``--every`` steps, at the current parameters:

* the **gradient variance at equal batch**: ``--draws`` fresh batches under each proposal
  (uniform, and the sampler's current one), each under GradStats; the unbiased tr(Sigma) of the
  per-example (weighted) gradients, over B, averaged over the draws (the trace variance of the
  minibatch gradient), with its standard error; the reduction is uniform / importance;
* the **held-out loss** on 4096 fixed (x0, t, noise) triples with uniform t: the real objective.

Verdict: the variance reduction (median over checkpoints after the first, and its range over
seeds), and the final held-out loss of each method with its seed spread.

    python benchmarks/timestep_sampling.py [--quick] [--steps 3000] [--seeds 5] [--draws 16]
        [--every 250] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from gradnoise import GradStats
from gradnoise.sampled import TimestepSampler
from gradnoise.stats.quantities import trace_covariance
from gradnoise.workloads.diffusion import DDPM, Denoiser, mixture, timesteps_in_buckets

K, BATCH, LR, MIX, SMOOTHING = 20, 64, 1e-3, 0.2, 0.9
DDPM_ = DDPM()


def draw(sampler: TimestepSampler, generator: torch.Generator):
    """One batch ``(x0, t, noise, buckets, weights)`` under the sampler's current proposal."""
    buckets, weights = sampler.sample(BATCH, generator=generator)
    x0 = mixture(BATCH, generator=generator)
    t = timesteps_in_buckets(buckets, K, DDPM_.steps, generator=generator)
    return x0, t, torch.randn(BATCH, 2, generator=generator), buckets, weights


def measured_step(model, batch):
    """Backward of the weighted mean loss under GradStats; ``(stats, loss)``."""
    x0, t, noise, _, weights = batch
    with GradStats(model) as stats:
        loss = (weights * DDPM_.losses(model, x0, t, noise)).mean()
        loss.backward()
    return stats, loss


def batch_variance(model, sampler: TimestepSampler, draws: int, generator) -> tuple[float, float]:
    """Mean over ``draws`` batches of tr(Sigma)/B (GradStats), and its standard error."""
    values = []
    for _ in range(draws):
        model.zero_grad(set_to_none=True)
        stats, _ = measured_step(model, draw(sampler, generator))
        trace = sum(float(trace_covariance(m)) for m in stats.moments().values())
        values.append(trace / BATCH)
    model.zero_grad(set_to_none=True)
    return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5


def run(method: str, seed: int, steps: int, every: int, draws: int, heldout) -> list[dict]:
    torch.manual_seed(seed)
    model = Denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    uniform = TimestepSampler(K)
    sampler = TimestepSampler(K, mix=MIX, smoothing=SMOOTHING) if method != "uniform" else uniform
    generator = torch.Generator().manual_seed(seed)
    probe = torch.Generator().manual_seed(50_000 + seed)
    curve = []
    for step in range(steps + 1):
        if step % every == 0:
            with torch.no_grad():
                point = {"step": step, "heldout_loss": float(DDPM_.losses(model, *heldout).mean())}
            if method != "uniform":
                u, u_se = batch_variance(model, uniform, draws, probe)
                i, i_se = batch_variance(model, sampler, draws, probe)
                point.update(
                    uniform_variance=u,
                    uniform_se=u_se,
                    importance_variance=i,
                    importance_se=i_se,
                    reduction=u / i,
                    max_weight=float(1 / (K * sampler.probs.min())),
                )
            curve.append(point)
        if step == steps:
            break
        batch = draw(sampler, generator)
        opt.zero_grad(set_to_none=True)
        stats, _ = measured_step(model, batch)
        if method != "uniform":
            sampler.update(batch[3], stats.total_sq_norms(), weights=batch[4])
        opt.step()
    curve[-1]["final_probs"] = sampler.probs.tolist()
    return curve


def summarize(runs: dict[str, list[list[dict]]]) -> dict:
    finals = {m: [c[-1]["heldout_loss"] for c in cs] for m, cs in runs.items()}
    per_seed = [statistics.median(p["reduction"] for p in c[1:]) for c in runs["importance"]]
    return {
        "final_heldout": {
            m: {"mean": statistics.mean(f), "min": min(f), "max": max(f), "runs": f}
            for m, f in finals.items()
        },
        "reduction_median_per_seed": per_seed,
    }


def verdict(summary: dict) -> list[str]:
    red = summary["reduction_median_per_seed"]
    fin = summary["final_heldout"]
    u, i = fin["uniform"], fin["importance"]
    lines = [
        f"variance reduction at equal batch (median over checkpoints): {min(red):.2f}-"
        f"{max(red):.2f}x over seeds ({'lower' if min(red) > 1 else 'NOT lower'} than uniform)",
        f"final held-out loss: importance {i['mean']:.5f} ({i['min']:.5f}-{i['max']:.5f}), "
        f"uniform {u['mean']:.5f} ({u['min']:.5f}-{u['max']:.5f}): "
        + ("no worse" if i["mean"] <= u["max"] else "WORSE than uniform's seed spread"),
    ]
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    colors = {"uniform": "tab:gray", "importance": "tab:blue"}
    for method, curves in result["runs"].items():
        for i, curve in enumerate(curves):
            steps = [p["step"] for p in curve][1:]  # step 0 (0.5) would flatten the rest
            axes[0].plot(
                steps,
                [p["heldout_loss"] for p in curve][1:],
                color=colors[method],
                label=method if i == 0 else None,
                alpha=0.8,
            )
    axes[0].set(
        xlabel="step",
        ylabel="held-out loss (uniform t)",
        title="held-out loss, every seed",
    )
    axes[0].legend()
    for i, curve in enumerate(result["runs"]["importance"]):
        steps = [p["step"] for p in curve]
        for key, color in (("uniform_variance", "tab:gray"), ("importance_variance", "tab:blue")):
            axes[1].errorbar(
                steps,
                [p[key] for p in curve],
                yerr=[2 * p[key.split("_")[0] + "_se"] for p in curve],
                color=color,
                label=key.split("_")[0] if i == 0 else None,
                alpha=0.7,
            )
        axes[2].plot(steps, [p["reduction"] for p in curve], color="tab:blue", alpha=0.7)
    axes[1].set(
        xlabel="step",
        ylabel="tr Var of the minibatch gradient",
        yscale="log",
        title="measured gradient variance at B=64 (2 SE)",
    )
    axes[1].legend()
    axes[2].axhline(1, color="k", lw=0.8)
    axes[2].set(xlabel="step", ylabel="uniform / importance", title="variance reduction, per seed")
    probs = result["runs"]["importance"][0][-1]["final_probs"]
    inset = axes[2].inset_axes([0.55, 0.55, 0.4, 0.35])
    inset.bar(range(K), probs)
    inset.set_title("final p_k (seed 0)", fontsize=8)
    inset.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.draws, args.every = 300, 3, 8, 100
    torch.set_num_threads(1)
    start = time.perf_counter()
    heldout = DDPM_.heldout(4096)
    runs = {m: [] for m in ("uniform", "importance")}
    for seed in range(args.seeds):
        for method in runs:
            runs[method].append(run(method, seed, args.steps, args.every, args.draws, heldout))
        print(
            f"seed {seed}: uniform {runs['uniform'][-1][-1]['heldout_loss']:.5f}, importance "
            f"{runs['importance'][-1][-1]['heldout_loss']:.5f}, reduction "
            f"{[round(p['reduction'], 2) for p in runs['importance'][-1]]}"
        )
    summary = summarize(runs)
    result = {
        "workload": "DDPM eps-prediction, 8-Gaussian mixture (std 0.05), Denoiser MLP 37k",
        "batch": BATCH,
        "lr": LR,
        "buckets": K,
        "mix": MIX,
        "smoothing": SMOOTHING,
        "steps": args.steps,
        "seeds": args.seeds,
        "draws": args.draws,
        "quick": args.quick,
        "runs": runs,
        "summary": summary,
        "verdict": verdict(summary),
        "seconds": time.perf_counter() - start,
    }
    print("\n".join(result["verdict"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "timestep_sampling_quick" if args.quick else "timestep_sampling"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{stem}.png")
    print(f"{result['seconds']:.0f} s; wrote {out / stem}.json/.png")


if __name__ == "__main__":
    main()
