"""Swap a model's ``nn.Linear`` layers for :class:`SampledLinear` and back, in place.

The swapped layers hold the original parameter objects, so an optimizer built before the swap
keeps training the same tensors, and ``state_dict`` keys and values do not change.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from gradnoise.errors import require
from gradnoise.sampled.linear import SampledLinear, check_budget

__all__ = ["sample_linears", "sampled_layers", "unsample_linears"]


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name
    }


def sample_linears(
    model: nn.Module,
    budget: float | Mapping[str, float] = 0.5,
    *,
    method: str = "bernoulli",
    proposal: str = "norm",
    share: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, SampledLinear]:
    """Replace the linear layers of ``model`` by SampledLinear layers; return them by name.

    ``budget`` is one fraction in (0, 1] for every linear layer, or a mapping from module names
    (as in ``model.named_modules()``) to fractions for those layers only, such as the budgets
    :func:`gradnoise.sampled.choose_budgets` picks. Layers already sampled get the new settings.
    """
    require(
        isinstance(model, nn.Module), "sample_linears(model)", "a torch.nn.Module",
        type(model).__name__, "pass the model itself",
    )  # fmt: skip
    linears = _linears(model)
    if isinstance(budget, Mapping):
        unknown = sorted(set(budget) - set(linears))
        require(
            not unknown, "sample_linears(budget={...})",
            f"names of nn.Linear submodules (such as {sorted(linears)[:3]})", str(unknown),
            "use the names of model.named_modules()",
        )  # fmt: skip
        budgets = {name: check_budget(b, f"sample_linears budget of {name!r}") for name, b in
                   budget.items()}  # fmt: skip
    else:
        require(
            bool(linears), "sample_linears(model)", "a model with nn.Linear submodules",
            f"{type(model).__name__} without any", "pass a model that has linear layers",
        )  # fmt: skip
        value = check_budget(budget, "sample_linears(budget=...)")
        budgets = dict.fromkeys(linears, value)
    options = {"method": method, "proposal": proposal, "share": share, "generator": generator}
    swapped = {}
    for name, value in budgets.items():
        layer = SampledLinear.from_linear(linears[name], budget=value, **options)
        _replace(model, name, layer)
        swapped[name] = layer
    return swapped


def unsample_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Replace every SampledLinear of ``model`` by a plain ``nn.Linear`` (same parameters)."""
    restored = {}
    for name, layer in sampled_layers(model).items():
        restored[name] = layer.to_linear()
        _replace(model, name, restored[name])
    return restored


def sampled_layers(model: nn.Module) -> dict[str, SampledLinear]:
    """The SampledLinear submodules of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SampledLinear) and n}
