r"""Two instruments that check what convergence proofs assume about gradient noise.

**Heavy-tail index** (:func:`hill_tail_index`). The Hill (1975) estimator of the tail index
:math:`\alpha` (:math:`P(X > x) \sim x^{-\alpha}`) of positive samples, e.g. per-example gradient
norms: with the order statistics :math:`X_{(1)} \ge \dots \ge X_{(n)}` and the
:math:`k = \lceil f n \rceil` largest (``f = tail_fraction``, capped at :math:`n - 1`),

.. math::
    T = \sum_{i=1}^{k} \log\frac{X_{(i)}}{X_{(k+1)}},\qquad \hat\alpha = \frac{k}{T}.

Interval: **the exact Gamma interval**. Above a Pareto threshold the log-spacings are, given
:math:`X_{(k+1)}`, i.i.d. exponential with rate :math:`\alpha` (Rényi), so
:math:`\alpha T \sim \mathrm{Gamma}(k, 1)` and

.. math::
    \left[\frac{q_{(1-c)/2}}{T},\ \frac{q_{(1+c)/2}}{T}\right],\qquad q_p = p\text{-quantile of }
    \mathrm{Gamma}(k, 1),

covers :math:`\alpha` with probability exactly ``confidence`` when the top :math:`k+1` samples
lie in a Pareto tail (for large k it tends to :math:`\hat\alpha(1 \pm z/\sqrt{k})`). For a tail
that is only asymptotically Pareto the estimator is biased by the slowly varying part; a smaller
``tail_fraction`` trades that bias for variance (relative sd :math:`1/\sqrt{k}`).
:math:`\alpha \le 2` means infinite variance, the regime of the heavy-tailed SGD analyses
(Simsekli et al. 2019, "A Tail-Index Analysis of Stochastic Gradient Noise"; Zhang et al. 2020,
"Why are Adaptive Methods Good for Attention Models?").

**Affine noise variance** (:func:`affine_variance_fit`). The assumption
:math:`\mathrm{tr}\,\Sigma = \sigma_0^2 + \sigma_1^2 \|G\|^2` of the AdaGrad and RMSProp/Adam
convergence results (e.g. Faw et al. 2022, "The Power of Adaptivity in SGD: Self-Tuning Step
Sizes with Unbounded Gradients and Affine Variance"; Wang et al. 2023, "Closing the Gap Between
the Upper Bound and the Lower Bound of Adam's Iteration Complexity"), fitted by ordinary least
squares across m steps from per-step unbiased estimates (``NoiseScaleEstimate.trace_sigma``,
``.grad_sq_norm``). Intervals are estimate :math:`\pm t_{(1+c)/2,\,m-2}\,\mathrm{SE}` with
the t quantile computed exactly (integer degrees of freedom) and, by default, the
heteroskedasticity-robust HC3 standard errors (MacKinnon & White 1985): the noise of a
tr(Sigma) estimate grows with tr(Sigma), which makes the classical OLS errors (``robust=False``)
too small where it matters. The model is said to fail (``holds=False``) when the intercept or
slope is significantly negative (interval entirely below 0) or when a quadratic term added to the
fit is significantly non-zero (its t interval on m - 3 degrees of freedom excludes 0): a
lack-of-fit test, so an affine truth is flagged with probability about 1 - confidence. R^2 is
reported but not used for ``holds``: constant noise (:math:`\sigma_1 = 0`) is affine with R^2
near 0.

Stated simplifications: (1) errors in variables are ignored: the per-step :math:`\|G\|^2`
estimates are noisy too, which biases the slope toward 0 by the factor
:math:`\mathrm{Var}(x_\text{true}) / (\mathrm{Var}(x_\text{true}) + \mathrm{Var}(\text{noise}))`;
use large batches or average several steps per point when :math:`\|G\|^2` is small against its
noise :math:`\approx \mathrm{tr}\Sigma / n`. (2) The standard errors assume independent
residuals; steps close in time are correlated, so read the intervals as optimistic on real runs.
On the linear-Gaussian problem (30 steps of batch 512) the 90% intervals measured 0.86 and 0.83
coverage over 100 repetitions (HC3; 0.92 and 0.77 classical), and ``holds`` 0.84.

Test tolerances (tests/stats/test_instruments.py): the exact intervals make the coverage of a
90% interval over 200 seeds Binomial(200, 0.9)/200, sd 0.021, so [0.84, 0.96] is about
±2.8 sd; point estimates are checked within 4 of their own standard errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradnoise.errors import GradNoiseError, check_confidence, explain
from gradnoise.stats.averaging import student_quantile

__all__ = [
    "AffineVarianceFit",
    "TailIndex",
    "affine_variance_fit",
    "hill_tail_index",
]


def _as_vector(where: str, name: str, values) -> torch.Tensor:
    x = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if x.dim() != 1:
        raise GradNoiseError(
            explain(
                f"{where} {name}",
                expected="a 1-D sequence of numbers",
                got=f"shape {tuple(x.shape)}",
                fix="pass one value per sample (flatten first)",
            )
        )
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise GradNoiseError(
            explain(
                f"{where} {name}",
                expected="finite values",
                got=f"{bad} NaN or inf value(s)",
                fix="drop the non-finite entries (steps skipped as non-finite) first",
            )
        )
    return x


# ---------------------------------------------------------------------------- quantiles


def _gamma_quantile(shape: int, p: float) -> float:
    """p-quantile of Gamma(shape, 1) by bisection on the regularized lower incomplete gamma."""
    k = torch.tensor(float(shape), dtype=torch.float64)
    lo, hi = 0.0, shape + 40.0 * math.sqrt(shape) + 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(torch.special.gammainc(k, torch.tensor(mid, dtype=torch.float64))) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------- Hill


@dataclass(frozen=True)
class TailIndex:
    """The Hill estimate ``alpha`` of the tail index with its exact ``confidence`` interval
    ``[low, high]`` (Gamma-based, see the module docstring), from the ``k`` largest of ``n``
    samples. ``alpha <= 2`` means an infinite-variance tail."""

    alpha: float
    low: float
    high: float
    k: int
    n: int
    confidence: float

    @property
    def heavy(self) -> bool:
        """Whether the whole interval lies at or below 2 (variance significantly infinite)."""
        return self.high <= 2.0


def hill_tail_index(
    norms: Sequence[float] | torch.Tensor, *, tail_fraction: float = 0.1, confidence: float = 0.9
) -> TailIndex:
    r"""Hill estimator :math:`\hat\alpha = k / \sum_{i \le k} \log(X_{(i)} / X_{(k+1)})`.

    ``k = ceil(tail_fraction * n)``, capped at ``n - 1``; needs ``k >= 2``. The interval is
    :math:`[q_{(1-c)/2}, q_{(1+c)/2}] \cdot \hat\alpha / k` with :math:`q` the quantiles of
    Gamma(k, 1): exact under a Pareto tail (Hill 1975, "A Simple General Approach to Inference
    About the Tail of a Distribution").
    """
    where = "hill_tail_index"
    check_confidence(f"{where} confidence", confidence)
    if not (isinstance(tail_fraction, (int, float)) and 0.0 < tail_fraction < 1.0):
        raise GradNoiseError(
            explain(
                f"{where} tail_fraction",
                expected="a float in (0, 1)",
                got=repr(tail_fraction),
                fix="use for example tail_fraction=0.1 (the largest 10% of the samples)",
            )
        )
    x = _as_vector(where, "norms", norms)
    if bool((x <= 0).any()):
        raise GradNoiseError(
            explain(
                f"{where} norms",
                expected="positive samples (the estimator takes logs)",
                got=f"{int((x <= 0).sum())} value(s) <= 0, minimum {float(x.min())!r}",
                fix="drop zero norms (e.g. padded examples) before estimating the tail",
            )
        )
    n = x.numel()
    k = min(math.ceil(tail_fraction * n), n - 1)
    if k < 2:
        raise GradNoiseError(
            explain(
                where,
                expected="a tail of at least k=2 order statistics (k = ceil(tail_fraction * n))",
                got=f"n={n}, tail_fraction={tail_fraction}, k={k}",
                fix="pass more samples or a larger tail_fraction",
            )
        )
    top = torch.topk(x, k + 1).values
    total = float(torch.log(top[:k] / top[k]).sum())
    if total <= 0.0:
        raise GradNoiseError(
            explain(
                where,
                expected="distinct values in the tail",
                got=f"the {k + 1} largest samples all equal {float(top[k])!r}",
                fix="the samples are constant in their tail; raise tail_fraction or check them",
            )
        )
    q_low = _gamma_quantile(k, (1.0 - confidence) / 2.0)
    q_high = _gamma_quantile(k, (1.0 + confidence) / 2.0)
    return TailIndex(k / total, q_low / total, q_high / total, k, n, float(confidence))


# ---------------------------------------------------------------------------- affine fit


@dataclass(frozen=True)
class AffineVarianceFit:
    r"""Least-squares fit of :math:`\mathrm{tr}\Sigma = \sigma_0^2 + \sigma_1^2 \|G\|^2`.

    ``sigma0_sq`` / ``sigma1_sq`` (intercept / slope) with their ``confidence`` intervals;
    ``curvature`` is the coefficient of :math:`\|G\|^4` when one is added (the lack-of-fit
    test), with its interval. ``holds`` is False, with ``reason`` saying why, when the intercept
    or slope is significantly negative or the curvature significantly non-zero.
    """

    sigma0_sq: float
    sigma0_sq_low: float
    sigma0_sq_high: float
    sigma1_sq: float
    sigma1_sq_low: float
    sigma1_sq_high: float
    curvature: float
    curvature_low: float
    curvature_high: float
    r_squared: float
    steps: int
    confidence: float
    holds: bool
    reason: str


def _ols(
    design: torch.Tensor, y: torch.Tensor, robust: bool
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Coefficients, their standard errors (classical, or HC3 when ``robust``) and the RSS."""
    xtx_inv = torch.linalg.inv(design.T @ design)
    beta = xtx_inv @ (design.T @ y)
    resid = y - design @ beta
    rss = float(resid @ resid)
    if robust:
        leverage = ((design @ xtx_inv) * design).sum(1)
        weight = (resid / torch.clamp(1.0 - leverage, min=1e-12)) ** 2
        cov = xtx_inv @ (design.T * weight) @ design @ xtx_inv
    else:
        cov = xtx_inv * rss / (design.shape[0] - design.shape[1])
    return beta, torch.sqrt(torch.clamp(torch.diagonal(cov), min=0.0)), rss


def affine_variance_fit(
    trace_sigma: Sequence[float] | torch.Tensor,
    grad_sq: Sequence[float] | torch.Tensor,
    *,
    confidence: float = 0.9,
    robust: bool = True,
) -> AffineVarianceFit:
    r"""Fit :math:`\mathrm{tr}\Sigma_t = \sigma_0^2 + \sigma_1^2 \|G_t\|^2` over steps t by OLS.

    ``trace_sigma[t]`` and ``grad_sq[t]`` are the per-step unbiased estimates (``grad_sq`` may be
    negative). Intervals: estimate :math:`\pm t_{(1+c)/2,\,m-2}\,\mathrm{SE}`, HC3 standard
    errors unless ``robust=False`` (classical, exact for i.i.d. normal residuals). Errors in the
    :math:`\|G\|^2` coordinate are ignored (attenuation toward 0; see the module docstring).
    Needs m >= 5 steps and at least 3 distinct ``grad_sq`` values.
    """
    where = "affine_variance_fit"
    check_confidence(f"{where} confidence", confidence)
    y = _as_vector(where, "trace_sigma", trace_sigma)
    x = _as_vector(where, "grad_sq", grad_sq)
    if y.numel() != x.numel():
        raise GradNoiseError(
            explain(
                where,
                expected="trace_sigma and grad_sq of the same length (one pair per step)",
                got=f"lengths {y.numel()} and {x.numel()}",
                fix="pass the two estimates of the same steps",
            )
        )
    m = y.numel()
    if m < 5:
        raise GradNoiseError(
            explain(
                where,
                expected="at least 5 steps (the lack-of-fit test needs 2 residual dof)",
                got=f"{m} step(s)",
                fix="record more steps before fitting",
            )
        )
    if torch.unique(x).numel() < 3:
        raise GradNoiseError(
            explain(
                where,
                expected="at least 3 distinct grad_sq values (a line and its curvature)",
                got=f"{torch.unique(x).numel()} distinct value(s)",
                fix="fit over steps where |G|^2 changes, e.g. across training",
            )
        )
    scale = float(x.abs().max())
    u = x / scale  # the slope is divided back; t statistics do not depend on the scale
    ones = torch.ones_like(u)
    beta, se, rss = _ols(torch.stack([ones, u], 1), y, robust)
    t1 = student_quantile((1.0 + confidence) / 2.0, m - 2)
    b0, s0 = float(beta[0]), float(se[0])
    b1, s1 = float(beta[1]) / scale, float(se[1]) / scale
    tss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - rss / tss if tss > 0 else 1.0
    beta_q, se_q, _ = _ols(torch.stack([ones, u, u * u], 1), y, robust)
    t2 = student_quantile((1.0 + confidence) / 2.0, m - 3)
    c, sc = float(beta_q[2]) / scale**2, float(se_q[2]) / scale**2

    fit = dict(
        sigma0_sq=b0,
        sigma0_sq_low=b0 - t1 * s0,
        sigma0_sq_high=b0 + t1 * s0,
        sigma1_sq=b1,
        sigma1_sq_low=b1 - t1 * s1,
        sigma1_sq_high=b1 + t1 * s1,
        curvature=c,
        curvature_low=c - t2 * sc,
        curvature_high=c + t2 * sc,
    )
    failures = []
    if fit["sigma0_sq_high"] < 0:
        failures.append(f"intercept sigma0^2 significantly negative ({b0:.4g})")
    if fit["sigma1_sq_high"] < 0:
        failures.append(f"slope sigma1^2 significantly negative ({b1:.4g})")
    if fit["curvature_low"] > 0 or fit["curvature_high"] < 0:
        failures.append(
            f"tr(Sigma) is curved in |G|^2 (quadratic coefficient {c:.4g}, "
            f"{confidence:.0%} interval [{fit['curvature_low']:.4g}, {fit['curvature_high']:.4g}]"
            " excludes 0)"
        )
    holds = not failures
    reason = (
        f"affine model consistent with the data at {confidence:.0%}"
        if holds
        else "affine model fails: " + "; ".join(failures)
    )
    return AffineVarianceFit(
        **fit,
        r_squared=r2,
        steps=m,
        confidence=float(confidence),
        holds=holds,
        reason=reason,
    )
