r"""Parameters used elementwise with the batch: ``w * x``, ``x + pos``, ``cls.expand(B, ...)``.

Hand-written RMSNorms (``weight * hidden``: Llama, T5), layer scale (``gamma * x``: ConvNeXt,
CaiT), learned position embeddings added to the tokens and class tokens expanded over the batch
(ViT) all broadcast a parameter :math:`p` against a batched tensor :math:`x` with the examples on
dim 0. Example i's gradient is its output gradient, times the other factor for a product, summed
over the dims :math:`p` is broadcast along (``sum_to_size``):

.. math::
    \nabla_p l_i = \mathrm{reduce}_{p}\big(g_i \odot x_i\big)\ \ (p \cdot x), \qquad
    \nabla_p l_i = \pm\alpha\, \mathrm{reduce}_{p}(g_i)\ \ (x \pm \alpha p), \qquad
    \nabla_p l_i = \mathrm{reduce}_{p}(g_i)\ \ (p\text{.expand}(B, \ldots)).

These per-example gradients have the parameter's size (a vector of d, a (1, N, d) table), so they
are materialized: :math:`B |p|` numbers, no more than the activations. The rules apply only when
:math:`p` is broadcast over the batch (its dim aligned with the batch dim, if any, has size 1);
any other use of a parameter (``p * 2``, ``p.pow(2)``, two parameters multiplied) is not a rule's
and goes to the fallback.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradnoise.layers.registry import BaseRule, Pieces, Request, pieces_from_per_example, register

__all__ = ["AddRule", "ExpandRule", "MulRule", "per_example_reduce"]

_TensorBase = torch._C.TensorBase


def per_example_reduce(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``(B, *shape)`` per-example gradients of a parameter broadcast into ``grad`` ``(B, *S)``."""
    inner = shape[1:] if len(shape) == grad.dim() else shape
    padded = (1,) * (grad.dim() - 1 - len(inner)) + tuple(inner)
    return grad.sum_to_size((grad.shape[0], *padded)).reshape(grad.shape[0], *shape)


def broadcast_over_batch(param: torch.Tensor, batched: Any) -> bool:
    """Whether ``param`` meets ``batched`` (examples on dim 0) without touching the batch dim."""
    if not isinstance(batched, torch.Tensor) or batched.dim() == 0:
        return False
    if param.dim() > batched.dim():
        return False  # the parameter's own leading dims would come first in the output
    return param.dim() < batched.dim() or param.shape[0] == 1


class _BinaryRule(BaseRule):
    """``f(input, other)`` where one operand is a tracked parameter and the other the batch."""

    param_roles = ("input", "other")
    gives_input_grad = True

    def batched_arg(self, roles: tuple[str, ...]) -> str | None:
        if len(roles) != 1:
            return None  # two parameters together: no batch in sight
        return "other" if roles == ("input",) else "input"

    def applies(self, bound: dict[str, Any], roles: tuple[str, ...], batch: int | None) -> bool:
        batched = self.batched_arg(roles)
        if batched is None or bound.get("out") is not None:
            return False
        x, param = bound[batched], bound[roles[0]]
        if not broadcast_over_batch(param, x):
            return False
        return batch is None or x.shape[0] == batch

    def input_grad(self, bound, grad_output: torch.Tensor, roles) -> torch.Tensor:
        role = self.batched_arg(roles)
        grad = self.operand_grad(bound, grad_output, role)
        return grad.sum_to_size(bound[role].shape)

    def backward(self, bound, grad_output, roles, request: Request) -> dict[str, Pieces]:
        role = roles[0]
        per_example = per_example_reduce(
            self.operand_grad(bound, grad_output, role), bound[role].shape
        )
        return {role: pieces_from_per_example(per_example, request, "direct")}


class MulRule(_BinaryRule):
    name = "mul"
    intercepts = (torch.mul, _TensorBase.mul)

    def bind(self, input, other, *, out=None) -> dict[str, Any]:
        return {"input": input, "other": other, "out": out}

    def call(self, bound: dict[str, Any]) -> torch.Tensor:
        return torch.mul(bound["input"], bound["other"])

    def operand_grad(self, bound, grad_output: torch.Tensor, role: str) -> torch.Tensor:
        return grad_output * bound["other" if role == "input" else "input"]

    def contract_cases(self):
        return [
            ("weight * hidden (RMSNorm)", _Scaled("left", (4,)), (torch.randn(5, 3, 4).double(),)),
            ("x * gamma (layer scale)", _Scaled("right", (4,)), (torch.randn(5, 3, 4).double(),)),
            ("(1, T, d) scale", _Scaled("left", (1, 3, 4)), (torch.randn(5, 3, 4).double(),)),
        ]


