"""Data pruning by gradient scores against random pruning: held-out accuracy vs kept fraction.

Pool: 3000 generated digit images (``workloads.images.digit_pool``: classes 8 and 9 five times
rarer, a quarter faint and noisy, **10% of the labels flipped**). Held-out: 2048 images of
another seed, scored on their true labels. Model: the image workload's CNN; SGD with momentum
0.9 at lr 0.03 (the best of {0.01, 0.03, 0.1} in ``importance_sampling.py``), B = 32.

Scoring (the "Data Diet" protocol, Paul et al. 2021): per seed, train on the whole pool for
``SCORE_EPOCHS`` epochs, then score every example: GraNd (per-example gradient norm, GradStats),
EL2N (softmax error norm) and the loss; VoG from the true-class input gradients at 4 checkpoints
over those epochs. Scores are averaged over the 3 scoring seeds (the expectation over
initialisations that GraNd and EL2N are defined by).

Pruning: ``keep_set`` at kept fractions {0.9, 0.7, 0.5, 0.3} by GraNd, EL2N, VoG (hardest), by
EL2N keeping the hardest after skipping the top 10% (where flipped labels collect), by EL2N
keeping the easiest (Sorscher et al. 2022: better when little data is kept), and random.
Each kept set is trained from scratch for the same number of steps as the full pool
(``TRAIN_STEPS``, so kept fraction changes the data, not the compute), 3 seeds; final held-out
accuracy, with the kept set's share of flipped, hard and rare-class examples. Verdict: which
scores beat random beyond the seed spread at each fraction.

    python benchmarks/pruning.py [--quick] [--out benchmarks/results]
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
from gradnoise.data import el2n, keep_set
from gradnoise.stats import ExampleScores, class_logit_input_grads
from gradnoise.workloads.images import digit_classifier, digit_pool

POOL, HELDOUT, BATCH, LR = 3000, 2048, 32, 0.03
SCORE_EPOCHS, TRAIN_STEPS, SEEDS = 3, 1000, (0, 1, 2)
FRACTIONS = (0.9, 0.7, 0.5, 0.3)
STRATEGIES = {  # name: (score, keep_set keyword arguments)
    "random": (None, {"rule": "random"}),
    "grand": ("grad_norm", {"rule": "hardest"}),
    "el2n": ("el2n", {"rule": "hardest"}),
    "vog": ("vog", {"rule": "hardest"}),
    "el2n_skip10": ("el2n", {"rule": "hardest", "skip_hardest": 0.1}),
    "el2n_easiest": ("el2n", {"rule": "easiest"}),
}


def batches(ids: torch.Tensor, seed: int):
    """Random reshuffling of ``ids``; the last partial batch of each epoch is dropped."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = ids[torch.randperm(ids.numel(), generator=generator)]
        for start in range(0, order.numel() - BATCH + 1, BATCH):
            yield order[start : start + BATCH]


def train(pool, ids: torch.Tensor, steps: int, seed: int, on_checkpoint=None, every=0):
    model = digit_classifier(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    stream = batches(ids, seed)
    for step in range(1, steps + 1):
        batch = next(stream)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(pool.images[batch]), pool.labels[batch]).backward()
        optimizer.step()
        if on_checkpoint is not None and every and step % every == 0:
            on_checkpoint(model)
    return model


