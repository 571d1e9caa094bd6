"""The plan built once per ``GradStats``: the tracked parameters, and where a fallback may run.

Every trainable parameter is tracked at the level of torch functions: wherever the model calls a
function a rule intercepts (``F.linear``, ``torch.addmm``, ``weight * x``, ...) on it, that rule
measures the use, whichever module makes the call (tied weights, a custom module calling
``F.linear`` on its own weight, a bare parameter on the root module). A use no rule takes (an op
without a rule, or one its rule declines) is *opaque*; the engine then measures that parameter by
the ``torch.func`` fallback over the innermost running module that holds it. To find that module
the plan lists the modules that own parameters (and the root), with the parameters of each
subtree, and fixes each one's fallback strategy by type: ``loop`` for recurrent layers, whose
kernels ``vmap`` cannot batch, ``vmap`` for every other module.

Frozen parameters (``requires_grad=False``) are listed as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from gradnoise.errors import GradNoiseError, explain
from gradnoise.layers.validate import check_module

__all__ = [
    "LOOP_MODULES",
    "HookedModule",
    "Plan",
    "fallback_strategy",
    "parameter_signature",
    "plan_coverage",
]

# Modules whose per-example gradients the fallback computes in a loop over the examples.
LOOP_MODULES: tuple[type[nn.Module], ...] = (nn.RNNBase,)


def fallback_strategy(module: nn.Module) -> str:
    """``"loop"`` for :data:`LOOP_MODULES`, else ``"vmap"``."""
    return "loop" if isinstance(module, LOOP_MODULES) else "vmap"


@dataclass
class HookedModule:
    """A module that may host a fallback: its name, its subtree's tracked parameters, strategy."""

    name: str
    module: nn.Module
    subtree: dict[int, str]  # id(param) -> local name inside the module
    strategy: str


@dataclass
class Plan:
    names: dict[int, str] = field(default_factory=dict)  # id(param) -> first name
    params: dict[str, nn.Parameter] = field(default_factory=dict)  # trainable, by name
    frozen: list[str] = field(default_factory=list)
    hooked: list[HookedModule] = field(default_factory=list)  # root first
    fallback: str = "vmap"  # or "error": refuse opaque uses
    signature: tuple = ()  # what the plan was built from (see parameter_signature)


def plan_coverage(model: nn.Module, fallback: str) -> Plan:
    """Track every trainable parameter of ``model`` (see the module docstring)."""
    plan = Plan(fallback=fallback, signature=parameter_signature(model))
    for name, param in model.named_parameters():
        if param.requires_grad:
            plan.names[id(param)] = name
            plan.params[name] = param
        else:
            plan.frozen.append(name)
    if not plan.params:
        raise GradNoiseError(
            explain(
                "GradStats(model)",
                expected="a model with at least one parameter that requires grad",
                got=f"{type(model).__name__} with no trainable parameters",
                fix="pass the module you train, or unfreeze its parameters",
            )
        )
    for module_name, module in model.named_modules():
        check_module(module_name, module)
        owns = any(p.requires_grad for p in module.parameters(recurse=False))
        if owns or module is model:
            plan.hooked.append(_hooked(plan, module_name, module))
    return plan


def parameter_signature(model: nn.Module) -> tuple:
    """Identity and trainability of every parameter: a change means the plan is stale."""
    return tuple((name, id(p), p.requires_grad) for name, p in model.named_parameters())


def _hooked(plan: Plan, name: str, module: nn.Module) -> HookedModule:
    subtree = {id(p): local for local, p in module.named_parameters() if id(p) in plan.names}
    return HookedModule(name, module, subtree, fallback_strategy(module))
