"""Sampled backprop (SampledLinear) on the W3-shaped GPT: memory, time, added variance, loss.

Model: ``gradnoise.testing.models.make_gpt`` (TinyGPT, vocab 1000, dim 256, 2 layers, T=128,
B=16, 13 linear layers). Data: the default workload's fresh synthetic language
(``gradnoise.workloads.markov.MarkovLanguage``, 32 tokens, order 2; every batch new), so the
SGD noise is that of a stream, not of memorization. Sampling: ``method="bernoulli"``,
``proposal="norm"`` (module docs of ``gradnoise.sampled``), one shared sample for layers
reading the same tensor (q, k, v).

Measured, per budget (fraction of rows kept) and for the budgets the rule picks at 10%:

* **saved activations for the linear layers' weight gradients**: bytes of the distinct storages
  autograd saves while a linear layer runs (``torch.autograd.graph.saved_tensors_hooks``,
  parameters left out), on one forward; and all saved tensors of the step;
* **peak RSS**: a fresh process per configuration builds the model and runs 3 SGD steps; the
  kernel's resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` just
  before) minus the resident size before, with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors
  leave RSS (as ``engine_overhead.py``), median of ``--repeats``; the parameters, gradients and
  every other tensor of the step are in it, alike for all configurations;
* **step time**: forward + backward, configurations interleaved round by round in one process,
  median over rounds of the ratio to the exact step of the same round;
* **added variance**: after ``--warm-steps`` exact AdamW steps, on one fixed batch: the SGD noise
  tr(Sigma)/B of every linear weight (GradStats), the sampled weight gradients of ``--draws``
  seeded backward passes (their sample trace variance, summed over the linear weights, with a
  standard error from the variance of the squared deviations), and the docstring formula;
* **loss**: AdamW (lr 1e-3) from scratch for ``--steps`` steps, ``--seeds`` seeds, held-out loss
  (64 fixed sequences) every 20 steps, for exact, fixed budgets and the rule (``choose_budgets``
  at 10%, re-run on the current batch every 50 steps; that step uses its exact gradient).

    python benchmarks/sampled_backprop.py [--quick] [--steps 240] [--seeds 3] [--draws 24]
        [--repeats 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from gradnoise.sampled import (
    added_variance,
    choose_budgets,
    inclusion_probabilities,
    record_rows,
    sample_linears,
)
from gradnoise.sampled.rows import kept_rows
from gradnoise.stats.quantities import trace_covariance
from gradnoise.testing.models import lm_loss, make_gpt
from gradnoise.workloads.markov import MarkovLanguage

BUDGETS = (0.9, 0.75, 0.5, 0.4, 0.25)
CURVE_BUDGETS = (0.5,)
FRACTION, BATCH, CONTEXT, VOCAB, LR, RULE_EVERY, EVAL_EVERY = 0.1, 16, 128, 32, 1e-3, 50, 20
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


def language() -> MarkovLanguage:
    return MarkovLanguage.build(VOCAB, seed=0)


def batch_of(lang: MarkovLanguage, generator: torch.Generator, count: int = BATCH):
    tokens = lang.sample(count, CONTEXT + 1, generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def build(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return make_gpt(BATCH)[0]


def sampled(model: nn.Module, budget, seed: int = 0) -> nn.Module:
    """A sampled copy of ``model`` (``budget`` None: the exact copy)."""
    model = copy.deepcopy(model)
    if budget is not None:
        sample_linears(model, budget, generator=torch.Generator().manual_seed(seed))
    return model


# ----------------------------------------------------------------------------- memory
def _never_unpacked(packed):
    """Unpack hook of a forward that is never differentiated (its graph is dropped unused)."""
    raise RuntimeError("this forward records what autograd saves; it cannot be differentiated")


def saved_bytes(model: nn.Module, batch) -> dict[str, int]:
    """Distinct storages autograd saves in one training forward (parameters left out): held
    only for linear layers (saved inside one and by no op outside), and all of them."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    depth, inside, outside = [0], {}, {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            (inside if depth[0] else outside)[storage.data_ptr()] = storage.nbytes()
        # keep the memory alive as autograd would, without the tensor: a saved output returned
        # as is would tie it to its own grad_fn, a cycle Python cannot collect
        return tensor.untyped_storage()

    enter = lambda *_: depth.__setitem__(0, depth[0] + 1)  # noqa: E731
    leave = lambda *_: depth.__setitem__(0, depth[0] - 1)  # noqa: E731
    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    with torch.autograd.graph.saved_tensors_hooks(pack, _never_unpacked):
        loss = lm_loss(model, *batch)
    for hook in hooks:
        hook.remove()
    del loss
    only_linear = {ptr: size for ptr, size in inside.items() if ptr not in outside}
    return {
        "linear_bytes": sum(only_linear.values()),
        "all_bytes": sum({**inside, **outside}.values()),
    }


