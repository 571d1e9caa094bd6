r"""SampledLinear: ``nn.Linear`` whose backward keeps k of the N input rows for the weight gradient.

Forward is exactly ``F.linear``. The backward returns

* the input gradient :math:`\nabla A = G W` exactly (it needs the weight, not the activations),
* the bias gradient :math:`\sum_r g_r` exactly,
* the weight gradient :math:`\widehat{\nabla W} = \sum_s w_s\, g_{r_s} a_{r_s}^\top`, unbiased,
  from the rows :math:`r_s` drawn in the forward with weights :math:`w_s`
  (:mod:`gradnoise.sampled.rows`: Bernoulli sampling with :math:`\pi_r = \min(1, c\|a_r\|)` and
  weights :math:`1/\pi_r`, or WTA-CRS), whose added trace variance is
  :math:`\sum_r (1/\pi_r - 1)\|g_r\|^2\|a_r\|^2` (Bernoulli) or
  :math:`\frac1{k'}(\sum_{r\in R}\|g_r\|^2\|a_r\|^2/q_r - \|\sum_{r \in R} g_r a_r^\top\|_F^2)`
  (WTA-CRS).

**What is saved.** Rows are chosen in the forward from the activation norms :math:`\|a_r\|` (the
output gradient does not exist yet), and only the chosen rows, already multiplied by their
weights, are saved: ``k x d_in`` values and ``k`` int64 indices instead of ``N x d_in``. The full
input is released as soon as nothing else holds it. With ``share=True`` (default), layers that
read the same input tensor in the same forward (q, k and v projections of one LayerNorm output)
with the same budget and settings save one sample between them, as autograd saves one input
between exact layers; each layer's gradient stays unbiased (they are correlated with each other,
which leaves the trace variance of the whole gradient, a sum over layers, unchanged).
Sampling frees memory only if nothing else keeps the input: where another op saves it anyway (the
output projection after ``scaled_dot_product_attention``, which saves its output; a layer after
``tanh`` or ``relu``, which save theirs), the k sampled rows come on top.
:func:`gradnoise.sampled.record_rows` finds such layers and
:func:`gradnoise.sampled.choose_budgets` leaves them exact.

The sampled path runs only when it can matter: in training mode, with grad enabled and the weight
requiring grad, and ``budget < 1``; otherwise the layer is a plain ``nn.Linear``. The parameters
and ``state_dict`` are those of ``nn.Linear`` (same names, shapes and objects).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from gradnoise.errors import require
from gradnoise.sampled.rows import METHODS, PROPOSALS, kept_rows, row_scores, sample_rows

__all__ = ["SampledLinear", "check_budget"]

_SHARED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # input tensor -> {settings: sample}


def check_budget(budget: object, what: str = "budget") -> float:
    """Return ``budget`` as a float after checking it is a number in (0, 1]."""
    ok = isinstance(budget, (int, float)) and not isinstance(budget, bool) and 0 < budget <= 1
    require(
        ok, what, "a number in (0, 1] (the fraction of activation rows kept)", repr(budget),
        "pass e.g. 0.5 to keep half the rows, or 1.0 for the exact gradient",
    )  # fmt: skip
    return float(budget)


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    require(value in choices, what, f"one of {choices}", repr(value), f"use {choices[0]!r}")


def _options(budget: float, method: str, proposal: str, share: bool, generator) -> dict:
    """The checked sampling settings of a SampledLinear."""
    budget = check_budget(budget, "SampledLinear(budget=...)")
    _check_choice(method, METHODS, "SampledLinear(method=...)")
    _check_choice(proposal, PROPOSALS, "SampledLinear(proposal=...)")
    ok = generator is None or isinstance(generator, torch.Generator)
    require(
        ok, "SampledLinear(generator=...)", "a torch.Generator or None", type(generator).__name__,
        "pass torch.Generator().manual_seed(seed)",
    )  # fmt: skip
    return {
        "budget": budget, "method": method, "proposal": proposal, "share": bool(share),
        "generator": generator,
    }  # fmt: skip


class _SampledLinearFunction(torch.autograd.Function):
    """``F.linear`` whose backward computes the weight gradient from pre-drawn, pre-scaled rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, scaled_rows):
        ctx.save_for_backward(weight, index, scaled_rows)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight, index, scaled_rows = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = rows[index].T @ scaled_rows if ctx.needs_input_grad[1] else None
        grad_b = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


class SampledLinear(nn.Linear):
    """Drop-in ``nn.Linear`` with an unbiased, row-sampled weight gradient (module docstring).

    Args:
        budget: the fraction k / N of activation rows kept for the weight gradient, in (0, 1];
            1.0 is the exact layer. The expected number of rows is ``max(1, round(budget * N))``.
        method: ``"bernoulli"`` (independent keeps with :math:`\\pi_r = \\min(1, c s_r)`; the
            number kept varies around k) or ``"wta-crs"`` (exactly k rows: a deterministic top
            set plus draws with replacement).
        proposal: the scores :math:`s_r`: ``"norm"`` (``||a_r||``) or ``"uniform"``.
        share: reuse one sample among layers that read the same input tensor.
        generator: the ``torch.Generator`` of the draws (keyword-only; ``None``: torch's global).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        budget: float = 0.5,
        method: str = "bernoulli",
        proposal: str = "norm",
        share: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        options = _options(budget, method, proposal, share, generator)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.__dict__.update(options)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        budget: float = 0.5,
        method: str = "bernoulli",
        proposal: str = "norm",
        share: bool = True,
        generator: torch.Generator | None = None,
    ) -> SampledLinear:
        """A SampledLinear holding ``linear``'s own parameter objects (no copy)."""
        options = _options(budget, method, proposal, share, generator)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.training = linear.training
        layer.__dict__.update(options)
        return layer

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's parameter objects."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        linear.training = self.training
        return linear

    def _sampled(self) -> bool:
        return (
            self.training
            and self.budget < 1
            and torch.is_grad_enabled()
            and self.weight.requires_grad
        )

    def _draw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, scaled_rows)`` for input ``x``: this forward's shared draw, or a new one.

        A draw is shared until a layer that already used it reads the same tensor again (the
        next forward on an unchanged input, or a layer applied twice), which draws afresh.
        """
        key = (self.budget, self.method, self.proposal, x._version)
        cache = _SHARED.setdefault(x, {}) if self.share else {}
        if key in cache and id(self) not in cache[key][1]:
            cache[key][1].add(id(self))
            return cache[key][0]
        with torch.no_grad():
            rows = x.detach().reshape(-1, x.shape[-1])
            k = kept_rows(self.budget, rows.shape[0])
            scores = row_scores(rows, self.proposal)
            index, scale = sample_rows(scores, k, self.method, generator=self.generator)
            sample = (index, rows[index] * scale.to(rows.dtype).unsqueeze(1))
        cache[key] = (sample, {id(self)})
        return sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._sampled():
            return F.linear(x, self.weight, self.bias)
        index, scaled_rows = self._draw(x)
        return _SampledLinearFunction.apply(x, self.weight, self.bias, index, scaled_rows)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, budget={self.budget}, method={self.method!r}, "
            f"proposal={self.proposal!r}"
        )
