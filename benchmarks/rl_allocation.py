"""Rollout allocation and advantages on a CPU verifiable-reward task, at equal rollout budget.

Every configuration (allocator x advantage) starts from the same supervised warm start per seed,
sees the same candidate prompts each step, and may spend at most ``--budget`` rollouts per step.
It records greedy test accuracy against cumulative rollouts, the fraction of sampled groups whose
rewards are all equal (zero-variance, no GRPO signal), and the measured policy-gradient variance
per rollout (trace of the per-rollout gradient covariance, from GradMoments).

    OMP_NUM_THREADS=1 python benchmarks/rl_allocation.py            # full run, a few minutes
    OMP_NUM_THREADS=1 python benchmarks/rl_allocation.py --quick    # smoke run, seconds

Writes benchmarks/results/rl_allocation.json and .png.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap

from gradnoise.rl import adaptive, advantages, allocators, bandits
from gradnoise.rl.aggregation import aggregation_weights
from gradnoise.rl.composite import SelectThenSample
from gradnoise.rl.loop import collect_rollouts, zero_variance_mask
from gradnoise.rl.tracker import ValueTracker
from gradnoise.stats.moments import GradMoments, total_moments
from gradnoise.stats.quantities import trace_covariance
from gradnoise.workloads import arithmetic as ar

OUT = Path(__file__).parent / "results"


def make_allocator(name: str, pool: int, prompts: int, group: int, seed: int):
    common = dict(seed=seed)

    def mixed():  # sample until a group holds one success and one failure, up to 2 x group
        return adaptive.ReinforceAda(
            pool, prompts, balanced=True, target=2, round_size=group // 2,
            max_samples=2 * group, **common,
        )  # fmt: skip

    table = {
        "uniform": lambda: allocators.Uniform(pool, prompts, **common),
        # DAPO over-samples to fill its batch: aim at 3/4 of the prompts so that, at equal
        # budget, it can replace up to a quarter of the groups that come back without signal
        "dapo": lambda: adaptive.DynamicSampling(
            pool, prompts * 3 // 4, group_size=group, **common
        ),
        "gvm": lambda: adaptive.GVM(pool, prompts, max_samples=4 * group, **common),
        "ada": lambda: adaptive.ReinforceAda(pool, prompts, target=group, **common),
        "ada_balanced": lambda: adaptive.ReinforceAda(
            pool, prompts, balanced=True, target=group, **common
        ),
        "vade": lambda: bandits.VADE(pool, prompts, **common),
        "vas": lambda: bandits.VarianceAwareSampling(pool, prompts, **common),
        # VADE picks the prompts; Reinforce-Ada balanced (one success and one failure) samples
        # within them in rounds of group/2 up to 2 x group; leftover budget tops up mixed groups
        "vade_balanced": lambda: SelectThenSample(bandits.VADE(pool, prompts, **common), mixed()),
        # ablation: the same within-prompt sampler on uniform's prompts (the first P candidates)
        "uniform_balanced": lambda: SelectThenSample(
            allocators.Uniform(pool, prompts, **common), mixed()
        ),
    }
    return table[name]()


def compute_advantages(name: str, rollouts, lengths, tracker: ValueTracker | None):
    r, sizes = rollouts.rewards.float(), rollouts.sizes
    if name == "grpo":
        return advantages.grpo_advantages(r, sizes)
    if name == "dr_grpo":
        return advantages.dr_grpo_advantages(r, sizes)
    if name == "rloo":
        return advantages.rloo_advantages(r, sizes)
    if name == "opo":
        return advantages.opo_advantages(r, lengths, sizes)
    if name == "bnpo":
        return advantages.bnpo_advantages(r, sizes)
    if name == "global":
        return advantages.global_baseline_advantages(r, sizes)
    values = tracker.values(rollouts.group_ids)
    return advantages.tracker_advantages(r, values, sizes)


def pg_loss(policy, prompts, completions, coef):
    """Surrogate ``-sum_i coef_i sum_t log pi(y_it)``; coef = aggregation weight x advantage."""
    logp = policy(prompts, completions).log_softmax(-1)
    tok = logp.gather(-1, completions.unsqueeze(-1)).squeeze(-1) * ar.completion_mask(completions)
    return -(coef * tok.sum(-1)).sum()


def rollout_variance(policy, prompts, completions, coef) -> tuple[float, float]:
    """Trace of the covariance of per-rollout gradient terms ``N coef_i grad sum_t log pi``, and
    the same divided by the squared norm of their mean (scale-free: advantages differ in scale)."""
    params = {k: v.detach() for k, v in policy.named_parameters()}

    def one(p, x, y, c):
        return pg_loss(lambda a, b: functional_call(policy, p, (a, b)), x[None], y[None], c[None])

    n = len(coef)
    per = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, prompts, completions, coef * n)
    moments = total_moments({k: GradMoments.from_per_example(v) for k, v in per.items()})
    trace = float(trace_covariance(moments))
    return trace, trace / max(float(moments.mean.pow(2).sum()), 1e-30)


def evaluate(policy, data, used):
    """(rollouts so far, greedy accuracy on the training prompts, on held-out prompts)."""
    return used, ar.accuracy(policy, data["train"])[0], ar.accuracy(policy, data["test"])[0]


def run_config(cfg, base_policy, data, cands, args, seed):
    alloc_name, adv_name = cfg.split("+")
    policy = copy.deepcopy(base_policy)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    pool = len(data["train"])
    allocator = make_allocator(alloc_name, pool, args.prompts, args.budget // args.prompts, seed)
    tracker = ValueTracker(pool) if adv_name == "spo" else None
    g = torch.Generator().manual_seed(1000 + seed)
    used, curve, zero_frac, variance = 0, [], [], []

    def sample(ids):
        comp = policy.sample(data["train"].prompts[ids], generator=g)
        return ar.exact_match(comp, data["train"].targets[ids]), comp

    for step in range(args.steps):
        if step % args.eval_every == 0:
            curve.append(evaluate(policy, data, used))
        ro = collect_rollouts(allocator, cands[step], args.budget, sample)
        comps = torch.cat(ro.payload)[ro.order]
        used += len(ro.rewards)
        zero = zero_variance_mask(ro.rewards, ro.sizes)
        zero_frac.append(zero.float().mean().item())
        lengths = ar.completion_mask(comps).sum(1)
        adv = compute_advantages(adv_name, ro, lengths, tracker).float()
        keep = (
            ~zero.repeat_interleave(ro.sizes)
            if alloc_name == "dapo"
            else torch.ones_like(adv).bool()
        )
        coef = torch.zeros_like(adv)
        if keep.any():  # DAPO may drop every group of a step: then no update
            coef[keep] = aggregation_weights(lengths[keep], "token_mean").float() * adv[keep]
        prompts = data["train"].prompts[ro.prompt_ids]
        if step % args.var_every == 0 and keep.sum() > 1:
            variance.append(rollout_variance(policy, prompts[keep], comps[keep], coef[keep]))
        if tracker is not None:
            tracker.update(ro.prompt_ids, ro.rewards)
        opt.zero_grad()
        pg_loss(policy, prompts, comps, coef).backward()
        opt.step()
    curve.append(evaluate(policy, data, used))
    return {
        "curve": curve,
        "zero_variance_fraction": statistics.fmean(zero_frac),
        "variance_per_rollout": statistics.median(v[0] for v in variance) if variance else None,
        "relative_variance_per_rollout": (
            statistics.median(v[1] for v in variance) if variance else None
        ),
    }


def warm_start(seed: int, args):
    """Supervised warm start on its own problems, so the RL pool's pass rates spread over (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sft = ar.make_problems(args.sft_size, generator=g)
    data = {
        "train": ar.make_problems(args.pool, generator=g),
        "test": ar.make_problems(args.test, generator=g),
    }
    policy = ar.TinyGRUPolicy()
    ar.supervised_warmup(policy, sft, steps=args.sft_steps, generator=g)
    cands = [torch.randperm(args.pool, generator=g)[: args.candidates] for _ in range(args.steps)]
    return policy, data, cands