def worker(config: str, steps: int) -> None:
    """Peak RSS of ``steps`` SGD steps of one configuration (run in a fresh process)."""
    torch.set_num_threads(1)
    budget = json.loads(config)
    toy = make_gpt(2, vocab=8, dim=8, layers=1, context=4)[0]  # load every code path first
    sample_linears(toy, 0.5)
    toy_batch = (torch.randint(0, 8, (2, 4)), torch.randint(0, 8, (2, 4)))
    torch.optim.SGD(toy.parameters(), lr=0.0).step()
    lm_loss(toy, *toy_batch).backward()
    lang, generator = language(), torch.Generator().manual_seed(0)
    batches = [batch_of(lang, generator) for _ in range(steps)]
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    model = sampled(build(0), budget)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        lm_loss(model, *batch).backward()
        opt.step()
    print(json.dumps({"peak_mb": (_status_kib("VmHWM") - base) / 1024}))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_rss(budget, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(budget), "--worker-steps", "3"],
            check=True,
            capture_output=True,
            text=True,
            env=WORKER_ENV,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])
    return {"peak_mb_median": statistics.median(runs), "peak_mb_runs": runs}


# ----------------------------------------------------------------------------- time
def step_times(models: dict[str, nn.Module], batch, rounds: int) -> dict[str, float]:
    """Median over rounds of (config step time / exact step time in the same round)."""
    ratios: dict[str, list[float]] = {name: [] for name in models}
    seconds: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for round_ in range(rounds + 1):
        took = {}
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            models[name].zero_grad(set_to_none=True)
            start = time.perf_counter()
            lm_loss(models[name], *batch).backward()
            took[name] = time.perf_counter() - start
        if round_:  # round 0 warms up
            for name in names:
                ratios[name].append(took[name] / took["exact"])
                seconds[name].append(took[name])
    return {
        name: {
            "ratio": statistics.median(ratios[name]),
            "ms": 1e3 * statistics.median(seconds[name]),
        }
        for name in names
    }


# ----------------------------------------------------------------------------- variance
def train_exact(model: nn.Module, steps: int, seed: int) -> nn.Module:
    lang, generator = language(), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        lm_loss(model, *batch_of(lang, generator)).backward()
        opt.step()
    return model


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def measured_variance(model: nn.Module, budget, batch, draws: int) -> dict:
    """Sample trace variance of the sampled linear weight gradients over seeded draws."""
    copy_ = sampled(model, budget, seed=123)
    weights = linear_weights(copy_)
    grads = []
    for _ in range(draws):
        copy_.zero_grad(set_to_none=True)
        lm_loss(copy_, *batch).backward()
        grads.append(torch.cat([w.grad.flatten() for w in weights.values()]).double())
    grads = torch.stack(grads)
    deviations = (grads - grads.mean(0)).pow(2).sum(1)
    return {
        "measured": float(deviations.sum() / (draws - 1)),
        "measured_se": float(deviations.std() / draws**0.5),
    }


