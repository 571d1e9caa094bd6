r"""Intervals for a benchmark score: over items (bootstrap), over seeds (t), and both at once.

A benchmark score is a mean of per-item scores, and two sources of chance move it: *which items*
the benchmark happens to hold, and *which seed* (initialisation, data order, sampling) produced
the model. Each interval here states the one it accounts for.

**Items** (:func:`bootstrap_interval`). Percentile bootstrap (Efron 1979): draw ``resamples``
samples of the ``n`` per-item values with replacement, compute the statistic on each, and report
the :math:`(1-c)/2` and :math:`(1+c)/2` quantiles of those replicates; the standard error is
their standard deviation. Assumes the items are i.i.d. draws from the population of items the
score should speak for, and holds the model (seed) fixed. For the mean of ``n`` items it tends to
:math:`\bar x \pm z\,s/\sqrt n` (slightly narrower at small n: the bootstrap variance is
:math:`\frac{n-1}{n}s^2/n`).

**Seeds** (:func:`seed_interval`). Given one score per seed :math:`y_1..y_J` (each computed on
the same items), the mean :math:`\bar y` with the Student-t interval
:math:`\bar y \pm t_{(1+c)/2,\,J-1}\, s_y/\sqrt J`; :math:`s_y` (``sd``) is the seed-to-seed
spread of the score, what one more run would move by. Assumes i.i.d. seeds and roughly normal
per-seed scores (t is exact then; with 3-5 seeds the interval is wide, as it should be).

**Items and seeds** (:func:`variance_components`). For a complete ``(I items, J seeds)`` matrix,
the two-way random-effects model :math:`x_{ij} = \mu + a_i + b_j + e_{ij}` (items, seeds and
their interaction independent, variances :math:`\sigma_a^2, \sigma_b^2, \sigma_e^2`) gives

.. math::
    \mathrm{Var}(\bar x_{\cdot\cdot}) = \frac{\sigma_a^2}{I} + \frac{\sigma_b^2}{J}
        + \frac{\sigma_e^2}{IJ}
    = \frac{s_\text{item}^2}{I} + \frac{s_\text{seed}^2}{J},

with :math:`s_\text{item}^2 = \sigma_a^2` and :math:`s_\text{seed}^2 = \sigma_b^2 +
\sigma_e^2/I` (the variance of one seed's benchmark score). With the ANOVA mean squares
:math:`M_A = J\,\mathrm{var}_i(\bar x_{i\cdot})`, :math:`M_B = I\,\mathrm{var}_j(\bar
x_{\cdot j})` and the residual :math:`M_E`, :math:`E[M_A] = \sigma_e^2 + J\sigma_a^2`,
:math:`E[M_B] = \sigma_e^2 + I\sigma_b^2`, :math:`E[M_E] = \sigma_e^2`, so
:math:`\hat\sigma_a^2 = (M_A - M_E)/J`, :math:`\hat\sigma_b^2 = (M_B - M_E)/I`,
:math:`\hat\sigma_e^2 = M_E` and :math:`\widehat{\mathrm{Var}} = (M_A + M_B - M_E)/(IJ)`
(unbiased). A negative component estimate is set to 0 (its term then drops out, which can only
widen the interval). The interval is :math:`\bar x \pm t_{(1+c)/2,\,\nu}\sqrt{\widehat{\mathrm
{Var}}}` with Satterthwaite's :math:`\nu = \widehat{\mathrm{Var}}^2 / \sum_k (c_k M_k)^2 /
\nu_k`, rounded down (conservative). Assumes i.i.d. items, i.i.d. seeds, additive effects and
roughly normal components.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gradnoise.errors import GradNoiseError, check_confidence, explain
from gradnoise.evaluation.checks import (
    check_resamples,
    make_generator,
    sample_sd,
    scores_vector,
)
from gradnoise.stats.averaging import student_quantile

__all__ = [
    "Interval",
    "VarianceComponents",
    "bootstrap_interval",
    "seed_interval",
    "t_quantile",
    "variance_components",
]

# indices drawn per chunk of resamples: 2**22 int64 = 32 MiB, whatever the number of items
_CHUNK_ELEMENTS = 2**22


@dataclass(frozen=True)
class Interval:
    """An estimate with its ``confidence`` interval ``[low, high]``.

    ``standard_error`` is the estimate's (bootstrap: the replicates' sd; t: ``sd / sqrt(n)``),
    ``n`` the number of units (items or seeds), ``sd`` their sample standard deviation
    (divisor n - 1), ``method`` ``"bootstrap"`` or ``"t"``. A bootstrap interval keeps its
    replicates (for a histogram; not part of equality or repr).
    """

    estimate: float
    low: float
    high: float
    standard_error: float
    n: int
    confidence: float
    method: str
    sd: float
    replicates: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def half_width(self) -> float:
        """Half the interval's width (the "±" of a symmetric interval)."""
        return (self.high - self.low) / 2

    def covers(self, value: float) -> bool:
        """Whether ``low <= value <= high``."""
        return self.low <= value <= self.high


def t_quantile(confidence: float, dof: float) -> float:
    """The two-sided Student-t quantile :math:`t_{(1+c)/2,\\,\\nu}` for ``floor(dof)`` degrees
    of freedom (at least 1: the conservative side of a fractional Welch dof), exact
    (``gradnoise.stats.averaging.student_quantile``)."""
    return student_quantile((1.0 + confidence) / 2.0, max(1, math.floor(dof)))


def _statistic(where: str, statistic) -> Callable[[torch.Tensor], torch.Tensor]:
    if statistic == "mean":
        return lambda x: x.mean(-1)
    if statistic == "median":
        return lambda x: x.quantile(0.5, dim=-1)
    if callable(statistic) and not isinstance(statistic, str):
        return statistic
    raise GradNoiseError(
        explain(
            f"{where} statistic",
            expected='"mean", "median" or a function of an (R, n) tensor returning (R,)',
            got=repr(statistic),
            fix='use statistic="mean", or statistic=lambda x: x.mean(-1)',
        )
    )


def _apply(where: str, fn, x: torch.Tensor) -> torch.Tensor:
    """``fn`` on the (R, n) resamples ``x``, checked to return R finite numbers."""
    out = torch.as_tensor(fn(x), dtype=torch.float64)
    if out.shape != (x.shape[0],):
        raise GradNoiseError(
            explain(
                f"{where} statistic",
                expected=f"one value per resample, shape ({x.shape[0]},)",
                got=f"shape {tuple(out.shape)}",
                fix="reduce the last dimension only, e.g. lambda x: x.mean(-1)",
            )
        )
    return out