class AddRule(_BinaryRule):
    """``input + alpha * other`` (``sign`` -1 for ``sub``)."""

    reads_in_backward = ()  # the output gradient is all it needs

    def __init__(self, name: str, intercepts: tuple, sign: int) -> None:
        self.name, self.intercepts, self.sign = name, intercepts, sign

    def bind(self, input, other, *, alpha=1, out=None) -> dict[str, Any]:
        return {"input": input, "other": other, "alpha": alpha, "out": out}

    def call(self, bound: dict[str, Any]) -> torch.Tensor:
        function = torch.add if self.sign > 0 else torch.sub
        return function(bound["input"], bound["other"], alpha=bound["alpha"])

    def operand_grad(self, bound, grad_output: torch.Tensor, role: str) -> torch.Tensor:
        if role == "input":
            return grad_output
        factor = self.sign * bound["alpha"]
        return grad_output if factor == 1 else grad_output * factor

    def contract_cases(self):
        kind = "add" if self.sign > 0 else "sub"
        return [
            (f"x {kind} pos_embed", _Added(kind, "right"), (torch.randn(5, 3, 4).double(),)),
            (f"bias {kind} x", _Added(kind, "left"), (torch.randn(5, 3, 4).double(),)),
        ]


class ExpandRule(BaseRule):
    """``param.expand(B, ...)``: a class token or a learned query repeated for every example."""

    name = "expand"
    intercepts = (_TensorBase.expand,)
    param_roles = ("input",)
    batched_input = ""  # the batch comes from the requested sizes
    reads_in_backward = ()

    def bind(self, input, *sizes, **kwargs) -> dict[str, Any]:
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
            sizes = tuple(sizes[0])
        return {"input": input, "sizes": tuple(sizes)}

    def batched_arg(self, roles: tuple[str, ...]) -> str | None:
        return None

    def _output_shape(self, bound: dict[str, Any]) -> tuple[int, ...]:
        shape, sizes = bound["input"].shape, bound["sizes"]
        offset = len(sizes) - len(shape)
        return tuple(shape[i - offset] if s == -1 else s for i, s in enumerate(sizes))

    def applies(self, bound: dict[str, Any], roles: tuple[str, ...], batch: int | None) -> bool:
        param, out = bound["input"], self._output_shape(bound)
        aligned_with_batch = len(out) == param.dim()
        if batch is None or not out or out[0] != batch:
            return False
        return not aligned_with_batch or param.shape[0] == 1

    def count_examples(self, bound, roles, batch: int | None) -> int:
        return self._output_shape(bound)[0]

    def call(self, bound: dict[str, Any]) -> torch.Tensor:
        return bound["input"].expand(*bound["sizes"])

    def backward(self, bound, grad_output, roles, request: Request) -> dict[str, Pieces]:
        per_example = per_example_reduce(grad_output, bound["input"].shape)
        return {"input": pieces_from_per_example(per_example, request, "direct")}

    def contract_cases(self):
        return [
            ("cat([cls.expand(B, -1, -1), x])", _ClassToken(), (torch.randn(5, 3, 4).double(),))
        ]


class _Scaled(nn.Module):
    def __init__(self, side: str, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.side = side
        self.weight = nn.Parameter(torch.randn(*shape, dtype=torch.float64))

    def forward(self, x):
        return self.weight * x if self.side == "left" else x * self.weight


class _Added(nn.Module):
    def __init__(self, kind: str, side: str) -> None:
        super().__init__()
        self.kind, self.side = kind, side
        self.table = nn.Parameter(torch.randn(1, 3, 4, dtype=torch.float64))

    def forward(self, x):
        op = torch.add if self.kind == "add" else torch.sub
        pair = (x, self.table) if self.side == "right" else (self.table, x)
        return op(*pair, alpha=0.5) if self.side == "right" else op(*pair)


class _ClassToken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4, dtype=torch.float64))

    def forward(self, x):
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)


register(MulRule())
register(AddRule("add", (torch.add, _TensorBase.add), sign=1))
register(AddRule("sub", (torch.sub, _TensorBase.sub), sign=-1))
register(ExpandRule())