def oracle_variance(a: torch.Tensor, g: torch.Tensor, budget: float) -> float:
    """Bernoulli variance with the scores ||a_r|| ||g_r|| (not available in a real forward)."""
    a, g = a.reshape(-1, a.shape[-1]).double(), g.reshape(-1, g.shape[-1]).double()
    sq = a.pow(2).sum(1) * g.pow(2).sum(1)
    pi = inclusion_probabilities(sq.sqrt(), kept_rows(budget, a.shape[0]))
    kept = pi > 0
    return float(((1 / pi[kept] - 1) * sq[kept]).sum())


def variance_study(model: nn.Module, batch, draws: int) -> tuple[dict, list[str], dict]:
    """SGD noise and added variance at every budget; returns (result, sampled layers, rule)."""
    model.zero_grad(set_to_none=True)
    recording = record_rows(model, lambda: lm_loss(model, *batch))
    rows = recording.rows
    layers = [n for n in rows if n not in recording.saved_elsewhere]
    sgd = {n: float(trace_covariance(m)) / BATCH for n, m in recording.stats.moments().items()}
    noise = sum(sgd[f"{n}.weight"] for n in layers)
    out = {
        "sampled_layers": layers,
        "left_exact": sorted(recording.saved_elsewhere),
        "sgd_noise_sampled_weights": noise,
        "sgd_noise_all_params": sum(sgd.values()),
    }
    per_budget = []
    for budget in BUDGETS:
        formula = sum(float(added_variance(*rows[n], budget)) for n in layers)
        mapping = dict.fromkeys(layers, budget)
        row = {
            "budget": budget,
            "formula": formula,
            **measured_variance(model, mapping, batch, draws),
        }
        row["formula_wta_crs"] = sum(
            float(added_variance(*rows[n], budget, method="wta-crs")) for n in layers
        )
        row["formula_oracle"] = sum(oracle_variance(*rows[n], budget) for n in layers)
        row["ratio_to_sgd"] = row["measured"] / noise
        row["ratio_to_sgd_se"] = row["measured_se"] / noise
        row["ratio_to_sgd_all_params"] = row["measured"] / out["sgd_noise_all_params"]
        per_budget.append(row)
        print(
            f"  budget {budget}: added/SGD noise {row['ratio_to_sgd']:.3f} "
            f"(+-{row['ratio_to_sgd_se']:.3f}; formula {formula / noise:.3f}, WTA-CRS "
            f"{row['formula_wta_crs'] / noise:.3f}, oracle {row['formula_oracle'] / noise:.3f})"
        )
    out["per_budget"] = per_budget
    out["per_layer_ratio_at_0.5"] = {
        n: float(added_variance(*rows[n], 0.5)) / sgd[f"{n}.weight"] for n in layers
    }
    model.zero_grad(set_to_none=True)
    rule = choose_budgets(model, lambda: lm_loss(model, *batch), fraction=FRACTION)
    mapping = {n: b.budget for n, b in rule.items() if b.budget < 1}
    out["rule"] = {
        "budgets": {n: b.budget for n, b in rule.items()},
        "formula_ratio": sum(b.added for b in rule.values()) / noise,
    }
    if mapping:
        measured = measured_variance(model, mapping, batch, draws)
        out["rule"].update(measured, ratio_to_sgd=measured["measured"] / noise)
    return out, layers, mapping


# ----------------------------------------------------------------------------- loss
def train_curve(budget, steps: int, seed: int, heldout) -> list[dict]:
    """Held-out loss every EVAL_EVERY steps; budget ``"rule"`` re-chooses every RULE_EVERY."""
    model = build(seed)
    if budget not in (None, "rule"):
        sample_linears(model, budget, generator=torch.Generator().manual_seed(seed))
    lang, generator = language(), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    curve, kept = [], []
    for step in range(steps + 1):
        if step % EVAL_EVERY == 0:
            with torch.no_grad():
                curve.append({"step": step, "heldout_loss": float(lm_loss(model, *heldout))})
        if step == steps:
            break
        batch = batch_of(lang, generator)
        opt.zero_grad(set_to_none=True)
        if budget == "rule" and step % RULE_EVERY == 0:
            rule = choose_budgets(model, lambda b=batch: lm_loss(model, *b), fraction=FRACTION)
            sample_linears(
                model,
                {n: b.budget for n, b in rule.items()},
                generator=torch.Generator().manual_seed(seed + step),
            )
            kept.append(statistics.mean(b.budget for b in rule.values()))
        else:
            lm_loss(model, *batch).backward()
        opt.step()
    if kept:
        curve[-1]["rule_mean_budgets"] = kept
    return curve


