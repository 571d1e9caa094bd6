r"""Gradient-noise quantities as pure functions of :class:`GradMoments`.

Notation: per-example gradients :math:`g_1..g_n` with mean :math:`\bar g`, true gradient
:math:`G = E[g_i]` and per-example covariance :math:`\Sigma`. All functions here read only a
record, so they work the same for one batch, merged micro-batches or merged ranks.

Unbiased estimators (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
appendix A.1, with the small batch being single examples, B_small = 1, and B_big = n):

.. math::
    \widehat{\mathrm{tr}\,\Sigma} = \frac{\sum_i \|g_i\|^2 - n \|\bar g\|^2}{n - 1},\qquad
    \widehat{\|G\|^2} = \|\bar g\|^2 - \frac{\widehat{\mathrm{tr}\,\Sigma}}{n},\qquad
    B_\text{simple} = \frac{\mathrm{tr}\,\Sigma}{\|G\|^2}.

The general two-batch-size form is :func:`two_batch_estimates`; a ratio of averages, never an
average of ratios, is the right way to combine steps (see ``NoiseScale``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.layers.registry import sq_norm
from gradnoise.stats.moments import GradMoments, common_count, total_moments

__all__ = [
    "NoiseScaleEstimate",
    "NormTestResult",
    "elementwise_variance",
    "gradient_noise_scale",
    "gsnr",
    "layer_estimates",
    "layer_estimates_from_sums",
    "layer_gsnr",
    "noise_scale_from_sums",
    "noise_scale_per_layer",
    "norm_test",
    "trace_covariance",
    "two_batch_estimates",
]


def _require_two_examples(moments: GradMoments, quantity: str) -> None:
    if moments.n < 2:
        raise GradNoiseError(
            explain(
                quantity,
                expected="moments of at least 2 examples (a variance needs two samples)",
                got=f"n={moments.n}",
                fix="use a batch size of 2 or more, or merge several steps' moments first",
            )
        )


def _require_elementwise(moments: GradMoments, quantity: str) -> torch.Tensor:
    if moments.elem_sq_sum is None:
        raise GradNoiseError(
            explain(
                quantity,
                expected="moments with elem_sq_sum",
                got="elem_sq_sum=None",
                fix="measure with GradStats(model, elementwise=True)",
            )
        )
    return moments.elem_sq_sum


def elementwise_variance(moments: GradMoments) -> torch.Tensor:
    r"""Unbiased per-coordinate variance of the per-example gradients.

    :math:`\hat\sigma^2_j = (\sum_i g_{ij}^2 - n \bar g_j^2) / (n - 1)`.
    """
    _require_two_examples(moments, "elementwise_variance")
    elem = _require_elementwise(moments, "elementwise_variance")
    mean = moments.mean
    return (elem - moments.n * mean * mean) / (moments.n - 1)


def trace_covariance(moments: GradMoments) -> torch.Tensor:
    r"""Unbiased :math:`\mathrm{tr}\,\Sigma = (\sum_i \|g_i\|^2 - n\|\bar g\|^2)/(n-1)`."""
    _require_two_examples(moments, "trace_covariance")
    return _trace_from_sums(moments.n, _as64(moments.sq_norm_sum), _sq_norm64(moments.grad_sum))


def _as64(value) -> torch.Tensor:
    return torch.as_tensor(value).to(torch.float64)


def _sq_norm64(tensor: torch.Tensor) -> torch.Tensor:
    """``||t||^2`` summed in float64, so float32 gradients near 1e30 or 1e-25 neither overflow
    nor underflow (the scalar results of this module are float64)."""
    return sq_norm(tensor.to(torch.float64))


def _trace_from_sums(n: int, sq_norm_sum, sum_sq_norm):
    """tr(Sigma) from sum_i ||g_i||^2 and ||sum_i g_i||^2: (S - ||s||^2 / n) / (n - 1)."""
    return (sq_norm_sum - sum_sq_norm / n) / (n - 1)


def two_batch_estimates(
    small_sq_norm: torch.Tensor | float,
    b_small: float,
    big_sq_norm: torch.Tensor | float,
    b_big: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Unbiased :math:`(\|G\|^2, \mathrm{tr}\,\Sigma)` from gradient norms at two batch sizes.

    McCandlish et al. 2018, A.1: with :math:`E\|g_B\|^2 = \|G\|^2 + \mathrm{tr}\Sigma / B`,

    .. math::
        \|G\|^2 \approx \frac{B_\text{big}\|g_\text{big}\|^2 - B_\text{small}\|g_\text{small}\|^2}
                             {B_\text{big} - B_\text{small}},\qquad
        \mathrm{tr}\Sigma \approx \frac{\|g_\text{small}\|^2 - \|g_\text{big}\|^2}
                                   {1/B_\text{small} - 1/B_\text{big}}.

    ``small_sq_norm`` is the average squared norm of the small-batch gradients.
    """
    if not 0 < b_small < b_big:
        raise GradNoiseError(
            explain(
                "two_batch_estimates",
                expected="0 < b_small < b_big",
                got=f"b_small={b_small}, b_big={b_big}",
                fix="pass the per-micro-batch size as b_small and the total batch as b_big",
            )
        )
    small = torch.as_tensor(small_sq_norm)
    big = torch.as_tensor(big_sq_norm)
    grad_sq = (b_big * big - b_small * small) / (b_big - b_small)
    trace = (small - big) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """One estimate of the simple noise scale and its two ingredients.

    ``b_simple`` is NaN when the |G|^2 estimate is not positive: the batch is then far below the
    noise scale and the data cannot tell how far. ``defined`` says which case holds; nothing is
    clipped into a confident-looking number.
    """

    trace_sigma: float
    grad_sq_norm: float
    b_simple: float
    n: int

    @property
    def defined(self) -> bool:
        return not math.isnan(self.b_simple)


