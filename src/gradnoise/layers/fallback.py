r"""The general fallback: per-example gradients of any module with ``torch.func``.

For a module :math:`y = m(x; \theta)` whose parameters no rule covers, the per-example gradient is
the vector-Jacobian product of the module alone, example by example:

.. math::  \nabla_\theta l_i = J_\theta m(x_i; \theta)^T\, \frac{\partial l}{\partial y_i},

computed as ``vmap(grad(<m(x_i), g_i>))`` over the batch, with the module re-run on single
examples (a batch of one each). This costs a second forward and backward of the module and
materializes its per-example gradients, so it is the last resort, reported as ``"fallback"``.
The module must be deterministic: randomness (dropout in training mode) would differ between the
batched and the per-example run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from gradnoise.errors import GradNoiseError, explain

__all__ = ["output_tensors", "per_example_grads"]


def output_tensors(output: Any) -> list[int] | None:
    """Positions of differentiable tensors in a module output (a tensor, or a tuple/list)."""
    if isinstance(output, torch.Tensor):
        return [0] if output.requires_grad else []
    if isinstance(output, (tuple, list)):
        return [
            i
            for i, item in enumerate(output)
            if isinstance(item, torch.Tensor) and item.requires_grad
        ]
    return None


def _as_sequence(output: Any) -> Sequence[Any]:
    return (output,) if isinstance(output, torch.Tensor) else output


def per_example_grads(
    module: nn.Module,
    module_name: str,
    params: dict[str, torch.Tensor],
    inputs: tuple[tuple, dict],
    positions: list[int],
    grad_outputs: Sequence[torch.Tensor],
    batch: int,
) -> dict[str, torch.Tensor]:
    """Per-example gradients ``(B, *shape)`` of ``params`` (local names) of one module call."""
    flat, spec = tree_flatten(inputs)
    dims = [0 if _is_batched(item, batch) else None for item in flat]

    def inner_product(local_params, flat_inputs, cotangents):
        batched = [x.unsqueeze(0) if d == 0 else x for x, d in zip(flat_inputs, dims, strict=True)]
        args, kwargs = tree_unflatten(batched, spec)
        outputs = _as_sequence(functional_call(module, local_params, args, kwargs))
        picked = [outputs[i] for i in positions]
        return sum((y * c.unsqueeze(0)).sum() for y, c in zip(picked, cotangents, strict=True))

    detached = {name: p.detach() for name, p in params.items()}
    try:
        return vmap(grad(inner_product), in_dims=(None, dims, 0))(
            detached, flat, list(grad_outputs)
        )
    except RuntimeError as error:
        if "randomness" not in str(error):
            raise
        raise GradNoiseError(
            explain(
                f"fallback module {module_name!r} ({type(module).__name__})",
                expected="a deterministic module (per-example gradients re-run it per example)",
                got="random operations in its forward, such as dropout in training mode",
                fix="set its dropout to 0 or put that module in eval mode while measuring",
            )
        ) from error


def _is_batched(item: Any, batch: int) -> bool:
    return isinstance(item, torch.Tensor) and item.dim() > 0 and item.shape[0] == batch
