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
    "check_grads",
    "check_group",
    "grads_at",
    "group_tensors",
    "is_real",
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


def is_real(value: object) -> bool:
    """A real number (int, float or a one-element tensor), not a bool; comparisons are then safe."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_betas(owner: str, betas: tuple[float, float]) -> None:
    """Both momentum coefficients must lie in [0, 1)."""
    ok = (
        isinstance(betas, (tuple, list))
        and len(betas) == 2
        and all(is_real(b) and 0 <= b < 1 for b in betas)
    )
    check(owner, "betas", betas, ok, "two floats in [0, 1)", "use e.g. betas=(0.9, 0.99)")


def check_group(opt: Optimizer, group: dict, checker: Callable[[str, dict], None]) -> None:
    """Run ``checker(owner, options)`` on a param group merged over ``opt.defaults``.

    Called from ``add_param_group`` (so also for every group at construction), before the group
    is added: a group with ``variant="bogus"`` or ``lr=-1`` is refused instead of running with a
    silently wrong setting.
    """
    if not isinstance(group, dict):
        return  # torch itself refuses non-dict groups with its own message
    options = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    owner = f"{type(opt).__name__}.param_groups[{len(opt.param_groups)}]"
    checker(owner, {**opt.defaults, **options})


def check_grads(owner: str, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """Refuse sparse or non-finite gradients before any state changes (one host sync).

    The update is then skipped entirely: parameters and optimizer state are left as they were,
    so training can continue after the caller drops the bad batch.
    """
    for i, grad in enumerate(grads):
        if grad.is_sparse:
            raise GradNoiseError(
                explain(
                    f"{owner}.step",
                    expected="dense gradients",
                    got=f"a sparse gradient for parameter {i} of shape {tuple(params[i].shape)}",
                    fix="use a dense embedding (sparse=False) for this optimizer, or a sparse "
                    "optimizer such as torch.optim.SparseAdam for that parameter",
                )
            )
    if not grads:
        return
    finite = torch.stack([torch.isfinite(g).all() for g in grads])
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).reshape(-1).tolist()
        raise GradNoiseError(
            explain(
                f"{owner}.step",
                expected="finite gradients",
                got=f"NaN or inf gradients at positions {bad[:5]} of the parameters with a "
                f"gradient "
                f"(shapes {[tuple(params[i].shape) for i in bad[:5]]}); the step was skipped "
                "and no parameter or state changed",
                fix="find the source of the overflow (lower the learning rate, clip, check the "
                "loss); to skip the batch, catch the error, call zero_grad() and continue",
            )
        )


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
    if not isinstance(moments, dict):
        raise GradNoiseError(
            explain(
                f"{owner}.step(moments=...)",
                expected="GradStats or {name: GradMoments}",
                got=type(moments).__name__,
                fix="pass the GradStats object that measured the backward, or stats.moments()",
            )
        )
    # Parameters without a gradient (frozen, or unused in this backward) are skipped by the step,
    # so they need no record; GradStats never records them either.
    names = [
        n
        for g in opt.param_groups
        for n, p in zip(g["param_names"], g["params"], strict=True)
        if p.grad is not None
    ]
    missing = [n for n in names if n not in moments]
    if missing:
        raise GradNoiseError(
            explain(
                f"{owner}.step(moments=...)",
                expected="GradStats or {name: GradMoments} with a record for every parameter that "
                "has a gradient",
                got=f"gradients but no record for {missing[:3]}",
                fix="measure the whole backward inside GradStats(model, ...) of the same model; "
                "if these parameters were not used in this backward, clear their stale "
                "gradients with opt.zero_grad(set_to_none=True)",
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
