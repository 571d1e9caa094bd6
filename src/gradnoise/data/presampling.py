r"""Presampling: importance sampling with fresh scores, bought by scoring a larger candidate set.

An :class:`~gradnoise.data.ImportanceSampler` works from stale scores, and scores renewed only
when an example is visited (or on a refresh schedule) lag the norms they stand for. Katharopoulos
& Fleuret (2018, "Not All Samples Are Created Equal") score the examples *where they are used*:
draw a candidate set of K = k B examples, score all K with the current model, and resample the
batch of B from the candidates in proportion to their scores. Two stages, both unbiased:

1. candidates :math:`j_1..j_K` drawn with replacement from a proposal :math:`p` over the N
   examples (uniform, :math:`p_i = 1/N`, or a sampler's stale proposal), with candidate weights
   :math:`c_j = 1/(N p_j)`: :math:`\bar g_C = \frac1K \sum_k c_{j_k} g_{j_k}` has
   :math:`E[\bar g_C] = \bar g`;
2. the batch :math:`b_1..b_B` drawn with replacement from the candidates with
   :math:`q_k = c_{j_k} r_{j_k} / \sum_l c_{j_l} r_{j_l}` for fresh scores :math:`r` (the
   candidates' gradient norms: then :math:`q_k \propto \|c_{j_k} g_{j_k}\|`, the optimum within
   the candidate set), with weights :math:`w_b = c_{j_b} / (K q_b)`, so that
   :math:`\hat g = \frac1B \sum_b w_b g_{j_b}` has :math:`E[\hat g \mid C] = \bar g_C`.

The total variance is the candidate set's plus the resampling's. With
:math:`m_p = \sum_i \|g_i\|^2 / (N^2 p_i)` (the second moment of one draw from :math:`p`),
:math:`G = \|\bar g\|^2` and the scores' product
:math:`S = \overline{r} \cdot \overline{\|g\|^2 / r}` (means over all N examples),

.. math::
    \mathrm{tr}\,\mathrm{Var}[\hat g] = \frac{m_p - G}{K}
    + \Big(1 - \frac1K\Big) \frac{S - G}{B},

exactly (:func:`presampling_variance`; both stages with replacement). For fresh norms
:math:`r_i = \|g_i\|`, :math:`S = (\frac1N \sum_i \|g_i\|)^2`, the single-stage optimum: the
second term is the optimal sampler's variance, and the first, the candidate-set term, is the
price of choosing among K candidates instead of all N. With uniform candidates it is uniform
sampling's variance at batch K, so the reduction over uniform at batch B is exactly
:math:`1 / (1/k + (1 - 1/K)/\rho^\star)` for the optimal reduction :math:`\rho^\star`, below
both k and :math:`\rho^\star K/(K-1)`: presampling needs k well above :math:`\rho^\star` to come
near it (it keeps about k / (k + rho*) of the optimum). Candidates drawn from a (stale) sampler's
proposal shrink the first term by that proposal's own reduction.
Scoring costs a forward and backward pass over the K candidates (or a forward pass, for a
forward-only score such as the loss or a last-layer bound): report it beside the variance.
A score of zero drops the candidate; that is unbiased only if its gradient is zero too, so pass
norms, or add a floor to proxy scores.
"""

from __future__ import annotations

import torch

from gradnoise.data.sampling import SamplingVariance
from gradnoise.errors import require

__all__ = ["draw_candidates", "presample", "presampling_variance"]


def draw_candidates(
    num_examples: int,
    count: int,
    *,
    probabilities: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Stage 1: ``count`` candidate indices drawn with replacement from ``probabilities`` (an
    (N,) proposal such as ``sampler.probabilities()``; uniform when None) and their candidate
    weights :math:`c_j = 1/(N p_j)` (float64; all ones for uniform)."""
    where = "draw_candidates"
    require(
        isinstance(num_examples, int) and num_examples > 0,
        where,
        "num_examples: a positive int",
        repr(num_examples),
        "pass len(dataset)",
    )
    require(
        isinstance(count, int) and count > 0,
        where,
        "count: a positive int (k * batch_size candidates)",
        repr(count),
        "e.g. 8 * batch_size",
    )
    if probabilities is None:
        picked = torch.randint(num_examples, (count,), generator=generator)
        return picked, torch.ones(count, dtype=torch.float64)
    p = torch.as_tensor(probabilities).detach().to("cpu", torch.float64).flatten()
    require(
        p.numel() == num_examples and bool((p > 0).all()) and abs(float(p.sum()) - 1) < 1e-6,
        where,
        f"probabilities: {num_examples} values > 0 summing to 1",
        f"{p.numel()} values, min {float(p.min()):.3g}, sum {float(p.sum()):.6g}",
        "pass sampler.probabilities() (mixed with uniform, so every p_i > 0), or None",
    )
    picked = torch.multinomial(p, count, replacement=True, generator=generator)
    return picked, 1.0 / (num_examples * p[picked])


def presample(
    scores: torch.Tensor,
    batch_size: int,
    *,
    candidate_weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Stage 2: positions (into the candidates) of a batch of ``batch_size`` drawn with
    :math:`q_k \propto c_k r_k`, and its weights :math:`w = c / (K q)` (float64).

    ``scores`` are the K candidates' fresh scores :math:`r` (per-example gradient norms, e.g.
    ``GradStats(...).total_sq_norms().sqrt()`` of a pass over them), ``candidate_weights`` the
    :math:`c` from :func:`draw_candidates` (ones when None). Train on
    ``candidates[positions]`` with ``(weights * losses).mean()``: unbiased for the full-data
    mean gradient. All-zero scores resample uniformly.
    """
    where = "presample"
    r = torch.as_tensor(scores).detach().to("cpu", torch.float64).flatten()
    require(
        r.numel() >= 1 and bool(torch.isfinite(r).all() and (r >= 0).all()),
        where,
        "scores: finite numbers >= 0, one per candidate",
        f"{r.numel()} scores, min {float(r.min()) if r.numel() else float('nan'):.3g}",
        "pass the candidates' gradient norms (sqrt of clamped squared norms)",
    )
    c = torch.ones_like(r) if candidate_weights is None else torch.as_tensor(candidate_weights)
    c = c.detach().to("cpu", torch.float64).flatten()
    require(
        c.shape == r.shape and bool(torch.isfinite(c).all() and (c > 0).all()),
        where,
        f"candidate_weights: {r.numel()} finite numbers > 0 (one per score)",
        f"{c.numel()} values",
        "pass the weights draw_candidates returned with the candidates",
    )
    require(
        isinstance(batch_size, int) and batch_size > 0,
        where,
        "batch_size: a positive int",
        repr(batch_size),
        "e.g. 32",
    )
    mass = c * r
    q = mass / mass.sum() if float(mass.sum()) > 0 else torch.full_like(r, 1.0 / r.numel())
    positions = torch.multinomial(q, batch_size, replacement=True, generator=generator)
    return positions, c[positions] / (r.numel() * q[positions])


def presampling_variance(
    sq_norms: torch.Tensor,
    full_grad_sq_norm: float,
    batch_size: int,
    num_candidates: int,
    *,
    probabilities: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> SamplingVariance:
    r"""The exact trace variance of the presampled batch gradient, against uniform at the same B.

    From every example's :math:`\|g_i\|^2` (``sq_norms``) and :math:`G = \|\bar g\|^2`:
    :math:`\frac{m_p - G}{K} + (1 - \frac1K)\frac{S - G}{B}` with
    :math:`m_p = \sum_i \|g_i\|^2/(N^2 p_i)` for the candidate proposal ``probabilities``
    (uniform when None) and :math:`S = \overline{r}\,\overline{\|g\|^2/r}` for the resampling
    ``scores`` r (fresh norms when None, the optimum; examples with r = 0 must have g = 0).
    ``importance`` is this; ``uniform`` is :math:`(\frac1N\sum_i\|g_i\|^2 - G)/B`.
    """
    where = "presampling_variance"
    norms = torch.as_tensor(sq_norms).detach().to("cpu", torch.float64).flatten().clamp_min(0)
    n = norms.numel()
    require(
        n >= 1 and bool(torch.isfinite(norms).all()),
        where,
        "sq_norms: finite numbers, one per example",
        f"{n} values",
        "pass every example's squared gradient norm (one GradStats pass over the data)",
    )
    require(
        isinstance(num_candidates, int) and isinstance(batch_size, int) and batch_size > 0,
        where,
        "batch_size and num_candidates: positive ints",
        f"{batch_size!r} and {num_candidates!r}",
        "e.g. batch_size=32, num_candidates=8 * 32",
    )
    require(
        num_candidates >= 1,
        where,
        "num_candidates >= 1",
        repr(num_candidates),
        "draw k * batch_size candidates",
    )
    p = torch.full_like(norms, 1.0 / n) if probabilities is None else torch.as_tensor(probabilities)
    p = p.detach().to("cpu", torch.float64).flatten()
    require(
        p.shape == norms.shape and bool((p > 0).all()) and abs(float(p.sum()) - 1) < 1e-6,
        where,
        "probabilities: one value > 0 per example, summing to 1",
        f"{p.numel()} values for {n} examples",
        "pass the proposal the candidates were drawn from, or None for uniform",
    )
    second = _score_product(norms, scores, where)
    m_p = float((norms / (n * n * p)).sum())
    g = float(full_grad_sq_norm)
    k = num_candidates
    return SamplingVariance(
        importance=(m_p - g) / k + (1 - 1 / k) * (second - g) / batch_size,
        uniform=(float(norms.mean()) - g) / batch_size,
        batch_size=batch_size,
    )


def _score_product(norms: torch.Tensor, scores, where: str) -> float:
    r""":math:`S = \overline{r}\,\overline{\|g\|^2/r}` (terms with r = 0 and g = 0 count 0)."""
    if scores is None:
        return float(norms.sqrt().mean()) ** 2
    r = torch.as_tensor(scores).detach().to("cpu", torch.float64).flatten()
    require(
        r.shape == norms.shape and bool(torch.isfinite(r).all() and (r >= 0).all()),
        where,
        "scores: one finite value >= 0 per example",
        f"{r.numel()} values for {norms.numel()} examples",
        "pass the scores the resampling uses, or None for fresh gradient norms",
    )
    require(
        not bool(((r == 0) & (norms > 0)).any()),
        where,
        "scores > 0 wherever the gradient is non-zero",
        f"{int(((r == 0) & (norms > 0)).sum())} zero scores with non-zero gradients",
        "add a floor to the scores; a zero score drops an example the gradient needs (bias)",
    )
    ratio = torch.where(r > 0, norms / r.clamp_min(1e-300), torch.zeros_like(norms))
    return float(r.mean()) * float(ratio.mean())
