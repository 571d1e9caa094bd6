"""Importance sampling of examples by gradient norm against uniform sampling, at equal batch size.

Two tasks, each a fixed pool of 4096 examples with a held-out set of 2048 from the same source:

* ``images``: generated digit images (``workloads.images.digit_pool``: classes 8 and 9 five
  times rarer, a quarter of the images faint and noisy, no label noise; held-out scored on the
  true labels) and the image workload's CNN (8k parameters). Gradient norms differ because
  examples differ in difficulty, which changes as the model learns.
* ``regression``: x = s z, z ~ N(0, I_16), s log-normal (sigma 1.5), y = teacher(x) + N(0, 0.3^2),
  a 16-32-1 tanh MLP with squared error. Gradient norms differ mostly because of the input
  scale, which does not change as the model trains: the case importance sampling is built for
  (each norm's residual factor still jitters from step to step, which makes scores go stale).

SGD with momentum 0.9, B = 32, 1536 steps (12 epochs' worth), 3 seeds. Methods, each at its own
best learning rate from a 3-point grid per task (lowest mean final pool loss over the seeds), all
at the same training batch B; extra compute is reported as examples through an extra forward
and backward pass per step (``extra_examples_per_step``, ``compute_factor`` = 1 + extra / B):

* ``uniform``: random reshuffling (each epoch a permutation), the usual DataLoader;
* ``importance_visits``: ``ImportanceSampler(mix=0.2)`` whose scores are each example's gradient
  norm at its latest visit, measured by GradStats in the training backward (no extra pass);
  loss (w * losses).mean();
* ``importance_refresh``: the same, plus ``sampler.refresh`` with every example's norm (one
  GradStats pass over the pool) every 128 steps: 1x the training examples in extra compute;
* ``importance_fresh``: a scoring pass at step 0 (no placeholder scores), refreshes every 128
  steps and a lower mix, 0.05;
* ``presample_k8``: presampling (Katharopoulos & Fleuret 2018): 8 B uniform candidates, scored
  by GradStats at the current parameters, B resampled by fresh norm (``draw_candidates``,
  ``presample``): 8x extra;
* ``presample_is_k16``: 16 B candidates drawn from an ``ImportanceSampler(mix=0.2)`` whose scores
  are renewed by every candidate's fresh norm (and a step-0 pass), then resampled: 16x extra.

Measured per seed, every 64 steps (before that step's refresh, so at the middle and the
stalest point of each refresh cycle): the training loss over the whole pool, held-out loss and
accuracy, and, with every example's gradient norm and the full-pool gradient (one GradStats pass
over the pool), the **exact** trace variance of the minibatch gradient under the method's
current proposal (``exact_sampling_variance``; ``presampling_variance`` for presampling, whose
scores are fresh by construction) and under uniform draws (with-replacement formulas, the
finite-population factor (N - B)/(N - 1) = 0.99 is ignored), and the reduction the optimal
proposal p ~ ||g_i|| with fresh norms would give. From the same pool statistics, at every
checkpoint of every method (``analysis``): the reduction under the *fresh* proposal mixed with
uniform for mix in {0, 0.05, 0.1, 0.2} (what the mix costs, apart from staleness), under
presampling from k B candidates for k in {2, 4, 8, 16, 32} (uniform candidates, or candidates
from the method's sampler), and with the forward-only score ||d loss_i / d output_i|| (the
last-layer bound of Katharopoulos & Fleuret). Validity: the sampler's own one-batch estimates
(``importance_sampling_variance``), averaged over the steps before each checkpoint, against the
exact values. Verdict per method: variance reduction >= 2x from the second checkpoint on (and
the median over checkpoints), and final pool / held-out loss and the pool loss averaged over
the checkpoints (loss per step) within the seed spread of uniform or better.

Full mode runs every method on regression and uniform, ``importance_visits`` and
``importance_refresh`` on images (about 15 minutes on 2 shared cores); ``--methods`` reruns the
named methods (and uniform), keeping the other methods of an earlier run of the same protocol
in the JSON.

    python benchmarks/importance_sampling.py [--quick] [--seeds 3] [--tasks images,regression]
        [--methods importance_fresh,presample_k8] [--refresh-every 128] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gradnoise import GradStats
from gradnoise.data import (
    ImportanceSampler,
    draw_candidates,
    exact_sampling_variance,
    importance_sampling_variance,
    presample,
    presampling_variance,
)
from gradnoise.workloads.images import digit_classifier, digit_pool

POOL, HELDOUT, BATCH, STEPS, EVERY, MIX, REFRESH = 4096, 2048, 32, 1536, 64, 0.2, 128
# each method: the sampler's mix, refreshes every REFRESH steps, a scoring pass at step 0,
# presampling from k * BATCH candidates (drawn uniformly, or from the sampler's proposal)
METHODS = {
    "uniform": {},
    "importance_visits": {"mix": 0.2},
    "importance_refresh": {"mix": 0.2, "refresh": True},
    "importance_fresh": {"mix": 0.05, "refresh": True, "initial": True},
    "presample_k8": {"presample": 8},
    "presample_is_k16": {"presample": 16, "mix": 0.2, "initial": True, "candidates": "sampler"},
}
ANALYSIS_MIXES, ANALYSIS_K = (0.0, 0.05, 0.1, 0.2), (2, 4, 8, 16, 32)
COLORS = {
    "uniform": "tab:gray",
    "importance_visits": "tab:orange",
    "importance_refresh": "tab:blue",
    "importance_fresh": "tab:green",
    "presample_k8": "tab:purple",
    "presample_is_k16": "tab:brown",
}


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
        "methods": ("uniform", "importance_visits", "importance_refresh"),  # the rest: --methods
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
    """Regression whose per-example gradient scale is set largely by the input scale (structural
    heterogeneity); the residual factor of each norm still moves from step to step."""
    teacher = mlp(999)
    return {
        "pool": scaled_inputs(POOL, torch.Generator().manual_seed(100), teacher),
        "heldout": scaled_inputs(HELDOUT, torch.Generator().manual_seed(200), teacher),
        "model": mlp,
        "loss": squared_error,
        "learning_rates": (0.01, 0.03, 0.1),  # brackets every method's best (0.003: none)
        "methods": tuple(METHODS),
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


def score_pool(model, data) -> torch.Tensor:
    """Every pool example's gradient norm (one GradStats pass): a refresh's scores."""
    return pool_statistics(model, *data["pool"], data["loss"])[0].clamp_min(0).sqrt()


def candidate_norms(model, x, y, loss_fn) -> torch.Tensor:
    """Presampling's scoring pass: the candidates' gradient norms at the current parameters."""
    with GradStats(model, loss_reduction="sum") as stats:
        loss_fn(model(x), y).sum().backward()
    model.zero_grad(set_to_none=True)
    return stats.total_sq_norms().double().clamp_min(0).sqrt()


def next_batch(spec, sampler, batches, model, data, generator):
    """Indices and weights of one training batch; presampling scores its candidates first."""
    k = spec.get("presample")
    if k is None:
        return next(batches)
    images, labels = data["pool"]
    from_sampler = spec.get("candidates") == "sampler"
    proposal = sampler.probabilities() if from_sampler else None
    candidates, c = draw_candidates(
        len(images), k * BATCH, probabilities=proposal, generator=generator
    )
    norms = candidate_norms(model, images[candidates], labels[candidates], data["loss"])
    if not bool(torch.isfinite(norms).all()):
        return None, None  # diverged
    if from_sampler:  # every candidate's fresh norm renews its stale score too
        sampler.update(candidates, norms)
    positions, weights = presample(norms, BATCH, candidate_weights=c, generator=generator)
    return candidates[positions], weights


def train(method: str, lr: float, seed: int, data: dict, steps: int, measure: bool) -> dict:
    spec = METHODS[method]
    images, labels = data["pool"]
    loss_fn = data["loss"]
    model = data["model"](seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sampler = ImportanceSampler(len(images), BATCH, mix=spec.get("mix", MIX), seed=seed)
    if spec.get("initial"):  # (b): score the pool once before training
        sampler.refresh(score_pool(model, data))
    uses_sampler = "mix" in spec and "presample" not in spec
    batches = (
        importance_batches(sampler) if uses_sampler else uniform_batches(len(images), BATCH, seed)
    )
    generator = torch.Generator().manual_seed(10_000 + seed)
    curve, window, snapshots = [], [], []
    for step in range(1, steps + 1):
        indices, weights = next_batch(spec, sampler, batches, model, data, generator)
        if indices is None:
            return {"curve": curve, "final_pool_loss": float("inf"), "diverged_at": step}
        w = torch.ones(BATCH, dtype=torch.float64) if weights is None else weights
        optimizer.zero_grad(set_to_none=True)
        with GradStats(model, loss_reduction="weighted") as stats:
            stats.set_example_weights(w.float() / BATCH)
            losses = loss_fn(model(images[indices]), labels[indices])
            (w.float() * losses).mean().backward()
        sq_norms = stats.total_sq_norms().double().clamp_min(0)
        if not bool(torch.isfinite(sq_norms).all()):  # diverged: this learning rate is out
            return {"curve": curve, "final_pool_loss": float("inf"), "diverged_at": step}
        if uses_sampler:
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
            snapshots.append((step, pool_sq_norms, point.get("full_grad_sq_norm")))
            window = []
        if spec.get("refresh") and step % REFRESH == 0:
            if pool_sq_norms is None:  # a checkpoint at this step already scored the pool
                pool_sq_norms = pool_statistics(model, images, labels, loss_fn)[0]
            if not bool(torch.isfinite(pool_sq_norms).all()):
                return {"curve": curve, "final_pool_loss": float("inf"), "diverged_at": step}
            sampler.refresh(pool_sq_norms.clamp_min(0).sqrt())
    run = {"curve": curve, "final_pool_loss": curve[-1]["pool_loss"]}
    if measure and method == "uniform":
        run["static_oracle"] = static_oracle(snapshots, steps)
    return run


def static_oracle(snapshots, steps) -> list[dict]:
    """The ceiling of any proposal that does not track the norms step by step: p_i proportional
    to example i's RMS norm over a window of checkpoints (computed with hindsight, so better than
    any stale score can know), and the exact reduction it gives at each checkpoint of the window.
    Windows: the first and second half of training, without the first checkpoint."""
    halves = [
        [s for s in snapshots if EVERY < s[0] <= steps // 2],
        [s for s in snapshots if s[0] > steps // 2],
    ]
    out = []
    for window in (w for w in halves if w):
        rms = positive_norms(torch.stack([sq for _, sq, _ in window]).mean(0))
        reductions = [
            exact_sampling_variance(sq, rms / rms.sum(), full, BATCH).reduction
            for _, sq, full in window
        ]
        out.append(
            {
                "steps": [window[0][0], window[-1][0]],
                "median_reduction": statistics.median(reductions),
                "min_reduction": min(reductions),
            }
        )
    return out


def positive_norms(sq_norms: torch.Tensor) -> torch.Tensor:
    """Norms for a proposal p ~ norm: a saturated classifier can give an example exactly zero
    gradient, and a proposal must keep every p_i > 0 (1e-9 of the mean changes nothing else)."""
    norms = sq_norms.clamp_min(0).sqrt()
    return norms.clamp_min(1e-9 * float(norms.mean()))


def output_grad_norms(model, data) -> torch.Tensor:
    """The forward-only score of Katharopoulos & Fleuret: ||d loss_i / d output_i||, the norm of
    the loss gradient at the last layer's output (an upper bound on ||g_i|| up to a constant)."""
    images, labels = data["pool"]
    with torch.no_grad():
        out = model(images)
    out.requires_grad_(True)
    data["loss"](out, labels).sum().backward()
    return out.grad.double().norm(dim=1)


