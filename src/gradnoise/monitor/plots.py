"""The report's figures, drawn with matplotlib's Agg backend into PNG files.

* ``noise_scale.png``: the running B_simple with its band, each batch's own estimate and the
  batch size.
* ``gsnr.png``: per-layer GSNR over the second half of training with its band, lowest first.
* ``norms.png``: the distribution of per-example gradient norms, early versus late in training.
* ``loss.png``: training and held-out loss at the measured steps, and the entropy floor when
  the workload knows it.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from gradnoise.monitor.records import finite_number
from gradnoise.monitor.summary import gsnr_ranking

__all__ = ["write_plots"]


def _series(steps: list[dict], key: str) -> list[float]:
    values = [finite_number(r.get(key)) for r in steps]
    return [math.nan if v is None else v for v in values]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_noise_scale(steps: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = [r["step"] for r in steps]
    high = [h if math.isfinite(h) else math.nan for h in _series(steps, "ci_high")]
    ax.fill_between(x, _series(steps, "ci_low"), high, alpha=0.25, label="90% band")
    ax.plot(x, _series(steps, "b_simple"), label="running B_simple")
    ax.plot(x, _series(steps, "b_batch"), ".", alpha=0.4, label="one batch's estimate")
    ax.axhline(steps[-1].get("batch_size") or 0, color="k", ls="--", lw=1, label="batch size")
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="simple noise scale", title="Gradient noise scale")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_gsnr(steps: list[dict], path: Path) -> Path:
    """Late-half GSNR of every parameter, lowest first, with its 90% band, on a linear axis."""
    ranked = [(name, g) for name, g in gsnr_ranking(steps) if math.isfinite(g.value)]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.22 * len(ranked) + 1)))
    if ranked:
        names = [name for name, _ in ranked]
        values = [g.value for _, g in ranked]
        low = [g.low if math.isfinite(g.low) else g.value for _, g in ranked]
        high = [g.high if math.isfinite(g.high) else g.value for _, g in ranked]
        ax.hlines(names, low, high, color="tab:orange", lw=1.5)
        ax.plot(values, names, "o", ms=3, color="tab:red")
        ax.axvline(0, color="k", lw=0.8)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    else:
        ax.text(0.5, 0.5, "no GSNR recorded", ha="center")
    ax.set(
        xlabel="GSNR = |G|^2 / tr(Sigma) (90% band; 0 = no signal)",
        title="Per-layer GSNR over the late half of training, lowest first",
    )
    return _save(fig, path)


def plot_norms(steps: list[dict], path: Path) -> Path:
    third = max(1, len(steps) // 3)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for label, part in (("early", steps[:third]), ("late", steps[-third:])):
        norms = [finite_number(v) for r in part for v in r.get("example_norms", [])]
        norms = [v for v in norms if v is not None]
        if norms:
            _histogram(ax, norms, label=f"{label} ({len(norms)} examples)")
    ax.set(
        xlabel="per-example gradient norm", ylabel="examples", title="Per-example gradient norms"
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def _histogram(ax, values: list[float], *, label: str) -> None:
    """40 bins, or as many as numpy can make: a range too narrow (or too wide, near the float
    limit) for finite-width bins gets one bin, and a series even that fails on is left out."""
    for bins in (40, 1):
        try:
            ax.hist(values, bins=bins, alpha=0.55, label=label)
            return
        except ValueError:
            continue


def plot_loss(steps: list[dict], path: Path, floor: float | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.0))
    x = [r["step"] for r in steps]
    ax.plot(x, _series(steps, "loss"), label="training (mean since the last measurement)")
    if any(r.get("heldout_loss") is not None for r in steps):
        ax.plot(x, _series(steps, "heldout_loss"), label="held-out")
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=1, label=f"entropy floor {floor:.3f}")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_plots(
    steps: list[dict], directory: Path, *, loss_floor: float | None = None
) -> dict[str, Path]:
    """Draw every figure into ``directory`` and return their paths by name."""
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "noise_scale": plot_noise_scale(steps, directory / "noise_scale.png"),
        "gsnr": plot_gsnr(steps, directory / "gsnr.png"),
        "norms": plot_norms(steps, directory / "norms.png"),
        "loss": plot_loss(steps, directory / "loss.png", loss_floor),
    }