def score_pool(pool, seed: int) -> dict[str, torch.Tensor]:
    """GraNd, EL2N, loss and VoG of every example after SCORE_EPOCHS epochs of one seed."""
    n = len(pool.labels)
    ids = torch.arange(n)
    store = ExampleScores(n, seed=seed)
    steps = SCORE_EPOCHS * (n // BATCH)

    def vog_checkpoint(model):
        store.update_vog(ids, class_logit_input_grads(model, pool.images, pool.labels))

    model = train(pool, ids, steps, 1000 + seed, vog_checkpoint, steps // 4)
    with GradStats(model, loss_reduction="sum") as stats:
        logits = model(pool.images)
        losses = F.cross_entropy(logits, pool.labels, reduction="none")
        losses.sum().backward()
    store.update(ids, grad_sq_norms=stats.total_sq_norms(), losses=losses)
    return {
        "grad_norm": store.values("grad_norm"),
        "loss": store.values("loss"),
        "vog": store.values("vog"),
        "el2n": el2n(logits, pool.labels).double(),
    }


@torch.no_grad()
def heldout_accuracy(model, heldout) -> float:
    return float((model(heldout.images).argmax(1) == heldout.true_labels).float().mean())


def composition(pool, keep: torch.Tensor) -> dict[str, float]:
    rare = torch.isin(pool.true_labels, torch.tensor([8, 9]))
    return {
        "mislabelled": float(pool.mislabelled[keep].float().mean()),
        "hard": float(pool.hard[keep].float().mean()),
        "rare": float(rare[keep].float().mean()),
    }


def spread(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    global TRAIN_STEPS, SCORE_EPOCHS
    seeds, fractions = (SEEDS[:1], FRACTIONS[1:3]) if args.quick else (SEEDS, FRACTIONS)
    if args.quick:
        TRAIN_STEPS, SCORE_EPOCHS = 150, 1
    torch.set_num_threads(2)
    started = time.perf_counter()
    pool = digit_pool(POOL, generator=torch.Generator().manual_seed(300), label_noise=0.1)
    heldout = digit_pool(HELDOUT, generator=torch.Generator().manual_seed(400))

    per_seed = [score_pool(pool, seed) for seed in seeds]
    scores = {name: torch.stack([s[name] for s in per_seed]).mean(0) for name in per_seed[0]}
    print(f"scored in {time.perf_counter() - started:.0f} s", flush=True)

    full = [
        heldout_accuracy(train(pool, torch.arange(POOL), TRAIN_STEPS, s), heldout) for s in seeds
    ]
    results = {
        "full": {"accuracy": spread(full), "composition": composition(pool, torch.arange(POOL))}
    }
    for name, (score, options) in STRATEGIES.items():
        results[name] = {}
        for fraction in fractions:
            keep_by_seed = [
                keep_set(scores[score] if score else scores["el2n"], fraction, seed=s, **options)
                for s in seeds
            ]
            accuracy = [
                heldout_accuracy(train(pool, keep, TRAIN_STEPS, s), heldout)
                for s, keep in zip(seeds, keep_by_seed, strict=True)
            ]
            results[name][str(fraction)] = {
                "accuracy": spread(accuracy),
                "composition": composition(pool, keep_by_seed[0]),
            }
            print(name, fraction, round(statistics.median(accuracy), 3), flush=True)

    result = {
        "benchmark": "pruning",
        "date": time.strftime("%Y-%m-%d"),
        "machine": "2-core x86_64 CPU, torch " + torch.__version__,
        "quick": args.quick,
        "pool": POOL,
        "label_noise": 0.1,
        "score_epochs": SCORE_EPOCHS,
        "train_steps": TRAIN_STEPS,
        "seeds": list(seeds),
        "fractions": list(fractions),
        "results": results,
        "verdict": verdict(results, fractions),
        "seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "pruning" + ("_quick" if args.quick else "")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / f"{name}.png")
    print(json.dumps(result["verdict"], indent=2))


def verdict(results, fractions) -> dict:
    """Per fraction and score: 'better' / 'worse' than random when the seed ranges do not
    overlap, else 'within spread'."""
    out = {}
    for fraction in fractions:
        base = results["random"][str(fraction)]["accuracy"]
        row = {}
        for name in STRATEGIES:
            if name == "random":
                continue
            acc = results[name][str(fraction)]["accuracy"]
            if len(acc["values"]) < 2:
                row[name] = "one seed: no spread to compare"
            elif acc["min"] > base["max"]:
                row[name] = "better"
            elif acc["max"] < base["min"]:
                row[name] = "worse"
            else:
                row[name] = "within spread"
        out[str(fraction)] = row
    return out


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    fractions = result["fractions"]
    for name in STRATEGIES:
        rows = [result["results"][name][str(f)] for f in fractions]
        med = [r["accuracy"]["median"] for r in rows]
        low = [r["accuracy"]["median"] - r["accuracy"]["min"] for r in rows]
        high = [r["accuracy"]["max"] - r["accuracy"]["median"] for r in rows]
        style = {"color": "k", "ls": "--"} if name == "random" else {}
        axes[0].errorbar(
            fractions, med, yerr=[low, high], marker="o", capsize=3, label=name, **style
        )
        axes[1].plot(
            fractions,
            [r["composition"]["mislabelled"] for r in rows],
            marker="o",
            label=name,
            **style,
        )
    full = result["results"]["full"]["accuracy"]
    axes[0].axhspan(full["min"], full["max"], color="tab:gray", alpha=0.3, label="full pool")
    axes[0].set(xlabel="kept fraction", ylabel="held-out accuracy (median, seed range)")
    axes[1].set(xlabel="kept fraction", ylabel="share of flipped labels kept")
    axes[0].invert_xaxis()
    axes[1].invert_xaxis()
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