def proposal_analysis(sq_norms, full_sq, sampler_p, bound) -> dict:
    """(a) and (c) from the pool statistics alone: the exact reduction under the *fresh* proposal
    mixed with uniform, (1 - m) ||g_i|| / sum ||g_j|| + m / N, for each m; under presampling with
    fresh norms from k B candidates, drawn uniformly or from the sampler's proposal; and with the
    forward-only output-gradient ``bound`` as the score (fresh, alone and presampled)."""
    norms = positive_norms(sq_norms)
    floor = bound + 1e-3 * bound.mean()  # a zero bound may hide a non-zero gradient
    fresh = norms / norms.sum()
    mixed = {
        str(m): exact_sampling_variance(
            sq_norms, (1 - m) * fresh + m / len(norms), full_sq, BATCH
        ).reduction
        for m in ANALYSIS_MIXES
    }
    presampled = {
        f"k{k}_{source}": presampling_variance(
            sq_norms, full_sq, BATCH, k * BATCH, probabilities=p
        ).reduction
        for k in ANALYSIS_K
        for source, p in (("uniform", None), ("sampler", sampler_p))
    }
    by_bound = {
        "fresh_mix0.05": exact_sampling_variance(
            sq_norms, 0.95 * floor / floor.sum() + 0.05 / len(norms), full_sq, BATCH
        ).reduction,
        **{
            f"presampled_k{k}_uniform": presampling_variance(
                sq_norms, full_sq, BATCH, k * BATCH, scores=floor
            ).reduction
            for k in ANALYSIS_K
        },
    }
    return {"fresh_mixed": mixed, "presampled": presampled, "output_bound": by_bound}


