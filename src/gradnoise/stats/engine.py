"""GradStats: per-example gradient statistics of every layer from one ordinary backward pass.

How it works, in order:

1. On entry, :func:`gradnoise.layers.plan.plan_coverage` gives every trainable parameter an owner.
   A ``TorchFunctionMode`` then watches the functional ops of the forward pass: a call of a ruled
   op (``F.linear``, ``F.conv2d``, ``F.embedding``, norms) on a tracked parameter runs with the
   parameter detached and is wrapped in :class:`_Attach`, whose backward asks the rule for the
   parameter's gradient *and* its per-example pieces from the same activations and output
   gradient. Fallback modules get forward hooks and a :class:`_Tap` on their outputs instead.
2. Each parameter's gradient hook compares the gradient autograd accumulates with the sum of the
   measured per-example gradients, so a use the engine did not see (``x @ W.T`` on a tracked
   weight, a regularizer in the loss) is reported, never folded silently into wrong statistics.
3. Results are assembled lazily; the only host syncs happen when they are asked for.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.hooks import RemovableHandle

from gradnoise.errors import GradNoiseError, NotReadyError, explain
from gradnoise.layers import fallback as fallback_rule
from gradnoise.layers.plan import FallbackModule, Plan, plan_coverage
from gradnoise.layers.registry import Pieces, Request, Rule, rule_for, sq_norm
from gradnoise.layers.validate import check_batch_norm_call
from gradnoise.stats.accumulate import Accumulator, check_residual
from gradnoise.stats.moments import GradMoments
from gradnoise.stats.quantities import NoiseScaleEstimate, noise_scale_from_sums

__all__ = ["GradStats"]

_REDUCTIONS = ("mean", "sum")
_FALLBACKS = ("vmap", "error")


@dataclass
class _Call:
    """One use of tracked parameters: a ruled op call or a fallback module call."""

    names: dict[str, str]  # role or local name -> parameter name
    rule: Rule | None = None
    bound: dict[str, Any] = field(default_factory=dict)
    owner: FallbackModule | None = None
    inputs: tuple[tuple, dict] | None = None
    positions: list[int] = field(default_factory=list)


class _Attach(torch.autograd.Function):
    """Identity on the op's output whose backward returns the rule's parameter gradients."""

    @staticmethod
    def forward(ctx, engine, call, output, *params):
        ctx.engine, ctx.call = engine, call
        return output.clone()  # a fresh tensor, so later in-place ops on it stay legal

    @staticmethod
    def backward(ctx, grad_output):
        grads = ctx.engine._rule_backward(ctx.call, grad_output)
        return (None, None, grad_output, *grads)


class _Fused(torch.autograd.Function):
    """The op itself, for rules that also give the input gradient: no clone, no second node."""

    @staticmethod
    def forward(ctx, engine, call, func, input, *params):
        ctx.engine, ctx.call = engine, call
        return call.rule.call(func, call.bound)

    @staticmethod
    def backward(ctx, grad_output):
        grads = ctx.engine._rule_backward(ctx.call, grad_output)
        grad_input = None
        if ctx.needs_input_grad[3]:
            grad_input = ctx.call.rule.input_grad(ctx.call.bound, grad_output)
        return (None, None, None, grad_input, *grads)


class _Tap(torch.autograd.Function):
    """Identity on a fallback module's outputs that records their gradients."""

    @staticmethod
    def forward(ctx, engine, call, *outputs):
        ctx.engine, ctx.call = engine, call
        return tuple(output.clone() for output in outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        ctx.engine._fallback_backward(ctx.call, grad_outputs)
        return (None, None, *grad_outputs)


class _RuleMode(TorchFunctionMode):
    def __init__(self, engine: GradStats) -> None:
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.engine._dispatch(func, args, kwargs or {})


class GradStats:
    """Per-example gradient statistics for every layer, from one forward and backward.

    Example::

        with GradStats(model) as stats:
            loss = F.cross_entropy(model(x), y)   # mean over the batch
            loss.backward()
        stats.per_example_sq_norms()  # {name: (B,) tensor of ||grad l_i||^2}
        stats.moments()               # {name: GradMoments}
        stats.noise_scale()           # B_simple of the whole model

    Args:
        model: the module whose parameters are measured.
        loss_reduction: ``"mean"`` if the loss is (1/B) sum_i l_i, ``"sum"`` if it is sum_i l_i.
            With ``"mean"`` every per-example gradient is B times what reaches the layer, a factor
            applied to the results.
        elementwise: also collect ``elem_sq_sum`` (needed for elementwise variance and GSNR).
        fallback: ``"vmap"`` measures modules without a rule with ``torch.func``; ``"error"``
            refuses them.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_reduction: str = "mean",
        elementwise: bool = False,
        fallback: str = "vmap",
    ) -> None:
        _check_choice("loss_reduction", loss_reduction, _REDUCTIONS)
        _check_choice("fallback", fallback, _FALLBACKS)
        if not isinstance(model, nn.Module):
            raise GradNoiseError(
                explain(
                    "GradStats(model)",
                    expected="a torch.nn.Module",
                    got=type(model).__name__,
                    fix="pass the model itself, not its parameters or output",
                )
            )
        self.model = model
        self.loss_reduction = loss_reduction
        self.elementwise = bool(elementwise)
        self._plan: Plan = plan_coverage(model, fallback)
        self._handles: list[RemovableHandle] = []
        self._mode: _RuleMode | None = None
        self._reset()

    # ----------------------------------------------------------------------------- lifecycle
    def _reset(self) -> None:
        self._batch: int | None = None
        self._uses: Counter[str] = Counter()
        self._acc: dict[str, Accumulator] = {}
        self._residuals: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._backward_started = False
        self._backward_done = False
        self._suspended = False
        self._checked = False
        self._moments: dict[str, GradMoments] | None = None

    def __enter__(self) -> GradStats:
        if self._mode is not None:
            raise GradNoiseError(
                explain(
                    "GradStats.__enter__",
                    expected="a GradStats block that is not already open",
                    got="a nested or repeated `with` on the same object",
                    fix="create one GradStats per block",
                )
            )
        self._reset()
        for name, param in self._plan.params.items():
            self._handles.append(param.register_hook(self._grad_hook(name)))
        for owner in self._plan.fallback:
            self._handles.append(
                owner.module.register_forward_pre_hook(
                    self._fallback_pre_hook(owner), with_kwargs=True
                )
            )
            self._handles.append(
                owner.module.register_forward_hook(self._fallback_post_hook(), with_kwargs=True)
            )
        self._mode = _RuleMode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(*exc_info)
        finally:
            self._mode = None
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    # ----------------------------------------------------------------------------- forward
    def _dispatch(self, func, args: tuple, kwargs: dict) -> Any:
        if self._suspended or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        check_batch_norm_call(func, args, kwargs)
        rule = rule_for(func)
        if rule is None:
            return func(*args, **kwargs)
        bound = rule.bind(*args, **kwargs)
        roles = tuple(role for role in rule.param_roles if self._is_rule_param(bound.get(role)))
        if not roles:
            return func(*args, **kwargs)
        rule.check(bound)
        self._before_use(
            bound["input"], f"{rule.name} of {self._plan.names[id(bound[roles[0]])]!r}"
        )
        params = [bound[role] for role in roles]
        detached = {**bound, **{role: bound[role].detach() for role in roles}}
        call = _Call(
            names={role: self._plan.names[id(bound[role])] for role in roles},
            rule=rule,
            bound=detached,
        )
        self._uses.update(call.names.values())
        if hasattr(rule, "input_grad"):
            return _Fused.apply(self, call, func, bound["input"], *params)
        return _Attach.apply(self, call, rule.call(func, detached), *params)

    def _is_rule_param(self, value: Any) -> bool:
        return (
            isinstance(value, torch.Tensor)
            and id(value) in self._plan.rule_params
            and value.requires_grad
        )

    def _before_use(self, batch_input: torch.Tensor, where: str) -> None:
        if self._backward_started:
            raise GradNoiseError(
                explain(
                    "GradStats",
                    expected="one forward and one backward per block",
                    got=f"a forward use of {where} after the backward pass",
                    fix="open a new GradStats block for every batch",
                )
            )
        size = batch_input.shape[0] if batch_input.dim() > 0 else 0
        if self._batch is None:
            self._batch = size
        elif size != self._batch:
            raise GradNoiseError(
                explain(
                    f"GradStats ({where})",
                    expected=f"examples on dim 0 of every layer input (batch size {self._batch})",
                    got=f"an input with dim 0 of size {size} (shape {tuple(batch_input.shape)})",
                    fix="keep the batch on dim 0 throughout the model (e.g. batch_first=True, no "
                    "flattening of batch and sequence into one dim before a layer)",
                )
            )

    def _fallback_pre_hook(self, owner: FallbackModule):
        def hook(module, args, kwargs):
            if self._suspended or not torch.is_grad_enabled():
                return None
            first = next(
                (a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None
            )
            if first is None:
                raise GradNoiseError(
                    explain(
                        f"fallback module {owner.name!r}",
                        expected="a forward call with at least one tensor argument (the batch)",
                        got="no tensor arguments",
                        fix="pass the batch to the module's forward as a tensor",
                    )
                )
            self._before_use(first, f"module {owner.name!r}")
            module._gradnoise_pending = _Call(
                names=dict(owner.params), owner=owner, inputs=(args, kwargs)
            )
            return None

        return hook

    def _fallback_post_hook(self):
        def hook(module, args, kwargs, output):
            call = module.__dict__.pop("_gradnoise_pending", None)
            if call is None:
                return None
            positions = fallback_rule.batched_outputs(output, self._batch)
            if not positions:
                return None
            call.positions = positions
            self._uses.update(call.names.values())
            leaves, spec = tree_flatten(output)
            tapped = _Tap.apply(self, call, *(leaves[i] for i in positions))
            for i, tensor in zip(positions, tapped, strict=True):
                leaves[i] = tensor
            return tree_unflatten(leaves, spec)

        return hook

    # ----------------------------------------------------------------------------- backward
    def _on_backward(self) -> None:
        if self._backward_done:
            raise GradNoiseError(
                explain(
                    "GradStats",
                    expected="one backward pass per block",
                    got="a second backward pass inside the same block",
                    fix="open a new GradStats block for every batch (merge their moments() to "
                    "accumulate micro-batches)",
                )
            )
        if not self._backward_started:
            self._backward_started = True
            torch.autograd.Variable._execution_engine.queue_callback(self._mark_done)

    def _mark_done(self) -> None:
        self._backward_done = True

    def _request(self, names) -> Request:
        shared = any(self._uses[name] > 1 for name in names)
        return Request(elementwise=self.elementwise, materialize=shared)

    def _rule_backward(self, call: _Call, grad_output: torch.Tensor) -> list[torch.Tensor]:
        self._on_backward()
        roles = tuple(call.names)
        pieces = call.rule.backward(
            call.bound, grad_output, roles, self._request(call.names.values())
        )
        for role, name in call.names.items():
            self._accumulate(name, pieces[role])
        return [pieces[role].grad for role in roles]

    def _fallback_backward(self, call: _Call, grad_outputs) -> None:
        self._on_backward()
        owner = call.owner
        grads = list(grad_outputs)  # autograd materializes zeros for unused outputs
        params = {local: self._plan.params[name] for local, name in call.names.items()}
        self._suspended = True
        try:
            per_example, strategy = fallback_rule.per_example_grads(
                owner.module, owner.name, params, call.inputs, call.positions, grads, self._batch
            )
        finally:
            self._suspended = False
        for local, name in call.names.items():
            method = "fallback" if strategy == "vmap" else "fallback-loop"
            pieces = Pieces(per_example[local].sum(0), None, None, per_example[local], method)
            self._accumulate(name, pieces)

    def _accumulate(self, name: str, pieces: Pieces) -> None:
        if name in self._acc:
            self._acc[name].add(pieces)
        else:
            self._acc[name] = Accumulator(pieces)

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            acc = self._acc.get(name)
            if acc is not None and grad is acc.grad:
                # autograd passed on the very tensor the rule returned: no other contribution
                self._residuals[name] = None
                return None
            measured = acc.grad if acc is not None else torch.zeros_like(grad)
            self._residuals[name] = (sq_norm(grad - measured), sq_norm(grad))
            return None

        return hook

    # ----------------------------------------------------------------------------- results
    def _measured(self) -> dict[str, Accumulator]:
        """The accumulators of measured parameters, after the readiness and residual checks."""
        if not self._checked:
            self._check_ready()
            self._check_residuals()
            self._checked = True
        return {name: self._acc[name] for name in self._plan.params if name in self._acc}

    def _check_residuals(self) -> None:
        """Raise for any parameter whose gradient is not the sum of the measured ones (one sync)."""
        pending = {name: r for name, r in self._residuals.items() if r is not None}
        if not pending:
            return
        stacked = torch.stack([torch.stack(r).double() for r in pending.values()]).tolist()
        for (name, (_, total)), (residual_sq, total_sq) in zip(
            pending.items(), stacked, strict=True
        ):
            check_residual(name, residual_sq, total_sq, total.dtype, self._acc.get(name))

    def _check_ready(self) -> None:
        if not self._residuals and not self._acc:
            raise NotReadyError(
                explain(
                    "GradStats results",
                    expected="a backward pass inside the `with GradStats(model)` block",
                    got="no backward pass yet",
                    fix="run loss.backward() inside the block before asking for statistics",
                )
            )
        if not self._acc:
            raise GradNoiseError(
                explain(
                    "GradStats",
                    expected="a loss built from per-example terms of the batch",
                    got="gradients that reached the parameters without passing through any "
                    "measured layer: the loss does not depend on the batch",
                    fix="compute the loss from model(batch) inside the block",
                )
            )

    @property
    def _scale(self) -> float:
        """Per-example gradients are ``scale`` times what reaches the layers (B for a mean)."""
        return float(self._batch) if self.loss_reduction == "mean" else 1.0

    @property
    def batch_size(self) -> int:
        """The batch size seen on dim 0 of the layer inputs."""
        self._measured()
        return self._batch

    def moments(self) -> dict[str, GradMoments]:
        """Per-parameter :class:`GradMoments` of the per-example gradients of this batch."""
        if self._moments is None:
            self._moments = {
                name: acc.moments(self._batch, self._scale, self.elementwise)
                for name, acc in self._measured().items()
            }
        return dict(self._moments)

    def per_example_sq_norms(self) -> dict[str, torch.Tensor]:
        """Per-parameter ``(B,)`` tensors of squared per-example gradient norms."""
        return {name: acc.sq_norms() * self._scale**2 for name, acc in self._measured().items()}

    def total_sq_norms(self) -> torch.Tensor:
        """``(B,)`` squared norms of the whole-model per-example gradients."""
        return torch.stack(list(self.per_example_sq_norms().values())).sum(0)

    def noise_scale(self) -> NoiseScaleEstimate:
        """Whole-model simple noise scale of this batch (see ``gradient_noise_scale``).

        Reads two scalars per parameter (the summed squared per-example norms and the squared
        norm of the summed gradient), so it builds no moments: the same numbers as
        ``gradient_noise_scale(stats.moments())``.
        """
        measured = self._measured()
        sq_norm_sum = torch.stack([acc.sq_norms().sum() for acc in measured.values()]).sum()
        sum_sq_norm = torch.stack([sq_norm(acc.grad) for acc in measured.values()]).sum()
        _require_batch(self._batch)
        return noise_scale_from_sums(
            self._batch, sq_norm_sum * self._scale**2, sum_sq_norm * self._scale**2
        )

    def coverage(self) -> dict[str, str]:
        """How each parameter was measured (``gram``, ``bmm``, ...) or ``skipped: <reason>``."""
        if not self._backward_started:
            raise NotReadyError(
                explain(
                    "GradStats.coverage",
                    expected="a backward pass inside the block",
                    got="no backward pass yet",
                    fix="run loss.backward() inside the block first",
                )
            )
        report = {}
        for name in self._plan.params:
            acc = self._acc.get(name)
            unused = "skipped: no gradient (unused in the forward pass)"
            report[name] = acc.method() if acc is not None else unused
        for name in self._plan.frozen:
            report[name] = "skipped: frozen (requires_grad=False)"
        return report


def _require_batch(batch: int) -> None:
    if batch < 2:
        raise GradNoiseError(
            explain(
                "GradStats.noise_scale",
                expected="a batch of at least 2 examples (a variance needs two samples)",
                got=f"batch size {batch}",
                fix="use a batch size of 2 or more, or merge several steps' moments first",
            )
        )


def _check_choice(argument: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise GradNoiseError(
            explain(
                f"GradStats({argument}=...)",
                expected=" or ".join(repr(c) for c in choices),
                got=repr(value),
                fix=f"pass {argument}={choices[0]!r} (the default) or one of the other choices",
            )
        )