def _estimate(trace: torch.Tensor, grad_sq: torch.Tensor, n: int) -> NoiseScaleEstimate:
    trace_value, grad_sq_value = float(trace), float(grad_sq)
    b_simple = trace_value / grad_sq_value if grad_sq_value > 0 else math.nan
    return NoiseScaleEstimate(trace_value, grad_sq_value, b_simple, n)


def gradient_noise_scale(
    moments: GradMoments | Mapping[str, GradMoments],
) -> NoiseScaleEstimate:
    r"""Simple noise scale :math:`B_\text{simple} = \mathrm{tr}\Sigma / \|G\|^2` of one batch.

    Accepts one record or a mapping of per-parameter records (then the whole model: traces and
    squared norms add over parameters). Uses the unbiased estimators of the module docstring.
    """
    records = list(moments.values()) if isinstance(moments, Mapping) else [moments]
    n = common_count(records, "gradient_noise_scale")
    _require_two_examples(records[0], "gradient_noise_scale")
    sq_norm_sum = torch.stack([_as64(r.sq_norm_sum).reshape(()) for r in records]).sum()
    sum_sq_norm = torch.stack([_sq_norm64(r.grad_sum) for r in records]).sum()
    return noise_scale_from_sums(n, sq_norm_sum, sum_sq_norm)


def noise_scale_from_sums(
    n: int, sq_norm_sum: torch.Tensor, sum_sq_norm: torch.Tensor
) -> NoiseScaleEstimate:
    r"""The estimate from two scalars: :math:`\sum_i\|g_i\|^2` and :math:`\|\sum_i g_i\|^2`.

    :math:`\mathrm{tr}\Sigma = (S - \|s\|^2/n)/(n-1)` and
    :math:`\|G\|^2 = \|s\|^2/n^2 - \mathrm{tr}\Sigma/n`; whole-model values are sums of
    per-parameter ones, so the two scalars may be summed over parameters first. Both are taken
    to float64 first, so finite inputs give finite answers. A record whose ``sq_norm_sum`` is
    already inf (float32 per-example norms above ~1.8e19) or 0 by underflow cannot be repaired
    here: keep such records in float64 (``GradMoments.to(torch.float64)`` before they overflow).
    """
    trace, grad_sq = layer_estimates_from_sums(n, sq_norm_sum, sum_sq_norm)
    return _estimate(trace, grad_sq, n)


