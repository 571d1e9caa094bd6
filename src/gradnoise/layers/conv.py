r"""``F.conv1d`` / ``F.conv2d``: per-example weight gradients as one grouped convolution.

Per example, the weight gradient of a convolution is the cross-correlation of that example's input
with its output gradient. Folding the batch into the channel dimension (input
``(1, B C_in, *S)``, output gradient ``(1, B C_out, *S')``) and multiplying the group count by B
turns the whole batch's per-example gradients into the weight gradient of one grouped
convolution, which ``aten.convolution_backward`` computes with the backend's native kernels: the
same FLOPs as the ordinary weight gradient, no unfolded copy of the input. Their sum is the batch
gradient; the bias gradient is the output gradient summed over positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gradnoise.layers.registry import BaseRule, Pieces, Request, pieces_from_per_example, register

__all__ = ["ConvRule"]


def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


class ConvRule(BaseRule):
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

    def call(self, func, bound: dict[str, Any]) -> torch.Tensor:
        conv = F.conv1d if self.dims == 1 else F.conv2d
        return conv(**bound)

    def input_grad(self, bound: dict[str, Any], grad_output: torch.Tensor) -> torch.Tensor:
        """``aten.convolution_backward`` for the input only (the weight gradient is ours)."""
        acts, pads = self._padded_input(bound)
        grad_input = self._backward(grad_output, acts, bound["weight"], bound, (True, False, False))
        if any(pads):  # string padding resolved by padding the input: cut the margins off again
            slices = [slice(None), slice(None)]
            for axis in range(self.dims):
                left, right = pads[2 * (self.dims - 1 - axis)], pads[2 * (self.dims - 1 - axis) + 1]
                slices.append(slice(left, grad_input.shape[2 + axis] - right))
            grad_input = grad_input[tuple(slices)]
        return grad_input

    def backward(self, bound, grad_output, roles, request: Request) -> dict[str, Pieces]:
        pieces = {}
        if "weight" in roles:
            per_example = self._per_example_weight(bound, grad_output)
            pieces["weight"] = pieces_from_per_example(per_example, request, "grouped")
        if "bias" in roles:
            bias = grad_output.flatten(2).sum(2)
            pieces["bias"] = pieces_from_per_example(bias, request, "grouped")
        return pieces

    def _per_example_weight(self, bound, grad_output: torch.Tensor) -> torch.Tensor:
        weight = bound["weight"]
        acts, _ = self._padded_input(bound)
        batch = acts.shape[0]
        folded_acts = acts.reshape(1, -1, *acts.shape[2:])
        folded_grads = grad_output.reshape(1, -1, *grad_output.shape[2:])
        # only the shape of the weight matters for its own gradient
        folded_weight = weight.new_empty((batch * weight.shape[0], *weight.shape[1:]))
        per_example = self._backward(
            folded_grads, folded_acts, folded_weight, bound, (False, True, False), batch
        )
        return per_example.reshape(batch, *weight.shape)

    def _backward(self, grad_output, acts, weight, bound, mask, group_factor: int = 1):
        padding = bound["padding"]
        grads = torch.ops.aten.convolution_backward(
            grad_output,
            acts,
            weight,
            None,
            _tuple(bound["stride"], self.dims),
            (0,) * self.dims if isinstance(padding, str) else _tuple(padding, self.dims),
            _tuple(bound["dilation"], self.dims),
            False,
            (0,) * self.dims,
            bound["groups"] * group_factor,
            mask,
        )
        return grads[0] if mask[0] else grads[1]

    def _padded_input(self, bound) -> tuple[torch.Tensor, list[int]]:
        """The input with string padding applied explicitly, and the ``F.pad`` amounts used."""
        acts, padding = bound["input"], bound["padding"]
        if not isinstance(padding, str) or padding == "valid":
            return acts, [0] * (2 * self.dims)
        kernel = bound["weight"].shape[2:]
        dilation = _tuple(bound["dilation"], self.dims)
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        pads = [p for t in reversed(totals) for p in (t // 2, t - t // 2)]
        return F.pad(acts, pads), pads


register(ConvRule(1), F.conv1d)
register(ConvRule(2), F.conv2d)
