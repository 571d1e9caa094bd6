"""The plain-language reading of a run: batch size versus the noise scale, the noisiest layers,
and what profiling cost.

McCandlish et al. (2018) found the critical batch size, past which larger batches stop saving
steps, close to the simple noise scale B_simple = tr(Sigma) / |G|^2. Well below it, each step is
mostly noise (cheap in compute, many steps); well above it, extra examples add little per step.
"""

from __future__ import annotations

import math

from gradnoise.monitor.console import fmt, plain
from gradnoise.monitor.summary import GsnrSummary, gsnr_ranking

__all__ = ["batch_advice", "layer_advice", "overhead_text"]


def batch_advice(batch_size: int, record: dict, first: dict | None = None) -> str:
    """One paragraph on the batch size, from the last step record's running reading."""
    b, low, high = record.get("b_simple"), record.get("ci_low"), record.get("ci_high")
    if b is None:
        return (
            f"At batch size {batch_size} the mean gradient could not be told apart from its "
            "noise: the noise scale is far above the batch size. Larger batches should cut "
            "the number of steps almost in proportion; profile again with a larger "
            "--batch-size to place the noise scale."
        )
    where = f"B_simple ~ {fmt(b)} (90% band {fmt(low)} to {fmt(high)})"
    if low is not None and batch_size < low:
        text = (
            f"Your batch size {batch_size} is below the measured noise scale, {where}. Each "
            f"step's gradient is dominated by noise: raising the batch toward ~{fmt(b, 2)} "
            "(and the learning rate with it) should cut the number of steps nearly in "
            "proportion for little extra total compute. Staying small is the cheapest in "
            "compute if wall-clock time does not matter."
        )
    elif high is not None and batch_size > high:
        text = (
            f"Your batch size {batch_size} is above the measured noise scale, {where}. The "
            "extra examples in each batch mostly repeat information: a batch near "
            f"~{fmt(b, 2)} should make nearly the same progress per step for less compute."
        )
    else:
        text = (
            f"Your batch size {batch_size} is within the band of the measured noise scale, "
            f"{where}: a good balance between steps and compute."
        )
    return text + _growth(first, b)


def _growth(first: dict | None, b: float) -> str:
    start = first.get("b_simple") if first else None
    if start is None or start <= 0 or b < 2 * start:
        return ""
    return (
        f" The noise scale grew from {fmt(start)} to {fmt(b)} during the run, as it usually "
        "does while the loss falls: a batch size that grows with it keeps the balance."
    )


def layer_advice(steps: list[dict], count: int = 3) -> str:
    """One paragraph naming the parameters with the lowest and the highest late GSNR."""
    ranked = [(n, g) for n, g in gsnr_ranking(steps) if math.isfinite(g.value)]
    if not ranked:
        return "No per-layer GSNR was recorded (it needs batches of 2 or more examples)."

    def named(items) -> str:
        return ", ".join(f"{name} ({_gsnr_text(g)})" for name, g in items)

    quiet = [name for name, g in ranked if not g.low > 0]
    text = (
        f"Lowest signal-to-noise (GSNR = |G|^2 / tr(Sigma) over the late half of training, "
        f"90% band): {named(ranked[:count])}. Highest: {named(ranked[::-1][:count])}."
    )
    if quiet:
        text += (
            f" {len(quiet)} of {len(ranked)} parameters have a band that reaches 0: at this "
            "batch size their mean gradient cannot be told apart from its noise; they gain "
            "most from larger batches or a smaller learning rate."
        )
    return text


def _gsnr_text(g: GsnrSummary) -> str:
    if not math.isfinite(g.low):
        return plain(g.value)
    return f"{plain(g.value)}, {plain(g.low)} to {plain(g.high)}"


def overhead_text(run: dict | None) -> str:
    """One sentence on the measured cost of profiling."""
    if not run or run.get("overhead_fraction") is None:
        return (
            "The profiling overhead was not measured (the run ended early or had no plain steps)."
        )
    return (
        f"Profiling cost {100 * run['overhead_fraction']:.1f}% of the training time: "
        f"{run['measured_steps']} measured steps (one in {run['every']}) took "
        f"{run['measured_step_ratio']:.2f}x the median plain step "
        f"({1000 * run['plain_step_median']:.1f} ms), plus {run['monitor_seconds']:.2f} s "
        f"of monitor work, over {run['train_seconds']:.1f} s of training."
    )
