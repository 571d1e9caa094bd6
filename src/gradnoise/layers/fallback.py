r"""The general fallback: per-example gradients of any module with ``torch.func``.

For a module :math:`y = m(x; \theta)` whose parameters no rule covers, the per-example gradient is
the vector-Jacobian product of the module alone, example by example:

.. math::  \nabla_\theta l_i = J_\theta m(x_i; \theta)^T\, \frac{\partial l}{\partial y_i},

computed as ``vmap(grad(<m(x_i), g_i>))`` over the batch, with the module re-run on single
examples (a batch of one each). Modules that ``vmap`` cannot batch (recurrent layers, whose
kernels write into their inputs) are re-run in a plain loop over the examples instead, as the plan
decided by their type. Either way
it costs a second forward and backward of the module and materializes its per-example gradients,
so it is the last resort, reported as ``"fallback"``. The module must be deterministic:
randomness (dropout in training mode) would differ between the batched and per-example runs.

Only output tensors with the batch on dim 0 carry per-example gradients (an LSTM's ``(h, c)``
have it on dim 1); if the loss also depends on the others, the engine's residual check reports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from gradnoise.errors import GradNoiseError, explain
from gradnoise.layers.plan import HookedModule

__all__ = ["batched_outputs", "per_example_grads"]


def batched_outputs(output: Any, batch: int) -> list[int]:
    """Leaf positions (pytree order) of differentiable output tensors with the batch on dim 0."""
    leaves, _ = tree_flatten(output)
    return [i for i, leaf in enumerate(leaves) if _is_batched(leaf, batch) and leaf.requires_grad]


def per_example_grads(
    hooked: HookedModule,
    params: dict[str, torch.Tensor],
    inputs: tuple[tuple, dict],
    positions: list[int],
    grad_outputs: Sequence[torch.Tensor],
    batch: int,
) -> dict[str, torch.Tensor]:
    """Per-example gradients ``(B, *shape)`` of ``params`` (local names) of one module call.

    The other parameters of the module stay as they are (constants here); the strategy, ``vmap``
    or ``loop``, was fixed by the plan (:func:`gradnoise.layers.plan.fallback_strategy`).
    """
    module = hooked.module
    flat, spec = tree_flatten(inputs)
    dims = [0 if _is_batched(item, batch) else None for item in flat]

    def inner_product(local_params, flat_inputs, cotangents):
        batched = [x.unsqueeze(0) if d == 0 else x for x, d in zip(flat_inputs, dims, strict=True)]
        args, kwargs = tree_unflatten(batched, spec)
        leaves, _ = tree_flatten(functional_call(module, local_params, args, kwargs, strict=False))
        picked = [leaves[i] for i in positions]
        return sum((y * c.unsqueeze(0)).sum() for y, c in zip(picked, cotangents, strict=True))

    detached = {name: p.detach() for name, p in params.items()}
    cotangents = list(grad_outputs)
    if hooked.strategy == "vmap":
        try:
            return vmap(grad(inner_product), in_dims=(None, dims, 0))(detached, flat, cotangents)
        except RuntimeError as error:
            if "randomness" in str(error):
                raise _random_module_error(module, hooked.name) from error
            raise
    per_example = [
        grad(inner_product)(
            detached,
            [x[i] if d == 0 else x for x, d in zip(flat, dims, strict=True)],
            [c[i] for c in cotangents],
        )
        for i in range(batch)
    ]
    return {name: torch.stack([g[name] for g in per_example]) for name in detached}


def _random_module_error(module: nn.Module, module_name: str) -> GradNoiseError:
    return GradNoiseError(
        explain(
            f"fallback module {module_name!r} ({type(module).__name__})",
            expected="a deterministic module (per-example gradients re-run it per example)",
            got="random operations in its forward, such as dropout in training mode",
            fix="set its dropout to 0 or put that module in eval mode while measuring",
        )
    )


def _is_batched(item: Any, batch: int) -> bool:
    return isinstance(item, torch.Tensor) and item.dim() > 0 and item.shape[0] == batch