def rollouts_to_reach(curve, target):
    return next((c[0] for c in curve if c[1] >= target), None)


def summarise(results, configs):
    seeds = sorted(results)
    uni = [statistics.fmean(c[1] for c in results[s]["uniform+grpo"]["curve"][-2:]) for s in seeds]
    target, total = statistics.fmean(uni), results[seeds[0]]["uniform+grpo"]["curve"][-1][0]
    out = {}
    for cfg in configs:
        runs = [results[s][cfg] for s in seeds]
        reach = [rollouts_to_reach(r["curve"], target) for r in runs]
        frac = [x / total if x is not None else None for x in reach]
        out[cfg] = {
            "final_accuracy": [r["curve"][-1][1] for r in runs],
            "final_heldout_accuracy": [r["curve"][-1][2] for r in runs],
            "rollouts_to_uniform_final_fraction": frac,
            "zero_variance_fraction": [r["zero_variance_fraction"] for r in runs],
            "variance_per_rollout": [r["variance_per_rollout"] for r in runs],
            "relative_variance_per_rollout": [r["relative_variance_per_rollout"] for r in runs],
        }
    base = statistics.median(out["uniform+grpo"]["zero_variance_fraction"])
    for s in out.values():
        s["zero_variance_drop_vs_uniform"] = base / statistics.median(s["zero_variance_fraction"])
        reached = [f for f in s["rollouts_to_uniform_final_fraction"] if f is not None]
        s["seeds_reaching_uniform_final"] = len(reached)
    return {"uniform_grpo_final_accuracy": target, "uniform_total_rollouts": total, "configs": out}


