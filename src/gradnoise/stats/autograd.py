"""The autograd functions and the function mode through which a Recorder sees one block.

They hold no state of their own: each calls back into the :class:`~gradnoise.stats.recorder.
Recorder` it was created with (``dispatch`` in forward, ``rule_backward`` / ``fallback_backward``
in backward).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from gradnoise.errors import GradNoiseError, explain
from gradnoise.layers.plan import HookedModule
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
    bound: dict[str, Any] = field(default_factory=dict)  # tracked parameters detached
    batched: str | None = None  # the bound argument with the examples
    broadcast: bool = False  # that argument has dim 0 of size 1, broadcast over the batch
    owner: HookedModule | None = None
    inputs: tuple[tuple, dict] | None = None
    positions: list[int] = field(default_factory=list)
    discarded: set[str] = field(default_factory=set)  # roles left to an enclosing fallback
    out_dtype: torch.dtype | None = None
    uniform: bool = False  # every floating bound tensor has out_dtype, a float32/64 one
    versions: dict[str, int] = field(default_factory=dict)  # of the bound tensors, at forward

    def __post_init__(self) -> None:
        self.roles = tuple(self.names)
        read = getattr(self.rule, "reads_in_backward", None)
        self.versions = {
            key: value._version
            for key, value in self.bound.items()
            if isinstance(value, torch.Tensor) and (read is None or key in read)
        }

    def check_unchanged(self) -> None:
        """Raise if a tensor the rule needs in backward was changed in place after forward.

        PyTorch raises for its own saved tensors; the rules keep theirs outside autograd's
        saved-tensor machinery, so the same version-counter check is made here.
        """
        for key, version in self.versions.items():
            if self.bound[key]._version != version:
                raise GradNoiseError(
                    explain(
                        f"GradStats ({self.rule.name} of {next(iter(self.names.values()))!r})",
                        expected="the layer's input and parameters unchanged between forward and "
                        "backward",
                        got=f"an in-place change of its {key!r} (version {version} -> "
                        f"{self.bound[key]._version}), e.g. `h += f(h)` on a layer input or "
                        "an optimizer step before backward",
                        fix="use an out-of-place op (`h = h + f(h)`) and step after backward",
                    )
                )


def _cast_floats(bound: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {
        key: value.to(dtype)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype
        else value
        for key, value in bound.items()
    }


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-example pieces are computed in float32 when the op ran in half precision."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _pieces_backward(recorder, call: Call, grad_output: torch.Tensor) -> list[torch.Tensor]:
    """The rule's pieces, from the call's data upcast and broadcast inputs expanded to the batch."""
    call.check_unchanged()
    if call.uniform and grad_output.dtype == call.out_dtype:  # nothing to cast (the usual case)
        bound = dict(call.bound) if call.broadcast else call.bound
    else:
        dtype = stats_dtype(call.out_dtype)
        bound = _cast_floats(call.bound, dtype)
        grad_output = grad_output.to(dtype)
    if call.broadcast:
        batched = bound[call.batched]
        bound[call.batched] = batched.expand(recorder.batch, *batched.shape[1:])
    pieces = recorder.rule_backward(call, bound, grad_output)
    if call.uniform:
        return [pieces[role].grad for role in call.names]
    return [pieces[role].grad.to(call.bound[role].dtype) for role in call.names]


def _expand_output(recorder, call: Call, output: torch.Tensor) -> torch.Tensor:
    dtype = call.out_dtype = output.dtype
    call.uniform = dtype == stats_dtype(dtype) and all(
        value.dtype == dtype
        for value in call.bound.values()
        if isinstance(value, torch.Tensor) and value.is_floating_point()
    )
    if not call.broadcast:
        return output
    return output.expand(recorder.batch, *output.shape[1:])


class Attach(torch.autograd.Function):
    """Identity on the op's output whose backward returns the rule's parameter gradients."""

    @staticmethod
    def forward(ctx, recorder, call, output, *params):
        ctx.recorder, ctx.call = recorder, call
        # a fresh tensor, so later in-place ops on it stay legal
        return _expand_output(recorder, call, output).clone()

    @staticmethod
    def backward(ctx, grad_output):
        with _unwatched(), _no_autocast(grad_output.device):
            grads = _pieces_backward(ctx.recorder, ctx.call, grad_output)
        if ctx.call.broadcast:
            grad_output = grad_output.sum(0, keepdim=True)
        return (None, None, grad_output, *grads)


class Fused(torch.autograd.Function):
    """The op itself, for rules that also give the input gradient: no clone, no second node."""

    @staticmethod
    def forward(ctx, recorder, call, batched_input, *params):
        ctx.recorder, ctx.call = recorder, call
        with _unwatched():
            return _expand_output(recorder, call, call.rule.call(call.bound))

    @staticmethod
    def backward(ctx, grad_output):
        call = ctx.call
        with _unwatched(), _no_autocast(grad_output.device):
            grads = _pieces_backward(ctx.recorder, call, grad_output)
            grad_input = None
            if ctx.needs_input_grad[2]:
                grad_input = _input_grad(call, grad_output)
        return (None, None, grad_input, *grads)


def _input_grad(call: Call, grad_output: torch.Tensor) -> torch.Tensor:
    """The batched input's gradient, computed in the dtype the op ran in (as autocast does)."""
    batched, bound = call.bound[call.batched], call.bound
    if call.broadcast:  # as the op's output saw it: expanded over the batch (a conv needs that)
        bound = {**bound, call.batched: batched.expand(grad_output.shape[0], *batched.shape[1:])}
    if call.uniform and grad_output.dtype == call.out_dtype:
        return _summed_if_broadcast(call, call.rule.input_grad(bound, grad_output, call.roles))
    bound = _cast_floats(bound, call.out_dtype)
    grad = call.rule.input_grad(bound, grad_output.to(call.out_dtype), call.roles)
    return _summed_if_broadcast(call, grad).to(batched.dtype)


def _summed_if_broadcast(call: Call, grad: torch.Tensor) -> torch.Tensor:
    return grad.sum(0, keepdim=True) if call.broadcast else grad


def _no_autocast(device: torch.device):
    """The rules' backward runs in the dtypes it chooses, even if backward is called under
    autocast (entering the context only then: it costs ~10 us)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


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
