r"""Unbiased row sampling of the weight-gradient matmul :math:`\nabla W = G^\top A`, its variance.

A linear layer :math:`Y = A W^\top + b` applied to :math:`N = B \cdot T` rows (examples times
positions) has the weight gradient

.. math::
    \nabla W = G^\top A = \sum_{r=1}^{N} u_r, \qquad u_r = g_r a_r^\top,
    \qquad \|u_r\|_F = \|g_r\|\,\|a_r\|,

with :math:`a_r` the r-th input row (the activation autograd would save) and :math:`g_r` the r-th
row of the output gradient. Keeping only some rows of :math:`A` after the forward and reweighting
them keeps the estimate unbiased. Two estimators, both conditional on the batch:

**Bernoulli (Poisson) sampling** (``method="bernoulli"``, the default). Row r is kept
independently with probability :math:`\pi_r = \min(1, c\, s_r)`, ``c`` chosen so that
:math:`\sum_r \pi_r = k` (the expected number of rows kept), and weighted by :math:`1/\pi_r`
(Horvitz-Thompson). Rows with :math:`\pi_r = 1` are kept exactly: the "winners" of WTA-CRS appear
without a separate rule. Unbiased, with the exact added (trace) variance

.. math::
    \mathrm{tr}\,\mathrm{Var}[\widehat{\nabla W}] = \sum_r \Big(\frac{1}{\pi_r} - 1\Big)
    \|g_r\|^2 \|a_r\|^2 .

**WTA-CRS** (``method="wta-crs"``; Liu et al. 2023, column-row sampling of Drineas et al. with
its winner-take-all split). With :math:`p_r = s_r / \sum_j s_j`, the :math:`|C|` rows of
largest :math:`p_r` are kept exactly, :math:`|C|` minimizing the bound
:math:`(1 - P_C)^2 / (k - |C|)` (:math:`P_C = \sum_{r \in C} p_r`), and :math:`k' = k - |C|`
rows are drawn with replacement from the rest :math:`R` with :math:`q_r = p_r / (1 - P_C)`, each
weighted by :math:`1 / (k' q_r)`. Unbiased, with the exact added variance

.. math::
    \mathrm{tr}\,\mathrm{Var}[\widehat{\nabla W}] = \frac{1}{k'} \Big( \sum_{r \in R}
    \frac{\|g_r\|^2 \|a_r\|^2}{q_r} - \Big\| \sum_{r \in R} g_r a_r^\top \Big\|_F^2 \Big)

(:math:`C = \emptyset` is plain CRS with replacement).

**Scores.** The variance-optimal score is :math:`s_r \propto \|a_r\|\,\|g_r\|`, but the rows must
be chosen in the forward, before :math:`g_r` exists, and only the chosen rows may be kept if
memory is to shrink. So, as WTA-CRS does in practice, the score is the activation norm
:math:`s_r = \|a_r\|` (``proposal="norm"``) or uniform (``proposal="uniform"``). Both variance
formulas hold for any scores: they use the true :math:`g_r` (known in the backward), so
:func:`added_variance` measures what the sampling costs on a batch whose gradients were recorded.
For nearly equal scores and token rows that carry independent noise, the added variance is about
:math:`(N/k - 1)` times the layer's own per-token scatter, which is why
:func:`gradnoise.sampled.choose_budgets` measures it against the SGD noise before choosing k.
"""

from __future__ import annotations

import torch

from gradnoise.errors import require

__all__ = [
    "METHODS",
    "PROPOSALS",
    "added_variance",
    "inclusion_probabilities",
    "kept_rows",
    "row_scores",
    "sample_rows",
    "wta_split",
]

METHODS = ("bernoulli", "wta-crs")
PROPOSALS = ("norm", "uniform")


def row_scores(rows: torch.Tensor, proposal: str) -> torch.Tensor:
    """Scores :math:`s_r` of the ``(N, d)`` activation rows: ``||a_r||`` or all ones (float64)."""
    if proposal == "uniform":
        return torch.ones(rows.shape[0], dtype=torch.float64, device=rows.device)
    return torch.linalg.vector_norm(rows.detach(), dim=1).to(torch.float64)


