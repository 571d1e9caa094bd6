"""Compare GradStats with the reference loop on any model: the check every fast path passes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from gradnoise.stats.engine import GradStats
from gradnoise.testing.reference import per_example_grads

__all__ = ["reference_errors", "relative_error"]


def relative_error(got: torch.Tensor, want: torch.Tensor, floor: float) -> float:
    """``||got - want|| / max(||want||, floor)``; ``floor`` keeps exact zeros from dividing by 0."""
    scale = max(float(torch.linalg.vector_norm(want.double())), floor)
    return float(torch.linalg.vector_norm((got - want).double())) / scale


def reference_errors(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    batch: Sequence[torch.Tensor],
    *,
    loss_reduction: str = "mean",
    **gradstats_kwargs,
) -> dict[str, dict[str, float]]:
    """Relative errors of GradStats against the per-example autograd loop, per parameter.

    ``batch`` is a tuple of tensors with the examples on dim 0, and ``loss_fn`` is called as
    ``loss_fn(model, *batch)`` (the tuple unpacked: ``loss_fn(model, x, y)``), on the whole batch
    and on one-example slices, returning the mean loss over the examples it is given. This is
    not the ``gradnoise profile --model`` convention, ``loss_fn(model, batch)`` with the tuple
    as one argument; pass ``lambda model, *batch: loss_fn(model, batch)`` to check such a loss.

    Returns ``{name: {"sq_norms", "grad_sum", "elem_sq_sum", "grad"}: error}`` where ``grad``
    compares ``param.grad`` under GradStats with a plain backward. Errors are relative to the
    reference value, with a floor of a small fraction of the largest reference norm of that
    statistic across parameters (1e-6 in float64, 1e-3 in lower precision, about 1e4 float32
    ulps): parameters whose true gradient is zero, such as attention key biases, hold only
    rounding noise in both the reference and GradStats, which would otherwise be divided by zero.
    """
    reference = per_example_grads(model, loss_fn, batch)
    plain = _plain_grads(model, loss_fn, batch, loss_reduction)
    model.zero_grad(set_to_none=True)
    with GradStats(model, loss_reduction=loss_reduction, **gradstats_kwargs) as stats:
        _loss(model, loss_fn, batch, loss_reduction).backward()
    got_norms, moments = stats.per_example_sq_norms(), stats.moments()
    params = dict(model.named_parameters())
    want = {
        name: {
            "sq_norms": g.flatten(1).pow(2).sum(1),
            "grad_sum": g.sum(0),
            "elem_sq_sum": g.pow(2).sum(0),
            "grad": plain[name],
        }
        for name, g in reference.items()
    }
    got = {
        name: {
            "sq_norms": got_norms[name],
            "grad_sum": moments[name].grad_sum,
            "elem_sq_sum": moments[name].elem_sq_sum,
            "grad": params[name].grad,
        }
        for name in reference
    }
    fraction = 1e-6 if next(model.parameters()).dtype == torch.float64 else 1e-3
    floors = {
        key: fraction * max(float(torch.linalg.vector_norm(w[key].double())) for w in want.values())
        for key in ("sq_norms", "grad_sum", "elem_sq_sum", "grad")
    }
    return {
        name: {
            key: relative_error(got[name][key], value, floors[key])
            for key, value in want[name].items()
            if got[name][key] is not None
        }
        for name in reference
    }


def _loss(model, loss_fn, batch, loss_reduction: str) -> torch.Tensor:
    loss = loss_fn(model, *batch)
    return loss * batch[0].shape[0] if loss_reduction == "sum" else loss


def _plain_grads(model, loss_fn, batch, loss_reduction: str) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    _loss(model, loss_fn, batch, loss_reduction).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads
