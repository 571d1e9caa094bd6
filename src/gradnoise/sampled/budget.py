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
exact one, layer by layer (1.0, the exact layer, when no grid value qualifies). Layers that read
the same input tensor (q, k, v) save one shared sample only if their budgets agree, so with
``share=True`` each such group gets the largest budget of its members (which only lowers their
added variance). One exact forward
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

__all__ = ["DEFAULT_GRID", "LayerBudget", "Recording", "choose_budgets", "record_rows"]

DEFAULT_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class LayerBudget:
    r"""One layer's choice: ``budget`` (kept fraction), ``sgd_noise`` :math:`\mathrm{tr}\,\Sigma/B`,
    ``added`` :math:`V(f)` at that budget, ``curve`` (``{f: V(f)}`` over the grid), and
    ``input_saved_elsewhere``: another op saves this layer's input anyway (the output projection
    after ``scaled_dot_product_attention``, which saves its output), so sampling would free no
    memory; such layers get budget 1.0."""

    name: str
    budget: float
    sgd_noise: float
    added: float
    curve: dict[float, float]
    input_saved_elsewhere: bool = False

    @property
    def ratio(self) -> float:
        """``added / sgd_noise`` at the chosen budget."""
        return self.added / self.sgd_noise if self.sgd_noise > 0 else float("inf")


@dataclass(frozen=True)
class Recording:
    """What :func:`record_rows` saw: the step's GradStats, ``rows`` ``{name: (activations,
    output_grads)}`` of every linear layer, and the names of those whose input storage autograd
    also saves for an op outside any linear layer."""

    stats: GradStats
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]]
    saved_elsewhere: frozenset[str]


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def record_rows(model: nn.Module, closure: Callable[[], torch.Tensor]) -> Recording:
    """Run ``closure()`` (a mean loss) and its backward exactly under GradStats, recording every
    ``nn.Linear`` submodule's input and output gradient (SampledLinear layers run exactly here).

    A second forward, without GradStats and without backward, finds the layers whose input
    storage autograd also saves for an op outside any linear layer. Gradients accumulate into
    ``.grad`` as in any backward.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n}
    rows: dict[str, list] = {}

    def capture(name):
        def hook(module, inputs, output):
            rows[name] = [inputs[0].detach(), None]
            output.register_hook(lambda grad: rows[name].__setitem__(1, grad.detach()))

        return hook

    saved = {n: m.budget for n, m in linears.items() if isinstance(m, SampledLinear)}
    try:
        for name in saved:
            linears[name].budget = 1.0
        elsewhere = _inputs_saved_elsewhere(linears, closure)
        handles = [m.register_forward_hook(capture(n)) for n, m in linears.items()]
        try:
            with GradStats(model) as stats:
                closure().backward()
        finally:
            for handle in handles:
                handle.remove()
    finally:
        for name, budget in saved.items():
            linears[name].budget = budget
    done = {name: tuple(pair) for name, pair in rows.items() if pair[1] is not None}
    return Recording(stats, done, elsewhere & set(done))


def _never_unpacked(packed):
    """Unpack hook of a forward that is never differentiated (its graph is dropped unused)."""
    raise RuntimeError("this forward records what autograd saves; it cannot be differentiated")


def _inputs_saved_elsewhere(linears: dict[str, nn.Module], closure) -> frozenset[str]:
    """Names of the linear layers whose input storage autograd saves, in one forward of
    ``closure``, for an op that runs outside every linear layer."""
    depth, outside, inputs = [0], set(), {}

    def pack(tensor):
        if not depth[0]:
            outside.add(_storage(tensor))
        # keep the memory alive as autograd would, without the tensor: a saved output returned
        # as is would tie it to its own grad_fn, a cycle Python cannot collect
        return tensor.untyped_storage()

    def enter(name):
        def hook(module, args):
            depth[0] += 1
            inputs[name] = _storage(args[0])

        return hook

    leave = lambda *_: depth.__setitem__(0, depth[0] - 1)  # noqa: E731
    handles = [m.register_forward_pre_hook(enter(n)) for n, m in linears.items()]
    handles += [m.register_forward_hook(leave) for m in linears.values()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _never_unpacked):
            closure()
    finally:
        for handle in handles:
            handle.remove()
    return frozenset(name for name, ptr in inputs.items() if ptr in outside)


def choose_budgets(
    model: nn.Module,
    closure: Callable[[], torch.Tensor],
    *,
    fraction: float = 0.1,
    method: str = "bernoulli",
    proposal: str = "norm",
    grid: Sequence[float] = DEFAULT_GRID,
    share: bool = True,
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
    recording = record_rows(model, closure)
    moments, batch, rows = recording.stats.moments(), recording.stats.batch_size, recording.rows
    sgd, curves, budgets = {}, {}, {}
    for name, (a, g) in rows.items():
        sgd[name] = float(trace_covariance(moments[f"{name}.weight"])) / batch
        curves[name] = {f: float(added_variance(a, g, f, method=method, proposal=proposal))
                        for f in grid}  # fmt: skip
        under = (f for f in grid if curves[name][f] <= fraction * sgd[name])
        budgets[name] = 1.0 if name in recording.saved_elsewhere else next(under, 1.0)
    if share:
        for group in _shared_inputs(rows).values():
            for name in group:
                budgets[name] = max(budgets[n] for n in group)
    return {
        n: LayerBudget(n, budgets[n], sgd[n], curves[n].get(budgets[n], 0.0), curves[n],
                       n in recording.saved_elsewhere)
        for n in rows
    }  # fmt: skip


def _shared_inputs(rows: dict) -> dict[tuple, list[str]]:
    """Layer names grouped by the input tensor they read (same storage, offset and shape)."""
    groups: dict[tuple, list[str]] = {}
    for name, (a, _) in rows.items():
        groups.setdefault((_storage(a), a.storage_offset(), tuple(a.shape)), []).append(name)
    return groups
