"""The plan built once per ``GradStats``: the tracked parameters, and where a fallback may run.

Every trainable parameter is tracked at the level of torch functions: wherever the model calls a
function a rule intercepts (``F.linear``, ``torch.addmm``, ``weight * x``, ...) on it, that rule
measures the use, whichever module makes the call (tied weights, a custom module calling
``F.linear`` on its own weight, a bare parameter on the root module). A use no rule takes (an op
without a rule, or one its rule declines) is *opaque*; the engine then measures that parameter by
the ``torch.func`` fallback over the innermost running module that holds it. To find that module
the plan lists the modules that own parameters (and the root), with the parameters of each
subtree, leaving out modules that rules declare as theirs alone (``nn.Linear``...: their calls
need no watching), and fixes each one's fallback strategy by type: ``loop`` for recurrent
layers, whose kernels ``vmap`` cannot batch, ``vmap`` for every other module.

Frozen parameters (``requires_grad=False``) are listed as skipped.

FSDP2 shards (``fully_shard``) are tracked through the unsharded parameters their forward
computes with (:mod:`gradnoise.layers.sharding`): the plan maps each one to the shard's name as
soon as FSDP has created it (:meth:`Plan.follow_unsharded`). Other DTensor parameters (tensor
parallelism) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

from torch import nn

from gradnoise.errors import GradNoiseError, UnsupportedModuleError, explain
from gradnoise.layers.registry import plain_module_types
from gradnoise.layers.sharding import ShardedParam, is_dtensor, sharded_params
from gradnoise.layers.validate import check_module, needs_check

__all__ = [
    "LOOP_MODULES",
    "HookedModule",
    "Plan",
    "fallback_strategy",
    "plan_coverage",
    "plan_for",
]

# Modules whose per-example gradients the fallback computes in a loop over the examples.
LOOP_MODULES: tuple[type[nn.Module], ...] = (nn.RNNBase,)


def fallback_strategy(module: nn.Module) -> str:
    """``"loop"`` for :data:`LOOP_MODULES`, else ``"vmap"``."""
    return "loop" if isinstance(module, LOOP_MODULES) else "vmap"


class HookedModule:
    """A module that may host a fallback: its name, its subtree's tracked parameters, strategy."""

    def __init__(self, name: str, module: nn.Module, names: dict[int, str], strategy: str) -> None:
        self.name, self.module, self.strategy = name, module, strategy
        self._names = names
        self._subtree: dict[int, str] | None = None

    @property
    def subtree(self) -> dict[int, str]:
        """``id(param) -> local name`` of the tracked parameters under this module (built on the
        first opaque use: most plans never need it)."""
        if self._subtree is None:
            self._subtree = {
                id(p): local for local, p in self.module.named_parameters() if id(p) in self._names
            }
        return self._subtree


@dataclass
class Plan:
    names: dict[int, str] = field(default_factory=dict)  # id(param) -> first name
    params: dict[str, nn.Parameter] = field(default_factory=dict)  # trainable, by name
    frozen: list[str] = field(default_factory=list)
    hooked: list[HookedModule] = field(default_factory=list)  # root first
    fallback: str = "vmap"  # or "error": refuse opaque uses
    # what the plan was built from: (owner, local name, parameter, requires_grad) of every
    # parameter, and the modules whose mode is checked at every block (BatchNorm, RNNs, MHA)
    slots: list[tuple[nn.Module, str, nn.Parameter, bool]] = field(default_factory=list)
    checked: list[tuple[str, nn.Module]] = field(default_factory=list)
    # FSDP2: name -> the shard and its unsharded parameter; names per FSDP module (by id)
    sharded: dict[str, ShardedParam] = field(default_factory=dict)
    sharded_by_owner: dict[int, list[str]] = field(default_factory=dict)

    def follow_unsharded(self, names: list[str]) -> list[str]:
        """Track the unsharded parameters FSDP2 has created for ``names`` (shards' names) in
        place of what was tracked before; returns the names whose tensor changed."""
        changed = []
        for name in names:
            unsharded = self.sharded[name].unsharded
            if unsharded is None or self.params[name] is unsharded:
                continue
            self.names.pop(id(self.params[name]), None)
            self.names[id(unsharded)] = name
            self.params[name] = unsharded
            changed.append(name)
        return changed

    def is_current(self) -> bool:
        """Whether no parameter was swapped, reloaded, frozen or unfrozen since the plan was
        built; also re-checks the modules whose mode matters (``model.train()`` in between)."""
        for owner, local, param, trainable in self.slots:
            if owner._parameters.get(local) is not param or param.requires_grad != trainable:
                return False
        for name, module in self.checked:
            check_module(name, module)
        return True


_PLANS: WeakKeyDictionary[nn.Module, dict[str, Plan]] = WeakKeyDictionary()


def plan_for(model: nn.Module, fallback: str) -> Plan:
    """The plan of ``model``, built once and reused while it is current (GradStats objects are
    often made afresh every step)."""
    plans = _PLANS.setdefault(model, {})
    plan = plans.get(fallback)
    if plan is None or not plan.is_current():
        plan = plans[fallback] = plan_coverage(model, fallback)
    return plan


def _refuse_unfollowed_dtensor(name: str) -> None:
    """A DTensor parameter FSDP2 does not manage (tensor parallelism): each rank computes with a
    slice of the weight, so its per-example norms are partial in a way GradStats cannot see."""
    raise UnsupportedModuleError(
        explain(
            f"GradStats parameter {name!r}",
            expected="plain parameters or FSDP2 (fully_shard) shards",
            got="a DTensor parameter that FSDP2 does not manage (tensor parallelism?): each "
            "rank computes with a slice of it",
            fix="measure a data-parallel (DDP or FSDP2) copy of the model; tensor-parallel "
            "layers are not supported",
        )
    )


def plan_coverage(model: nn.Module, fallback: str) -> Plan:
    """Track every trainable parameter of ``model`` (see the module docstring)."""
    plan = Plan(fallback=fallback)
    for module_name, module in model.named_modules():
        check_module(module_name, module)
        if needs_check(module):
            plan.checked.append((module_name, module))
        for local, param in module._parameters.items():
            if param is not None:
                plan.slots.append((module, local, param, param.requires_grad))
    shards = sharded_params(model)
    for name, param in model.named_parameters():
        if is_dtensor(param):
            if id(param) not in shards:
                _refuse_unfollowed_dtensor(name)
            if param.requires_grad:
                shard = plan.sharded[name] = shards[id(param)]
                plan.sharded_by_owner.setdefault(id(shard.owner), []).append(name)
        if param.requires_grad:
            plan.names[id(param)] = name
            plan.params[name] = param
        else:
            plan.frozen.append(name)
    plan.follow_unsharded(list(plan.sharded))
    if not plan.params:
        raise GradNoiseError(
            explain(
                "GradStats(model)",
                expected="a model with at least one parameter that requires grad",
                got=f"{type(model).__name__} with no trainable parameters",
                fix="pass the module you train, or unfreeze its parameters",
            )
        )
    plain = plain_module_types()
    for module_name, module in model.named_modules():
        owns = any(p.requires_grad for p in module.parameters(recurse=False))
        if (owns and type(module) not in plain) or module is model:
            plan.hooked.append(
                HookedModule(module_name, module, plan.names, fallback_strategy(module))
            )
    return plan
