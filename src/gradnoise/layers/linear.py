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

from typing import Any

import torch
import torch.nn.functional as F

from gradnoise.layers.registry import (
    BaseRule,
    Pieces,
    Request,
    batched_sq_norms,
    pieces_from_per_example,
    register,
)

__all__ = ["BMM_CHUNK_BYTES", "BMM_PASS_COST", "LinearRule", "choose_method"]

# Multiply-adds that one pass over one element of the materialized per-example gradients is
# worth, times the passes bmm makes (sum, squared norm). Memory-bound passes cost tens of
# multiply-adds per element on CPUs; benchmarks/engine_overhead.py measures both paths.
BMM_PASS_COST = 24.0
# Per-example gradients are materialized in batch chunks of at most this many bytes.
BMM_CHUNK_BYTES = 256 * 2**20


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
    param_roles = ("weight", "bias")

    def bind(self, input, weight, bias=None) -> dict[str, Any]:
        return {"input": input, "weight": weight, "bias": bias}

    def call(self, func, bound: dict[str, Any]) -> torch.Tensor:
        return F.linear(bound["input"], bound["weight"], bound["bias"])

    def input_grad(self, bound: dict[str, Any], grad_output: torch.Tensor) -> torch.Tensor:
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
    recompute = (lambda: grads.T @ acts) if smaller else None
    return Pieces(grad, sq_norms, elem_sq, None, "product", recompute)


def _gram(acts: torch.Tensor, grads: torch.Tensor) -> Pieces:
    grad = grads.flatten(0, 1).T @ acts.flatten(0, 1)
    gram_products = torch.bmm(acts, acts.mT) * torch.bmm(grads, grads.mT)
    return Pieces(grad, gram_products.sum((1, 2)), None, None, "gram")


def _bmm(acts: torch.Tensor, grads: torch.Tensor, request: Request) -> Pieces:
    if request.materialize:
        return pieces_from_per_example(torch.bmm(grads.mT, acts), request, "bmm")
    d_in = acts.shape[-1]
    bytes_per_example = d_in * grads.shape[-1] * acts.element_size()
    chunk = max(1, BMM_CHUNK_BYTES // bytes_per_example)
    parts = [
        pieces_from_per_example(torch.bmm(g.mT, a), request, "bmm")
        for a, g in zip(acts.split(chunk), grads.split(chunk), strict=True)
    ]
    if len(parts) == 1:
        return parts[0]
    return Pieces(
        grad=sum(p.grad for p in parts),
        sq_norms=torch.cat([p.sq_norms for p in parts]),
        elem_sq=sum(p.elem_sq for p in parts) if request.elementwise else None,
        per_example=None,
        method="bmm",
    )


register(LinearRule(), F.linear)