# ----------------------------------------------------------------------------- report
def verdict(result: dict) -> list[str]:
    memory = {row["config"]: row for row in result["memory"]}
    exact_bytes = memory["exact"]["linear_bytes"]
    lines = []
    under = [r for r in result["variance"]["per_budget"] if r["ratio_to_sgd"] <= FRACTION]
    for row in result["variance"]["per_budget"]:
        ratio = exact_bytes / memory[str(row["budget"])]["linear_bytes"]
        lines.append(
            f"budget {row['budget']}: {ratio:.2f}x less linear-layer activation memory, "
            f"added variance {100 * row['ratio_to_sgd']:.0f}% of tr(Sigma)/B"
        )
    met = [r for r in under if exact_bytes / memory[str(r["budget"])]["linear_bytes"] >= 2]
    rule_ratio = exact_bytes / memory["rule"]["linear_bytes"] if "rule" in memory else 1.0
    lines.append(
        f"the 10% rule keeps {rule_ratio:.2f}x less linear-layer activation memory; >= 2x at "
        f"<= 10% added variance: {'met' if met else 'NOT met'} on this task"
    )
    final = result["loss"]["final"]
    exact = final["exact"]
    for name, row in final.items():
        if name != "exact":
            inside = exact["min"] <= row["mean"] <= exact["max"]
            lines.append(
                f"{name}: final held-out loss {row['mean']:.4f} (seeds {row['min']:.4f}-"
                f"{row['max']:.4f}) vs exact {exact['mean']:.4f} ({exact['min']:.4f}-"
                f"{exact['max']:.4f}): {'inside' if inside else 'outside'} exact's "
                "seed spread"
            )
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    memory = {row["config"]: row for row in result["memory"]}
    exact_bytes = memory["exact"]["linear_bytes"]
    rows = result["variance"]["per_budget"]
    budgets = [r["budget"] for r in rows]
    axes[0].plot(
        budgets,
        [exact_bytes / memory[str(b)]["linear_bytes"] for b in budgets],
        "o-",
        label="linear-layer saved activations",
    )
    axes[0].plot(
        budgets,
        [memory["exact"]["all_bytes"] / memory[str(b)]["all_bytes"] for b in budgets],
        "s--",
        label="all saved tensors",
    )
    axes[0].axhline(2, color="tab:red", lw=0.8)
    axes[0].set(
        xlabel="budget (fraction of rows kept)",
        ylabel="x less memory than exact",
        title="W3 GPT: saved activations",
    )
    axes[0].legend()
    axes[1].errorbar(
        budgets,
        [r["ratio_to_sgd"] for r in rows],
        yerr=[2 * r["ratio_to_sgd_se"] for r in rows],
        fmt="o",
        label="measured (2 SE)",
    )
    axes[1].plot(
        budgets,
        [r["formula"] / result["variance"]["sgd_noise_sampled_weights"] for r in rows],
        "k:",
        label="docstring formula",
    )
    noise = result["variance"]["sgd_noise_sampled_weights"]
    for key, style, label in (
        ("formula_wta_crs", "--", "WTA-CRS formula"),
        ("formula_oracle", "-.", "oracle scores |a||g| formula"),
    ):
        axes[1].plot(budgets, [r[key] / noise for r in rows], style, label=label)
    axes[1].axhline(FRACTION, color="tab:red", lw=0.8, label="10% of tr(Sigma)/B")
    axes[1].set(
        xlabel="budget",
        ylabel="added variance / SGD noise tr(Sigma)/B",
        yscale="log",
        title="added variance, linear weights",
    )
    axes[1].legend()
    for name, runs in result["loss"]["curves"].items():
        steps = [p["step"] for p in runs[0]][2:]  # from step 40: the first drop flattens the rest
        values = torch.tensor([[p["heldout_loss"] for p in run][2:] for run in runs])
        line = axes[2].plot(steps, values.mean(0), label=name)[0]
        axes[2].fill_between(
            steps, values.min(0).values, values.max(0).values, alpha=0.2, color=line.get_color()
        )
    axes[2].axhline(result["loss_floor"], color="k", lw=0.8, ls="--", label="entropy floor")
    axes[2].set(
        xlabel="step",
        ylabel="held-out loss (nats)",
        title=f"loss, {len(runs)} seeds (band: min-max)",
    )
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker")
    parser.add_argument("--worker-steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run, under 2 minutes")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--draws", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warm-steps", type=int, default=150)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.worker_steps)
        return
    if args.quick:
        args.steps, args.seeds, args.draws, args.repeats, args.warm_steps = 20, 2, 4, 1, 5
    torch.set_num_threads(2)
    start = time.perf_counter()
    lang = language()
    batch = batch_of(lang, torch.Generator().manual_seed(99))
    print(f"warming up {args.warm_steps} exact steps; variance at that point")
    model = train_exact(build(0), args.warm_steps, seed=0)
    variance, layers, mapping = variance_study(model, batch, args.draws)
    configs = {"exact": None, **{str(b): dict.fromkeys(layers, b) for b in BUDGETS}}
    configs["rule"] = mapping or None
    memory = []
    for name, budget in configs.items():
        row = {"config": name, **saved_bytes(sampled(model, budget), batch)}
        if not args.quick or name in ("exact", "0.25"):
            row.update(peak_rss(budget, args.repeats))
        memory.append(row)
        rss = row.get("peak_mb_median", float("nan"))
        print(
            f"  {name}: linear-layer saved {row['linear_bytes'] / 2**20:.1f} MiB, all saved "
            f"{row['all_bytes'] / 2**20:.1f} MiB, peak RSS {rss:.1f} MB"
        )
    timing = step_times(
        {n: sampled(model, b) for n, b in configs.items()}, batch, rounds=3 if args.quick else 12
    )
    heldout = batch_of(lang, torch.Generator().manual_seed(10_000), count=64)
    curves = {}
    for name, budget in {
        "exact": None,
        **{str(b): b for b in CURVE_BUDGETS},
        "rule": "rule",
    }.items():
        curves[name] = [
            train_curve(budget, args.steps, seed, heldout) for seed in range(args.seeds)
        ]
        finals = [c[-1]["heldout_loss"] for c in curves[name]]
        print(f"  loss {name}: {statistics.mean(finals):.4f} ({min(finals):.4f}-{max(finals):.4f})")
    final = {}
    for name, runs in curves.items():
        f = [c[-1]["heldout_loss"] for c in runs]
        final[name] = {"mean": statistics.mean(f), "min": min(f), "max": max(f), "runs": f}
    result = {
        "model": "TinyGPT vocab 1000, dim 256, 2 layers, T=128, B=16, float32, 2 threads",
        "data": f"MarkovLanguage({VOCAB} tokens, seed 0), fresh batches",
        "loss_floor": lang.loss_floor(CONTEXT),
        "method": "bernoulli, proposal norm, shared samples; fixed budgets on every linear layer "
        "except those whose input another op saves anyway (attention's o after SDPA)",
        "quick": args.quick,
        "warm_steps": args.warm_steps,
        "draws": args.draws,
        "variance": variance,
        "memory": memory,
        "timing": timing,
        "loss": {
            "curves": curves,
            "final": final,
            "steps": args.steps,
            "seeds": args.seeds,
            "lr": LR,
            "rule_every": RULE_EVERY,
        },
    }
    result["verdict"] = verdict(result)
    result["seconds"] = time.perf_counter() - start
    print("\n".join(result["verdict"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "sampled_backprop_quick" if args.quick else "sampled_backprop"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{stem}.png")
    print(f"{result['seconds']:.0f} s; wrote {out / stem}.json/.png")


if __name__ == "__main__":
    main()