def _bootstrap_replicates(
    x: torch.Tensor, fn, resamples: int, generator: torch.Generator, where: str
) -> torch.Tensor:
    """``resamples`` values of ``fn`` on resamples of ``x`` with replacement, drawn in chunks
    of at most 2**22 indices (memory stays bounded for any n)."""
    n = x.numel()
    chunk = max(1, _CHUNK_ELEMENTS // n)
    parts = []
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        index = torch.randint(0, n, (rows, n), generator=generator)
        parts.append(_apply(where, fn, x[index]))
    return torch.cat(parts)


def bootstrap_interval(
    values,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    statistic: str | Callable[[torch.Tensor], torch.Tensor] = "mean",
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> Interval:
    """Percentile bootstrap interval of ``statistic`` over the items ``values`` (one per item).

    ``statistic``: ``"mean"``, ``"median"`` or a function mapping an ``(R, n)`` tensor of
    resamples to ``(R,)``. Randomness: ``generator``, else a generator seeded with ``seed``
    (0 when both are None), so the same call gives the same interval. Assumes i.i.d. items.
    """
    where = "bootstrap_interval"
    confidence = check_confidence(f"{where} confidence", confidence)
    resamples = check_resamples(where, resamples)
    fn = _statistic(where, statistic)
    gen = make_generator(where, seed, generator)
    x = scores_vector(f"{where} values", values)
    estimate = float(_apply(where, fn, x.unsqueeze(0))[0])
    replicates = _bootstrap_replicates(x, fn, resamples, gen, where)
    if not bool(torch.isfinite(replicates).all()):
        raise GradNoiseError(
            explain(
                f"{where} statistic",
                expected="finite values on every resample",
                got="NaN or inf on some resamples",
                fix="use a statistic defined on every resample (with repeated items)",
            )
        )
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    low, high = torch.quantile(replicates, q).tolist()
    return Interval(
        estimate=estimate,
        low=low,
        high=high,
        standard_error=sample_sd(replicates),
        n=x.numel(),
        confidence=confidence,
        method="bootstrap",
        sd=sample_sd(x),
        replicates=replicates,
    )


def t_interval(x: torch.Tensor, confidence: float) -> Interval:
    """:math:`\\bar x \\pm t_{(1+c)/2,\\,n-1}\\, s/\\sqrt n` of a checked 1-D tensor."""
    n = x.numel()
    mean, sd = float(x.mean()), sample_sd(x)
    se = sd / math.sqrt(n)
    half = t_quantile(confidence, n - 1) * se
    return Interval(mean, mean - half, mean + half, se, n, confidence, "t", sd)


def seed_interval(per_seed_scores, *, confidence: float = 0.95) -> Interval:
    """Mean over seeds with its Student-t interval; ``sd`` is the seed-to-seed spread.

    ``per_seed_scores``: one benchmark score per seed, each on the same items. The interval is
    :math:`\\bar y \\pm t_{(1+c)/2,\\,J-1}\\, s_y/\\sqrt J` (i.i.d. seeds, roughly normal
    scores). It says nothing about the items: add :func:`variance_components` for both.
    """
    confidence = check_confidence("seed_interval confidence", confidence)
    return t_interval(scores_vector("seed_interval per_seed_scores", per_seed_scores), confidence)


@dataclass(frozen=True)
class VarianceComponents:
    """The benchmark mean of an ``(items, seeds)`` matrix with an interval from both sources.

    ``item_variance`` :math:`\\hat\\sigma_a^2`, ``seed_variance`` :math:`\\hat\\sigma_b^2`
    (each floored at 0) and ``residual_variance`` :math:`\\hat\\sigma_e^2` (item x seed
    interaction and noise); ``from_items``, ``from_seeds`` and ``from_residual`` are the three
    terms :math:`\\sigma_a^2/I`, :math:`\\sigma_b^2/J`, :math:`\\sigma_e^2/(IJ)` of
    ``standard_error ** 2``. ``seed_sd`` is the sd of the per-seed scores (column means),
    ``item_standard_error`` the standard error with the seeds held fixed
    (:math:`\\sqrt{M_A/(IJ)}`, what a bootstrap over items estimates), ``dof`` Satterthwaite's.
    """

    estimate: float
    low: float
    high: float
    standard_error: float
    confidence: float
    n_items: int
    n_seeds: int
    item_variance: float
    seed_variance: float
    residual_variance: float
    from_items: float
    from_seeds: float
    from_residual: float
    seed_sd: float
    item_standard_error: float
    dof: float


def _score_matrix(scores) -> torch.Tensor:
    where = "variance_components scores"
    try:
        x = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise GradNoiseError(
            explain(
                where,
                expected="an (items, seeds) matrix of numbers",
                got=f"{type(scores).__name__} ({error})",
                fix="pass a list of rows, one row per item and one column per seed",
            )
        ) from error
    if x.dim() != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise GradNoiseError(
            explain(
                where,
                expected="an (items, seeds) matrix with at least 2 items and 2 seeds",
                got=f"shape {tuple(x.shape)}",
                fix="use bootstrap_interval for one seed, seed_interval for per-seed scores",
            )
        )
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise GradNoiseError(
            explain(
                where,
                expected="finite values (a complete matrix)",
                got=f"{bad} NaN or inf value(s)",
                fix="keep only the items scored under every seed",
            )
        )
    return x


def _mean_squares(x: torch.Tensor) -> tuple[float, float, float]:
    """Two-way ANOVA mean squares (items, seeds, residual) of an (I, J) matrix."""
    n_items, n_seeds = x.shape
    rows, cols, grand = x.mean(1), x.mean(0), x.mean()
    resid = x - rows[:, None] - cols[None, :] + grand
    m_a = n_seeds * float(rows.var(unbiased=True))
    m_b = n_items * float(cols.var(unbiased=True))
    m_e = float(resid.pow(2).sum()) / ((n_items - 1) * (n_seeds - 1))
    return m_a, m_b, m_e


def variance_components(scores, *, confidence: float = 0.95) -> VarianceComponents:
    """Item and seed variance of an ``(items, seeds)`` score matrix, and the benchmark mean's
    interval from both (the module docstring gives the model and the formulas).

    ``scores[i][j]``: item i's score under seed j (every item under every seed).
    """
    confidence = check_confidence("variance_components confidence", confidence)
    x = _score_matrix(scores)
    n_items, n_seeds = x.shape
    m_a, m_b, m_e = _mean_squares(x)
    keep_a, keep_b = m_a > m_e, m_b > m_e  # components estimated as positive
    var_a = (m_a - m_e) / n_seeds if keep_a else 0.0
    var_b = (m_b - m_e) / n_items if keep_b else 0.0
    cells = n_items * n_seeds
    terms = (var_a / n_items, var_b / n_seeds, m_e / cells)
    variance = sum(terms)
    # variance = c_a m_a + c_b m_b + c_e m_e; Satterthwaite's degrees of freedom of that sum
    c_a, c_b = keep_a / cells, keep_b / cells
    c_e = (1 - keep_a - keep_b) / cells
    dofs = (n_items - 1, n_seeds - 1, (n_items - 1) * (n_seeds - 1))
    denom = sum(
        (c * m) ** 2 / d for c, m, d in zip((c_a, c_b, c_e), (m_a, m_b, m_e), dofs, strict=True)
    )
    dof = variance**2 / denom if denom > 0 else float(dofs[2])
    se = math.sqrt(variance)
    half = t_quantile(confidence, dof) * se
    mean = float(x.mean())
    return VarianceComponents(
        estimate=mean,
        low=mean - half,
        high=mean + half,
        standard_error=se,
        confidence=confidence,
        n_items=n_items,
        n_seeds=n_seeds,
        item_variance=var_a,
        seed_variance=var_b,
        residual_variance=m_e,
        from_items=terms[0],
        from_seeds=terms[1],
        from_residual=terms[2],
        seed_sd=math.sqrt(m_b / n_items),
        item_standard_error=math.sqrt(m_a / cells),
        dof=dof,
    )
