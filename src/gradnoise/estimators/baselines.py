r"""Baselines for the score-function estimator: small objects, passed in, composed freely.

The score-function term with a baseline is :math:`t_k = (f(x_k) - b_k)\, s_k` with
:math:`s_k = \nabla_\theta \log p_\theta(x_k)`. It stays unbiased whenever :math:`b_k` does not
depend on :math:`x_k`, because :math:`E[s] = 0`. A baseline is a callable

.. code-block:: python

    baseline(values, scores) -> list[Tensor]   # one b per parameter, broadcastable to (K, *shape)

with ``values`` of shape ``(K,)`` and ``scores[i]`` of shape ``(K, *params[i].shape)``. Each ``b``
is a number, a 0-dim tensor, or a tensor with the sample dimension first and one axis per
parameter dimension, ``(K, 1, ..., 1)`` or ``(K, *shape)`` (checked by the estimator: a per-sample
``(K,)`` would otherwise broadcast along the parameter's last dimension).

The variance-optimal constant baseline (Weaver & Tao 2001; Greensmith et al. 2004; Mohamed et al.
2020, section 7.4.1) minimises :math:`\mathrm{tr}\,\mathrm{Var}[(f - b)s]`:

.. math::
    b^* = \frac{E[f\,\|s\|^2]}{E[\|s\|^2]},\qquad
    b^*_j = \frac{E[f\,s_j^2]}{E[s_j^2]}\ \text{(per coordinate)}.

The estimated versions here use the other ``K - 1`` samples only (leave-one-out), so they stay
unbiased. Leave-one-out baselines couple the terms weakly (through the other samples), so the
reported variance is then an approximation with an O(1/K) relative error.
"""

from __future__ import annotations

import math
import numbers

import torch

from gradnoise.errors import GradNoiseError, explain

__all__ = [
    "Constant",
    "LeaveOneOut",
    "MovingAverage",
    "NoBaseline",
    "OptimalPerCoordinate",
    "OptimalScalar",
]

_TINY = 1e-30


def _broadcast(b: torch.Tensor, scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """A per-sample scalar baseline ``(K,)`` as one view per parameter, ``(K, 1, ..., 1)``."""
    return [b.reshape(-1, *([1] * (s.dim() - 1))) for s in scores]


def _leave_one_out(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``(sum_j num_j - num_k) / (sum_j den_j - den_k)`` along the sample dimension 0."""
    total = denominator.sum(0, keepdim=True) - denominator
    return (numerator.sum(0, keepdim=True) - numerator) / total.clamp_min(_TINY)


class NoBaseline:
    """:math:`b = 0`: plain REINFORCE."""

    def __call__(self, values: torch.Tensor, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        return _broadcast(torch.zeros_like(values), scores)


class Constant:
    """A fixed :math:`b` chosen by the user (e.g. a known mean of ``f``)."""

    def __init__(self, value: float) -> None:
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            number = math.nan
        if not math.isfinite(number) or isinstance(value, bool):
            raise GradNoiseError(
                explain(
                    "Constant baseline",
                    expected="a finite number (one b shared by every sample and coordinate)",
                    got=repr(value),
                    fix="pass e.g. Constant(0.5); for a per-sample baseline use LeaveOneOut or "
                    "MovingAverage",
                )
            )
        self.value = number

    def __call__(self, values: torch.Tensor, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        return _broadcast(torch.full_like(values, self.value), scores)


class MovingAverage:
    r"""Exponential moving average of past means of ``f``: :math:`b \leftarrow \beta b +
    (1-\beta)\bar f`, updated *after* use so the current samples never enter their own baseline.
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not isinstance(decay, numbers.Real) or isinstance(decay, bool) or not 0 <= decay < 1:
            raise GradNoiseError(
                explain(
                    "MovingAverage decay",
                    expected="a float in [0, 1)",
                    got=repr(decay),
                    fix="use e.g. decay=0.9 (larger remembers longer)",
                )
            )
        self.decay = decay
        self.value: float | None = None

    def __call__(self, values: torch.Tensor, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        current = 0.0 if self.value is None else self.value
        mean = float(values.mean())
        self.value = mean if self.value is None else self.decay * current + (1 - self.decay) * mean
        return _broadcast(torch.full_like(values, current), scores)


class LeaveOneOut:
    r"""RLOO (Kool et al. 2019): :math:`b_k = \frac{1}{K-1}\sum_{j \ne k} f(x_j)`."""

    def __call__(self, values: torch.Tensor, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        return _broadcast(_leave_one_out(values, torch.ones_like(values)), scores)


class OptimalScalar:
    r""":math:`b^*_k = \sum_{j \ne k} f_j \|s_j\|^2 / \sum_{j \ne k} \|s_j\|^2`."""

    def __call__(self, values: torch.Tensor, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        sq_norm = sum(
            s.reshape(s.shape[0], -1).pow(2).sum(1) for s in scores
        )  # 0-dim: one coordinate
        return _broadcast(_leave_one_out(values * sq_norm, sq_norm), scores)


class OptimalPerCoordinate:
    r"""Per coordinate: :math:`b^*_{kj} = \sum_{i \ne k} f_i s_{ij}^2 / \sum_{i \ne k} s_{ij}^2`."""

    def __call__(self, values: torch.Tensor, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for s in scores:
            weight = s.pow(2)
            f = values.reshape(-1, *([1] * (s.dim() - 1)))
            out.append(_leave_one_out(f * weight, weight))
        return out