def checkpoint(model, sampler, data, step, window, method) -> tuple[dict, torch.Tensor]:
    """The measurements at one step, and every pool example's squared gradient norm."""
    spec = METHODS[method]
    sq_norms, full_sq, pool_loss = pool_statistics(model, *data["pool"], data["loss"])
    if not bool(torch.isfinite(sq_norms).all()):  # diverged (only at a tuning run's end)
        return {"step": step, "pool_loss": float("inf")}, sq_norms
    heldout_loss, heldout_acc = evaluate(model, *data["heldout"], data["loss"])
    point = {
        "step": step,
        "full_grad_sq_norm": full_sq,
        "pool_loss": pool_loss,
        "heldout_loss": heldout_loss,
        "heldout_accuracy": heldout_acc,
    }
    # the optimum p ~ ||g_i|| with fresh norms, for how much the stale, mixed scores lose
    norms = positive_norms(sq_norms)
    best = exact_sampling_variance(sq_norms, norms / norms.sum(), full_sq, BATCH)
    point["optimal_reduction"] = best.reduction
    p = sampler.probabilities()
    bound = output_grad_norms(model, data)
    model.zero_grad(set_to_none=True)
    point["analysis"] = proposal_analysis(sq_norms, full_sq, p, bound)
    if method == "uniform":
        return point, sq_norms
    if "presample" in spec:
        k = spec["presample"]
        proposal = p if spec.get("candidates") == "sampler" else None
        exact = presampling_variance(sq_norms, full_sq, BATCH, k * BATCH, probabilities=proposal)
    else:
        exact = exact_sampling_variance(sq_norms, p, full_sq, BATCH)
    point["exact_variance"] = {"importance": exact.importance, "uniform": exact.uniform}
    point["exact_reduction"] = exact.reduction
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


