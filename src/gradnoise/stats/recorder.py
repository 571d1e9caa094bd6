"""What one ``with GradStats(...)`` block records: the capture half of the engine.

A :class:`Recorder` lives for one block. While installed, a ``TorchFunctionMode`` routes every
ruled op on a tracked parameter (``F.linear``, ``F.conv2d``, ``F.embedding``, norms) through an
autograd function whose backward asks the rule for the parameter's gradient *and* its per-example
pieces (:class:`Fused` when the rule also gives the input gradient, else :class:`Attach`);
fallback modules get forward hooks and a :class:`Tap` on their outputs. Each parameter's gradient
hook then compares autograd's gradient with the sum of the measured per-example gradients, so a
use the engine did not see (``x @ W.T`` on a tracked weight, a regularizer in the loss) is
reported instead of folded silently into wrong statistics.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.hooks import RemovableHandle

from gradnoise.errors import GradNoiseError, NotReadyError, explain
from gradnoise.layers import fallback as fallback_rule
from gradnoise.layers.plan import FallbackModule, Plan
from gradnoise.layers.registry import Pieces, Request, rule_for, sq_norm
from gradnoise.layers.validate import check_batch_norm_call
from gradnoise.stats.accumulate import Accumulator, check_residual
from gradnoise.stats.autograd import Attach, Call, Fused, RuleMode, Tap

__all__ = ["Recorder"]


class Recorder:
    """Per-block capture state: uses, accumulated pieces, residual norms, batch size."""

    def __init__(self, plan: Plan, *, elementwise: bool) -> None:
        self.plan = plan
        self.elementwise = elementwise
        self.batch: int | None = None
        self.uses: Counter[str] = Counter()
        self.acc: dict[str, Accumulator] = {}
        self.residuals: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self.backward_started = False
        self.backward_done = False
        self.suspended = False
        self._handles: list[RemovableHandle] = []
        self._mode: RuleMode | None = None

    def install(self) -> None:
        """Register the gradient hooks, the fallback hooks and the function mode."""
        for name, param in self.plan.params.items():
            self._handles.append(param.register_hook(self._grad_hook(name)))
        for owner in self.plan.fallback:
            pre_hook = self._fallback_pre_hook(owner)
            module = owner.module
            self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            post_hook = self._fallback_post_hook()
            self._handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
        self._mode = RuleMode(self)
        self._mode.__enter__()

    def remove(self, *exc_info) -> None:
        """Undo :meth:`install`; safe to call after a failure half-way."""
        try:
            if self._mode is not None:
                self._mode.__exit__(*exc_info)
        finally:
            self._mode = None
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    # ----------------------------------------------------------------------------- forward
    def dispatch(self, func, args: tuple, kwargs: dict) -> Any:
        if self.suspended or not torch.is_grad_enabled():
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
        self._before_use(bound["input"], f"{rule.name} of {self.plan.names[id(bound[roles[0]])]!r}")
        params = [bound[role] for role in roles]
        detached = {**bound, **{role: bound[role].detach() for role in roles}}
        call = Call(
            names={role: self.plan.names[id(bound[role])] for role in roles},
            rule=rule,
            bound=detached,
        )
        self.uses.update(call.names.values())
        if hasattr(rule, "input_grad"):
            return Fused.apply(self, call, func, bound["input"], *params)
        return Attach.apply(self, call, rule.call(func, detached), *params)

    def _is_rule_param(self, value: Any) -> bool:
        return (
            isinstance(value, torch.Tensor)
            and id(value) in self.plan.rule_params
            and value.requires_grad
        )

    def _before_use(self, batch_input: torch.Tensor, where: str) -> None:
        if self.backward_started:
            raise GradNoiseError(
                explain(
                    "GradStats",
                    expected="one forward and one backward per block",
                    got=f"a forward use of {where} after the backward pass",
                    fix="open a new GradStats block for every batch",
                )
            )
        size = batch_input.shape[0] if batch_input.dim() > 0 else 0
        if self.batch is None:
            self.batch = size
        elif size != self.batch:
            raise GradNoiseError(
                explain(
                    f"GradStats ({where})",
                    expected=f"examples on dim 0 of every layer input (batch size {self.batch})",
                    got=f"an input with dim 0 of size {size} (shape {tuple(batch_input.shape)})",
                    fix="keep the batch on dim 0 throughout the model (e.g. batch_first=True, no "
                    "flattening of batch and sequence into one dim before a layer)",
                )
            )

    def _fallback_pre_hook(self, owner: FallbackModule):
        def hook(module, args, kwargs):
            if self.suspended or not torch.is_grad_enabled():
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
            module._gradnoise_pending = Call(
                names=dict(owner.params), owner=owner, inputs=(args, kwargs)
            )
            return None

        return hook

    def _fallback_post_hook(self):
        def hook(module, args, kwargs, output):
            call = module.__dict__.pop("_gradnoise_pending", None)
            if call is None:
                return None
            positions = fallback_rule.batched_outputs(output, self.batch)
            if not positions:
                return None
            call.positions = positions
            self.uses.update(call.names.values())
            leaves, spec = tree_flatten(output)
            tapped = Tap.apply(self, call, *(leaves[i] for i in positions))
            for i, tensor in zip(positions, tapped, strict=True):
                leaves[i] = tensor
            return tree_unflatten(leaves, spec)

        return hook

    # ----------------------------------------------------------------------------- backward
    def _on_backward(self) -> None:
        if self.backward_done:
            raise GradNoiseError(
                explain(
                    "GradStats",
                    expected="one backward pass per block",
                    got="a second backward pass inside the same block",
                    fix="open a new GradStats block for every batch (merge their moments() to "
                    "accumulate micro-batches)",
                )
            )
        if not self.backward_started:
            self.backward_started = True
            torch.autograd.Variable._execution_engine.queue_callback(self._mark_done)

    def _mark_done(self) -> None:
        self.backward_done = True

    def _request(self, names) -> Request:
        shared = any(self.uses[name] > 1 for name in names)
        return Request(elementwise=self.elementwise, materialize=shared)

    def rule_backward(self, call: Call, grad_output: torch.Tensor) -> list[torch.Tensor]:
        self._on_backward()
        roles = tuple(call.names)
        pieces = call.rule.backward(
            call.bound, grad_output, roles, self._request(call.names.values())
        )
        for role, name in call.names.items():
            self._accumulate(name, pieces[role])
        return [pieces[role].grad for role in roles]

    def fallback_backward(self, call: Call, grad_outputs) -> None:
        self._on_backward()
        owner = call.owner
        grads = list(grad_outputs)  # autograd materializes zeros for unused outputs
        params = {local: self.plan.params[name] for local, name in call.names.items()}
        self.suspended = True
        try:
            per_example, strategy = fallback_rule.per_example_grads(
                owner.module, owner.name, params, call.inputs, call.positions, grads, self.batch
            )
        finally:
            self.suspended = False
        for local, name in call.names.items():
            method = "fallback" if strategy == "vmap" else "fallback-loop"
            pieces = Pieces(per_example[local].sum(0), None, None, per_example[local], method)
            self._accumulate(name, pieces)

    def _accumulate(self, name: str, pieces: Pieces) -> None:
        if name in self.acc:
            self.acc[name].add(pieces)
        else:
            self.acc[name] = Accumulator(pieces)

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            acc = self.acc.get(name)
            if acc is not None and grad is acc.grad:
                # autograd passed on the very tensor the rule returned: no other contribution
                self.residuals[name] = None
                acc.release()
                return None
            measured = acc.grad if acc is not None else torch.zeros_like(grad)
            self.residuals[name] = (sq_norm(grad - measured), sq_norm(grad))
            return None

        return hook

    # ----------------------------------------------------------------------------- checks
    def check_residuals(self) -> None:
        """Raise for any parameter whose gradient is not the sum of the measured ones (one sync)."""
        pending = {name: r for name, r in self.residuals.items() if r is not None}
        if not pending:
            return
        stacked = torch.stack([torch.stack(r).double() for r in pending.values()]).tolist()
        for (name, (_, total)), (residual_sq, total_sq) in zip(
            pending.items(), stacked, strict=True
        ):
            check_residual(name, residual_sq, total_sq, total.dtype, self.acc.get(name))

    def check_ready(self) -> None:
        if not self.residuals and not self.acc:
            raise NotReadyError(
                explain(
                    "GradStats results",
                    expected="a backward pass inside the `with GradStats(model)` block",
                    got="no backward pass yet",
                    fix="run loss.backward() inside the block before asking for statistics",
                )
            )
        if not self.acc:
            raise GradNoiseError(
                explain(
                    "GradStats",
                    expected="a loss built from per-example terms of the batch",
                    got="gradients that reached the parameters without passing through any "
                    "measured layer: the loss does not depend on the batch",
                    fix="compute the loss from model(batch) inside the block",
                )
            )