def plot(results, summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for i, (cfg, s) in enumerate(summary["configs"].items()):
        curves = [results[seed][cfg]["curve"] for seed in sorted(results)]
        xs = [c[0] for c in curves[0]]
        ys = [statistics.fmean(c[i][1] for c in curves if i < len(c)) for i in range(len(xs))]
        style = dict(lw=2.5 if cfg == "uniform+grpo" else 1.2, ls="--" if i >= 10 else "-")
        axes[0].plot(xs, ys, label=cfg, **style)  # the colour cycle repeats after 10 lines
        axes[1].bar(cfg, statistics.median(s["zero_variance_fraction"]))
        var = [v for v in s["relative_variance_per_rollout"] if v is not None]
        axes[2].bar(cfg, statistics.median(var) if var else 0)
    axes[0].axhline(summary["uniform_grpo_final_accuracy"], color="k", ls=":")
    axes[0].set(
        xlabel="rollouts (first seed's x)", ylabel="greedy accuracy, RL prompt pool (seed mean)"
    )
    axes[0].legend(fontsize=7)
    axes[1].set(ylabel="fraction of zero-variance groups (median)")
    axes[2].set(ylabel="tr Cov / ||mean||^2, per-rollout PG term (median)", yscale="log")
    for ax in axes[1:]:
        ax.tick_params(axis="x", rotation=75, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


CONFIGS = [
    "uniform+grpo",
    "uniform+dr_grpo",
    "uniform+rloo",
    "uniform+opo",
    "uniform+bnpo",
    "uniform+spo",
    "dapo+grpo",
    "gvm+grpo",
    "ada+global",
    "ada_balanced+global",
    "vade+grpo",
    "vas+grpo",
    "uniform_balanced+grpo",
    "vade_balanced+grpo",
]


def parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, few steps: a smoke run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--pool", type=int, default=256)
    ap.add_argument("--test", type=int, default=512)
    ap.add_argument("--sft-steps", type=int, default=800)
    ap.add_argument("--sft-size", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--var-every", type=int, default=25)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default=str(OUT / "rl_allocation"))
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.sft_steps, args.var_every = 1, 20, 100, 10
    return args


def main():
    args, start = parse(), time.time()
    configs = args.configs.split(",")
    results = {}
    for seed in range(args.seeds):
        policy, data, cands = warm_start(seed, args)
        results[seed] = {c: run_config(c, policy, data, cands, args, seed) for c in configs}
        print(f"seed {seed} done at {time.time() - start:.0f}s", flush=True)
    summary = summarise(results, configs)
    for cfg, s in summary["configs"].items():
        print(
            f"{cfg:22s} final {s['final_accuracy']} reach {s['rollouts_to_uniform_final_fraction']}"
            f" zero-var {[round(z, 3) for z in s['zero_variance_fraction']]}"
        )
    record = {
        "args": vars(args),
        "seconds": time.time() - start,
        "summary": summary,
        "runs": {str(k): v for k, v in results.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(record, indent=1))
    plot(results, summary, args.out + ".png")
    print(f"wrote {args.out}.json/.png in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