def run_task(name, data, seeds, steps, quick, methods) -> dict:
    tuning = {}
    for method in methods:  # each method's own best learning rate, by final pool loss
        finals = {
            lr: [train(method, lr, s, data, steps, False)["final_pool_loss"] for s in seeds]
            for lr in data["learning_rates"]
        }
        tuning[method] = {str(lr): finite_mean(v) for lr, v in finals.items()}
        print(name, method, {lr: round(v, 4) for lr, v in tuning[method].items()}, flush=True)
    best = {m: float(min(tuning[m], key=tuning[m].get)) for m in methods}
    runs = {m: [train(m, best[m], s, data, steps, True) for s in seeds] for m in methods}
    result = summarize(runs, best, tuning, seeds, steps, quick)
    result["learning_rate_grid"] = list(data["learning_rates"])
    return result


def finite_mean(values: list[float]) -> float:
    """The mean final loss of a learning rate; a diverged seed (NaN, inf) rules it out."""
    mean = statistics.fmean(values)
    return mean if mean == mean and mean < float("inf") else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--refresh-every", type=int, default=None, help="default 128")
    parser.add_argument(
        "--methods", default=None, help="comma-separated (uniform always runs); default per task"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    global REFRESH
    REFRESH = args.refresh_every or REFRESH
    steps = 128 if args.quick else STEPS
    seeds = list(range(1 if args.quick else args.seeds))
    torch.set_num_threads(1)  # tiny models: one thread (two contend on a shared machine)
    started = time.perf_counter()
    result = {
        "benchmark": "importance_sampling",
        "date": time.strftime("%Y-%m-%d"),
        "machine": "2-core x86_64 CPU, torch " + torch.__version__,
        "tasks": {},
    }
    out = "importance_sampling" + ("_quick" if args.quick else "")
    if REFRESH != 128:
        out += f"_refresh{REFRESH}"
    for name in args.tasks.split(","):
        data = TASKS[name]()
        chosen = args.methods.split(",") if args.methods else data["methods"]
        unknown = sorted(set(chosen) - set(METHODS))
        if unknown:
            parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
        methods = ["uniform", *(m for m in METHODS if m in chosen and m != "uniform")]
        task = run_task(name, data, seeds, steps, args.quick, methods)
        print(name, json.dumps(task["verdict"], indent=2), flush=True)
        result["seconds"] = time.perf_counter() - started
        write(result, name, task, args.out / f"{out}.json")  # after each task
    print(f"wrote {args.out / out}.json and .png")


def write(result: dict, name: str, task: dict, path: Path) -> None:
    """Add one task to the JSON (keeping the other tasks, and the methods of an earlier run of
    this task that were not rerun) and redraw the PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(path.read_text())["tasks"] if path.exists() else {}
    if name in kept:
        task = carry_methods(kept[name], task)
    result["tasks"] = {**{k: v for k, v in kept.items() if k in TASKS}, name: task}
    path.write_text(json.dumps(result, indent=2))
    plot(result, path.with_suffix(".png"))


def carry_methods(old: dict, new: dict) -> dict:
    """A task rerun with some methods, plus the methods of an earlier run of the same protocol
    (same steps and seeds) that this one did not rerun, summarized together."""
    carried = [m for m in old["runs"] if m in METHODS and m not in new["runs"]]
    if not carried or (old["steps"], old["seeds"]) != (new["steps"], new["seeds"]):
        return new
    order = [m for m in METHODS if m in new["runs"] or m in carried]
    pick = {m: (new if m in new["runs"] else old) for m in order}
    result = summarize(
        {m: pick[m]["runs"][m] for m in order},
        {m: pick[m]["best_learning_rate"][m] for m in order},
        {m: pick[m]["tuning_final_pool_loss"][m] for m in order},
        new["seeds"],
        new["steps"],
        new["quick"],
    )
    result["learning_rate_grid"] = new["learning_rate_grid"]
    result["carried_from_earlier_run"] = carried
    return result


def summarize(runs, best, tuning, seeds, steps, quick) -> dict:
    per_checkpoint = {m: checkpoints(runs[m]) for m in runs}
    final = {
        m: {
            key: spread([run["curve"][-1][key] for run in runs[m]])
            for key in ("pool_loss", "heldout_loss", "heldout_accuracy")
            if runs[m][0]["curve"][-1][key] is not None
        }
        for m in runs
    }
    curve_loss = {m: spread([mean_curve_loss(run) for run in runs[m]]) for m in runs}
    verdict = {
        m: method_verdict(per_checkpoint[m], final, curve_loss, m, steps)
        for m in per_checkpoint
        if m != "uniform"
    }
    verdict["final_medians"] = {m: {k: v["median"] for k, v in final[m].items()} for m in runs}
    return {
        "quick": quick,
        "pool": POOL,
        "batch": BATCH,
        "steps": steps,
        "mix": MIX,
        "refresh_every": REFRESH,
        "methods": {m: METHODS[m] for m in runs},
        "extra_examples_per_step": {m: extra_examples(m, steps) for m in runs},
        "mean_pool_loss_over_checkpoints": curve_loss,
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


def extra_examples(method: str, steps: int) -> float:
    """Examples through an extra forward and backward pass per training step (B = BATCH):
    refreshes (the pool every REFRESH steps), the step-0 pass, presampling's candidates."""
    spec = METHODS[method]
    extra = POOL / REFRESH if spec.get("refresh") else 0.0
    extra += POOL / steps if spec.get("initial") else 0.0
    return extra + spec.get("presample", 0) * BATCH


def mean_curve_loss(run) -> float:
    """Loss per step: the pool loss averaged over the checkpoints (the curve's mean)."""
    return statistics.fmean(p["pool_loss"] for p in run["curve"])


def method_verdict(points, final, curve_loss, method, steps) -> dict:
    later = [c["exact_reduction"]["min"] for c in points[1:]] or [float("nan")]
    return {
        "min_exact_reduction_after_first_checkpoint": min(later),
        "median_exact_reduction": statistics.median(c["exact_reduction"]["median"] for c in points),
        "median_exact_reduction_after_first_checkpoint": statistics.median(
            c["exact_reduction"]["median"] for c in points[1:] or points
        ),
        "reduction_at_least_2x": min(later) >= 2.0,
        "compute_factor": 1 + extra_examples(method, steps) / BATCH,
        "mean_pool_loss_no_worse_than_uniform_spread": curve_loss[method]["median"]
        <= curve_loss["uniform"]["max"],
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
            "optimal_reduction": spread([r["optimal_reduction"] for r in rows]),
        }
        if "exact_reduction" in rows[0]:
            entry["exact_reduction"] = spread([r["exact_reduction"] for r in rows])
        if all("analysis" in r for r in rows):  # (runs from before the analysis lack it)
            entry["analysis"] = {
                part: {
                    key: spread([r["analysis"][part][key] for r in rows])
                    for key in rows[0]["analysis"][part]
                }
                for part in rows[0]["analysis"]
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
    """Per task (a row): pool loss, held-out loss, the exact variance reduction over steps, and
    the reduction against extra compute (trained methods, and presampling from the analysis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    fig, grid = plt.subplots(len(tasks), 4, figsize=(19, 4 * len(tasks)), squeeze=False)
    for axes, (name, task) in zip(grid, tasks.items(), strict=True):
        for method, method_runs in task["runs"].items():
            for i, run in enumerate(method_runs):
                steps = [p["step"] for p in run["curve"]]
                lr = task["best_learning_rate"][method]
                label = f"{method} (lr {lr:g})" if i == 0 else None
                for ax, key in ((axes[0], "pool_loss"), (axes[1], "heldout_loss")):
                    ax.plot(
                        steps, [p[key] for p in run["curve"]], color=COLORS[method], label=label
                    )
                if method != "uniform":
                    axes[2].plot(
                        steps, [p["exact_reduction"] for p in run["curve"]], color=COLORS[method]
                    )
        for run in task["runs"]["uniform"]:
            steps = [p["step"] for p in run["curve"]]
            optimum = [p.get("optimal_reduction", math.nan) for p in run["curve"]]
            axes[2].plot(steps, optimum, color="k", ls=":")
        axes[2].set_yscale("log")
        axes[2].axhline(2.0, color="tab:red", lw=0.8)
        axes[0].set(title=f"{name}: training loss on the pool", xlabel="step", yscale="log")
        axes[1].set(title=f"{name}: held-out loss", xlabel="step", yscale="log")
        axes[2].set(
            title=f"{name}: variance reduction (uniform / method)\n"
            "dotted: fresh optimum (uniform's runs)",
            xlabel="step",
        )
        axes[0].legend(fontsize=7)
        plot_compute(axes[3], name, task)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_compute(ax, name, task) -> None:
    """Median reduction after the first checkpoint (seed range) against the compute factor."""
    for method, method_runs in task["runs"].items():
        if method == "uniform":
            continue
        per_seed = [
            statistics.median(p["exact_reduction"] for p in run["curve"][1:]) for run in method_runs
        ]
        factor = 1 + extra_examples(method, task["steps"]) / BATCH
        mid = statistics.median(per_seed)
        ax.errorbar(
            factor,
            mid,
            yerr=[[mid - min(per_seed)], [max(per_seed) - mid]],
            fmt="o",
            color=COLORS[method],
            label=method,
        )
    analysis = task["per_checkpoint"].get("uniform", [])[1:]
    if analysis and "analysis" in analysis[0]:
        for key, style, text, cost in (
            ("presampled", "-", "presampling, uniform candidates (formula)", 1.0),
            (
                "output_bound",
                "--",
                "presampling by the output bound (formula; forward = 1/3)",
                1 / 3,
            ),
        ):
            prefix = "k" if key == "presampled" else "presampled_k"
            suffix = "_uniform"
            xs = [1 + cost * k for k in ANALYSIS_K]
            ys = [
                statistics.median(
                    c["analysis"][key][f"{prefix}{k}{suffix}"]["median"] for c in analysis
                )
                for k in ANALYSIS_K
            ]
            ax.plot(xs, ys, color="k", ls=style, lw=0.8, label=text)
        best = statistics.median(c["optimal_reduction"]["median"] for c in analysis)
        ax.axhline(best, color="k", ls=":", lw=0.8, label="fresh optimum")
    ax.axhline(2.0, color="tab:red", lw=0.8)
    ax.set(
        xscale="log",
        xlabel="forward + backward passes per training example",
        ylabel="variance reduction at equal B",
        title=f"{name}: reduction vs compute\n(median over checkpoints after the first)",
    )
    ax.legend(fontsize=7, loc="lower right")


if __name__ == "__main__":
    main()
