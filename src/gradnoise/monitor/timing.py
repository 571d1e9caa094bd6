"""The honest cost of profiling, from timings the monitor takes while training runs.

A plain step's time is the median of the unmeasured steps (medians resist the noise of a shared
machine; plain and measured steps interleave, so both see the same load). The overhead is

    sum over measured steps of (step time - median plain step time)
    + every second the monitor itself spent (records, host syncs, sinks, console),

reported as a fraction of the time the same loop would have taken without profiling.
"""

from __future__ import annotations

from statistics import median

__all__ = ["overhead_summary"]


def overhead_summary(
    plain: list[float], measured: list[float], monitor_seconds: float, total_seconds: float
) -> dict:
    """Timing fields of the run record (``None`` where too few steps were timed)."""
    summary = {
        "train_seconds": total_seconds,
        "plain_steps": len(plain),
        "measured_steps": len(measured),
        "monitor_seconds": monitor_seconds,
        "plain_step_median": median(plain) if plain else None,
        "measured_step_median": median(measured) if measured else None,
        "overhead_seconds": None,
        "overhead_fraction": None,
    }
    if plain and measured:
        extra = sum(measured) - len(measured) * summary["plain_step_median"] + monitor_seconds
        summary["overhead_seconds"] = extra
        baseline = total_seconds - extra
        summary["overhead_fraction"] = extra / baseline if baseline > 0 else None
        summary["measured_step_ratio"] = (
            summary["measured_step_median"] / summary["plain_step_median"]
        )
    return summary
