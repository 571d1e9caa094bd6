"""Importance sampling of examples by gradient norm against uniform sampling, at equal batch size.

Two tasks, each a fixed pool of 4096 examples with a held-out set of 2048 from the same source:

* ``images``: generated digit images (``workloads.images.digit_pool``: classes 8 and 9 five
  times rarer, a quarter of the images faint and noisy, no label noise; held-out scored on the
  true labels) and the image workload's CNN (8k parameters). Gradient norms differ because
  examples differ in difficulty, which changes as the model learns.
* ``regression``: x = s z, z ~ N(0, I_16), s log-normal (sigma 1.5), y = teacher(x) + N(0, 0.3^2),
  a 16-32-1 tanh MLP with squared error. Gradient norms differ mostly because of the input
  scale, which does not change as the model trains: the case importance sampling is built for.

SGD with momentum 0.9, B = 32, 1536 steps (12 epochs' worth), 3 seeds. Methods, each at its own
best learning rate from a 3-point grid per task (lowest mean final pool loss over the seeds):

* ``uniform``: random reshuffling (each epoch a permutation), the usual DataLoader;
* ``importance_visits``: ``ImportanceSampler(mix=0.2)`` whose scores are each example's gradient
  norm at its latest visit, measured by GradStats in the training backward (no extra pass);
  loss (w * losses).mean();
* ``importance_refresh``: the same, plus ``sampler.refresh`` with every example's norm (one
  GradStats pass over the pool) every 128 steps: 1x the training examples in extra compute.

Measured per seed, every 64 steps (before that step's refresh, so at the middle and the
stalest point of each refresh cycle): the training loss over the whole pool, held-out loss and
accuracy, and, with every example's gradient norm and the full-pool gradient (one GradStats pass
over the pool), the **exact** trace variance of the minibatch gradient under the sampler's
current proposal and under uniform draws (``exact_sampling_variance``; with-replacement formulas,
the finite-population factor (N - B)/(N - 1) = 0.99 is ignored), and the reduction the optimal
proposal p ~ ||g_i|| with fresh norms would give. Validity: the sampler's own one-batch
estimates (``importance_sampling_variance``), averaged over the steps before each checkpoint,
against the exact values. Verdict per method: variance reduction >= 2x from the second
checkpoint on, and final pool / held-out loss within the seed spread of uniform or better.

    python benchmarks/importance_sampling.py [--quick] [--seeds 3] [--tasks images,regression]
        [--refresh-every 128] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gradnoise import GradStats
from gradnoise.data import ImportanceSampler, exact_sampling_variance, importance_sampling_variance
from gradnoise.workloads.images import digit_classifier, digit_pool

POOL, HELDOUT, BATCH, STEPS, EVERY, MIX, REFRESH = 4096, 2048, 32, 1536, 64, 0.2, 128
METHODS = ("uniform", "importance_visits", "importance_refresh")


def pool_statistics(model, images, labels, loss_fn, chunk=1024):
    """Per-example squared gradient norms of every example, the full-pool mean gradient's
    squared norm, and the mean loss (one GradStats pass, sum reduction, in chunks)."""
    model.zero_grad(set_to_none=True)
    sq_norms, total_loss = [], 0.0
    for start in range(0, len(images), chunk):
        x, y = images[start : start + chunk], labels[start : start + chunk]
        with GradStats(model, loss_reduction="sum") as stats:
            loss = loss_fn(model(x), y).sum()
            loss.backward()
        sq_norms.append(stats.total_sq_norms().double())
        total_loss += float(loss.detach())
    n = len(images)
    full_sq = sum(float((p.grad.double() / n).pow(2).sum()) for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return torch.cat(sq_norms), full_sq, total_loss / n


@torch.no_grad()
def evaluate(model, images, labels, loss_fn) -> tuple[float, float | None]:
    """Held-out mean loss, and accuracy for a classifier (None for regression)."""
    out = model(images)
    accuracy = float((out.argmax(1) == labels).float().mean()) if out.shape[1] > 1 else None
    return float(loss_fn(out, labels).mean()), accuracy


def cross_entropy(out, y):
    return F.cross_entropy(out, y, reduction="none")


def squared_error(out, y):
    return (out - y).pow(2).sum(1)


def image_task() -> dict:
    """The digit pool (see the module docstring) and the image workload's CNN."""
    pool = digit_pool(POOL, generator=torch.Generator().manual_seed(100))
    heldout = digit_pool(HELDOUT, generator=torch.Generator().manual_seed(200))
    return {
        "pool": (pool.images, pool.labels),
        "heldout": (heldout.images, heldout.true_labels),
        "model": digit_classifier,
        "loss": cross_entropy,
        "learning_rates": (0.01, 0.03, 0.1),
    }