def inclusion_probabilities(scores: torch.Tensor, k: int) -> torch.Tensor:
    r""":math:`\pi_r = \min(1, c\, s_r)` with :math:`\sum_r \pi_r = k` (float64).

    The capped rows are the largest scores: with the scores sorted decreasingly and ``m`` rows
    capped, :math:`c = (k - m) / \sum_{j > m} s_j`, and ``m`` is the smallest count for which the
    first uncapped row has :math:`c\, s_{m+1} \le 1`. Rows of score 0 get :math:`\pi = 0`; if at
    most ``k`` rows have positive scores, all of them get :math:`\pi = 1`.
    """
    positive = scores > 0
    if int(positive.sum()) <= k:
        return positive.to(torch.float64)
    ordered, order = scores.to(torch.float64).sort(descending=True)
    tails = ordered.flip(0).cumsum(0).flip(0)[:k]  # tails[m] = sum_{j >= m} s_j
    capped = torch.arange(k, dtype=torch.float64, device=scores.device)
    factors = (k - capped) / tails
    m = int(torch.nonzero(factors * ordered[:k] <= 1)[0])
    pi_sorted = (factors[m] * ordered).clamp(max=1.0)
    pi_sorted[:m] = 1.0
    return torch.empty_like(pi_sorted).scatter_(0, order, pi_sorted)


def wta_split(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""WTA-CRS's exact set: ``(indices of C, P_C)``, :math:`|C|` minimizing
    :math:`(1 - P_C)^2 / (k - |C|)` over :math:`0 \le |C| < k`, C the largest ``probs``."""
    ordered, order = probs.sort(descending=True)
    mass = torch.cat([ordered.new_zeros(1), ordered[: k - 1].cumsum(0)])  # P_C for |C| = 0..k-1
    sizes = torch.arange(k, dtype=probs.dtype, device=probs.device)
    size = int(((1 - mass).clamp_min(0) ** 2 / (k - sizes)).argmin())
    return order[:size], mass[size]


def sample_rows(
    scores: torch.Tensor, k: int, method: str, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the rows to keep: ``(index, scale)`` with the estimate ``sum_s scale_s u_{index_s}``.

    ``index`` is int64 (repeats possible for ``"wta-crs"``), ``scale`` float64, both 1-D.
    """
    if method == "bernoulli":
        pi = inclusion_probabilities(scores, k)
        uniform = torch.rand(pi.shape, generator=generator, dtype=torch.float64, device=pi.device)
        index = torch.nonzero(uniform < pi).squeeze(1)
        return index, 1.0 / pi[index]
    positive = scores > 0
    if int(positive.sum()) <= k:  # every row that can contribute fits: keep them exactly
        index = torch.nonzero(positive).squeeze(1)
        return index, torch.ones(index.shape, dtype=torch.float64, device=scores.device)
    probs = scores.to(torch.float64) / scores.sum()
    exact, mass = wta_split(probs, k)
    rest = probs.clone()
    rest[exact] = 0.0
    draws = k - exact.numel()
    drawn = torch.multinomial(rest, draws, replacement=True, generator=generator)
    scale = torch.cat(
        [torch.ones_like(exact, dtype=torch.float64), (1 - mass) / (draws * rest[drawn])]
    )
    return torch.cat([exact, drawn]), scale


def kept_rows(budget: float, rows: int) -> int:
    """``k = max(1, round(budget * N))``: the (expected) number of rows a budget keeps."""
    return max(1, min(rows, round(budget * rows)))


def added_variance(
    activations: torch.Tensor,
    output_grads: torch.Tensor,
    budget: float,
    *,
    method: str = "bernoulli",
    proposal: str = "norm",
) -> torch.Tensor:
    """The exact added trace variance of the sampled weight gradient (module formulas), float64.

    ``activations`` ``(..., d_in)`` and ``output_grads`` ``(..., d_out)`` are the layer's input and
    the gradient reaching its output on one batch; ``budget`` the kept fraction k / N.
    """
    require(
        method in METHODS, "added_variance(method=...)", f"one of {METHODS}", repr(method),
        "use 'bernoulli' or 'wta-crs'",
    )  # fmt: skip
    a = activations.detach().reshape(-1, activations.shape[-1]).to(torch.float64)
    g = output_grads.detach().reshape(-1, output_grads.shape[-1]).to(torch.float64)
    k = kept_rows(budget, a.shape[0])
    scores = row_scores(a, proposal)
    sq = a.pow(2).sum(1) * g.pow(2).sum(1)
    if method == "bernoulli":
        pi = inclusion_probabilities(scores, k)
        kept = pi > 0
        return ((1 / pi[kept] - 1) * sq[kept]).sum()
    if int((scores > 0).sum()) <= k:
        return sq.new_zeros(())
    probs = scores / scores.sum()
    exact, mass = wta_split(probs, k)
    rest = torch.ones_like(probs, dtype=torch.bool)
    rest[exact] = False
    rest &= probs > 0
    q = probs[rest] / (1 - mass)
    total = g[rest].T @ a[rest]
    return ((sq[rest] / q).sum() - total.pow(2).sum()) / (k - exact.numel())
