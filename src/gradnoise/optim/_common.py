"""Helpers shared by the optimizer shells: argument checks, closures, two-point gradients."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.optim import Optimizer

from gradnoise.errors import GradNoiseError, explain
from gradnoise.stats.moments import GradMoments

__all__ = [
    "adam_direction",
    "check",
    "check_betas",
    "check_grads",
    "check_group",
    "check_records",
    "grads_at",
    "group_tensors",
    "is_real",
    "named_groups",
    "named_records",
    "param_labels",
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


def check_grads(
    owner: str,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    labels: Sequence[str] | None = None,
) -> None:
    """Refuse sparse or non-finite gradients before any state changes (one host sync).

    The update is then skipped entirely: parameters and optimizer state are left as they were,
    so training can continue after the caller drops the bad batch. ``labels`` name the
    parameters in the message (``param_labels`` of the optimizer); by default their positions.
    """
    if labels is None:
        labels = [f"parameter {i}" for i in range(len(params))]
    for label, param, grad in zip(labels, params, grads, strict=True):
        if grad.is_sparse:
            raise GradNoiseError(
                explain(
                    f"{owner}.step",
                    expected="dense gradients",
                    got=f"a sparse gradient for {label} of shape {tuple(param.shape)} (e.g. from "
                    "nn.Embedding(sparse=True)); the step was skipped and nothing changed",
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
                got=f"NaN or inf gradients in {[labels[i] for i in bad[:5]]} "
                f"(shapes {[tuple(params[i].shape) for i in bad[:5]]}); the step was skipped "
                "and no parameter or state changed",
                fix="find the source of the overflow (lower the learning rate, clip, check the "
                "loss); to skip the batch, catch the error, call zero_grad() and continue",
            )
        )


def param_labels(opt: Optimizer) -> dict[torch.Tensor, str]:
    """A readable label per parameter: its name if the optimizer was built from named
    parameters, else ``param_groups[g]['params'][i]``."""
    labels = {}
    for g, group in enumerate(opt.param_groups):
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            labels[p] = repr(names[i]) if names else f"param_groups[{g}]['params'][{i}]"
    return labels


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


def named_records(opt: Optimizer, moments: object, owner: str, *, elementwise: bool) -> dict:
    """``{name: GradMoments}`` for every parameter of ``opt`` with a gradient, all checked.

    Everything a step needs from the records is checked here, before any state changes: a record
    per parameter with a gradient, of that parameter's shape, of at least two examples, and with
    ``elem_sq_sum`` when ``elementwise``. Parameters without a gradient (frozen, or unused in this
    backward) are skipped by the step, as ``torch.optim`` skips them, so they need no record.
    """
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
    named = [
        (n, p)
        for g in opt.param_groups
        for n, p in zip(g["param_names"], g["params"], strict=True)
        if p.grad is not None
    ]
    frozen = [n for n, p in named if n not in moments and not p.requires_grad]
    if frozen:
        raise GradNoiseError(
            explain(
                f"{owner}.step(moments=...)",
                expected="a record for every parameter that has a gradient",
                got=f"frozen parameters {frozen[:3]} (requires_grad=False) that still hold a "
                "gradient; GradStats measures trainable parameters only, so they have no record",
                fix="pass only trainable parameters, e.g. "
                f"{owner}([(n, p) for n, p in model.named_parameters() if p.requires_grad]), or "
                "clear their gradients with opt.zero_grad(set_to_none=True) after freezing",
            )
        )
    missing = [n for n, _ in named if n not in moments]
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
    check_records(owner, [repr(n) for n, _ in named], [p for _, p in named],
                  [moments[n] for n, _ in named], elementwise=elementwise)  # fmt: skip
    return moments


def check_records(
    owner: str,
    labels: Sequence[str],
    params: Sequence[torch.Tensor],
    records: Sequence[object],
    *,
    elementwise: bool,
) -> None:
    """Each record is a GradMoments of its parameter's shape, of >= 2 examples (elementwise)."""

    def refuse(label: str, expected: str, got: str, fix: str) -> None:
        raise GradNoiseError(
            explain(f"{owner}.step: the record of {label}", expected=expected, got=got, fix=fix)
        )

    for label, param, rec in zip(labels, params, records, strict=True):
        if not isinstance(rec, GradMoments):
            refuse(label, "a GradMoments", type(rec).__name__, "pass stats.moments()")
        if tuple(rec.grad_sum.shape) != tuple(param.shape):
            refuse(
                label,
                f"moments of the parameter's shape {tuple(param.shape)}",
                f"shape {tuple(rec.grad_sum.shape)}",
                "measure the backward with GradStats around the model this optimizer updates",
            )
        if rec.n < 2:
            refuse(
                label,
                "moments of at least 2 examples (a noise estimate needs two samples)",
                f"n={rec.n}",
                "use a batch size of 2 or more",
            )
        if elementwise and rec.elem_sq_sum is None:
            refuse(
                label,
                "elementwise moments (elem_sq_sum)",
                "elem_sq_sum=None",
                "measure with GradStats(model, elementwise=True)",
            )


def named_groups(opt: Optimizer, records: dict, keys: tuple[str, ...]):
    """Per group: ``(params, grads, records, states, options)`` of parameters with a gradient."""
    for group in opt.param_groups:
        pairs = zip(group["param_names"], group["params"], strict=True)
        named = [(n, p) for n, p in pairs if p.grad is not None]
        params = [p for _, p in named]
        options = {k: group[k] for k in keys}
        grads = [p.grad for p in params]
        yield params, grads, [records[n] for n, _ in named], [opt.state[p] for p in params], options
