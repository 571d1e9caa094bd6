r"""Summaries of a run's step records that the console, the plots and the report share.

**Per-layer GSNR with an interval.** Every step record holds, per parameter, the unbiased
one-batch estimates :math:`t_s` of :math:`\mathrm{tr}\,\Sigma` (``layer_trace``) and :math:`q_s`
of :math:`\|G\|^2` (``layer_grad_sq``). Over the late half of the measured steps the layer's GSNR
is the ratio of their means, :math:`\bar q / \bar t` (never a mean of ratios, which is biased),
and its interval is Fieller's for that ratio with the steps treated as independent draws (the
same construction as ``NoiseScale``'s band, see :mod:`gradnoise.stats.averaging`). With no
signal the value sits near 0 and the interval reaches down to 0; nothing is floored at ``1/B``.
One ranking, :func:`gsnr_ranking`, orders the layers for the console and the report alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gradnoise.stats.averaging import fieller_interval, student_quantile

__all__ = ["GsnrSummary", "gsnr_ranking", "late_gsnr", "late_steps"]

CONFIDENCE = 0.9


@dataclass(frozen=True)
class GsnrSummary:
    """A layer's GSNR over the late steps: ``value`` and its ``CONFIDENCE`` band (floats)."""

    value: float
    low: float
    high: float
    steps: int


def late_steps(steps: list[dict]) -> list[dict]:
    """The second half of the measured steps (all of them when there are fewer than 4)."""
    return steps if len(steps) < 4 else steps[len(steps) // 2 :]


def _pairs(steps: list[dict]) -> dict[str, list[tuple[float, float]]]:
    pairs: dict[str, list[tuple[float, float]]] = {}
    for record in steps:
        traces, sqs = record.get("layer_trace") or {}, record.get("layer_grad_sq") or {}
        for name, t in traces.items():
            q = sqs.get(name)
            if t is not None and q is not None:
                pairs.setdefault(name, []).append((t, q))
    return pairs


def _summary(pairs: list[tuple[float, float]]) -> GsnrSummary:
    m = len(pairs)
    mean_t = sum(t for t, _ in pairs) / m
    mean_q = sum(q for _, q in pairs) / m
    value = mean_q / mean_t if mean_t > 0 else math.nan
    if m < 2 or not mean_t > 0:
        return GsnrSummary(value, math.nan, math.nan, m)

    def cov(a: int, b: int) -> float:  # covariance of the means: sample covariance / m
        mean = (mean_t, mean_q)
        return sum((p[a] - mean[a]) * (p[b] - mean[b]) for p in pairs) / (m - 1) / m

    # Fieller for q/t: numerator q, denominator t (cov in that order).
    z = student_quantile(0.5 + CONFIDENCE / 2, m - 1)
    low, high = fieller_interval(
        mean_q, mean_t, [[cov(1, 1), cov(1, 0)], [cov(0, 1), cov(0, 0)]], z
    )
    return GsnrSummary(value, low, high, m)


def late_gsnr(steps: list[dict]) -> dict[str, GsnrSummary]:
    """Every parameter's GSNR over :func:`late_steps`, with its interval."""
    return {name: _summary(pairs) for name, pairs in _pairs(late_steps(steps)).items()}


def gsnr_ranking(steps: list[dict]) -> list[tuple[str, GsnrSummary]]:
    """Parameters from the lowest late GSNR to the highest (undefined ones last)."""
    summaries = late_gsnr(steps)
    return sorted(
        summaries.items(),
        key=lambda item: (math.isnan(item[1].value), item[1].value, item[0]),
    )
