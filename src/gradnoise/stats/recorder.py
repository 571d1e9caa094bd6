"""What one ``with GradStats(...)`` block records: the capture half of the engine.

A :class:`Recorder` lives for one block, and every piece of per-call state lives on it (nothing is
written onto user modules). While installed, a ``TorchFunctionMode`` sees every torch function:

* a call a rule intercepts and accepts, on a tracked parameter, runs through an autograd function
  whose backward asks the rule for the parameter's gradient *and* its per-example pieces
  (:class:`Fused` when the rule also gives the input gradient, else :class:`Attach`);
* any other differentiable use of a tracked parameter is *opaque*: the innermost running module
  that holds the parameter is marked, and when its forward returns, a :class:`Tap` on its outputs
  measures that parameter by the ``torch.func`` fallback (earlier rule uses of it inside that call
  are then left to the fallback, which sees them too);
* dtype casts of a tracked parameter (``weight.to(x.dtype)``) are followed, so the cast tensor is
  measured as the parameter.

Each parameter's gradient hook then compares autograd's gradient with the sum of the measured
per-example gradients, so a use the engine did not see (a regularizer in the loss) is reported
instead of folded silently into wrong statistics.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.hooks import RemovableHandle

from gradnoise.errors import GradNoiseError, NotReadyError, UnsupportedModuleError, explain
from gradnoise.layers import fallback as fallback_rule
from gradnoise.layers.plan import HookedModule, Plan
from gradnoise.layers.registry import Pieces, Request, Rule, rule_for, sq_norm
from gradnoise.layers.validate import (
    check_batch_norm_call,
    padded_mean_flag,
    refuse_padded_mean,
)
from gradnoise.stats.accumulate import Accumulator, check_residual
from gradnoise.stats.autograd import Attach, Call, Fused, RuleMode, Tap

__all__ = ["Recorder"]

_TensorBase = torch._C.TensorBase
_CASTS = frozenset(
    {_TensorBase.to, _TensorBase.float, _TensorBase.half, _TensorBase.bfloat16, _TensorBase.type_as}
)


@dataclass
class Frame:
    """One running call of a hooked module: its inputs, and the opaque uses seen inside it."""

    hooked: HookedModule
    inputs: tuple[tuple, dict]
    first_call: int  # index into Recorder.calls where this module call began
    opaque: dict[int, str] = field(default_factory=dict)  # id(param) -> parameter name


class Recorder:
    """Per-block capture state: calls, frames, accumulated pieces, residual norms, batch size."""

    def __init__(self, plan: Plan, *, elementwise: bool, loss_reduction: str = "mean") -> None:
        self.plan = plan
        self.elementwise = elementwise
        self.loss_reduction = loss_reduction
        self.padded_flags: list[torch.Tensor] = []  # "a mean loss saw ignored targets"
        self.batch: int | None = None
        self.batch_hint: int | None = None  # dim 0 of the outermost module call's first tensor
        self.uses: Counter[str] = Counter()
        self.calls: list[Call] = []
        self.frames: list[Frame] = []
        self.aliases: dict[int, tuple[str, torch.Tensor]] = {}  # id(cast tensor) -> (name, it)
        self.acc: dict[str, Accumulator] = {}
        self.residuals: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self.backward_started = False
        self.backward_done = False
        self.suspended = False
        self._handles: list[RemovableHandle] = []
        self._mode: RuleMode | None = None
        self.stale_shards: list[str] = []
        self._factorable_names: dict[str, bool] = {}
        self._plain_request: Request | None = None  # see request()
        self.shard_sq_norms: dict[str, torch.Tensor] = {}  # ||reduced shard||^2, FSDP2 only

    def install(self) -> None:
        """Register the gradient hooks, the module hooks and the function mode."""
        # FSDP2 shards holding a gradient already: their reduced .grad will not be this block's
        self.stale_shards = [n for n, s in self.plan.sharded.items() if s.sharded.grad is not None]
        for name, shard in self.plan.sharded.items():
            if shard.sharded.requires_grad:
                hook = self._shard_hook(name)
                self._handles.append(shard.sharded.register_post_accumulate_grad_hook(hook))
        for name, param in self.plan.params.items():
            if name not in self.plan.sharded or self.plan.sharded[name].unsharded is param:
                self._handles.append(param.register_hook(self._grad_hook(name)))
        for owner, names in self._sharded_owners():
            self._handles.append(owner.register_forward_pre_hook(self._follow_hook(names)))
        for hooked in self.plan.hooked:
            module = hooked.module
            pre_hook, post_hook = self._module_hooks(hooked)
            self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
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
            self.aliases.clear()

    @property
    def recording(self) -> bool:
        return not self.suspended and torch.is_grad_enabled()

    # ----------------------------------------------------------------------------- forward
    def dispatch(self, func, args: tuple, kwargs: dict) -> Any:
        if not self.recording:
            return func(*args, **kwargs)
        check_batch_norm_call(func, args, kwargs)
        padded = padded_mean_flag(func, args, kwargs, self.loss_reduction, self.batch)
        if padded is not None:
            self.padded_flags.append(padded)
        rule = rule_for(func)
        if rule is not None:
            bound = rule.bind(*args, **kwargs)
            names = {}
            for role in rule.param_roles:
                name = self._name_of(bound.get(role))
                if name is not None:
                    names[role] = name
            roles = tuple(names)
            if roles and rule.applies(bound, roles, self.batch or self.batch_hint):
                return self._ruled(rule, bound, roles, names)
        tracked = self._tracked_in(args, kwargs)
        if not tracked:
            return func(*args, **kwargs)
        result = func(*args, **kwargs)
        if func in _CASTS and _is_cast_of(result, args[0]) and id(args[0]) in tracked:
            self.aliases[id(result)] = (tracked[id(args[0])], result)
        elif _differentiable(result):
            self._opaque(tracked, func)
        return result

    def _name_of(self, value: Any) -> str | None:
        """The parameter name of a tracked tensor (a parameter or a cast of one), else None."""
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            return None
        name = self.plan.names.get(id(value))
        if name is not None and self.plan.params[name] is value:
            return name
        alias = self.aliases.get(id(value))
        return alias[0] if alias is not None and alias[1] is value else None

    def _tracked_in(self, args: tuple, kwargs: dict) -> dict[int, str]:
        """Tracked tensors among the arguments (one level into lists: ``torch.cat``, ``_VF``)."""
        found = {}
        for value in (*args, *kwargs.values()):
            for item in value if isinstance(value, (list, tuple)) else (value,):
                name = self._name_of(item)
                if name is not None:
                    found[id(self.plan.params[name])] = name
        return found

    def _ruled(self, rule: Rule, bound: dict, roles: tuple[str, ...], names: dict) -> torch.Tensor:
        where = f"{rule.name} of {names[roles[0]]!r}"
        self._check_not_checkpointed(where)
        examples = rule.count_examples(bound, roles, self.batch or self.batch_hint)
        broadcast = self._before_use(examples, where, rule.broadcasts)
        rule.check(bound, roles)
        params = [bound[role] for role in roles]
        call = Call(
            names=names,
            rule=rule,
            bound={**bound, **{role: bound[role].detach() for role in roles}},
            batched=rule.batched_arg(roles),
            broadcast=broadcast,
        )
        self.calls.append(call)
        self.uses.update(names.values())
        if rule.gives_input_grad:
            batched = bound.get(call.batched) if call.batched else None
            return Fused.apply(self, call, batched, *params)
        return Attach.apply(self, call, rule.call(call.bound), *params)

    def _before_use(self, examples: int, where: str, broadcasts: bool = False) -> bool:
        """Check the batch size of one use; True when it is a size-1 input broadcast over it."""
        if self.backward_started:
            raise GradNoiseError(
                explain(
                    "GradStats",
                    expected="one forward and one backward per block",
                    got=f"a forward use of {where} after the backward pass (a second forward, or "
                    "the recomputation of torch.utils.checkpoint(use_reentrant=True))",
                    fix="open a new GradStats block for every batch, and turn gradient "
                    "checkpointing off while measuring",
                )
            )
        if examples == 0:
            raise GradNoiseError(
                explain(
                    f"GradStats ({where})",
                    expected="a batch of at least one example on dim 0",
                    got="an empty batch (dim 0 of size 0) or a 0-dim input",
                    fix="skip empty batches before the block",
                )
            )
        if self.batch is None:
            self.batch = examples
            return False
        if examples == self.batch:
            return False
        if broadcasts and examples == 1:
            return True
        raise GradNoiseError(
            explain(
                f"GradStats ({where})",
                expected=f"examples on dim 0 of every layer input (batch size {self.batch})",
                got=f"an input with dim 0 of size {examples}",
                fix="keep the batch on dim 0 throughout the model (e.g. batch_first=True, no "
                "flattening of batch and sequence into one dim before a layer); a batch of 1 "
                "seen first must not be broadcast later",
            )
        )

    def _check_not_checkpointed(self, where: str) -> None:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        # torch.utils.checkpoint(use_reentrant=False) packs saved tensors with these hooks; its
        # recomputation would pair recomputed tensors with this engine's calls, so refuse it
        qualname = getattr(hooks[0], "__qualname__", "") if hooks else ""
        if qualname.startswith(("_checkpoint_hook", "_recomputation_hook")):
            raise GradNoiseError(
                explain(
                    f"GradStats ({where})",
                    expected="layers run without activation checkpointing inside the block",
                    got="a call inside torch.utils.checkpoint (use_reentrant=False)",
                    fix="turn gradient checkpointing off for measured steps (for transformers: "
                    "model.gradient_checkpointing_disable()), or measure every k-th step "
                    "without it",
                )
            )

    def _opaque(self, tracked: dict[int, str], func) -> None:
        """A use no rule takes: the innermost running module holding all of it will fall back."""
        if self.plan.fallback == "error":
            raise UnsupportedModuleError(
                explain(
                    "GradStats(fallback='error')",
                    expected="parameters used only through functions with a rule",
                    got=f"{_func_name(func)} on {', '.join(repr(n) for n in tracked.values())}",
                    fix="use fallback='vmap' to measure them with torch.func, or freeze them",
                )
            )
        for frame in reversed(self.frames):
            if all(key in frame.hooked.subtree for key in tracked):
                frame.opaque.update(tracked)
                return
        # used outside every hooked module: the residual check reports it after backward

    def _module_hooks(self, hooked: HookedModule):
        def pre_hook(module, args, kwargs):
            if self.recording:
                if not self.frames and self.batch_hint is None:
                    self.batch_hint = _first_dim(args, kwargs)
                self.frames.append(Frame(hooked, (args, kwargs), len(self.calls)))

        def post_hook(module, args, kwargs, output):
            if not self.recording or not self.frames or self.frames[-1].hooked is not hooked:
                return None
            frame = self.frames.pop()
            if not frame.opaque:
                return None
            return self._fallback_call(frame, output)

        return pre_hook, post_hook

    def _fallback_call(self, frame: Frame, output: Any) -> Any:
        """Tap the outputs of a module call with opaque uses; its inner calls of them are undone."""
        names = {frame.hooked.subtree[key]: name for key, name in frame.opaque.items()}
        tensors = [a for a in tree_flatten(frame.inputs)[0] if isinstance(a, torch.Tensor)]
        if not tensors:
            raise GradNoiseError(
                explain(
                    f"fallback module {frame.hooked.name!r}",
                    expected="a forward call with at least one tensor argument (the batch)",
                    got="no tensor arguments",
                    fix="pass the batch to the module's forward as a tensor",
                )
            )
        self._before_use(
            tensors[0].shape[0] if tensors[0].dim() else 0, f"module {frame.hooked.name!r}"
        )
        self._hand_over(frame.first_call, set(names.values()))
        positions = fallback_rule.batched_outputs(output, self.batch)
        if not positions:
            return None
        call = Call(names=names, owner=frame.hooked, inputs=frame.inputs, positions=positions)
        self.calls.append(call)
        self.uses.update(names.values())
        leaves, spec = tree_flatten(output)
        tapped = Tap.apply(self, call, *(leaves[i] for i in positions))
        for i, tensor in zip(positions, tapped, strict=True):
            leaves[i] = tensor
        return tree_unflatten(leaves, spec)

    def _hand_over(self, first_call: int, names: set[str]) -> None:
        """Leave the uses of ``names`` inside a module call to that call's fallback."""
        for call in self.calls[first_call:]:
            for role, name in call.names.items():
                if name in names and role not in call.discarded:
                    call.discarded.add(role)
                    self.uses[name] -= 1

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
        # the calls hold the block's activations; forward is over, so let them go with autograd's
        self.calls.clear()
        self.frames.clear()

    def request(self, names) -> Request:
        """What a use must hand over: shared parameters need their per-example gradients, as
        factors when every use of them can give factors (tied embedding and head), else whole."""
        shared = [name for name in names if self.uses[name] > 1]
        if not shared:  # the usual case: one request for the whole block
            if self._plain_request is None:
                self._plain_request = Request(elementwise=self.elementwise, batch=self.batch)
            return self._plain_request
        factored = [n for n in shared if not self.elementwise and self._factorable(n)]
        return Request(
            elementwise=self.elementwise,
            materialize=len(factored) < len(shared),  # for the roles that cannot give factors
            batch=self.batch,
            factored=bool(factored),
        )

    def _factorable(self, name: str) -> bool:
        """Whether every use of ``name`` in this block is a rule role that gives factors."""
        known = self._factorable_names.get(name)
        if known is None:
            known = self._factorable_names[name] = all(
                call.rule is not None and role in call.rule.factored_roles
                for call in self.calls
                for role, used in call.names.items()
                if used == name and role not in call.discarded
            ) and not any(call.rule is None and name in call.names.values() for call in self.calls)
        return known

    def rule_backward(self, call: Call, bound: dict, grad_output: torch.Tensor) -> dict:
        """The rule's pieces for every role; the kept ones are accumulated."""
        self._on_backward()
        kept = {role: name for role, name in call.names.items() if role not in call.discarded}
        pieces = call.rule.backward(bound, grad_output, call.roles, self.request(kept.values()))
        for role, name in kept.items():
            self._accumulate(name, pieces[role])
        return pieces

    def fallback_backward(self, call: Call, grad_outputs) -> None:
        self._on_backward()
        kept = {local: name for local, name in call.names.items() if local not in call.discarded}
        if not kept:
            return
        hooked = call.owner
        params = {local: self.plan.params[name] for local, name in kept.items()}
        self.suspended = True
        try:
            per_example = fallback_rule.per_example_grads(
                hooked, params, call.inputs, call.positions, list(grad_outputs), self.batch
            )
        finally:
            self.suspended = False
        method = "fallback" if hooked.strategy == "vmap" else "fallback-loop"
        for local, name in kept.items():
            grads = (
                per_example[local].float() if _is_half(per_example[local]) else per_example[local]
            )
            self._accumulate(name, Pieces(grads.sum(0), None, None, grads, method))

    def _accumulate(self, name: str, pieces: Pieces) -> None:
        if name in self.acc:
            self.acc[name].add(pieces)
        else:
            self.acc[name] = Accumulator(pieces)

    def _grad_hook(self, name: str):
        sharded = name in self.plan.sharded

        def hook(grad: torch.Tensor) -> None:
            acc = self.acc.get(name)
            if acc is not None and grad is acc.grad:
                # autograd passed on the very tensor the rule returned: no other contribution
                self.residuals[name] = None
                acc.release()
            else:
                measured = acc.summed_grad() if acc is not None else torch.zeros_like(grad)
                residual = sq_norm(grad.float() - measured.float())
                self.residuals[name] = (residual, sq_norm(grad.float()))
            if acc is not None:
                acc.drop_factors()  # every use is in: the cross terms are complete
            if sharded and acc is not None:
                acc.drop_grad()  # FSDP reduce-scatters and frees it; keeping it costs a copy
            return None

        return hook

    def _shard_hook(self, name: str):
        """FSDP2 calls it right after the reduce-scatter: the shard's squared norm is kept, so
        the statistics survive an optimizer step and ``zero_grad()`` before they are read."""

        def hook(shard: torch.Tensor) -> None:
            local = shard.grad.to_local()
            self.shard_sq_norms[name] = torch.linalg.vector_norm(local, dtype=torch.float64).pow(2)

        return hook

    def _sharded_owners(self) -> list[tuple[torch.nn.Module, list[str]]]:
        """FSDP2 modules whose shards have no unsharded parameter yet (before the first
        all-gather), with those shards' names."""
        pending: dict[int, tuple[torch.nn.Module, list[str]]] = {}
        for name, shard in self.plan.sharded.items():
            if shard.unsharded is None:
                pending.setdefault(id(shard.owner), (shard.owner, []))[1].append(name)
        return list(pending.values())

    def _follow_hook(self, names: list[str]):
        """Runs after FSDP's own pre-forward hook (FSDP prepends it), so the unsharded
        parameters exist: track them and hook their gradients."""

        def pre_hook(module, args) -> None:
            for name in self.plan.follow_unsharded(names):
                param = self.plan.params[name]
                self._handles.append(param.register_hook(self._grad_hook(name)))

        return pre_hook

    # ----------------------------------------------------------------------------- checks
    def check_residuals(self) -> None:
        """Raise for any parameter whose gradient is not the sum of the measured ones, or for a
        mean loss over padded targets (one sync)."""
        if self.padded_flags and bool(torch.stack(self.padded_flags).any()):
            refuse_padded_mean(self.loss_reduction)
        self._check_rounding()
        pending = {name: r for name, r in self.residuals.items() if r is not None}
        if not pending:
            return
        stacked = torch.stack([torch.stack(r).double() for r in pending.values()]).tolist()
        for name, (residual_sq, total_sq) in zip(pending, stacked, strict=True):
            dtype = self.plan.params[name].dtype
            check_residual(name, residual_sq, total_sq, dtype, self.acc.get(name))

    def _check_rounding(self) -> None:
        unsure = {
            name: torch.stack(acc.unsure).any() for name, acc in self.acc.items() if acc.unsure
        }
        if not unsure:
            return
        flags = torch.stack(list(unsure.values())).tolist()
        names = [name for name, flag in zip(unsure, flags, strict=True) if flag]
        if names:
            raise GradNoiseError(
                explain(
                    f"parameter {names[0]!r}"
                    + (f" (and {len(names) - 1} more)" if names[1:] else ""),
                    expected="per-example norms whose float32 rounding is within 1%",
                    got="per-position gradients that nearly cancel, where the Gram form's rounding "
                    "error may exceed the norm itself",
                    fix="measure with GradStats(model, elementwise=True), which uses the exact "
                    "batched-GEMM path, or run the model in float64",
                )
            )

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


def _first_dim(args: tuple, kwargs: dict) -> int | None:
    """Dim 0 of the first tensor argument: the batch size, for rules that cannot read it."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _differentiable(result: Any) -> bool:
    leaves = result if isinstance(result, (list, tuple)) else (result,)
    return any(isinstance(t, torch.Tensor) and t.grad_fn is not None for t in leaves)


def _is_cast_of(result: Any, source: torch.Tensor) -> bool:
    return (
        isinstance(result, torch.Tensor)
        and result is not source
        and result.shape == source.shape
        and result.grad_fn is not None
    )


def _is_half(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.float16, torch.bfloat16)


def _func_name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
