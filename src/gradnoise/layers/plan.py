"""Coverage plan: which parameter is measured by which rule, which by the fallback, and why.

Every trainable parameter gets exactly one owner, decided before anything runs:

* parameters of :data:`RULED_MODULES` (and their subclasses) are measured where their functional
  op is called (``F.linear`` for ``nn.Linear`` ...), which also covers tied weights used by
  several modules and weights passed to those ops directly;
* every other module owning parameters goes to the ``torch.func`` fallback (``fallback="vmap"``)
  or is refused (``fallback="error"``); for :data:`SUBTREE_FALLBACK` modules, which call their
  children's weights functionally in another layout, the fallback takes the whole subtree;
* frozen parameters (``requires_grad=False``) are listed as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from gradnoise.errors import GradNoiseError, UnsupportedModuleError, explain
from gradnoise.layers.validate import check_module

__all__ = ["RULED_MODULES", "SUBTREE_FALLBACK", "FallbackModule", "Plan", "plan_coverage"]

RULED_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
SUBTREE_FALLBACK: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


@dataclass
class FallbackModule:
    """A module measured by the fallback, with its parameters (local name -> global name)."""

    name: str
    module: nn.Module
    params: dict[str, str]


@dataclass
class Plan:
    names: dict[int, str] = field(default_factory=dict)  # id(param) -> first name
    params: dict[str, nn.Parameter] = field(default_factory=dict)  # trainable, by name
    rule_params: set[int] = field(default_factory=set)  # ids measured by op rules
    fallback: list[FallbackModule] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)


def plan_coverage(model: nn.Module, fallback: str) -> Plan:
    """Assign every trainable parameter of ``model`` an owner (see the module docstring)."""
    plan = Plan()
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
    claimed: set[int] = set()
    for module_name, module in model.named_modules():
        check_module(module_name, module)
        _assign(plan, claimed, module_name, module)
    unsupported = [f"{m.name or '<root>'} ({type(m.module).__name__})" for m in plan.fallback]
    if fallback == "error" and unsupported:
        raise UnsupportedModuleError(
            explain(
                "GradStats(fallback='error')",
                expected="only modules with per-layer rules (Linear, Conv1d/2d, Embedding, norms)",
                got="modules without a rule: " + ", ".join(unsupported),
                fix="use fallback='vmap' to measure them with torch.func, or freeze their "
                "parameters",
            )
        )
    return plan


def _assign(plan: Plan, claimed: set[int], module_name: str, module: nn.Module) -> None:
    whole_subtree = isinstance(module, SUBTREE_FALLBACK)
    owned = module.named_parameters(recurse=whole_subtree)
    fresh = {local: p for local, p in owned if id(p) in plan.names and id(p) not in claimed}
    if not fresh:
        return
    claimed.update(id(p) for p in fresh.values())
    if isinstance(module, RULED_MODULES) and not whole_subtree:
        plan.rule_params.update(id(p) for p in fresh.values())
        return
    params = {local: plan.names[id(p)] for local, p in fresh.items()}
    plan.fallback.append(FallbackModule(module_name, module, params))
