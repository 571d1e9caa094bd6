"""The reference: per-example gradients by a plain loop of one autograd backward per example.

Slow (B backward passes) and obviously correct, which is the point: every rule and the engine are
tested against it. ``loss_fn(model, *batch)`` must return the loss of the given (sub-)batch
reduced as a mean over its examples, so on a batch of one it is that example's loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from gradnoise.stats.moments import GradMoments

__all__ = ["per_example_grads", "reference_moments"]


def per_example_grads(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    batch: Sequence[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``{name: (B, *param.shape)}`` gradients of each example's loss, one backward each.

    Parameters that get no gradient are left out; a shared parameter appears once, under the
    first name ``named_parameters()`` gives it, with the gradient summed over its uses.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    size = batch[0].shape[0]
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in params}
    for i in range(size):
        example = [t[i : i + 1] for t in batch]
        loss = loss_fn(model, *example)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, grad in zip(params, grads, strict=True):
            rows[name].append(grad)
    return {
        name: torch.stack(grads)
        for name, grads in rows.items()
        if all(g is not None for g in grads)
    }


def reference_moments(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    batch: Sequence[torch.Tensor],
) -> dict[str, GradMoments]:
    """:class:`GradMoments` built from the reference per-example gradients."""
    grads = per_example_grads(model, loss_fn, batch)
    return {name: GradMoments.from_per_example(g) for name, g in grads.items()}
