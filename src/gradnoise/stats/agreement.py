r"""Gradient agreement between micro-batches or ranks, and the adaptive-sampling tests.

**Agreement.** For gradients :math:`g_1..g_K` of disjoint micro-batches (or ranks) the cosine
matrix :math:`C_{rs} = \langle g_r, g_s\rangle / (\|g_r\|\|g_s\|)` summarizes how much they pull
the same way; the fraction of pairs with :math:`C_{rs} <` ``threshold`` is the quantity Gradient
Agreement Filtering thresholds (Chaubard & Kochenderfer 2024, "Beyond Gradient Averaging in
Parallel Optimization"). Without the gradients themselves, :func:`agreement_from_norms` gives the
mean pairwise inner product relative to the mean squared norm from two-batch norms alone:

.. math::
    \frac{\frac{1}{K(K-1)}\sum_{r\ne s}\langle g_r, g_s\rangle}{\frac1K\sum_r\|g_r\|^2}
    = \frac{K\|\bar g\|^2 - \overline{\|g\|^2}}{(K-1)\,\overline{\|g\|^2}},

which is free under DDP (:class:`~gradnoise.stats.distributed.NoiseScaleHook`) or accumulation.

**Inner-product and orthogonality tests** (Bollapragada, Byrd & Nocedal 2018, "Adaptive
Sampling Strategies for Stochastic Optimization", eqs. 2.6 and 2.9): with per-example squared
norms :math:`\|g_i\|^2` and projections :math:`d_i = \langle g_i, \bar g\rangle`,

.. math::
    \frac{\widehat{\mathrm{Var}}(d_i)}{n\,\|\bar g\|^4} \le \theta^2,\qquad
    \frac{\sum_i \big(\|g_i\|^2 - d_i^2/\|\bar g\|^2\big)}{(n-1)\,n\,\|\bar g\|^2} \le \nu^2.

:func:`directional_derivatives` computes the :math:`d_i` in one forward-mode pass (``torch.func``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from gradnoise.errors import GradNoiseError, explain
from gradnoise.stats.twobatch import TwoBatchNorms

__all__ = [
    "Agreement",
    "SamplingTest",
    "agreement",
    "agreement_from_norms",
    "directional_derivatives",
    "inner_product_test",
    "orthogonality_test",
]


@dataclass(frozen=True)
class Agreement:
    """Summary of a cosine matrix between ``K`` gradients."""

    cosine: torch.Tensor  # (K, K)
    mean_cosine: float  # over the K (K - 1) / 2 distinct pairs
    min_cosine: float
    conflict_fraction: float  # pairs with cosine < threshold
    threshold: float


def agreement(grads: torch.Tensor, *, threshold: float = 0.0) -> Agreement:
    """Cosine matrix and its summary for gradients stacked as ``(K, ...)``, ``K >= 2``."""
    if grads.dim() < 2 or grads.shape[0] < 2:
        raise GradNoiseError(
            explain(
                "agreement",
                expected="at least 2 gradients stacked on dim 0, shape (K, ...)",
                got=f"shape {tuple(grads.shape)}",
                fix="stack the micro-batch (or rank) gradients, e.g. torch.stack(grads)",
            )
        )
    flat = grads.reshape(grads.shape[0], -1)
    unit = flat / torch.linalg.vector_norm(flat, dim=1, keepdim=True).clamp_min(1e-30)
    cosine = unit @ unit.T
    rows, cols = torch.triu_indices(len(flat), len(flat), offset=1)
    pairs = cosine[rows, cols]
    conflicts = float((pairs < threshold).to(flat.dtype).mean())
    return Agreement(cosine, float(pairs.mean()), float(pairs.min()), conflicts, threshold)


def agreement_from_norms(record: TwoBatchNorms) -> float:
    """Mean pairwise inner product over the mean squared norm (module docstring), whole model."""
    k = record.b_big / record.b_small
    small = float(sum(record.small_sq_norms.values()))
    big = float(sum(record.big_sq_norms.values()))
    return (k * big - small) / ((k - 1) * small)


@dataclass(frozen=True)
class SamplingTest:
    """One of Bollapragada et al.'s tests: pass when ``statistic <= threshold**2``.

    ``suggested_batch_size`` is the smallest ``n`` that would pass at the measured variance.
    """

    statistic: float
    threshold: float
    passed: bool
    suggested_batch_size: float


def _checked_mean_sq(sq_norms: torch.Tensor, dots: torch.Tensor, mean_sq_norm) -> float:
    if sq_norms.shape != dots.shape or dots.dim() != 1 or len(dots) < 2:
        raise GradNoiseError(
            explain(
                "inner_product_test / orthogonality_test",
                expected="per-example sq_norms and dots of the same shape (n,), n >= 2",
                got=f"shapes {tuple(sq_norms.shape)} and {tuple(dots.shape)}",
                fix="pass stats.total_sq_norms() and directional_derivatives(..., mean grad)",
            )
        )
    return float(mean_sq_norm)


def inner_product_test(
    sq_norms: torch.Tensor, dots: torch.Tensor, mean_sq_norm, *, theta: float = 0.9
) -> SamplingTest:
    """Inner-product test: :math:`\\widehat{Var}(d_i) / (n \\|\\bar g\\|^4) \\le \\theta^2`."""
    g2 = _checked_mean_sq(sq_norms, dots, mean_sq_norm)
    n, variance = len(dots), float(dots.var())
    statistic = variance / (n * g2 * g2)
    return SamplingTest(statistic, theta, statistic <= theta**2, variance / (theta**2 * g2 * g2))


def orthogonality_test(
    sq_norms: torch.Tensor, dots: torch.Tensor, mean_sq_norm, *, nu: float = 5.67
) -> SamplingTest:
    """Orthogonality test: the mean squared component orthogonal to :math:`\\bar g`, over n.

    The default ``nu`` is :math:`\\tan 80^\\circ \\approx 5.67`, the paper's choice.
    """
    g2 = _checked_mean_sq(sq_norms, dots, mean_sq_norm)
    n = len(dots)
    orthogonal = float((sq_norms - dots.pow(2) / g2).sum()) / (n - 1)
    statistic = orthogonal / (n * g2)
    return SamplingTest(statistic, nu, statistic <= nu**2, orthogonal / (nu**2 * g2))


def directional_derivatives(
    model: nn.Module,
    per_example_loss: Callable[[nn.Module], torch.Tensor],
    direction: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """:math:`d_i = \\langle \\nabla \\ell_i, v\\rangle` for all examples in one ``torch.func.jvp``.

    ``per_example_loss(call)`` must return the ``(n,)`` losses, computing the model's output as
    ``call(inputs)``; ``direction`` maps parameter names to tangents (missing names: zero).
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    names = [name for name in params if name in direction]

    def losses(*values: torch.Tensor) -> torch.Tensor:
        current = {**params, **dict(zip(names, values, strict=True))}
        return per_example_loss(lambda *a: torch.func.functional_call(model, current, a))

    primals = tuple(params[name] for name in names)
    tangents = tuple(direction[name].to(params[name]) for name in names)
    return torch.func.jvp(losses, primals, tangents)[1]