def scaled_inputs(count: int, generator: torch.Generator, teacher: torch.nn.Module):
    """x = s z with z ~ N(0, I_16) and a log-normal scale s (sigma 1.5), y = teacher(x) + noise."""
    z = torch.randn(count, 16, generator=generator)
    scale = torch.exp(1.5 * torch.randn(count, 1, generator=generator))
    x = scale * z
    with torch.no_grad():
        y = teacher(x) + 0.3 * torch.randn(count, 1, generator=generator)
    return x, y


def mlp(seed: int) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def regression_task() -> dict:
    """Regression whose per-example gradient scale is set by the input scale: structural
    heterogeneity that does not change as the model trains, so stale scores stay right."""
    teacher = mlp(999)
    return {
        "pool": scaled_inputs(POOL, torch.Generator().manual_seed(100), teacher),
        "heldout": scaled_inputs(HELDOUT, torch.Generator().manual_seed(200), teacher),
        "model": mlp,
        "loss": squared_error,
        "learning_rates": (0.003, 0.01, 0.03),
    }


TASKS = {"images": image_task, "regression": regression_task}


def uniform_batches(n, batch, seed):
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):
            yield order[start : start + batch], None


def importance_batches(sampler):
    while True:
        yield from ((torch.tensor(indices), sampler.weights(indices)) for indices in sampler)


def train(method: str, lr: float, seed: int, data: dict, steps: int, measure: bool) -> dict:
    images, labels = data["pool"]
    loss_fn = data["loss"]
    model = data["model"](seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sampler = ImportanceSampler(len(images), BATCH, mix=MIX, seed=seed)
    batches = (
        uniform_batches(len(images), BATCH, seed)
        if method == "uniform"
        else importance_batches(sampler)
    )
    curve, window = [], []
    for step in range(1, steps + 1):
        indices, weights = next(batches)
        w = torch.ones(BATCH, dtype=torch.float64) if weights is None else weights
        optimizer.zero_grad(set_to_none=True)
        with GradStats(model, loss_reduction="weighted") as stats:
            stats.set_example_weights(w.float() / BATCH)
            losses = loss_fn(model(images[indices]), labels[indices])
            (w.float() * losses).mean().backward()
        sq_norms = stats.total_sq_norms().double().clamp_min(0)
        if method != "uniform":
            sampler.update(indices, sq_norms.sqrt())
            mean_sq = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())
            window.append(importance_sampling_variance(sq_norms, w, mean_sq))
        optimizer.step()
        # measure first: at a refresh step the proposal is at its stalest, so the exact
        # variance reported is the worst of the refresh cycle (and half-way at EVERY = 64)
        pool_sq_norms = None
        if (measure and step % EVERY == 0) or step == steps:
            point, pool_sq_norms = checkpoint(model, sampler, data, step, window, method)
            curve.append(point)
            window = []
        if method == "importance_refresh" and step % REFRESH == 0:
            if pool_sq_norms is None:  # a checkpoint at this step already scored the pool
                pool_sq_norms = pool_statistics(model, images, labels, loss_fn)[0]
            sampler.refresh(pool_sq_norms.clamp_min(0).sqrt())
    return {"curve": curve, "final_pool_loss": curve[-1]["pool_loss"]}


def checkpoint(model, sampler, data, step, window, method) -> tuple[dict, torch.Tensor]:
    """The measurements at one step, and every pool example's squared gradient norm."""
    sq_norms, full_sq, pool_loss = pool_statistics(model, *data["pool"], data["loss"])
    heldout_loss, heldout_acc = evaluate(model, *data["heldout"], data["loss"])
    point = {
        "step": step,
        "pool_loss": pool_loss,
        "heldout_loss": heldout_loss,
        "heldout_accuracy": heldout_acc,
    }
    if method != "uniform":
        exact = exact_sampling_variance(sq_norms, sampler.probabilities(), full_sq, BATCH)
        point["exact_variance"] = {"importance": exact.importance, "uniform": exact.uniform}
        point["exact_reduction"] = exact.reduction
        # the optimum p ~ ||g_i|| with fresh norms, for how much the stale, mixed scores lose
        norms = sq_norms.clamp_min(0).sqrt()
        best = exact_sampling_variance(sq_norms, norms / norms.sum(), full_sq, BATCH)
        point["optimal_reduction"] = best.reduction
        if window:
            point["online_variance"] = {
                "importance": statistics.fmean(r.importance for r in window),
                "uniform": statistics.fmean(r.uniform for r in window),
            }
    return point, sq_norms


