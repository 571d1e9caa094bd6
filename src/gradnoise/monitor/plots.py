"""The report's figures, drawn with matplotlib's Agg backend into PNG files.

* ``noise_scale.png``: the running B_simple with its band, each batch's own estimate and the
  batch size.
* ``gsnr.png``: per-layer GSNR over the second half of training with its band, lowest first.
* ``norms.png``: the distribution of per-example gradient norms, early versus late in training,
  and beside it the late tail index (Hill) of every layer with its interval.
* ``affine.png``: tr(Sigma) against |G|^2 over the measured steps with the fitted affine noise
  model, and every layer's fitted slope with its interval, marked where the model fails.
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
from gradnoise.monitor.summary import WHOLE_MODEL, affine_fits, gsnr_ranking, tail_indices

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
    """Left: per-example norms early and late; right: the late tail index per layer."""
    third = max(1, len(steps) // 3)
    tails = tail_indices(steps)
    layers = [(n, t) for n, t in tails.items() if n != WHOLE_MODEL]
    fig, (ax, right) = plt.subplots(
        1, 2, figsize=(11, max(3.4, 0.2 * len(layers) + 1.2)), width_ratios=(1.2, 1)
    )
    for label, part in (("early", steps[:third]), ("late", steps[-third:])):
        norms = [finite_number(v) for r in part for v in r.get("example_norms", [])]
        norms = [v for v in norms if v is not None]
        if norms:
            _histogram(ax, norms, label=f"{label} ({len(norms)} examples)")
    whole = tails.get(WHOLE_MODEL)
    title = "Per-example gradient norms"
    if whole is not None:
        title += f"\nlate tail index {whole.alpha:.2f} ({whole.low:.2f} to {whole.high:.2f})"
    ax.set(xlabel="per-example gradient norm", ylabel="examples", title=title)
    ax.legend(fontsize=8)
    _tail_dots(right, layers)
    return _save(fig, path)


def _interval_dots(ax, rows: list, *, empty: str, reference: float, dashed: bool = False) -> None:
    """One row per layer: ``(name, value, low, high, red)`` as a dot on its interval, red rows
    in red, in the order given, with a vertical line at ``reference``."""
    if not rows:
        ax.text(0.5, 0.5, empty, ha="center")
        ax.set_axis_off()
        return
    names = [row[0] for row in rows]
    colors = ["tab:red" if row[4] else "tab:blue" for row in rows]
    ax.hlines(names, [row[2] for row in rows], [row[3] for row in rows], colors=colors)
    ax.scatter([row[1] for row in rows], names, s=9, c=colors, zorder=3)
    ax.axvline(reference, color="k", lw=0.8, ls="--" if dashed else "-")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=6)


def _tail_dots(ax, layers: list) -> None:
    """Hill alpha per layer with its 90% interval; alpha <= 2 (left of the line) is an
    infinite-variance tail."""
    rows = [(name, t.alpha, t.low, t.high, t.heavy) for name, t in layers]
    _interval_dots(ax, rows, empty="no per-layer norms recorded", reference=2, dashed=True)
    if rows:
        ax.set(
            xlabel="tail index alpha (Hill, largest 10%; red: interval below 2)",
            title="Late tail index per layer, heaviest first",
        )


def plot_affine(steps: list[dict], path: Path) -> Path:
    """Left: tr(Sigma) against |G|^2 per measured step with the fitted line; right: each
    layer's fitted slope sigma1^2 with its 90% interval, red where the affine model fails."""
    fits = affine_fits(steps)
    layers = [(n, f) for n, f in fits.items() if n != WHOLE_MODEL]
    fig, (ax, right) = plt.subplots(
        1, 2, figsize=(11, max(3.4, 0.2 * len(layers) + 1.2)), width_ratios=(1.2, 1)
    )
    xs, ys = _series(steps, "grad_sq_norm"), _series(steps, "trace_sigma")
    ax.plot(xs, ys, ".", alpha=0.5, label="one measured step")
    whole = fits.get(WHOLE_MODEL)
    finite = [x for x in xs if math.isfinite(x)]
    if whole is not None and finite:
        line = [min(finite), max(finite)]
        verdict = "holds" if whole.holds else "fails"
        ax.plot(
            line,
            [whole.sigma0_sq + whole.sigma1_sq * x for x in line],
            color="k",
            label=f"sigma0^2 + sigma1^2 |G|^2 (R^2 {whole.r_squared:.2f}, {verdict})",
        )
    ax.set(
        xlabel="|G|^2 (one batch, unbiased)",
        ylabel="tr(Sigma)",
        title="Affine noise model, whole model",
    )
    ax.legend(fontsize=8)
    _slope_dots(right, layers)
    return _save(fig, path)


def _slope_dots(ax, layers: list) -> None:
    rows = [(n, f.sigma1_sq, f.sigma1_sq_low, f.sigma1_sq_high, not f.holds) for n, f in layers]
    _interval_dots(ax, rows, empty="no per-layer estimates recorded", reference=0)
    if rows:
        ax.set(xlabel="slope sigma1^2 (90% interval; red: affine model fails)", title="Per layer")


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
        "affine": plot_affine(steps, directory / "affine.png"),
        "loss": plot_loss(steps, directory / "loss.png", loss_floor),
    }
