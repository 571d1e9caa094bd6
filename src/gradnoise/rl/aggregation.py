r"""Loss aggregation over responses of different lengths, and its measured gradient variance.

Every aggregation in use is a weighted sum of per-response token sums. With per-token losses
``l_{i,t}`` (already multiplied by the advantage), response lengths ``L_i`` and ``N`` responses,

.. math::  \mathcal L = \sum_i w_i \sum_{t \le L_i} l_{i,t},

and the methods differ only in ``w_i``. Let ``g_i = sum_t grad l_{i,t}`` be the unnormalised
response gradient; its expectation is the policy gradient (up to sign) and, as He et al. 2025 argue
and measure, ``Var(g_i) ~ V L_i``.

=================  ============================  ==========================================
method             ``w_i``                       properties
=================  ============================  ==========================================
``token_mean``     ``1 / sum_j L_j``             DAPO (Yu et al. 2025), TRL ``"bnpo"``/``"dapo"``.
                                                 Biased: the scale ``1/sum L`` shrinks as
                                                 responses grow. Every token weighs the same.
``sequence_mean``  ``1 / (N L_i)``               GRPO (Shao et al. 2024), TRL ``"grpo"``. Biased
                                                 towards short responses (length bias), low
                                                 variance ``~ V/(N^2) sum 1/L_i``.
``constant``       ``1 / (N T_max)``             Dr. GRPO (Liu et al. 2025), TRL ``"dr_grpo"``.
                                                 Unbiased up to the constant ``1/T_max``; variance
                                                 ``~ V sum L_i`` grows with long responses.
``delta_l``        ``L_i^-a / sum_j L_j^-a``     Delta-L normalisation (He et al. 2025, "Delta L
                                                 Normalization: Rethink Loss Aggregation in
                                                 RLVR"). Weights sum to 1, so unbiased for
                                                 ``E[g_i]``; ``a = 1`` minimises ``sum w_i^2 L_i``,
                                                 the variance; ``a < 1`` trades some variance for
                                                 more weight on long responses.
=================  ============================  ==========================================

For Delta-L we implement the weights that sum to one (the minimum-variance unbiased combination);
the paper additionally rescales by a constant to keep gradient magnitudes comparable to the other
methods, which is a learning-rate factor and is left to the caller. Because the methods differ in
scale, :func:`aggregation_variance` reports the scale-free ratio ``tr Cov / ||mean||^2`` next to
the raw trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.stats.moments import GradMoments
from gradnoise.stats.quantities import trace_covariance

__all__ = [
    "METHODS",
    "AggregationVariance",
    "aggregate",
    "aggregation_variance",
    "aggregation_weights",
]

METHODS = ("token_mean", "sequence_mean", "constant", "delta_l")


def aggregation_weights(
    lengths: torch.Tensor, method: str, *, max_len: int | None = None, alpha: float = 1.0
) -> torch.Tensor:
    """The per-response weights ``w_i`` of ``method`` (table in the module docstring)."""
    lengths = torch.as_tensor(lengths).reshape(-1).to(torch.get_default_dtype())
    _check_lengths(lengths, method)
    n = lengths.numel()
    if method == "token_mean":
        return torch.full_like(lengths, 1.0) / lengths.sum()
    if method == "sequence_mean":
        return 1.0 / (n * lengths)
    if method == "constant":
        t_max = int(lengths.max().item()) if max_len is None else max_len
        return torch.full_like(lengths, 1.0 / (n * t_max))
    inv = lengths.pow(-alpha)
    return inv / inv.sum()


def _check_lengths(lengths: torch.Tensor, method: str) -> None:
    if method not in METHODS:
        raise GradNoiseError(
            explain(
                "aggregation method",
                expected=f"one of {METHODS}",
                got=repr(method),
                fix="pick one of the listed aggregation methods",
            )
        )
    if lengths.numel() == 0 or (lengths <= 0).any():
        raise GradNoiseError(
            explain(
                "aggregation lengths",
                expected="at least one response, every length >= 1",
                got=f"{lengths.numel()} lengths: {lengths.tolist()[:8]}",
                fix="drop empty responses (or count their end token) before aggregating",
            )
        )


def aggregate(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    method: str = "token_mean",
    *,
    max_len: int | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """``sum_i w_i sum_t mask_{i,t} l_{i,t}`` for ``(N, T)`` losses and a 0/1 mask."""
    if per_token_loss.shape != mask.shape or per_token_loss.dim() != 2:
        raise GradNoiseError(
            explain(
                "aggregate",
                expected="per-token losses and mask of the same (N, T) shape",
                got=f"{tuple(per_token_loss.shape)} and {tuple(mask.shape)}",
                fix="pad responses to a common length and pass the 0/1 padding mask",
            )
        )
    mask = mask.to(per_token_loss.dtype)
    max_len = per_token_loss.shape[1] if max_len is None else max_len
    weights = aggregation_weights(mask.sum(1), method, max_len=max_len, alpha=alpha)
    return (weights.to(per_token_loss.dtype) * (per_token_loss * mask).sum(1)).sum()


@dataclass(frozen=True)
class AggregationVariance:
    """Variance of one aggregation's batch gradient over resampled batches (module docstring)."""

    method: str
    trace: float  # tr Cov of the batch gradient
    mean_sq_norm: float  # ||mean batch gradient||^2
    relative: float  # trace / mean_sq_norm: scale-free, comparable across methods
    moments: GradMoments  # one "example" per resampled batch gradient


