r"""Summaries of a run's step records that the console, the plots and the report share.

**Per-layer GSNR with an interval.** Every step record holds, per parameter, the unbiased
one-batch estimates :math:`t_s` of :math:`\mathrm{tr}\,\Sigma` (``layer_trace``) and :math:`q_s`
of :math:`\|G\|^2` (``layer_grad_sq``). Over the late half of the measured steps the layer's GSNR
is the ratio of their means, :math:`\bar q / \bar t` (never a mean of ratios, which is biased),
and its interval is Fieller's for that ratio with the steps treated as independent draws (the
same construction as ``NoiseScale``'s band, see :mod:`gradnoise.stats.averaging`). With no
signal the value sits near 0 and the interval reaches down to 0; nothing is floored at ``1/B``.
One ranking, :func:`gsnr_ranking`, orders the layers for the console and the report alike.

**Instruments per layer** (:mod:`gradnoise.stats.instruments`). :func:`tail_indices`: the Hill
tail index of the per-example gradient norms over the late third of the steps, whole model
(``example_norms``) and per parameter (``layer_example_norms``), the largest 10% as the tail.
:func:`affine_fits`: the affine noise model tr(Sigma) = sigma0^2 + sigma1^2 |G|^2 fitted over all
measured steps, whole model (``trace_sigma``, ``grad_sq_norm``) and per parameter
(``layer_trace``, ``layer_grad_sq``). Non-positive or non-finite norms and non-finite estimates
are left out; a layer with too few samples for its estimator is left out of the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gradnoise.errors import GradNoiseError
from gradnoise.monitor.records import as_number
from gradnoise.stats.averaging import fieller_interval, student_quantile
from gradnoise.stats.instruments import (
    AffineVarianceFit,
    TailIndex,
    affine_variance_fit,
    hill_tail_index,
)

__all__ = [
    "TAIL_FRACTION",
    "WHOLE_MODEL",
    "GsnrSummary",
    "affine_fits",
    "gsnr_ranking",
    "late_gsnr",
    "late_steps",
    "late_third",
    "tail_indices",
]

TAIL_FRACTION = 0.1
WHOLE_MODEL = "whole model"

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


# ------------------------------------------------------------------------------- instruments
def late_third(steps: list[dict]) -> list[dict]:
    """The last third of the measured steps (at least one)."""
    return steps[-max(1, len(steps) // 3) :]


def _positive_finite(values) -> list[float]:
    numbers = (as_number(v) for v in values)
    return [v for v in numbers if v is not None and 0 < v < math.inf]


def tail_indices(steps: list[dict]) -> dict[str, TailIndex]:
    """Hill tail index of the late per-example norms: ``WHOLE_MODEL`` first, then each
    parameter, ordered by ``alpha`` (heaviest tail first)."""
    late = late_third(steps)
    samples = {WHOLE_MODEL: [v for r in late for v in r.get("example_norms") or []]}
    layers: dict[str, list] = {}
    for record in late:
        for name, norms in (record.get("layer_example_norms") or {}).items():
            layers.setdefault(name, []).extend(norms)
    result = {}
    for name, values in {**samples, **layers}.items():
        try:
            result[name] = hill_tail_index(_positive_finite(values), tail_fraction=TAIL_FRACTION)
        except GradNoiseError:
            continue
    whole = {k: v for k, v in result.items() if k == WHOLE_MODEL}
    rest = sorted(
        ((k, v) for k, v in result.items() if k != WHOLE_MODEL), key=lambda kv: kv[1].alpha
    )
    return whole | dict(rest)


def _finite_pairs(pairs) -> tuple[list[float], list[float]]:
    numbers = [(as_number(t), as_number(q)) for t, q in pairs]
    kept = [(t, q) for t, q in numbers if t is not None and q is not None]
    kept = [(t, q) for t, q in kept if math.isfinite(t) and math.isfinite(q)]
    return [t for t, _ in kept], [q for _, q in kept]


def affine_fits(steps: list[dict]) -> dict[str, AffineVarianceFit]:
    """The affine-variance fit over all measured steps: ``WHOLE_MODEL`` first, then each
    parameter in record order."""
    series = {WHOLE_MODEL: [(r.get("trace_sigma"), r.get("grad_sq_norm")) for r in steps]}
    for name, pairs in _pairs(steps).items():
        series[name] = pairs
    result = {}
    for name, pairs in series.items():
        traces, sqs = _finite_pairs(pairs)
        try:
            result[name] = affine_variance_fit(traces, sqs)
        except GradNoiseError:
            continue
    return result
