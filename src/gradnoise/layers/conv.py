r"""``F.conv1d`` / ``F.conv2d``: per-example gradients by unfolding the input.

With :math:`U_i` the unfolded input of example i (patches as columns,
:math:`C_{in}/g \cdot k` rows per group) and :math:`G_i` its output gradient (positions as
columns), the per-example weight gradient of group c is :math:`W_{i,c} = G_{i,c} U_{i,c}^T`: one
batched GEMM with the FLOPs of the ordinary weight gradient, which is then their sum. Conv1d is
the 2-d case with a 1-high kernel. The bias gradient is the output gradient summed over positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gradnoise.layers.registry import Pieces, Request, pieces_from_per_example, register

__all__ = ["ConvRule"]


def _pair(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _same_padding(kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[tuple[int, int]]:
    totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
    return [(total // 2, total - total // 2) for total in totals]


class ConvRule:
    param_roles = ("weight", "bias")

    def __init__(self, dims: int) -> None:
        self.dims = dims
        self.name = f"conv{dims}d"

    def bind(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        return {
            "input": input,
            "weight": weight,
            "bias": bias,
            "stride": stride,
            "padding": padding,
            "dilation": dilation,
            "groups": groups,
        }

    def check(self, bound: dict[str, Any]) -> None:
        pass

    def call(self, func, bound: dict[str, Any]) -> torch.Tensor:
        conv = F.conv1d if self.dims == 1 else F.conv2d
        return conv(**bound)

    def input_grad(self, bound: dict[str, Any], grad_output: torch.Tensor) -> torch.Tensor:
        """``aten.convolution_backward`` for the input only (the weight gradient is ours)."""
        acts, weight, padding = bound["input"], bound["weight"], bound["padding"]
        if isinstance(padding, str):
            with torch.enable_grad():  # rare: let autograd resolve string padding
                leaf = acts.detach().requires_grad_()
                out = self.call(None, {**bound, "input": leaf, "bias": None})
                return torch.autograd.grad(out, leaf, grad_output)[0]
        grad_input, _, _ = torch.ops.aten.convolution_backward(
            grad_output,
            acts,
            weight,
            None,
            _pair(bound["stride"], self.dims),
            _pair(padding, self.dims),
            _pair(bound["dilation"], self.dims),
            False,
            (0,) * self.dims,
            bound["groups"],
            (True, False, False),
        )
        return grad_input

    def backward(self, bound, grad_output, roles, request: Request) -> dict[str, Pieces]:
        pieces = {}
        if "weight" in roles:
            per_example = self._per_example_weight(bound, grad_output)
            pieces["weight"] = pieces_from_per_example(per_example, request, "unfold")
        if "bias" in roles:
            bias = grad_output.flatten(2).sum(2)
            pieces["bias"] = pieces_from_per_example(bias, request, "unfold")
        return pieces

    def _per_example_weight(self, bound, grad_output: torch.Tensor) -> torch.Tensor:
        weight, groups = bound["weight"], bound["groups"]
        acts, kernel, stride, padding, dilation = self._as_2d(bound)
        patches = F.unfold(acts, kernel, dilation=dilation, padding=padding, stride=stride)
        batch, positions = patches.shape[0], patches.shape[-1]
        patches = patches.reshape(batch, groups, -1, positions)
        grads = grad_output.reshape(batch, groups, -1, positions)
        per_example = torch.einsum("bgop,bgip->bgoi", grads, patches)
        return per_example.reshape(batch, *weight.shape)

    def _as_2d(self, bound):
        """Input and conv geometry in the 2-d form ``F.unfold`` takes, string padding resolved."""
        acts, weight = bound["input"], bound["weight"]
        kernel = tuple(weight.shape[2:])
        stride, dilation = _pair(bound["stride"], self.dims), _pair(bound["dilation"], self.dims)
        padding = bound["padding"]
        if isinstance(padding, str):
            sides = _same_padding(kernel, dilation) if padding == "same" else [(0, 0)] * self.dims
            acts = F.pad(acts, [p for side in reversed(sides) for p in side])
            padding = 0
        padding = _pair(padding, self.dims)
        if self.dims == 1:  # a 1-high 2-d convolution
            acts = acts.unsqueeze(2)
            kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
            padding = (0, *padding)
        return acts, kernel, stride, padding, dilation


register(ConvRule(1), F.conv1d)
register(ConvRule(2), F.conv2d)
