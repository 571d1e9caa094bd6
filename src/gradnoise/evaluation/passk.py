r"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With :math:`n` samples of one problem of which :math:`c` are correct, the probability that
:math:`k` samples drawn without replacement from those :math:`n` hold at least one correct one,

.. math::
    \widehat{\text{pass@}k} = 1 - \binom{n-c}{k} \Big/ \binom{n}{k}
        = 1 - \prod_{i=n-c+1}^{n} \left(1 - \frac{k}{i}\right),

is an unbiased estimate of the problem's pass@k for every :math:`k \le n` (1 when
:math:`n - c < k`). The product form is computed as :math:`-\mathrm{expm1}(\sum_i
\mathrm{log1p}(-k/i))`, which neither overflows (binomials of large n) nor loses the small
values (``1 - prod`` near 0). The benchmark's pass@k is the mean over problems, and its standard
error the sd of the per-problem estimates over :math:`\sqrt P`: that spread holds both the
problems' differences and each estimate's sampling noise, so it is the right error of the mean
for i.i.d. problems (the interval is :math:`\pm t_{(1+c)/2,\,P-1}` SE, cut to [0, 1]).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from gradnoise.errors import GradNoiseError, check_confidence, explain
from gradnoise.evaluation.checks import sample_sd
from gradnoise.evaluation.intervals import t_quantile

__all__ = ["PassAtK", "pass_at_k", "pass_at_k_interval"]


def _k(where: str, k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise GradNoiseError(
            explain(
                f"{where} k",
                expected="a positive integer",
                got=repr(k),
                fix="use for example k=1 or k=10",
            )
        )
    return k


def _counts(where: str, name: str, values) -> list[int]:
    """``values`` (an int or a 1-D sequence of ints) as a list of non-negative ints."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        items = [values] if isinstance(values, (numbers.Number, str)) else list(values)
    except TypeError:
        items = [values]
    for index, value in enumerate(items):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise GradNoiseError(
                explain(
                    f"{where} {name}",
                    expected="non-negative integers (one per problem)",
                    got=f"{value!r} at position {index}",
                    fix="count samples and correct samples per problem as integers",
                )
            )
    return [int(value) for value in items]


def _check_problems(where: str, n: list[int], c: list[int], k: int) -> None:
    if len(n) != len(c) or not n:
        raise GradNoiseError(
            explain(
                where,
                expected="n and c of the same non-zero length (one entry per problem)",
                got=f"{len(n)} and {len(c)} entries",
                fix="pass the number of samples and of correct samples of every problem",
            )
        )
    for index, (samples, correct) in enumerate(zip(n, c, strict=True)):
        if correct > samples:
            raise GradNoiseError(
                explain(
                    f"{where} problem {index}",
                    expected="c <= n (correct samples among the samples drawn)",
                    got=f"c={correct} > n={samples}",
                    fix="count each problem's correct samples among its n samples",
                )
            )
        if samples < k:
            raise GradNoiseError(
                explain(
                    f"{where} problem {index}",
                    expected=f"at least k={k} samples (the estimator needs n >= k)",
                    got=f"n={samples}",
                    fix=f"draw at least {k} samples per problem, or use k <= {samples}",
                )
            )


def _one(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    if c == 0:
        return 0.0
    i = torch.arange(n - c + 1, n + 1, dtype=torch.float64)
    return float(-torch.expm1(torch.log1p(-k / i).sum()))


def pass_at_k(n, c, k: int) -> torch.Tensor:
    """Unbiased pass@k of each problem (module docstring), as a float64 tensor of shape (P,).

    ``n``: samples per problem, ``c``: correct ones (ints, or 1-D sequences of ints of one
    length); every problem needs ``n >= k``.
    """
    where = "pass_at_k"
    k = _k(where, k)
    n_list, c_list = _counts(where, "n", n), _counts(where, "c", c)
    _check_problems(where, n_list, c_list, k)
    values = [_one(samples, correct, k) for samples, correct in zip(n_list, c_list, strict=True)]
    return torch.tensor(values, dtype=torch.float64)


@dataclass(frozen=True)
class PassAtK:
    """The benchmark's pass@k: mean over ``n_problems`` of the per-problem unbiased estimates,
    their ``sd`` across problems, the mean's ``standard_error`` and ``confidence`` interval."""

    k: int
    estimate: float
    low: float
    high: float
    standard_error: float
    sd: float
    n_problems: int
    confidence: float


def pass_at_k_interval(n, c, k: int, *, confidence: float = 0.95) -> PassAtK:
    """pass@k over problems with the standard error of the mean over problems and a t interval
    on P - 1 degrees of freedom, cut to [0, 1]; needs at least 2 problems."""
    where = "pass_at_k_interval"
    confidence = check_confidence(f"{where} confidence", confidence)
    per_problem = pass_at_k(n, c, k)
    problems = per_problem.numel()
    if problems < 2:
        raise GradNoiseError(
            explain(
                where,
                expected="at least 2 problems (the error is the spread across problems)",
                got=f"{problems}",
                fix="use pass_at_k for one problem's estimate, or evaluate more problems",
            )
        )
    mean, sd = float(per_problem.mean()), sample_sd(per_problem)
    se = sd / math.sqrt(problems)
    half = t_quantile(confidence, problems - 1) * se
    return PassAtK(
        k=k,
        estimate=mean,
        low=max(0.0, mean - half),
        high=min(1.0, mean + half),
        standard_error=se,
        sd=sd,
        n_problems=problems,
        confidence=confidence,
    )
