"""Adaptive batch size against the fixed-batch frontier, on a language whose critical batch grows.

Workload: an order-2 Markov language (``workloads.markov.MarkovLanguage``, vocabulary 16, windows
of 32 tokens) drawn fresh for every batch, so nothing is read twice and the held-out loss is the
training objective; its entropy rate H is known exactly, and every number here is the *excess*
loss over it, measured on 2048 held-out windows. The model predicts each token from the two
before it (embeddings of both, a 128-unit tanh layer): it can reach the floor, so the gradient
signal keeps shrinking against the noise and the critical batch grows as training proceeds.

1. **Frontier.** Fixed batches B in {8, ..., 256}, AdamW with a 50-step warm-up, each at its own
   learning rate: a grid {1/2, 1, 2} x the square-root rule 3e-3 sqrt(B / 32), picked on a
   tuning seed that is not reported (lowest excess loss at the example budget), then 3
   reported seeds, which train on to twice the budget. At each excess-loss target L the steps
   S_B(L) (first crossing of the held-out curve, interpolated in log loss between evaluations)
   are fitted with
   McCandlish et al. (2018): S = S_min (1 + B_crit / B), so E = B S = E_min (1 + B / B_crit).
   Accepted only if the fitted B_crit grows >= 8x between the first and last targets fitted.
   B_simple(L) is measured beside it with GradStats on 512 fresh windows at every evaluation
   of the B = 32 runs.
2. **Adaptive arms**, 5 seeds each: ``BatchSizeController`` (micro-batch 8, accumulation up to
   32, shrinking allowed, hysteresis 25%) at B = m B_noise for m in {1/8, 1/4, 1/2, 1}, its
   noise scale the running ``NoiseScale`` over the last 128 micro-batches' GradStats
   (1024 examples); and a square-root schedule B = 8 sqrt(1 + e / e_0) with no measurement. Each
   step's learning rate is the tuned rate of its batch size (interpolated in log B).

Verdict at the final target (the median excess loss the B = 8 runs reach with the budget:
the smallest batch, which uses examples best; every run trains on to twice the budget, so
larger batches and the arms reach it too): an arm passes when it reaches it with <= 0.75x the steps
and <= 1.10x the examples of B = 8 (Merrill et al.'s warm-up claim, as the issue states it),
and where its (S, E) point lies against the frontier fitted at that target: McCandlish's curve
is (S / S_min - 1)(E / E_min - 1) = 1, so a value <= 1 is on or beyond it.

    python benchmarks/adaptive_batch.py            # full: 16 min on 2 cores, tuning cached
    python benchmarks/adaptive_batch.py --retune   # tune the rates again (+2.5 min)
    python benchmarks/adaptive_batch.py --quick    # 3 batch sizes, 1 seed, small budget

Writes benchmarks/results/adaptive_batch[_quick].json and .png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.control import BatchSizeController
from gradnoise.stats import GradStats
from gradnoise.stats.running import NoiseScale
from gradnoise.workloads.markov import MarkovLanguage

OUT = Path(__file__).parent / "results"
VOCAB, CONTEXT, MICRO, WARMUP, LR0, B0 = 16, 32, 8, 50, 3e-3, 32
FULL = {
    "batches": (8, 16, 32, 64, 128, 256),
    "grid": (0.5, 1.0, 2.0),
    "seeds": (0, 1, 2),
    "arm_seeds": (0, 1, 2, 3, 4),
    "budget": 65_536,
    "eval_every": 1024,
    "multiples": (0.125, 0.25, 0.5, 1.0),
}
QUICK = {
    "batches": (8, 32, 128),
    "grid": (1.0,),
    "seeds": (0,),
    "arm_seeds": (0,),
    "budget": 8_192,
    "eval_every": 512,
    "multiples": (0.25,),
}
TUNING_SEED = 100


class PairModel(nn.Module):
    """Predicts token t from tokens t-2 and t-1: enough to reach the chain's entropy rate."""

    def __init__(self, dim: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.first, self.second = nn.Embedding(VOCAB, dim), nn.Embedding(VOCAB, dim)
        self.hidden, self.out = nn.Linear(2 * dim, hidden), nn.Linear(hidden, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pairs = torch.cat([self.first(tokens[:, :-2]), self.second(tokens[:, 1:-1])], -1)
        return self.out(torch.tanh(self.hidden(pairs)))


def window_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the windows' predicted tokens (each has two predecessors)."""
    return F.cross_entropy(model(tokens).flatten(0, 1), tokens[:, 2:].flatten())


class Task:
    """The language, its entropy rate and the held-out windows (the same for every run)."""

    def __init__(self) -> None:
        self.language = MarkovLanguage.build(VOCAB, seed=0)
        self.floor = self.language.entropy_rate
        held = torch.Generator().manual_seed(999)
        self.held_out = self.language.sample(2048, CONTEXT, generator=held)

    def excess(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float(window_loss(model, self.held_out)) - self.floor


def tuned_lr(batch: float, rates: dict[int, float]) -> float:
    """The tuned rate of ``batch``, log-log interpolated between the tuned batch sizes."""
    sizes = sorted(rates)
    if batch <= sizes[0]:
        return rates[sizes[0]]
    if batch >= sizes[-1]:
        return rates[sizes[-1]]
    for low, high in itertools.pairwise(sizes):
        if low <= batch <= high:
            t = math.log(batch / low) / math.log(high / low)
            return math.exp((1 - t) * math.log(rates[low]) + t * math.log(rates[high]))
    raise AssertionError("unreachable")


def run(spec: dict) -> dict:
    """One training run; ``spec['kind']`` is ``fixed``, ``controller`` or ``sqrt``."""
    torch.set_num_threads(1)
    task, cfg = Task(), spec["cfg"]
    torch.manual_seed(spec["seed"])
    model = PairModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    stream = torch.Generator().manual_seed(10_000 + spec["seed"])
    probe = torch.Generator().manual_seed(20_000 + spec["seed"])
    noise = NoiseScale(window=128)  # micro-batches: 1024 examples
    controller = None
    if spec["kind"] == "controller":
        controller = BatchSizeController(
            micro_batch=MICRO,
            target_multiple=spec["multiple"],
            max_accumulation=256 // MICRO,
            grow_only=False,
            hysteresis=0.25,
            warmup=10,
            lr_rule="none",
        )
    curve, seen, steps, next_eval, batch = [], 0, 0, 0, MICRO
    start = time.perf_counter()
    horizon = cfg["budget"] * spec.get("horizon", 2)
    while seen < horizon:
        if seen >= next_eval:
            point = {"steps": steps, "examples": seen, "excess": task.excess(model)}
            if spec.get("probe"):
                point["b_simple"] = probe_b_simple(model, task, probe)
            curve.append(point)
            next_eval += cfg["eval_every"]
        batch = batch_size(spec, controller, seen, cfg)
        lr = spec["lr"] if spec["kind"] == "fixed" else tuned_lr(batch, spec["rates"])
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (steps + 1) / WARMUP)
        optimizer.zero_grad()
        # the step's windows are drawn at once, as for a fixed batch, then accumulated
        step_tokens = task.language.sample(batch, CONTEXT, generator=stream)
        if controller is None:
            window_loss(model, step_tokens).backward()
        else:
            for tokens in step_tokens.split(MICRO):
                # the step's loss is the mean over all its windows: each window weighs 1 / batch
                with GradStats(model, loss_reduction="weighted") as stats:
                    stats.set_example_weights(torch.full((MICRO,), 1.0 / batch))
                    (window_loss(model, tokens) / (batch // MICRO)).backward()
                noise.update(stats)
        optimizer.step()
        if controller is not None:
            controller.update(noise.estimate())
        seen, steps = seen + batch, steps + 1
    curve.append({"steps": steps, "examples": seen, "excess": task.excess(model)})
    return {
        **{k: v for k, v in spec.items() if k not in ("cfg", "rates")},
        "curve": curve,
        "seconds": time.perf_counter() - start,
    }


def batch_size(spec: dict, controller, seen: int, cfg: dict) -> int:
    if spec["kind"] == "fixed":
        return spec["batch"]
    if spec["kind"] == "sqrt":
        grown = MICRO * math.sqrt(1 + seen / (cfg["budget"] / 64))  # 64 at the budget
        return int(min(256, max(MICRO, MICRO * round(grown / MICRO))))
    return controller.decision().batch_size


def probe_b_simple(model: nn.Module, task: Task, generator: torch.Generator) -> float:
    """This batch's B_simple from the per-example norms of 512 fresh windows (no update)."""
    tokens = task.language.sample(512, CONTEXT, generator=generator)
    model.zero_grad()
    with GradStats(model) as stats:
        window_loss(model, tokens).backward()
    model.zero_grad()
    return stats.noise_scale().b_simple


# ----------------------------------------------------------------------------- analysis
def crossing(curve: list[dict], target: float) -> dict | None:
    """Steps and examples at the first crossing of ``target`` by the running minimum of the
    held-out curve, interpolated linearly in log(excess) between the two evaluations."""
    best = math.inf
    previous = None
    for point in curve:
        level = min(best, point["excess"])
        if level <= target:
            if previous is None or previous[1] <= 0 or level <= 0:
                return {"steps": point["steps"], "examples": point["examples"]}
            p, before = previous
            t = (math.log(before) - math.log(target)) / (math.log(before) - math.log(level))
            return {key: p[key] + t * (point[key] - p[key]) for key in ("steps", "examples")}
        best = level
        previous = (point, best)
    return None


def fit_frontier(points: dict[int, float]) -> dict | None:
    """Least squares of S = S_min + (S_min B_crit) / B over the batch sizes that reached."""
    if len(points) < 3:
        return None
    xs = [1.0 / b for b in points]
    ys = list(points.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    s_min = my - slope * mx
    if s_min <= 0 or slope <= 0:
        return {"s_min": s_min, "b_crit": math.nan, "valid": False}
    return {"s_min": s_min, "b_crit": slope / s_min, "e_min": slope, "valid": True}


def median_interval(values: list[float]) -> dict:
    values = sorted(v for v in values if v is not None and math.isfinite(v))
    if not values:
        return {"median": None, "low": None, "high": None, "n": 0}
    return {
        "median": statistics.median(values),
        "low": values[0],
        "high": values[-1],
        "n": len(values),
    }


def level_at(curve: list[dict], examples: float) -> float:
    """The running minimum of the held-out excess loss over evaluations up to ``examples``."""
    return min(p["excess"] for p in curve if p["examples"] <= examples)


def analyse(fixed: dict[int, list[dict]], arms: dict[str, list[dict]], cfg: dict) -> dict:
    # what the smallest batch reaches with the budget; every run trains on for twice as long,
    # so larger batches reach it too and the frontier can be fitted there
    final = statistics.median(level_at(r["curve"], cfg["budget"]) for r in fixed[min(fixed)])
    start = max(statistics.median(r["curve"][1]["excess"] for r in fixed[min(fixed)]), final)
    targets = [start * (final / start) ** (k / 9) for k in range(10)]
    frontier = []
    for target in targets:
        steps = {}
        for batch, runs in fixed.items():
            hits = [crossing(r["curve"], target) for r in runs]
            if all(hits):
                steps[batch] = statistics.median(h["steps"] for h in hits)
        fit = fit_frontier(steps)
        frontier.append(
            {
                "target": target,
                "steps": steps,
                "fit": fit,
                "b_simple": b_simple_at(fixed.get(B0, []), target),
            }
        )
    valid = [f["fit"]["b_crit"] for f in frontier if f["fit"] and f["fit"]["valid"]]
    growth = valid[-1] / valid[0] if len(valid) >= 2 else math.nan
    baseline = [crossing(r["curve"], final) for r in fixed[min(fixed)]]
    base_steps = statistics.median(h["steps"] for h in baseline if h)
    base_examples = statistics.median(h["examples"] for h in baseline if h)
    last_fit = frontier[-1]["fit"]
    verdicts = {}
    for name, runs in arms.items():
        hits = [crossing(r["curve"], final) for r in runs]
        reached = [h for h in hits if h]
        steps = median_interval([h["steps"] / base_steps for h in reached])
        examples = median_interval([h["examples"] / base_examples for h in reached])
        position = None
        if last_fit and last_fit["valid"] and reached:
            values = [
                (h["steps"] / last_fit["s_min"] - 1) * (h["examples"] / last_fit["e_min"] - 1)
                for h in reached
            ]
            position = median_interval(values)
        point = (
            (
                statistics.median(h["steps"] for h in reached),
                statistics.median(h["examples"] for h in reached),
            )
            if reached
            else None
        )
        passed = (
            len(reached) == len(runs)
            and steps["median"] is not None
            and steps["median"] <= 0.75
            and examples["median"] <= 1.10
        )
        verdicts[name] = {
            "reached": f"{len(reached)}/{len(runs)}",
            "steps_ratio": steps,
            "examples_ratio": examples,
            "frontier_product": position,
            "dominated_by": dominated_by(point, fixed, final),
            "passes": passed,
        }
    return {
        "final_target": final,
        "targets": targets,
        "frontier": frontier,
        "b_crit_growth": growth,
        "workload_accepted": bool(growth >= 8),
        "baseline": {"batch": min(fixed), "steps": base_steps, "examples": base_examples},
        "arms": verdicts,
    }


def dominated_by(point, fixed: dict[int, list[dict]], target: float) -> list[int] | None:
    """The fixed batches whose median (steps, examples) to ``target`` are both at most the
    arm's: empty means the arm lies on or beyond the measured fixed-batch frontier (no fit
    needed, so it holds where B_crit is beyond the batch range)."""
    if point is None:
        return None
    beaten = []
    for batch, runs in sorted(fixed.items()):
        hits = [crossing(r["curve"], target) for r in runs]
        if not all(hits):
            continue
        steps = statistics.median(h["steps"] for h in hits)
        examples = statistics.median(h["examples"] for h in hits)
        if steps <= point[0] and examples <= point[1]:
            beaten.append(batch)
    return beaten


def b_simple_at(runs: list[dict], target: float) -> float | None:
    """Median over runs of the probed B_simple at the first evaluation at or below target."""
    values = []
    for r in runs:
        for point in r["curve"]:
            if point["excess"] <= target and point.get("b_simple") is not None:
                values.append(point["b_simple"])
                break
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else None


# ----------------------------------------------------------------------------- driving
def run_all(specs: list[dict], jobs: int) -> list[dict]:
    if jobs == 1:
        return [run(s) for s in specs]
    with get_context("spawn").Pool(jobs) as pool:
        return pool.map(run, specs, chunksize=1)  # one run at a time: no idle worker at the end


def tuning_settings(cfg: dict) -> dict:
    """What the tuned rates depend on (change the model or the task: run with --retune)."""
    keys = ("batches", "grid", "budget", "eval_every")
    return {k: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k] for k in keys} | {
        "lr0": LR0,
        "b0": B0,
        "seed": TUNING_SEED,
        "warmup": WARMUP,
        "torch": torch.__version__,
    }


def load_tuning(tuning: list[dict], cfg: dict, args) -> tuple[list[dict], bool]:
    """The tuning runs (with their curves) and whether they came from the cache, which is used
    when its settings match, else the runs are made (and cached, in the full mode)."""
    path = OUT / "adaptive_batch_tuning.json"
    if not (args.quick or args.retune) and path.exists():
        cached = json.loads(path.read_text())
        if cached["settings"] == tuning_settings(cfg):
            print(f"tuned rates from {path} (--retune to tune again)")
            return cached["runs"], True
    tuned = run_all(tuning, args.jobs)
    if not args.quick:
        runs = [{k: t[k] for k in ("batch", "lr", "grid", "curve")} for t in tuned]
        OUT.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": tuning_settings(cfg), "runs": runs}, indent=1))
    return tuned, False


def reanalyse(path: Path) -> None:
    """Recompute the analysis of a saved report from its runs (no training)."""
    report = json.loads(path.read_text())
    fixed: dict[int, list[dict]] = {}
    arms: dict[str, list[dict]] = {}
    for r in report["runs"]:
        if r["kind"] == "fixed":
            fixed.setdefault(r["batch"], []).append(r)
        else:
            name = "sqrt_schedule" if r["kind"] == "sqrt" else f"controller_m{r['multiple']:g}"
            arms.setdefault(name, []).append(r)
    report["analysis"] = analyse(fixed, arms, report["config"])
    path.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, path.with_suffix(".png"))
    print_summary(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--reanalyse", type=Path, help="a saved JSON: recompute its analysis")
    parser.add_argument("--retune", action="store_true", help="tune even if a cache matches")
    args = parser.parse_args()
    if args.reanalyse is not None:
        reanalyse(args.reanalyse)
        return
    cfg = QUICK if args.quick else FULL
    start = time.perf_counter()
    tuning = [
        {
            "kind": "fixed",
            "batch": b,
            "lr": LR0 * math.sqrt(b / B0) * g,
            "seed": TUNING_SEED,
            "grid": g,
            "cfg": cfg,
            "horizon": 1,  # the rate is picked by the excess loss at the budget
        }
        for b in cfg["batches"]
        for g in cfg["grid"]
    ]
    tuned, tuning_cached = (
        load_tuning(tuning, cfg, args) if len(cfg["grid"]) > 1 else (tuning, False)
    )
    tuning_seconds = time.perf_counter() - start
    rates = {}
    for b in cfg["batches"]:
        candidates = [t for t in tuned if t["batch"] == b]
        best = min(candidates, key=lambda t: t["curve"][-1]["excess"] if "curve" in t else 0)
        rates[b] = best["lr"]
    fixed_specs = [
        {"kind": "fixed", "batch": b, "lr": rates[b], "seed": s, "cfg": cfg, "probe": b == B0}
        for b in cfg["batches"]
        for s in cfg["seeds"]
    ]
    arm_specs = [
        {"kind": "controller", "multiple": m, "seed": s, "rates": rates, "cfg": cfg}
        for m in cfg["multiples"]
        for s in cfg["arm_seeds"]
    ] + [{"kind": "sqrt", "seed": s, "rates": rates, "cfg": cfg} for s in cfg["arm_seeds"]]
    results = run_all(arm_specs + fixed_specs, args.jobs)  # the long runs first
    fixed: dict[int, list[dict]] = {}
    arms: dict[str, list[dict]] = {}
    for r in results:
        if r["kind"] == "fixed":
            fixed.setdefault(r["batch"], []).append(r)
        else:
            name = "sqrt_schedule" if r["kind"] == "sqrt" else f"controller_m{r['multiple']:g}"
            arms.setdefault(name, []).append(r)
    report = {
        "benchmark": "adaptive_batch",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "tuned_rates": rates,
        "tuning": [
            {k: t[k] for k in ("batch", "lr", "grid")}
            | {"final_excess": t["curve"][-1]["excess"] if "curve" in t else None}
            for t in tuned
        ],
        "analysis": analyse(fixed, arms, cfg),
        "runs": results,
        "seconds": time.perf_counter() - start,
        "tuning_seconds": tuning_seconds,
        "tuning_cached": tuning_cached,
        "torch": torch.__version__,
    }
    suffix = "_quick" if args.quick else ""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"adaptive_batch{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, OUT / f"adaptive_batch{suffix}.png")
    print_summary(report)


def print_summary(report: dict) -> None:
    a = report["analysis"]
    print(
        f"final target (excess loss): {a['final_target']:.4f}; B_crit growth "
        f"{a['b_crit_growth']:.1f}x (accepted: {a['workload_accepted']})"
    )
    for f in a["frontier"]:
        fit = f["fit"] or {}
        print(
            f"  L={f['target']:.4f}: B_crit {fit.get('b_crit', math.nan):8.1f}  "
            f"B_simple {f['b_simple'] if f['b_simple'] is not None else math.nan:8.1f}  "
            f"steps {f['steps']}"
        )
    for name, v in a["arms"].items():
        print(
            f"  {name:20s} reached {v['reached']}  steps x{v['steps_ratio']['median']:.3f} "
            f"[{v['steps_ratio']['low']:.3f}, {v['steps_ratio']['high']:.3f}]  examples "
            f"x{v['examples_ratio']['median']:.3f} [{v['examples_ratio']['low']:.3f}, "
            f"{v['examples_ratio']['high']:.3f}]  dominated by fixed {v['dominated_by']}  "
            f"passes {v['passes']}"
        )
    print(f"{report['seconds']:.0f} s")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = report["analysis"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    targets = [f["target"] for f in a["frontier"]]
    crit = [
        f["fit"]["b_crit"] if f["fit"] and f["fit"]["valid"] else math.nan for f in a["frontier"]
    ]
    simple = [f["b_simple"] if f["b_simple"] is not None else math.nan for f in a["frontier"]]
    left.plot(targets, crit, "o-", label="B_crit (frontier fit)")
    left.plot(targets, simple, "s--", label="B_simple (GradStats, B=32 runs)")
    left.set(
        xscale="log",
        yscale="log",
        xlabel="held-out excess loss",
        ylabel="batch size",
        title="critical batch vs loss",
    )
    left.invert_xaxis()
    left.legend()
    final = a["final_target"]
    for run_ in report["runs"]:
        hit = crossing(run_["curve"], final)
        if hit is None:
            continue
        if run_["kind"] == "fixed":
            right.scatter(hit["examples"], hit["steps"], c="gray", s=12)
            right.annotate(str(run_["batch"]), (hit["examples"], hit["steps"]), fontsize=7)
        else:
            label = "sqrt" if run_["kind"] == "sqrt" else f"m={run_['multiple']:g}"
            right.scatter(hit["examples"], hit["steps"], s=18, label=label)
    fit = a["frontier"][-1]["fit"]
    if fit and fit["valid"]:
        bs = [2 ** (k / 4) for k in range(8, 37)]
        right.plot(
            [fit["e_min"] * (1 + b / fit["b_crit"]) for b in bs],
            [fit["s_min"] * (1 + fit["b_crit"] / b) for b in bs],
            "k-",
            lw=0.8,
            label="fitted frontier",
        )
    handles, labels = right.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    right.legend(unique.values(), unique.keys(), fontsize=7)
    right.set(
        xscale="log",
        yscale="log",
        xlabel="examples",
        ylabel="optimizer steps",
        title=f"to the final target (excess {final:.3f})",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