def aggregation_variance(
    sequence_grads: torch.Tensor,
    lengths: torch.Tensor,
    *,
    batch_size: int,
    num_batches: int = 200,
    methods: tuple[str, ...] = METHODS,
    alpha: float = 1.0,
    generator: torch.Generator,
) -> dict[str, AggregationVariance]:
    r"""Empirical gradient variance of each aggregation on given data.

    ``sequence_grads`` is ``(M, D)``: row ``i`` is ``g_i``, the gradient of response ``i``'s token
    sum. Each of ``num_batches`` batches draws ``batch_size`` responses without replacement (the
    same draws for every method) and forms ``sum_i w_i g_i``; the batch gradients are gathered in
    a :class:`GradMoments` and :func:`trace_covariance` gives the variance.
    """
    lengths = torch.as_tensor(lengths).reshape(-1)
    if sequence_grads.dim() != 2 or sequence_grads.shape[0] != lengths.numel():
        raise GradNoiseError(
            explain(
                "aggregation_variance",
                expected="(M, D) gradients and M lengths",
                got=f"{tuple(sequence_grads.shape)} and {lengths.numel()} lengths",
                fix="flatten each response's gradient into one row",
            )
        )
    if not 1 <= batch_size <= lengths.numel() or num_batches < 2:
        raise GradNoiseError(
            explain(
                "aggregation_variance",
                expected=f"1 <= batch_size <= {lengths.numel()} and num_batches >= 2",
                got=f"batch_size={batch_size}, num_batches={num_batches}",
                fix="pass more responses or a smaller batch_size",
            )
        )
    draws = [
        torch.randperm(lengths.numel(), generator=generator)[:batch_size]
        for _ in range(num_batches)
    ]
    return {m: _variance_of(sequence_grads, lengths, draws, m, alpha) for m in methods}


def _variance_of(grads, lengths, draws, method, alpha) -> AggregationVariance:
    max_len = int(lengths.max().item())
    batch_grads = torch.stack(
        [
            aggregation_weights(lengths[d], method, max_len=max_len, alpha=alpha).to(grads.dtype)
            @ grads[d]
            for d in draws
        ]
    )
    moments = GradMoments.from_per_example(batch_grads)
    trace = float(trace_covariance(moments))
    sq = float(moments.mean.pow(2).sum())
    return AggregationVariance(method, trace, sq, trace / max(sq, 1e-30), moments)
