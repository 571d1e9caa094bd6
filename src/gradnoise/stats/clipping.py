r"""Per-example gradient clipping from GradStats' norms: the clipped sum without per-example
gradients (the building block of DP-SGD, with no noise and no privacy accounting).

With per-example gradients :math:`g_i = \nabla_\theta l_i` and a threshold C, the clipped sum is

.. math::
    \tilde G = \sum_{i=1}^{B} c_i\, g_i, \qquad c_i = \min\!\Big(1, \frac{C}{\|g_i\|}\Big),

:math:`\|g_i\|` the norm over **all** trainable parameters (Abadi et al. 2016). Because
:math:`\tilde G = \nabla_\theta \sum_i c_i l_i` with the :math:`c_i` held constant, it takes two
passes and never a per-example gradient ("ghost clipping", Li et al. 2021, "Large Language
Models Can Be Strong Differentially Private Learners"; Opacus' ``FastGradientClipping``):

1. forward and backward of :math:`\sum_i l_i` inside :class:`~gradnoise.stats.engine.GradStats`,
   which gives every :math:`\|g_i\|^2` from the layers' activations and output gradients;
2. forward and backward of :math:`\sum_i c_i l_i` with :math:`c_i` detached: the parameters'
   ``.grad`` become :math:`\tilde G` (or :math:`\tilde G / B` with ``reduction="mean"``, the
   usual DP-SGD scaling).

The loss function is called twice, with the same RNG state (so dropout draws the same masks),
and the first pass's ``.grad`` is discarded: what ``.grad`` held before the call is kept and
:math:`\tilde G` is added to it, as ``backward()`` would. Cost: two forwards and two backwards
(Opacus' ghost clipping keeps the graph and pays one forward and two backwards; GradStats frees
its activations after its backward, so the second pass runs the forward again). GradStats
measures every trainable parameter that gets a gradient (by a rule or the torch.func fallback)
or raises, so the norms are whole-model norms. This module gives the clipped sum only: adding
calibrated noise and accounting for privacy (the other half of DP-SGD) is not done here; use
Opacus for that.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gradnoise.errors import GradNoiseError, explain
from gradnoise.stats.engine import GradStats

__all__ = ["ClippedGradient", "clip_factors", "clipped_backward"]

_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class ClippedGradient:
    """What :func:`clipped_backward` measured: per-example norms before clipping, the factors
    :math:`c_i = \\min(1, C / \\|g_i\\|)`, and how many examples were clipped (``c_i < 1``)."""

    norms: torch.Tensor
    factors: torch.Tensor
    max_norm: float
    reduction: str

    @property
    def clipped(self) -> int:
        """Number of examples whose gradient was scaled down (one host sync)."""
        return int((self.factors < 1).sum())

    @property
    def clipped_fraction(self) -> float:
        return self.clipped / self.factors.numel()


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    r""":math:`c_i = \min(1, C / \|g_i\|)`; a zero norm gets 1 (nothing to clip)."""
    norms = norms.detach()
    return torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-300), 1.0).to(norms.dtype)


def _check_arguments(max_norm: float, reduction: str) -> None:
    if not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm > 0):
        raise GradNoiseError(
            explain(
                "clipped_backward max_norm",
                expected="a finite number > 0 (the clipping threshold C)",
                got=repr(max_norm),
                fix="pass for example max_norm=1.0",
            )
        )
    if reduction not in _REDUCTIONS:
        raise GradNoiseError(
            explain(
                "clipped_backward reduction",
                expected="'sum' (sum_i c_i g_i) or 'mean' (the same divided by B)",
                got=repr(reduction),
                fix="pass reduction='mean' for the DP-SGD scaling",
            )
        )


def _per_example(losses, where: str) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or not losses.requires_grad:
        got = (
            type(losses).__name__
            if not isinstance(losses, torch.Tensor)
            else f"a tensor of shape {tuple(losses.shape)}"
            + ("" if losses.requires_grad else " that does not require grad")
        )
        raise GradNoiseError(
            explain(
                where,
                expected="loss_fn() returning a (B,) tensor of per-example losses with a graph",
                got=got,
                fix="return e.g. F.cross_entropy(model(x), y, reduction='none'); for a sequence "
                "model average each sequence's token losses into one number per example",
            )
        )
    return losses


def clipped_backward(
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    max_norm: float,
    *,
    reduction: str = "mean",
    fallback: str = "vmap",
) -> ClippedGradient:
    r"""Add :math:`\sum_i \min(1, C/\|g_i\|)\, g_i` (divided by B for ``"mean"``) to ``.grad``.

    ``loss_fn()`` runs the forward and returns the (B,) per-example losses :math:`l_i`; it is
    called twice with the same RNG state. See the module docstring for the two passes and cost.
    """
    _check_arguments(max_norm, reduction)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.grad for p in params]
    for p in params:
        p.grad = None
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        with GradStats(model, loss_reduction="sum", fallback=fallback) as stats:
            losses = _per_example(loss_fn(), "clipped_backward (first pass)")
            losses.sum().backward()
        norms = stats.total_sq_norms().clamp_min(0).sqrt()
    finally:
        for p, grad in zip(params, before, strict=True):
            p.grad = grad
    factors = clip_factors(norms, float(max_norm))
    torch.random.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    losses = _per_example(loss_fn(), "clipped_backward (second pass)")
    if losses.shape != factors.shape:
        raise GradNoiseError(
            explain(
                "clipped_backward (second pass)",
                expected=f"the same {tuple(factors.shape)} losses as the first pass",
                got=f"shape {tuple(losses.shape)}",
                fix="make loss_fn() compute the same batch every time it is called",
            )
        )
    weights = factors.to(losses.dtype) / (losses.numel() if reduction == "mean" else 1)
    (weights * losses).sum().backward()
    return ClippedGradient(norms, factors, float(max_norm), reduction)
