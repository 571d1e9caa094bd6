r"""Two systems scored on the same items: the paired difference and how sure it is.

With per-item scores :math:`a_i, b_i` on the same ``n`` items, the differences
:math:`d_i = a_i - b_i` carry everything: the item difficulty both systems share cancels, so a
paired interval is much narrower than two separate ones whenever the systems agree on which
items are hard (Miller 2024, "Adding Error Bars to Evals"). :func:`paired_comparison` reports

* the mean difference :math:`\bar d` with a **paired bootstrap** interval (items resampled
  jointly: the percentile bootstrap of :math:`d`) and a **paired t** interval
  :math:`\bar d \pm t_{(1+c)/2,\,n-1}\, s_d/\sqrt n`; both assume i.i.d. items, the t interval
  also a roughly normal :math:`\bar d` (fine for n of a few dozen and more);
* the **exact sign test**: with :math:`w` items where a wins and :math:`l` where b wins (ties
  dropped), under :math:`H_0` (either is as likely to win) :math:`W \sim \mathrm{Bin}(w + l,
  1/2)` and :math:`p = \min\{1, 2 P(W \le \min(w, l))\}`; it assumes only independent items;
* the **minimum detectable difference** at this n and spread,
  :func:`minimum_detectable_difference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch

from gradnoise.errors import GradNoiseError, check_confidence, explain
from gradnoise.evaluation.checks import scores_vector
from gradnoise.evaluation.intervals import Interval, bootstrap_interval, t_interval

__all__ = [
    "PairedComparison",
    "minimum_detectable_difference",
    "paired_comparison",
    "sign_test_p_value",
]


def _count(where: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GradNoiseError(
            explain(
                where,
                expected="a non-negative integer",
                got=repr(value),
                fix="count the items each system wins (ties excluded)",
            )
        )
    return value


def sign_test_p_value(wins: int, losses: int) -> float:
    """Exact two-sided sign test: :math:`\\min\\{1, 2 P(W \\le \\min(w, l))\\}`,
    :math:`W \\sim \\mathrm{Bin}(w + l, 1/2)`; 1.0 when there are no untied items.

    The binomial tail is summed in log space (``lgamma``), exact to rounding for any count.
    """
    wins = _count("sign_test_p_value wins", wins)
    losses = _count("sign_test_p_value losses", losses)
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        for i in range(k + 1)
    ]
    top = max(log_terms)
    tail = math.exp(top) * math.fsum(math.exp(t - top) for t in log_terms)
    return min(1.0, 2.0 * tail)


def _probability(where: str, value, name: str, example: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and 0.0 < value < 1.0):
        raise GradNoiseError(
            explain(
                f"{where} {name}",
                expected="a number in (0, 1)",
                got=repr(value),
                fix=f"use for example {name}={example}",
            )
        )
    return float(value)


def minimum_detectable_difference(
    sd_of_differences: float, n_items: int, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest true mean difference a two-sided level-``alpha`` test on ``n_items``
    paired items detects with probability ``power`` (normal approximation):

    .. math:: \\mathrm{MDD} = (z_{1-\\alpha/2} + z_{\\text{power}})\\, \\frac{s_d}{\\sqrt n}

    (2.80 :math:`s_d/\\sqrt n` at alpha 0.05, power 0.8). A smaller difference may be real but
    this benchmark cannot reliably show it; to halve the MDD, use 4x the items.
    """
    where = "minimum_detectable_difference"
    sd = sd_of_differences
    if isinstance(sd, bool) or not isinstance(sd, (int, float)) or not (sd >= 0 and sd < math.inf):
        raise GradNoiseError(
            explain(
                f"{where} sd_of_differences",
                expected="a finite number >= 0",
                got=repr(sd),
                fix="pass the sample sd of the per-item differences a_i - b_i",
            )
        )
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1:
        raise GradNoiseError(
            explain(
                f"{where} n_items",
                expected="a positive integer",
                got=repr(n_items),
                fix="pass the number of paired items",
            )
        )
    alpha = _probability(where, alpha, "alpha", "0.05")
    power = _probability(where, power, "power", "0.8")
    z = NormalDist().inv_cdf
    return (z(1 - alpha / 2) + z(power)) * sd / math.sqrt(n_items)


@dataclass(frozen=True)
class PairedComparison:
    """System a against system b on the same ``n`` items (``difference`` = mean of a - b).

    ``bootstrap`` and ``t`` are intervals of the mean difference; ``wins`` / ``losses`` /
    ``ties`` count the items where a scored higher / lower / equal; ``sign_test_p`` is the exact
    two-sided sign test; ``minimum_detectable`` the MDD at alpha = 1 - confidence, power 0.8,
    with this ``sd`` of the differences and this ``n``.
    """

    difference: float
    n: int
    sd: float
    bootstrap: Interval
    t: Interval
    wins: int
    losses: int
    ties: int
    sign_test_p: float
    minimum_detectable: float


def paired_comparison(
    a,
    b,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> PairedComparison:
    """Compare per-item scores ``a`` and ``b`` (the same items, in the same order).

    Randomness (the bootstrap only): ``generator``, else a generator seeded with ``seed``
    (0 when both are None).
    """
    where = "paired_comparison"
    confidence = check_confidence(f"{where} confidence", confidence)
    x, y = scores_vector(f"{where} a", a), scores_vector(f"{where} b", b)
    if x.numel() != y.numel():
        raise GradNoiseError(
            explain(
                where,
                expected="a and b of the same length (one score per shared item)",
                got=f"{x.numel()} and {y.numel()} scores",
                fix="keep only the items both systems were scored on, in the same order",
            )
        )
    d = x - y
    boot = bootstrap_interval(
        d, confidence=confidence, resamples=resamples, seed=seed, generator=generator
    )
    t = t_interval(d, confidence)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    return PairedComparison(
        difference=t.estimate,
        n=d.numel(),
        sd=t.sd,
        bootstrap=boot,
        t=t,
        wins=wins,
        losses=losses,
        ties=d.numel() - wins - losses,
        sign_test_p=sign_test_p_value(wins, losses),
        minimum_detectable=minimum_detectable_difference(t.sd, d.numel(), 1 - confidence),
    )
