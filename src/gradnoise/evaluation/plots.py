"""One PNG of an evaluation, drawn with matplotlib's Agg backend, one panel per part that applies:

* the bootstrap distribution of each system's score over items, with its interval;
* the bootstrap distribution of the paired difference, with 0 marked (two systems);
* the per-seed scores of each system with their mean and t interval (two or more seeds);
* pass@k against k with intervals (samples with 0/1 scores).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from gradnoise.evaluation.summary import Evaluation

__all__ = ["plot_evaluation"]


def _items(ax, evaluation: Evaluation) -> None:
    for system in evaluation.systems:
        i = system.items
        if i is None or i.replicates is None:
            continue
        color = ax.hist(i.replicates.numpy(), bins=40, alpha=0.45, label=system.name)[2][0]
        for end in (i.low, i.high):
            ax.axvline(end, color=color.get_facecolor(), ls="--", lw=1)
    ax.set(xlabel="score (mean over items)", ylabel="bootstrap resamples")
    ax.set_title("Score over items (dashed: interval)", fontsize=10)
    ax.legend(fontsize=7)


def _difference(ax, evaluation: Evaluation) -> None:
    c = evaluation.comparison
    r = c.result
    ax.hist(r.bootstrap.replicates.numpy(), bins=40, color="tab:purple", alpha=0.6)
    for end in (r.bootstrap.low, r.bootstrap.high):
        ax.axvline(end, color="tab:purple", ls="--", lw=1)
    ax.axvline(0, color="k", lw=1)
    ax.set(xlabel=f"{c.a} - {c.b} (mean over shared items)", ylabel="bootstrap resamples")
    ax.set_title(f"Paired difference, sign test p = {r.sign_test_p:.3g}", fontsize=10)


def _seeds(ax, evaluation: Evaluation) -> None:
    rows = [s for s in evaluation.systems if s.seeds is not None]
    for x, system in enumerate(rows):
        values = list(system.per_seed.values())
        ax.plot([x] * len(values), values, "o", alpha=0.6, ms=4)
        s = system.seeds
        ax.errorbar(
            x + 0.15,
            s.estimate,
            yerr=[[s.estimate - s.low], [s.high - s.estimate]],
            fmt="s",
            color="k",
            capsize=4,
        )
    ax.set_xticks(range(len(rows)), [s.name for s in rows], fontsize=8)
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set(ylabel="score of one seed")
    ax.set_title("Per-seed scores, mean and t interval", fontsize=10)


def _pass(ax, evaluation: Evaluation) -> None:
    for system in evaluation.systems:
        if not system.pass_at_k:
            continue
        ks = [p.k for p in system.pass_at_k]
        est = [p.estimate for p in system.pass_at_k]
        err = [[p.estimate - p.low for p in system.pass_at_k]]
        err.append([p.high - p.estimate for p in system.pass_at_k])
        ax.errorbar(ks, est, yerr=err, marker="o", capsize=3, label=system.name)
    ax.set_xscale("log")
    ax.set(xlabel="k", ylabel="pass@k")
    ax.set_title("Unbiased pass@k with intervals", fontsize=10)
    ax.legend(fontsize=7)


def plot_evaluation(evaluation: Evaluation, path: str | Path) -> Path:
    """Write the evaluation's figure to ``path`` (PNG) and return the path."""
    panels = []
    if any(s.items is not None for s in evaluation.systems):
        panels.append(_items)
    if evaluation.comparison is not None and evaluation.comparison.result is not None:
        panels.append(_difference)
    if any(s.seeds is not None for s in evaluation.systems):
        panels.append(_seeds)
    if any(s.pass_at_k for s in evaluation.systems):
        panels.append(_pass)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.3 * max(1, len(panels)), 3.6))
    axes = list(axes) if len(panels) > 1 else [axes]
    for draw, ax in zip(panels, axes, strict=False):
        draw(ax, evaluation)
    if not panels:
        axes[0].text(0.5, 0.5, "nothing to plot (one item)", ha="center")
        axes[0].set_axis_off()
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