def spread(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def run_task(name: str, data: dict, seeds: list[int], steps: int, quick: bool) -> dict:
    tuning = {}
    for method in METHODS:  # each method's own best learning rate, by final pool loss
        finals = {
            lr: [train(method, lr, s, data, steps, False)["final_pool_loss"] for s in seeds]
            for lr in data["learning_rates"]
        }
        tuning[method] = {str(lr): statistics.fmean(v) for lr, v in finals.items()}
        print(name, method, {lr: round(v, 4) for lr, v in tuning[method].items()}, flush=True)
    best = {m: float(min(tuning[m], key=tuning[m].get)) for m in METHODS}
    runs = {m: [train(m, best[m], s, data, steps, True) for s in seeds] for m in METHODS}
    result = summarize(runs, best, tuning, seeds, steps, quick)
    result["learning_rate_grid"] = list(data["learning_rates"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--refresh-every", type=int, default=None, help="default 128")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    global REFRESH
    REFRESH = args.refresh_every or REFRESH
    steps = 128 if args.quick else STEPS
    seeds = list(range(1 if args.quick else args.seeds))
    torch.set_num_threads(2)
    started = time.perf_counter()
    result = {
        "benchmark": "importance_sampling",
        "date": time.strftime("%Y-%m-%d"),
        "machine": "2-core x86_64 CPU, torch " + torch.__version__,
        "tasks": {},
    }
    for name in args.tasks.split(","):
        result["tasks"][name] = run_task(name, TASKS[name](), seeds, steps, args.quick)
        print(name, json.dumps(result["tasks"][name]["verdict"], indent=2), flush=True)
    result["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    out = "importance_sampling" + ("_quick" if args.quick else "")
    if REFRESH != 128:
        out += f"_refresh{REFRESH}"
    previous = args.out / f"{out}.json"
    if previous.exists():  # --tasks reruns some tasks: keep the others' results
        kept = json.loads(previous.read_text())["tasks"]
        result["tasks"] = {**{k: v for k, v in kept.items() if k in TASKS}, **result["tasks"]}
    (args.out / f"{out}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / f"{out}.png")
    print(f"wrote {args.out / out}.json and .png")


def summarize(runs, best, tuning, seeds, steps, quick) -> dict:
    per_checkpoint = {m: checkpoints(runs[m]) for m in METHODS if m != "uniform"}
    final = {
        m: {
            key: spread([run["curve"][-1][key] for run in runs[m]])
            for key in ("pool_loss", "heldout_loss", "heldout_accuracy")
            if runs[m][0]["curve"][-1][key] is not None
        }
        for m in METHODS
    }
    verdict = {m: method_verdict(per_checkpoint[m], final, m) for m in per_checkpoint}
    verdict["final_medians"] = {m: {k: v["median"] for k, v in final[m].items()} for m in METHODS}
    return {
        "quick": quick,
        "pool": POOL,
        "batch": BATCH,
        "steps": steps,
        "mix": MIX,
        "refresh_every": REFRESH,
        "refresh_cost": f"one pass over the {POOL}-example pool (forward and backward) every "
        f"{REFRESH} steps of {BATCH}: {POOL / (REFRESH * BATCH):.2f}x the training examples",
        "seeds": seeds,
        "tuning_final_pool_loss": tuning,
        "best_learning_rate": best,
        "per_checkpoint": per_checkpoint,
        "final": final,
        "verdict": verdict,
        "runs": runs,
    }


def method_verdict(points, final, method) -> dict:
    later = [c["exact_reduction"]["min"] for c in points[1:]] or [float("nan")]
    return {
        "min_exact_reduction_after_first_checkpoint": min(later),
        "median_exact_reduction": statistics.median(c["exact_reduction"]["median"] for c in points),
        "reduction_at_least_2x": min(later) >= 2.0,
        "final_loss_no_worse_than_uniform_spread": {
            key: final[method][key]["median"] <= final["uniform"][key]["max"]
            for key in ("pool_loss", "heldout_loss")
        },
    }


def checkpoints(method_runs) -> list[dict]:
    per_checkpoint = []
    for k in range(len(method_runs[0]["curve"])):
        rows = [run["curve"][k] for run in method_runs]
        entry = {
            "step": rows[0]["step"],
            "exact_reduction": spread([r["exact_reduction"] for r in rows]),
            "optimal_reduction": spread([r["optimal_reduction"] for r in rows]),
        }
        online = [r for r in rows if "online_variance" in r]
        if online:
            entry["online_over_exact_importance"] = spread(
                [
                    r["online_variance"]["importance"] / r["exact_variance"]["importance"]
                    for r in online
                ]
            )
            entry["online_over_exact_uniform"] = spread(
                [r["online_variance"]["uniform"] / r["exact_variance"]["uniform"] for r in online]
            )
        per_checkpoint.append(entry)
    return per_checkpoint


def plot(result, path: Path) -> None:
    """Per task (a row): pool loss, held-out loss, and the exact variance reduction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    fig, grid = plt.subplots(len(tasks), 3, figsize=(14, 4 * len(tasks)), squeeze=False)
    colors = {
        "uniform": "tab:gray",
        "importance_visits": "tab:orange",
        "importance_refresh": "tab:blue",
    }
    for axes, (name, task) in zip(grid, tasks.items(), strict=True):
        for method, method_runs in task["runs"].items():
            for i, run in enumerate(method_runs):
                steps = [p["step"] for p in run["curve"]]
                lr = task["best_learning_rate"][method]
                label = f"{method} (lr {lr:g})" if i == 0 else None
                for ax, key in ((axes[0], "pool_loss"), (axes[1], "heldout_loss")):
                    ax.plot(
                        steps, [p[key] for p in run["curve"]], color=colors[method], label=label
                    )
        for method in ("importance_visits", "importance_refresh"):
            for run in task["runs"][method]:
                steps = [p["step"] for p in run["curve"]]
                axes[2].plot(
                    steps, [p["exact_reduction"] for p in run["curve"]], color=colors[method]
                )
                axes[2].plot(
                    steps, [p["optimal_reduction"] for p in run["curve"]], color="k", ls=":"
                )
        axes[2].set_yscale("log")
        axes[2].axhline(2.0, color="tab:red", lw=0.8)
        axes[0].set(title=f"{name}: training loss on the pool", xlabel="step", yscale="log")
        axes[1].set(title=f"{name}: held-out loss", xlabel="step", yscale="log")
        axes[2].set(
            title=f"{name}: variance reduction (uniform / IS)\n"
            "solid: sampler, dotted: fresh optimum",
            xlabel="step",
        )
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
