"""The autograd functions and the function mode through which a Recorder sees one block.

They hold no state of their own: each calls back into the :class:`~gradnoise.stats.recorder.
Recorder` it was created with (``dispatch`` in forward, ``rule_backward`` / ``fallback_backward``
in backward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from gradnoise.layers.plan import FallbackModule
from gradnoise.layers.registry import Rule

__all__ = ["Attach", "Call", "Fused", "RuleMode", "Tap"]


def _unwatched() -> torch._C.DisableTorchFunction:
    """The rules' own tensor ops skip the mode: each would otherwise pay a Python round trip."""
    return torch._C.DisableTorchFunction()


@dataclass
class Call:
    """One use of tracked parameters: a ruled op call or a fallback module call."""

    names: dict[str, str]  # role or local name -> parameter name
    rule: Rule | None = None
    bound: dict[str, Any] = field(default_factory=dict)
    owner: FallbackModule | None = None
    inputs: tuple[tuple, dict] | None = None
    positions: list[int] = field(default_factory=list)


class Attach(torch.autograd.Function):
    """Identity on the op's output whose backward returns the rule's parameter gradients."""

    @staticmethod
    def forward(ctx, recorder, call, output, *params):
        ctx.recorder, ctx.call = recorder, call
        return output.clone()  # a fresh tensor, so later in-place ops on it stay legal

    @staticmethod
    def backward(ctx, grad_output):
        with _unwatched():
            grads = ctx.recorder.rule_backward(ctx.call, grad_output)
        return (None, None, grad_output, *grads)


class Fused(torch.autograd.Function):
    """The op itself, for rules that also give the input gradient: no clone, no second node."""

    @staticmethod
    def forward(ctx, recorder, call, func, input, *params):
        ctx.recorder, ctx.call = recorder, call
        with _unwatched():
            return call.rule.call(func, call.bound)

    @staticmethod
    def backward(ctx, grad_output):
        with _unwatched():
            grads = ctx.recorder.rule_backward(ctx.call, grad_output)
            grad_input = None
            if ctx.needs_input_grad[3]:
                grad_input = ctx.call.rule.input_grad(ctx.call.bound, grad_output)
        return (None, None, None, grad_input, *grads)


class Tap(torch.autograd.Function):
    """Identity on a fallback module's outputs that records their gradients."""

    @staticmethod
    def forward(ctx, recorder, call, *outputs):
        ctx.recorder, ctx.call = recorder, call
        return tuple(output.clone() for output in outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        ctx.recorder.fallback_backward(ctx.call, grad_outputs)
        return (None, None, *grad_outputs)


class RuleMode(TorchFunctionMode):
    def __init__(self, recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.recorder.dispatch(func, args, kwargs or {})
