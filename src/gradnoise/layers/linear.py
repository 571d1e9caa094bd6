r"""``F.linear`` with any number of leading dims: per-example pieces by product, Gram or bmm.

Input :math:`A_i \in R^{T \times d_{in}}` and output gradient :math:`G_i \in R^{T \times d_{out}}`
of example i (T = product of the non-batch leading dims, 1 for plain (B, d) inputs). The
per-example weight gradient is :math:`W_i = G_i^T A_i`; three ways to get its pieces:

* **product** (T = 1): :math:`\|W_i\|^2 = \|a_i\|^2 \|g_i\|^2`, elementwise squares
  :math:`\sum_i W_i^{\circ 2} = (G^{\circ 2})^T A^{\circ 2}` (one GEMM of squares).
* **gram**: :math:`\|W_i\|^2 = \langle A_i A_i^T, G_i G_i^T \rangle` costs
  :math:`B T^2 (d_{in} + d_{out})` multiply-adds on top of the usual weight-gradient GEMM.
* **bmm**: materialize :math:`W_i` with one batched GEMM (the same FLOPs as the weight gradient,
  which is then their sum), then reduce: a few passes over :math:`B d_{in} d_{out}` numbers.

The cost model compares the extra work of gram and bmm per call; elementwise squares and shared
parameters need the per-example gradients, hence bmm (or product when T = 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.errors import GradNoiseError, explain
from gradnoise.layers.factors import Factors
from gradnoise.layers.registry import (
    BaseRule,
    Pieces,
    Request,
    batched_sq_norms,
    chunked_pieces,
    gram_unsure,
    pieces_from_per_example,
    rebuilt,
    register,
    require_batched,
    settled,
)

__all__ = ["BMM_CHUNK_BYTES", "BMM_PASS_COST", "AddmmRule", "LinearRule", "choose_method"]

# Multiply-adds that one pass over one element of the materialized per-example gradients is
# worth, times the passes bmm makes (sum, squared norm). Memory-bound passes cost tens of
# multiply-adds per element on CPUs; benchmarks/engine_overhead.py measures both paths.
BMM_PASS_COST = 24.0
# Per-example gradients are materialized in batch chunks of at most this many bytes (see
# registry.chunked_pieces); 256 MB chunks ran a ViT step 1.2x slower than 4-16 MB ones.
BMM_CHUNK_BYTES = 32 * 2**20


def choose_method(batch: int, seq: int, d_in: int, d_out: int, request: Request) -> str:
    """Pick ``product``, ``gram`` or ``bmm`` for one call by the cost model of the docstring."""
    if seq == 1:
        return "product"
    if request.elementwise or request.materialize:
        return "bmm"
    gram_cost = batch * seq * seq * (d_in + d_out)
    bmm_cost = BMM_PASS_COST * batch * d_in * d_out
    return "gram" if gram_cost <= bmm_cost else "bmm"


class LinearRule(BaseRule):
    name = "linear"
    intercepts = (F.linear,)
    modules = (nn.Linear,)
    param_roles = ("weight", "bias")
    factored_roles = ("weight",)
    gives_input_grad = True
    broadcasts = True

    def bind(self, input, weight, bias=None) -> dict[str, Any]:
        return {"input": input, "weight": weight, "bias": bias}

    def check(self, bound: dict[str, Any], roles) -> None:
        require_batched(self.name, bound["input"], 2, "(B, ..., d_in)")

    def call(self, bound: dict[str, Any]) -> torch.Tensor:
        return F.linear(bound["input"], bound["weight"], bound["bias"])

    def contract_cases(self):
        return [
            ("linear (B, d)", nn.Linear(4, 3).double(), (torch.randn(5, 4).double(),)),
            ("linear (B, T, d)", nn.Linear(4, 3).double(), (torch.randn(5, 6, 4).double(),)),
            (
                "linear, no bias",
                nn.Linear(4, 3, bias=False).double(),
                (torch.randn(5, 2, 4).double(),),
            ),
        ]

    def input_grad(
        self, bound: dict[str, Any], grad_output: torch.Tensor, roles=()
    ) -> torch.Tensor:
        return grad_output @ bound["weight"]

    def backward(self, bound, grad_output, roles, request: Request) -> dict[str, Pieces]:
        batch = grad_output.shape[0]
        acts = bound["input"].reshape(batch, -1, bound["input"].shape[-1])
        grads = grad_output.reshape(batch, -1, grad_output.shape[-1])
        # per-example bias gradients; with one position their squared norms serve the weight too
        rows = grads[:, 0] if grads.shape[1] == 1 else grads.sum(1)
        row_sq = None
        if grads.shape[1] == 1 and not request.materialize:
            row_sq = batched_sq_norms(rows)
        pieces = {}
        if "weight" in roles:
            pieces["weight"] = _weight_pieces(acts, grads, request, row_sq)
        if "bias" in roles:
            pieces["bias"] = _bias_pieces(rows, request, row_sq)
        return pieces


def _bias_pieces(rows: torch.Tensor, request: Request, row_sq: torch.Tensor | None) -> Pieces:
    if row_sq is None:
        return pieces_from_per_example(rows, request, "product")
    elem_sq = rows.pow(2).sum(0) if request.elementwise else None
    return Pieces(rows.sum(0), row_sq, elem_sq, None, "product")


def _weight_pieces(acts, grads, request: Request, row_sq: torch.Tensor | None) -> Pieces:
    if request.factored:  # this use's own terms as usual, plus its factors for the cross terms
        plain = Request(batch=request.batch)
        own = settled(_weight_pieces(acts, grads, plain, row_sq), plain)
        return dataclasses.replace(own, recompute=None, factors=Factors(right=acts, left=grads))
    batch, seq, d_in = acts.shape
    method = choose_method(batch, seq, d_in, grads.shape[-1], request)
    if method == "product":
        return _product(acts[:, 0], grads[:, 0], request, row_sq)
    if method == "gram":
        return _gram(acts, grads)
    return _bmm(acts, grads, request)


def _product(acts, grads, request: Request, grads_sq: torch.Tensor | None = None) -> Pieces:
    if request.materialize:
        return pieces_from_per_example(torch.einsum("bo,bi->boi", grads, acts), request, "product")
    grad = grads.T @ acts
    if grads_sq is None:
        grads_sq = batched_sq_norms(grads)
    sq_norms = grads_sq * batched_sq_norms(acts)
    elem_sq = grads.pow(2).T @ acts.pow(2) if request.elementwise else None
    # the factors are smaller than the gradient when B (d_in + d_out) < d_in d_out
    smaller = grads.numel() + acts.numel() < grad.numel()
    recompute = rebuilt(lambda: grads.T @ acts, acts) if smaller else None
    return Pieces(grad, sq_norms, elem_sq, None, "product", recompute)


def _gram(acts: torch.Tensor, grads: torch.Tensor) -> Pieces:
    grad = grads.flatten(0, 1).T @ acts.flatten(0, 1)
    gram_products = torch.bmm(acts, acts.mT) * torch.bmm(grads, grads.mT)
    sq_norms = gram_products.sum((1, 2))
    norm_products = torch.linalg.vector_norm(acts, dim=2) * torch.linalg.vector_norm(grads, dim=2)
    unsure = gram_unsure(norm_products, sq_norms)
    return Pieces(grad, sq_norms, None, None, "gram", unsure=unsure)


def _bmm(acts: torch.Tensor, grads: torch.Tensor, request: Request) -> Pieces:
    if request.materialize:
        return pieces_from_per_example(torch.bmm(grads.mT, acts), request, "bmm")

    def fill(start: int, stop: int, out: torch.Tensor) -> None:
        torch.bmm(grads[start:stop].mT, acts[start:stop], out=out)

    shape = (grads.shape[-1], acts.shape[-1])
    return chunked_pieces(acts.shape[0], shape, acts, fill, request, "bmm", BMM_CHUNK_BYTES)


class AddmmRule(BaseRule):
    r"""``torch.addmm(bias, rows, weight)`` as transformers' ``Conv1D`` calls it.

    ``Conv1D`` flattens ``(B, T, d_in)`` to ``(B T, d_in)`` rows and computes
    ``beta * bias + alpha * rows @ weight`` with a ``(d_in, d_out)`` weight: the Linear rule on
    ``(B, T, d_in)`` with the weight transposed. The rows must be the batch's, example-major
    (what ``x.view(-1, d)`` of a batch-first tensor gives), so their count is a multiple of the
    block's batch size: fixed by an earlier batched layer (an embedding, usually), or else read
    from dim 0 of the first tensor the model was called with.
    """

    name = "addmm"
    intercepts = (torch.addmm, torch._C.TensorBase.addmm)
    param_roles = ("input", "mat2")
    factored_roles = ("mat2",)
    batched_input = "mat1"
    gives_input_grad = True

    def bind(self, input, mat1, mat2, *, beta=1, alpha=1) -> dict[str, Any]:
        return {"input": input, "mat1": mat1, "mat2": mat2, "beta": beta, "alpha": alpha}

    def count_examples(self, bound, roles, batch: int | None) -> int:
        rows = bound["mat1"].shape[0]
        if batch is None or rows % batch:
            raise GradNoiseError(
                explain(
                    "torch.addmm on a tracked weight (transformers' Conv1D)",
                    expected="rows of a known batch: a multiple of the batch size, set by an "
                    "earlier layer" + ("" if batch is None else f" ({batch})"),
                    got=f"{rows} rows" + (" before any batched layer" if batch is None else ""),
                    fix="run a layer on the (B, ...) batch first (an embedding or nn.Linear), or "
                    "use nn.Linear on batch-first inputs",
                )
            )
        return batch

    def check(self, bound, roles) -> None:
        bias = bound["input"]
        if "input" in roles and bias.dim() != 1:
            raise GradNoiseError(
                explain(
                    "torch.addmm(bias, rows, weight)",
                    expected="a 1-d bias broadcast over the rows",
                    got=f"a tracked tensor of shape {tuple(bias.shape)} as the added term",
                    fix="add per-row terms outside addmm",
                )
            )

    def call(self, bound: dict[str, Any]) -> torch.Tensor:
        return torch.addmm(**bound)

    def input_grad(
        self, bound: dict[str, Any], grad_output: torch.Tensor, roles=()
    ) -> torch.Tensor:
        grad = grad_output @ bound["mat2"].T
        return grad * bound["alpha"] if bound["alpha"] != 1 else grad

    def backward(self, bound, grad_output, roles, request: Request) -> dict[str, Pieces]:
        batch = request.batch
        acts = bound["mat1"].reshape(batch, -1, bound["mat1"].shape[-1])
        grads = grad_output.reshape(batch, -1, grad_output.shape[-1])
        pieces = {}
        if "mat2" in roles:
            scaled = grads * bound["alpha"] if bound["alpha"] != 1 else grads
            pieces["mat2"] = _transposed(_weight_pieces(acts, scaled, request, None))
        if "input" in roles:
            scaled = grads * bound["beta"] if bound["beta"] != 1 else grads
            pieces["input"] = pieces_from_per_example(scaled.sum(1), request, "product")
        return pieces

    def contract_cases(self):
        return [("addmm Conv1D", _Conv1D(4, 3), (torch.randn(5, 6, 4).double(),))]


def _transposed(pieces: Pieces) -> Pieces:
    """Pieces of ``W^T`` from those of ``W`` (a (d_out, d_in) layout turned into (d_in, d_out))."""
    recompute = pieces.recompute
    return Pieces(
        grad=pieces.grad.T,
        sq_norms=pieces.sq_norms,
        elem_sq=None if pieces.elem_sq is None else pieces.elem_sq.T,
        per_example=None if pieces.per_example is None else pieces.per_example.mT,
        method=pieces.method,
        recompute=None if recompute is None else (lambda: recompute().T),
        unsure=pieces.unsure,
        factors=None if pieces.factors is None else pieces.factors.transposed(),
    )


class _Conv1D(nn.Module):
    """transformers' ``Conv1D`` (a linear layer with a (d_in, d_out) weight), for the contract."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(d_out, dtype=torch.float64))

    def forward(self, x):
        rows = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return rows.view(*x.shape[:-1], -1)


register(LinearRule())
register(AddmmRule())
