"""The rule registry: which functional ops gradnoise measures, and the records rules exchange.

A *rule* handles one family of functional ops (``F.linear``, ``F.conv2d``, ...). The engine calls
the op itself with the tracked parameters detached, so autograd computes only the gradient of the
input; in backward the rule gets the op's arguments and the output gradient and returns, for each
parameter role ("weight", "bias"), the summed gradient that autograd would have produced plus the
per-example pieces: squared norms, and on request elementwise squares or whole per-example
gradients. Computing the summed gradient from the same data as the pieces is what keeps the cost
close to a plain backward.

Gradient scale: rules work in the scale autograd hands them (a mean-reduced loss makes every
output gradient carry a 1/B); the engine rescales per the declared loss reduction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = [
    "BaseRule",
    "Pieces",
    "Request",
    "Rule",
    "batched_sq_norms",
    "pieces_from_per_example",
    "register",
    "rule_for",
    "sq_norm",
]


@dataclass(frozen=True)
class Request:
    """What the engine needs from one backward call of a rule."""

    elementwise: bool = False
    materialize: bool = False  # whole per-example gradients, for parameters used more than once


@dataclass
class Pieces:
    """Per-example pieces of one parameter from one use, in autograd's gradient scale.

    grad         sum over examples of the per-example gradients (the batch gradient contribution)
    sq_norms     (B,) squared norms of the per-example gradients, or None when materialized
    elem_sq      elementwise sum over examples of squared per-example gradients, or None
    per_example  (B, *param.shape) per-example gradients, only when ``Request.materialize``
    method       how they were computed, for the coverage report
    recompute    optional: rebuilds ``grad`` from factors smaller than it, so the engine need
                 not keep ``grad`` itself (autograd can then adopt it as ``.grad`` uncopied)
    """

    grad: torch.Tensor
    sq_norms: torch.Tensor | None
    elem_sq: torch.Tensor | None
    per_example: torch.Tensor | None
    method: str
    recompute: Callable[[], torch.Tensor] | None = None


# Squared norms in one fused ``vector_norm`` pass (no squared copy). A single float32 reduction
# drifts by ~sqrt(n) eps, ~1e-6 relative at 16k elements but ~1e-5 at 256k, so rows longer than
# SQ_NORM_SHORT are reduced in chunks of SQ_NORM_CHUNK elements and the chunks' squares summed.
SQ_NORM_CHUNK = 1024
SQ_NORM_SHORT = 16384


def batched_sq_norms(tensor: torch.Tensor) -> torch.Tensor:
    """``(B,)`` squared norms of the rows of a ``(B, *shape)`` tensor, accurately summed."""
    flat = tensor.reshape(tensor.shape[0], -1)
    size = flat.shape[1]
    if size <= SQ_NORM_SHORT:
        return torch.linalg.vector_norm(flat, dim=1).pow(2)
    head = size - size % SQ_NORM_CHUNK
    chunks = flat[:, :head].reshape(flat.shape[0], -1, SQ_NORM_CHUNK)
    total = torch.linalg.vector_norm(chunks, dim=2).pow(2).sum(1)
    if head < size:
        total = total + torch.linalg.vector_norm(flat[:, head:], dim=1).pow(2)
    return total


def sq_norm(tensor: torch.Tensor) -> torch.Tensor:
    """``||t||^2`` as a 0-dim tensor, summed like :func:`batched_sq_norms`."""
    return batched_sq_norms(tensor.reshape(1, -1))[0]


def pieces_from_per_example(per_example: torch.Tensor, request: Request, method: str) -> Pieces:
    """Reduce materialized per-example gradients ``(B, *shape)`` to the pieces a request needs."""
    if request.materialize:
        return Pieces(per_example.sum(0), None, None, per_example, method)
    sq_norms = batched_sq_norms(per_example)
    elem_sq = per_example.pow(2).sum(0) if request.elementwise else None
    return Pieces(per_example.sum(0), sq_norms, elem_sq, None, method)


class Rule(Protocol):
    """One family of functional ops (see the module docstring)."""

    name: str
    param_roles: tuple[str, ...]

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Name every argument of the functional call, defaults filled in."""

    def check(self, bound: dict[str, Any]) -> None:
        """Raise a clear error for calls the rule cannot measure (before anything runs)."""

    def call(self, func: Callable[..., Any], bound: dict[str, Any]) -> torch.Tensor:
        """Run the op (the engine has already replaced tracked parameters with detached ones)."""

    def backward(
        self,
        bound: dict[str, Any],
        grad_output: torch.Tensor,
        roles: tuple[str, ...],
        request: Request,
    ) -> dict[str, Pieces]:
        """Pieces for each requested parameter role, from the call's arguments and output grad."""


class BaseRule:
    """Defaults shared by the rules: no extra argument checks."""

    def check(self, bound: dict[str, Any]) -> None:
        """Accept every call; rules with unmeasurable options override this."""


_RULES: dict[Callable[..., Any], Rule] = {}


def register(rule: Rule, *functions: Callable[..., Any]) -> Rule:
    """Route calls of ``functions`` (as seen by a TorchFunctionMode) to ``rule``."""
    for function in functions:
        _RULES[function] = rule
    return rule


def rule_for(function: Callable[..., Any]) -> Rule | None:
    """The rule registered for a torch function, or None."""
    return _RULES.get(function)