def layer_estimates_from_sums(
    n: int | float, sq_norm_sums: torch.Tensor, sum_sq_norms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-parameter ``(tr Sigma, |G|^2)`` float64 vectors from the vectors of
    :math:`\sum_i\|g_i\|^2` and :math:`\|\sum_i g_i\|^2`, elementwise (the formulas of
    :func:`noise_scale_from_sums`, which calls it on whole-model sums)."""
    sq_norm_sums, sum_sq_norms = _as64(sq_norm_sums), _as64(sum_sq_norms)
    trace = _trace_from_sums(n, sq_norm_sums, sum_sq_norms)
    return trace, sum_sq_norms / n**2 - trace / n


def layer_estimates(
    per_param: Mapping[str, GradMoments],
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    r"""``(names, tr Sigma, |G|^2)`` per parameter as float64 vectors: the unbiased
    :math:`\mathrm{tr}\Sigma` and :math:`\|G\|^2 = \|\bar g\|^2 - \mathrm{tr}\Sigma / n`
    of every record (what :class:`~gradnoise.stats.running.NoiseScale` averages)."""
    names = list(per_param)
    traces, sqs = [], []
    for name in names:
        record = per_param[name]
        trace = torch.as_tensor(trace_covariance(record)).to(torch.float64)
        traces.append(trace)
        sqs.append(record.mean.pow(2).sum().to(torch.float64) - trace / record.n)
    return names, torch.stack(traces), torch.stack(sqs)


def noise_scale_per_layer(per_param: Mapping[str, GradMoments]) -> dict[str, NoiseScaleEstimate]:
    """:func:`gradient_noise_scale` of every parameter's record separately."""
    return {name: gradient_noise_scale(record) for name, record in per_param.items()}


def gsnr(moments: GradMoments, *, unbiased: bool = True, eps: float = 1e-30) -> torch.Tensor:
    r"""Per-coordinate gradient signal-to-noise ratio :math:`r_j = \mu_j^2 / \sigma_j^2`.

    Liu et al. 2020, "Understanding Why Neural Networks Generalize Well Through GSNR of
    Parameters". The squared mean of ``n`` samples estimates :math:`\mu_j^2 + \sigma_j^2/n`,
    not :math:`\mu_j^2`, so the plug-in ratio :math:`\bar g_j^2/\hat\sigma_j^2` has a floor of
    about ``1/n`` even with no signal at all. With ``unbiased=True`` (the default) the numerator
    is :math:`\bar g_j^2 - \hat\sigma_j^2/n`, whose expectation is exactly :math:`\mu_j^2`: a
    coordinate without signal reads 0 on average and single readings may be negative (never
    clipped, which would bring the floor back). ``unbiased=False`` gives the plug-in ratio that
    VRGD's paper uses. ``eps`` guards coordinates with zero variance (unused embedding rows).
    """
    variance = elementwise_variance(moments)
    signal = moments.mean.pow(2)
    if unbiased:
        signal = signal - variance / moments.n
    return signal / variance.clamp_min(eps)


def layer_gsnr(moments: GradMoments) -> float:
    r"""A parameter's GSNR as a ratio of sums: :math:`\hat{\|G\|^2} / \hat{\mathrm{tr}\Sigma}`.

    :math:`\sum_j \hat\mu_j^2 / \sum_j \hat\sigma_j^2` with both sums unbiased (the
    construction of the noise scale, so this is ``1 / B_simple`` of the parameter). Unlike the
    mean of per-coordinate ratios it has no ``1/n`` floor, needs no elementwise moments and is
    defined for ``n >= 2``: near 0 (either sign) when the parameter's mean gradient is
    indistinguishable from its noise; NaN when the variance estimate is not positive. Average
    its numerator and denominator over steps separately (the report does) to read it with an
    interval.
    """
    _require_two_examples(moments, "layer_gsnr")
    trace = float(trace_covariance(moments))
    grad_sq = float(_sq_norm64(moments.grad_sum)) / moments.n**2 - trace / moments.n
    return grad_sq / trace if trace > 0 else math.nan


@dataclass(frozen=True)
class NormTestResult:
    r"""The norm test of Byrd et al. 2012 / Bollapragada et al. 2018.

    ``statistic`` is :math:`(\mathrm{tr}\Sigma / n) / \|\bar g\|^2`, the relative variance of the
    batch gradient; the batch passes when ``statistic <= theta**2``. ``suggested_batch_size`` is
    the smallest n that would pass, :math:`\mathrm{tr}\Sigma / (\theta^2 \|\bar g\|^2)`.
    """

    statistic: float
    theta: float
    passed: bool
    suggested_batch_size: float


def norm_test(
    moments: GradMoments | Mapping[str, GradMoments], *, theta: float = 0.9
) -> NormTestResult:
    """Run the norm test on one record or on a whole model's per-parameter records."""
    if theta <= 0:
        raise GradNoiseError(
            explain(
                "norm_test theta",
                expected="a positive float",
                got=repr(theta),
                fix="use a value such as 0.9 (looser) or 0.5 (stricter)",
            )
        )
    record = total_moments(moments) if isinstance(moments, Mapping) else moments
    trace = float(trace_covariance(record))
    mean_sq = float(_sq_norm64(record.grad_sum)) / record.n**2
    if mean_sq == 0.0:
        return NormTestResult(math.inf, theta, False, math.inf)
    statistic = trace / record.n / mean_sq
    return NormTestResult(statistic, theta, statistic <= theta**2, trace / (theta**2 * mean_sq))
