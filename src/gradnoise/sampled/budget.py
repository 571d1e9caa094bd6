r"""The budget rule: per layer, the fewest rows whose added variance stays below a share of the SGD
noise, with both measured on one batch.

For layer l the minibatch gradient already carries the SGD noise
:math:`\mathrm{tr}\,\Sigma_l / B` (GradStats: the unbiased trace covariance of the per-example
gradients of the layer's weight, over the batch size). Sampling rows adds, conditionally on the
batch, :math:`V_l(f)` (the formulas of :mod:`gradnoise.sampled.rows` at kept fraction f, computed
from the batch's activations and output gradients). The rule keeps the smallest f of a grid with

.. math::
    V_l(f) \le \text{fraction} \cdot \mathrm{tr}\,\Sigma_l / B,

so the sampled gradient's total variance is at most :math:`(1 + \text{fraction})` times the
exact one, layer by layer (1.0, the exact layer, when no grid value qualifies). One exact forward
and backward under GradStats measures everything; rerun it as training moves the ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gradnoise.errors import require
from gradnoise.sampled.linear import SampledLinear, check_budget
from gradnoise.sampled.rows import METHODS, PROPOSALS, added_variance
from gradnoise.stats.engine import GradStats
from gradnoise.stats.quantities import trace_covariance

__all__ = ["DEFAULT_GRID", "LayerBudget", "choose_budgets", "record_rows"]

DEFAULT_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class LayerBudget:
    r"""One layer's choice: ``budget`` (kept fraction), ``sgd_noise`` :math:`\mathrm{tr}\,\Sigma/B`,
    ``added`` :math:`V(f)` at that budget and ``curve`` (``{f: V(f)}`` over the grid)."""

    name: str
    budget: float
    sgd_noise: float
    added: float
    curve: dict[float, float]

    @property
    def ratio(self) -> float:
        """``added / sgd_noise`` at the chosen budget."""
        return self.added / self.sgd_noise if self.sgd_noise > 0 else float("inf")


def record_rows(model: nn.Module, closure: Callable[[], torch.Tensor]):
    """Run ``closure()`` (a mean loss) and its backward exactly under GradStats.

    Returns ``(stats, rows)``: the GradStats of the step and ``{name: (activations,
    output_grads)}`` of every ``nn.Linear`` submodule (SampledLinear layers run exactly here).
    Gradients accumulate into ``.grad`` as in any backward.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n}
    rows: dict[str, list] = {}

    def hook(name):
        def capture(module, inputs, output):
            rows[name] = [inputs[0].detach(), None]
            output.register_hook(lambda grad: rows[name].__setitem__(1, grad.detach()))

        return capture

    saved = {n: m.budget for n, m in linears.items() if isinstance(m, SampledLinear)}
    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        for name in saved:
            linears[name].budget = 1.0
        with GradStats(model) as stats:
            closure().backward()
    finally:
        for handle in handles:
            handle.remove()
        for name, budget in saved.items():
            linears[name].budget = budget
    return stats, {name: tuple(pair) for name, pair in rows.items() if pair[1] is not None}


def choose_budgets(
    model: nn.Module,
    closure: Callable[[], torch.Tensor],
    *,
    fraction: float = 0.1,
    method: str = "bernoulli",
    proposal: str = "norm",
    grid: Sequence[float] = DEFAULT_GRID,
) -> dict[str, LayerBudget]:
    """Pick each linear layer's budget by the rule of the module docstring.

    ``closure()`` must compute the mean loss of one batch (no backward; the rule runs it). Pass
    ``{n: b.budget for n, b in result.items()}`` to :func:`gradnoise.sampled.sample_linears`.
    """
    ok = isinstance(fraction, (int, float)) and 0 < fraction < 1
    require(
        ok, "choose_budgets(fraction=...)", "a number in (0, 1) (added variance / SGD noise)",
        repr(fraction), "pass e.g. 0.1 to allow 10% of the SGD noise",
    )  # fmt: skip
    require(method in METHODS, "choose_budgets(method=...)", f"one of {METHODS}", repr(method),
            f"use {METHODS[0]!r}")  # fmt: skip
    require(proposal in PROPOSALS, "choose_budgets(proposal=...)", f"one of {PROPOSALS}",
            repr(proposal), f"use {PROPOSALS[0]!r}")  # fmt: skip
    grid = sorted(check_budget(f, "choose_budgets(grid=...)") for f in grid)
    stats, rows = record_rows(model, closure)
    moments, batch = stats.moments(), stats.batch_size
    chosen = {}
    for name, (a, g) in rows.items():
        sgd = float(trace_covariance(moments[f"{name}.weight"])) / batch
        curve = {f: float(added_variance(a, g, f, method=method, proposal=proposal)) for f in grid}
        budget = next((f for f in grid if curve[f] <= fraction * sgd), 1.0)
        chosen[name] = LayerBudget(name, budget, sgd, curve.get(budget, 0.0), curve)
    return chosen
