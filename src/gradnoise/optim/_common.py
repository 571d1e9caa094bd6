"""Helpers shared by the optimizer shells: argument checks, closures, two-point gradients."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.optim import Optimizer

from gradnoise.errors import GradNoiseError, explain

__all__ = [
    "adam_direction",
    "check",
    "check_betas",
    "grads_at",
    "group_tensors",
    "named_groups",
    "named_records",
    "require_closure",
    "require_names",
]


def check(owner: str, name: str, value: object, ok: bool, expected: str, fix: str) -> None:
    """Raise ``GradNoiseError`` for ``owner(name=value)`` unless ``ok`` (before state changes)."""
    if not ok:
        raise GradNoiseError(
            explain(f"{owner}({name}=...)", expected=expected, got=repr(value), fix=fix)
        )


def check_betas(owner: str, betas: tuple[float, float]) -> None:
    """Both momentum coefficients must lie in [0, 1)."""
    ok = len(betas) == 2 and all(0 <= b < 1 for b in betas)
    check(owner, "betas", betas, ok, "two floats in [0, 1)", "use e.g. betas=(0.9, 0.99)")


def group_tensors(group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters of ``group`` that have a gradient, and those gradients."""
    params = [p for p in group["params"] if p.grad is not None]
    return params, [p.grad for p in params]


def require_closure(owner: str, closure: Callable | None) -> Callable:
    """Two-point methods need the loss of the *same* batch at another point, so a closure."""
    if closure is None:
        raise GradNoiseError(
            explain(
                f"{owner}.step",
                expected="a closure that zeroes grads, computes the loss of one batch and calls "
                "backward()",
                got="closure=None",
                fix="call opt.step(closure) with a closure over the current batch",
            )
        )
    return closure


@torch.no_grad()
def grads_at(
    params: Sequence[torch.Tensor], point: Sequence[torch.Tensor], closure: Callable
) -> list[torch.Tensor]:
    """Gradients of ``closure``'s loss at ``point``; ``params`` and their ``.grad`` are restored.

    The parameters are overwritten with ``point`` in place, the closure runs under autograd, and
    the original values and gradients are copied back, so the result is exact (no arithmetic).
    """
    saved = [p.detach().clone() for p in params]
    saved_grads = [p.grad for p in params]
    for p, q in zip(params, point, strict=True):
        p.copy_(q)
        p.grad = None
    with torch.enable_grad():
        closure()
    out = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
    for p, s, g in zip(params, saved, saved_grads, strict=True):
        p.copy_(s)
        p.grad = g
    return out


def adam_direction(
    state: dict, grad: torch.Tensor, *, betas: tuple[float, float], eps: float
) -> torch.Tensor:
    r"""Update Adam's moments; return :math:`\hat m_t / (\sqrt{\hat v_t} + \epsilon)`."""
    beta1, beta2 = betas
    if "exp_avg" not in state:
        state.update(step=0, exp_avg=torch.zeros_like(grad), exp_avg_sq=torch.zeros_like(grad))
    state["step"] += 1
    state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
    return (state["exp_avg"] / bias1) / ((state["exp_avg_sq"] / bias2).sqrt() + eps)


def require_names(opt: Optimizer, owner: str) -> None:
    """Stats-fed optimizers match GradStats records by parameter name, so names are required."""
    if not all("param_names" in group for group in opt.param_groups):
        raise GradNoiseError(
            explain(
                f"{owner}(params)",
                expected="named parameters (GradStats records are keyed by name)",
                got="parameters without names",
                fix="construct it with model.named_parameters()",
            )
        )


def named_records(opt: Optimizer, moments: object, owner: str) -> dict:
    """``{name: GradMoments}`` for every named parameter of ``opt``, from GradStats or a dict."""
    if hasattr(moments, "moments") and callable(moments.moments):
        moments = moments.moments()
    names = [n for g in opt.param_groups for n in g["param_names"]]
    missing = [n for n in names if not isinstance(moments, dict) or n not in moments]
    if missing:
        raise GradNoiseError(
            explain(
                f"{owner}.step(moments=...)",
                expected="GradStats or {name: GradMoments} covering every named parameter",
                got=f"missing {missing[:3]}",
                fix="measure the backward with GradStats(model, elementwise=True) around the "
                "same model the optimizer was built from",
            )
        )
    return moments


def named_groups(opt: Optimizer, records: dict, keys: tuple[str, ...]):
    """Per group: ``(params, grads, records, states, options)`` of parameters with a gradient."""
    for group in opt.param_groups:
        pairs = zip(group["param_names"], group["params"], strict=True)
        named = [(n, p) for n, p in pairs if p.grad is not None]
        params = [p for _, p in named]
        options = {k: group[k] for k in keys}
        grads = [p.grad for p in params]
        yield params, grads, [records[n] for n, _ in named], [opt.state[p] for p in params], options
