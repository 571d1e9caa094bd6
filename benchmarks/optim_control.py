"""Noise-aware optimizers and the adaptive batch size on the built-in workloads.

Part 1 (optimizers): on the char-level LM and the image classifier, every optimizer of
gradnoise.optim against AdamW and SGD with momentum. Each gets a 4-point learning-rate grid
(center x {1/3, 1, 3, 9}) picked by the final held-out loss of seed 0, then seeds 1.. at the best
rate; all seeds at the best rate are reported (median and min..max).

Part 2 (adaptive batch): on the char LM, AdamW at fixed batches (sqrt LR rule from batch 16) for a
fixed example budget against the BatchSizeController (micro-batch 16, target = {1/4, 1/2, 1} x the
running Adam-preconditioned noise scale, sqrt LR rule), on the same budget. Does the adaptive run
reach the best fixed batch's final loss with >= 25% fewer optimizer steps and no more examples?

Counts: ``examples`` are data examples drawn; ``grad_evals`` are per-example gradients computed
(STORM and SVRG evaluate each batch twice, SVRG's snapshot adds an 8-batch gradient).

    OMP_NUM_THREADS=1 python benchmarks/optim_control.py            # full run, ~10-15 min, 2 cores
    OMP_NUM_THREADS=1 python benchmarks/optim_control.py --quick    # smoke run, about a minute

Writes benchmarks/results/optim_control[_quick].json and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from multiprocessing import get_context
from pathlib import Path

import torch

from gradnoise.control import BatchSizeController
from gradnoise.optim import MARS, STORM, SVRG, VRGD, NoiseAdaptive
from gradnoise.stats import GradStats
from gradnoise.stats.preconditioned import adam_preconditioner, precondition
from gradnoise.stats.running import NoiseScale
from gradnoise.workloads import get_workload

OUT = Path(__file__).parent / "results"
SNAPSHOT_EVERY, SNAPSHOT_BATCHES = 25, 8

# name: (factory(model, lr), how a step feeds it, grid center)
OPTIMIZERS = {
    "adamw": (
        lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0),
        "plain",
        3e-3,
    ),
    "sgdm": (lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), "plain", 0.1),
    "mars_adamw": (lambda m, lr: MARS(m.parameters(), lr=lr), "plain", 3e-3),
    "mars_lion": (lambda m, lr: MARS(m.parameters(), lr=lr, variant="lion"), "plain", 3e-4),
    "storm": (lambda m, lr: STORM(m.parameters(), lr=lr, a=0.1), "closure", 0.1),
    "svrg": (lambda m, lr: SVRG(m.parameters(), lr=lr, momentum=0.9), "svrg", 0.1),
    "noise_adaptive": (
        lambda m, lr: NoiseAdaptive(m.named_parameters(), lr=lr, base="adam"),
        "stats",
        3e-3,
    ),
    "vrgd": (lambda m, lr: VRGD(m.named_parameters(), lr=lr, gamma=0.1), "stats", 3e-3),
}


def eval_loss(workload, batches) -> float:
    with torch.no_grad():
        return statistics.fmean(float(workload.loss(workload.model, b)) for b in batches)


def held_out(name: str, size: int = 64, count: int = 2):
    # an unseen seed: new images (held out); for charlm, new windows of the same corpus
    stream = get_workload(name, batch_size=size, seed=10_000).batches
    return [next(stream) for _ in range(count)]


def optimizer_step(kind: str, w, opt, batch, step: int, batch_size: int) -> int:
    """One step of ``opt``; returns the per-example gradients it computed."""
    model = w.model

    def closure():
        opt.zero_grad()
        loss = w.loss(model, batch)
        loss.backward()
        return loss

    if kind == "plain":
        closure()
        opt.step()
        return batch_size
    if kind == "stats":
        opt.zero_grad()
        with GradStats(model, elementwise=True) as stats:
            w.loss(model, batch).backward()
        opt.step(moments=stats)
        return batch_size
    extra = 0
    if kind == "svrg" and step % SNAPSHOT_EVERY == 0:
        big = [next(w.batches) for _ in range(SNAPSHOT_BATCHES)]
        opt.snapshot(lambda: sum(w.loss(model, b) / len(big) for b in big).backward())
        extra = SNAPSHOT_BATCHES * batch_size
    opt.step(closure)
    return 2 * batch_size + extra


def run_optimizer(spec: dict) -> dict:
    torch.set_num_threads(1)
    w = get_workload(spec["workload"], batch_size=spec["batch"], seed=spec["seed"])
    factory, kind, _ = OPTIMIZERS[spec["optimizer"]]
    opt, evals = factory(w.model, spec["lr"]), held_out(spec["workload"])
    log = {k: [] for k in ("step", "examples", "grad_evals", "wall", "loss")}
    examples = grad_evals = 0
    start = time.perf_counter()
    for step in range(spec["steps"] + 1):
        if step % spec["eval_every"] == 0 or step == spec["steps"]:
            wall = time.perf_counter() - start
            for key, value in zip(
                log, (step, examples, grad_evals, wall, eval_loss(w, evals)), strict=True
            ):
                log[key].append(value)
            start = time.perf_counter() - wall  # evaluation time is not training time
        if step == spec["steps"]:
            break
        grad_evals += optimizer_step(kind, w, opt, next(w.batches), step, spec["batch"])
        examples += spec["batch"] * (1 + (kind == "svrg" and step % SNAPSHOT_EVERY == 0) * 8)
    final = log["loss"][-1]
    return {**spec, **log, "final": final if math.isfinite(final) else float("inf")}


def run_batch(spec: dict) -> dict:
    """AdamW on the char LM at a fixed batch, or (``adaptive``) under the BatchSizeController."""
    torch.set_num_threads(1)
    micro = spec["micro"]
    w = get_workload("charlm", batch_size=micro, seed=spec["seed"])
    opt, evals = (
        torch.optim.AdamW(w.model.parameters(), lr=spec["lr"], weight_decay=0),
        held_out("charlm"),
    )
    control = BatchSizeController(
        micro_batch=micro,
        target_multiple=spec["multiple"] or 1.0,  # unused by fixed runs
        lr_rule="sqrt",
        warmup=20,
        max_accumulation=8,
    )
    noise, accumulation = NoiseScale(beta=0.9), spec["accumulation"]
    log = {k: [] for k in ("step", "examples", "wall", "loss", "batch")}
    examples, step, start = 0, 0, time.perf_counter()
    while True:
        if step % spec["eval_every"] == 0 or examples >= spec["budget"]:
            wall = time.perf_counter() - start
            values = (step, examples, wall, eval_loss(w, evals), accumulation * micro)
            for key, value in zip(log, values, strict=True):
                log[key].append(value)
            start = time.perf_counter() - wall
        if examples >= spec["budget"]:
            break
        accumulation = min(accumulation, (spec["budget"] - examples) // micro)
        for micro_step in range(accumulation):
            batch = next(w.batches)
            if spec["adaptive"] and micro_step == 0:
                with GradStats(w.model, elementwise=True) as stats:
                    (w.loss(w.model, batch) / accumulation).backward()
                scales = adam_preconditioner(opt, w.model)
                noise.update(precondition(stats.moments(), scales))
            else:
                (w.loss(w.model, batch) / accumulation).backward()
        for group in opt.param_groups:
            group["lr"] = spec["lr"] * math.sqrt(accumulation * micro / 16)
        opt.step()
        opt.zero_grad()
        examples, step = examples + accumulation * micro, step + 1
        if spec["adaptive"]:
            accumulation = control.update(noise.estimate()).accumulation
    return {**spec, **log, "final": log["loss"][-1]}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def optimizer_specs(cfg: dict) -> list[dict]:
    specs = []
    for workload in ("charlm", "images"):
        for name, (_, _, center) in OPTIMIZERS.items():
            for factor in cfg["grid"]:
                base = {"workload": workload, "optimizer": name, "batch": 16, "seed": 0}
                specs.append({**base, "lr": center * factor, **cfg["train"][workload]})
    return specs


def best_rates(grid_runs: list[dict]) -> dict:
    best = {}
    for run in grid_runs:
        key = (run["workload"], run["optimizer"])
        if key not in best or run["final"] < best[key]["final"]:
            best[key] = run
    return best


def reach(run: dict, target: float) -> dict | None:
    """Step and examples at the first evaluation with loss <= ``target`` (None if never)."""
    for step, examples, loss in zip(run["step"], run["examples"], run["loss"], strict=True):
        if loss <= target:
            return {"step": step, "examples": examples}
    return None


def adaptive_report(runs: list[dict]) -> dict:
    fixed = {}
    for run in runs:
        if not run["adaptive"]:
            fixed.setdefault(run["accumulation"] * run["micro"], []).append(run)
    best_batch = min(fixed, key=lambda b: statistics.median(r["final"] for r in fixed[b]))
    baseline = {r["seed"]: r for r in fixed[best_batch]}
    rows = []
    for run in (r for r in runs if r["adaptive"]):
        base = baseline[run["seed"]]
        hit = reach(run, base["final"])
        rows.append(
            {
                "multiple": run["multiple"],
                "seed": run["seed"],
                "baseline_final": base["final"],
                "baseline_steps": base["step"][-1],
                "baseline_examples": base["examples"][-1],
                "adaptive_final": run["final"],
                "adaptive_steps": run["step"][-1],
                "reached_at": hit,
                "step_ratio": hit["step"] / base["step"][-1] if hit else None,
                "example_ratio": hit["examples"] / base["examples"][-1] if hit else None,
            }
        )
    finals = {b: summary([r["final"] for r in fixed[b]]) for b in sorted(fixed)}
    return {"best_fixed_batch": best_batch, "fixed_finals": finals, "per_seed": rows}


def batch_specs(cfg: dict) -> list[dict]:
    specs = []
    for seed in range(cfg["seeds"]):
        common = {"seed": seed, "micro": 16, "lr": 3e-3, **cfg["batch_run"]}
        for accumulation in cfg["fixed_accumulations"]:
            specs.append({**common, "accumulation": accumulation, "adaptive": False, "multiple": 0})
        for multiple in cfg["multiples"]:
            specs.append({**common, "accumulation": 1, "adaptive": True, "multiple": multiple})
    return specs


def optimizer_table(runs: list[dict], best: dict) -> dict:
    table = {}
    for (workload, name), grid_best in best.items():
        mine = [
            r
            for r in runs
            if (r["workload"], r["optimizer"], r["lr"]) == (workload, name, grid_best["lr"])
        ]
        adamw = [
            r
            for r in runs
            if (r["workload"], r["optimizer"]) == (workload, "adamw")
            and r["lr"] == best[(workload, "adamw")]["lr"]
        ]
        table.setdefault(workload, {})[name] = {
            "lr": grid_best["lr"],
            "final": summary([r["final"] for r in mine]),
            "minus_adamw": summary(
                [r["final"] - a["final"] for r in mine for a in adamw if a["seed"] == r["seed"]]
            ),
            "grad_evals": mine[0]["grad_evals"][-1],
            "wall": summary([r["wall"][-1] for r in mine]),
            "seeds": sorted(r["seed"] for r in mine),
        }
    return table


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(16, 13))
    for row, workload in enumerate(("charlm", "images")):
        for name, entry in result["optimizers"][workload].items():
            runs = [
                r
                for r in result["runs"]
                if (r["workload"], r["optimizer"], r["lr"]) == (workload, name, entry["lr"])
            ]
            for col, x in enumerate(("step", "grad_evals", "wall")):
                band(axes[row, col], runs, x, f"{name} lr={entry['lr']:.0e}")
        for col, x in enumerate(("optimizer steps", "per-example gradients", "wall seconds")):
            axes[row, col].set(xlabel=x, ylabel=f"{workload} held-out loss")
            if workload == "charlm":  # diverged runs (clipped at 10) would hide the rest
                axes[row, col].set_ylim(2.1, 3.2)
        axes[row, 0].legend(fontsize=7)
    for run_group in group_batch_runs(result["batch_runs"]).items():
        label, runs = run_group
        color = band(axes[2, 0], runs, "step", label, each=True)
        band(axes[2, 1], runs, "examples", label, each=True)
        batch_sizes(axes[2, 2], runs, label, color)
    axes[2, 0].set(xlabel="optimizer steps", ylabel="charlm held-out loss")
    axes[2, 1].set(xlabel="examples", ylabel="charlm held-out loss")
    axes[2, 2].set(xlabel="optimizer steps", ylabel="batch size (each seed)")
    axes[2, 2].legend(fontsize=7)
    axes[2, 0].legend(fontsize=7)
    fig.suptitle("median over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def band(ax, runs: list[dict], x: str, label: str, each: bool = False) -> str:
    """Median over seeds with a min..max band (up to the shortest run); ``each``: seeds too."""
    length = min(len(r["loss"]) for r in runs)
    xs = [statistics.median(r[x][i] for r in runs) for i in range(length)]
    columns = [[min(r["loss"][i], 10.0) for r in runs] for i in range(length)]
    (line,) = ax.plot(xs, [statistics.median(c) for c in columns], label=label)
    color = line.get_color()
    ax.fill_between(
        xs, [min(c) for c in columns], [max(c) for c in columns], alpha=0.2, color=color
    )
    for run in runs if each else []:
        ax.plot(run[x], run["loss"], color=color, alpha=0.35, linewidth=0.8)
    return color


def batch_sizes(ax, runs: list[dict], label: str, color: str) -> None:
    for i, run in enumerate(runs):
        ax.step(
            run["step"],
            run["batch"],
            where="post",
            color=color,
            alpha=0.7,
            label=label if i == 0 else None,
        )


def group_batch_runs(runs: list[dict]) -> dict:
    groups = {}
    for run in runs:
        fixed = f"fixed {run['accumulation'] * run['micro']}"
        label = f"adaptive {run['multiple']} x B_noise" if run["adaptive"] else fixed
        groups.setdefault(label, []).append(run)
    return groups


CONFIGS = {
    "full": {
        "grid": (1 / 3, 1.0, 3.0, 9.0),
        "seeds": 3,
        "train": {
            "charlm": {"steps": 120, "eval_every": 20},
            "images": {"steps": 200, "eval_every": 20},
        },
        "fixed_accumulations": (1, 2, 4),
        "multiples": (0.25, 0.5, 1.0),
        "batch_run": {"budget": 4800, "eval_every": 10},
    },
    "quick": {
        "grid": (1.0,),
        "seeds": 1,
        "train": {
            "charlm": {"steps": 10, "eval_every": 5},
            "images": {"steps": 10, "eval_every": 5},
        },
        "fixed_accumulations": (1, 2),
        "multiples": (0.5,),
        "batch_run": {"budget": 320, "eval_every": 5},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (about a minute)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--replot", type=Path, help="only redraw the PNG of a saved JSON")
    parser.add_argument("--batch-only", type=int, metavar="BUDGET", help="only part 2, longer")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return
    if args.batch_only:
        return batch_only(args.batch_only, args.jobs)
    cfg = CONFIGS["quick" if args.quick else "full"]
    started = time.perf_counter()
    with get_context("fork").Pool(args.jobs) as pool:
        batch_async = pool.map_async(run_batch, batch_specs(cfg), chunksize=1)
        grid = pool.map(run_optimizer, optimizer_specs(cfg), chunksize=1)
        best = best_rates(grid)
        more = [{**run_spec(b), "seed": s} for b in best.values() for s in range(1, cfg["seeds"])]
        runs = [r for r in grid] + pool.map(run_optimizer, more, chunksize=1)
        batch_runs = batch_async.get()
    result = {
        "config": {"mode": "quick" if args.quick else "full", **cfg, "jobs": args.jobs},
        "optimizers": optimizer_table(runs, best),
        "adaptive_batch": adaptive_report(batch_runs),
        "runs": runs,
        "batch_runs": batch_runs,
        "total_seconds": time.perf_counter() - started,
    }
    OUT.mkdir(exist_ok=True)
    stem = "optim_control_quick" if args.quick else "optim_control"
    (OUT / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, OUT / f"{stem}.png")
    print(
        json.dumps(
            {k: result[k] for k in ("optimizers", "adaptive_batch", "total_seconds")}, indent=1
        )
    )


def batch_only(budget: int, jobs: int) -> None:
    """Part 2 alone at another example budget: fixed 16 and 32 against m = 1/4 and 1/2."""
    cfg = {**CONFIGS["full"], "fixed_accumulations": (1, 2), "multiples": (0.25, 0.5)}
    cfg["batch_run"] = {"budget": budget, "eval_every": 10}
    started = time.perf_counter()
    with get_context("fork").Pool(jobs) as pool:
        batch_runs = pool.map(run_batch, batch_specs(cfg), chunksize=1)
    result = {
        "config": {"mode": "batch-only", **cfg, "jobs": jobs},
        "adaptive_batch": adaptive_report(batch_runs),
        "batch_runs": batch_runs,
        "total_seconds": time.perf_counter() - started,
    }
    path = OUT / f"optim_control_batch{budget}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result["adaptive_batch"], indent=1))


def run_spec(run: dict) -> dict:
    keys = ("workload", "optimizer", "batch", "seed", "lr", "steps", "eval_every")
    return {k: run[k] for k in keys}


if __name__ == "__main__":
    main()
