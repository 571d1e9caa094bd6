r"""``F.embedding``: per-example gradients by segment sums, never a dense one-hot.

Example i's gradient of the table touches only the rows it looks up: row v receives
:math:`s_{iv} = \sum_{t: x_{it} = v} g_{it}`. Sorting the (example, token) keys gives the
segments, so :math:`\|W_i\|^2 = \sum_v \|s_{iv}\|^2` and the summed gradient
:math:`\sum_i s_{iv}` cost one pass over the output gradient plus a sort of B*T keys.
Positions equal to ``padding_idx`` get no gradient, as in PyTorch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.errors import BatchCouplingError, GradNoiseError, explain
from gradnoise.layers.factors import Factors
from gradnoise.layers.registry import BaseRule, Pieces, Request, register

__all__ = ["EmbeddingRule"]


class EmbeddingRule(BaseRule):
    name = "embedding"
    intercepts = (F.embedding,)
    modules = (nn.Embedding,)
    param_roles = ("weight",)
    factored_roles = ("weight",)
    gives_input_grad = True
    broadcasts = True  # a (1, T) position index shared by the batch (GPT-2, BERT)

    def bind(
        self,
        input,
        weight,
        padding_idx=None,
        max_norm=None,
        norm_type=2.0,
        scale_grad_by_freq=False,
        sparse=False,
    ) -> dict[str, Any]:
        return {
            "input": input,
            "weight": weight,
            "padding_idx": padding_idx,
            "max_norm": max_norm,
            "norm_type": norm_type,
            "scale_grad_by_freq": scale_grad_by_freq,
            "sparse": sparse,
        }

    def check(self, bound: dict[str, Any], roles) -> None:
        if bound["scale_grad_by_freq"]:
            raise BatchCouplingError(
                explain(
                    "Embedding(scale_grad_by_freq=True)",
                    expected="gradients that depend on one example at a time",
                    got="a gradient scaled by token counts over the whole batch",
                    fix="construct the embedding with scale_grad_by_freq=False inside GradStats",
                )
            )
        if bound["sparse"]:
            raise GradNoiseError(
                explain(
                    "Embedding(sparse=True)",
                    expected="a dense embedding gradient",
                    got="sparse=True",
                    fix="use sparse=False while measuring with GradStats",
                )
            )

    def call(self, bound: dict[str, Any]) -> torch.Tensor:
        return F.embedding(**bound)

    def contract_cases(self):
        table = nn.Embedding(7, 3, padding_idx=2).double()
        tokens = torch.randint(0, 7, (5, 6))
        return [
            ("embedding", table, (tokens,)),
            ("embedding, (1, T) positions", _TokensPlusPositions(), (tokens,)),
        ]

    def input_grad(self, bound: dict[str, Any], grad_output: torch.Tensor, roles=()) -> None:
        return None  # indices have no gradient

    def backward(self, bound, grad_output, roles, request: Request) -> dict[str, Pieces]:
        tokens, weight = bound["input"], bound["weight"]
        batch, (vocab, dim) = tokens.shape[0], weight.shape
        tokens = tokens.reshape(batch, -1)
        grads = grad_output.reshape(batch, -1, dim)
        if bound["padding_idx"] is not None:
            padding = bound["padding_idx"] % vocab
            grads = grads * (tokens != padding).unsqueeze(-1).to(grads.dtype)
        keys = torch.arange(batch, device=tokens.device).unsqueeze(1) * vocab + tokens
        unique_keys, segment_of = torch.unique(keys.reshape(-1), return_inverse=True)
        segments = grads.new_zeros(len(unique_keys), dim).index_add_(
            0, segment_of, grads.flatten(0, 1)
        )
        example, row = unique_keys // vocab, unique_keys % vocab
        grad = grads.new_zeros(vocab, dim).index_add_(0, row, segments)
        if request.materialize:
            per_example = grads.new_zeros(batch, vocab, dim)
            per_example[example, row] = segments
            return {"weight": Pieces(grad, None, None, per_example, "segment")}
        segment_sq = segments.pow(2)
        sq_norms = grads.new_zeros(batch).index_add_(0, example, segment_sq.sum(1))
        elem_sq = (
            grads.new_zeros(vocab, dim).index_add_(0, row, segment_sq)
            if request.elementwise
            else None
        )
        factors = Factors(right=grads, ids=tokens) if request.factored else None
        return {"weight": Pieces(grad, sq_norms, elem_sq, None, "segment", factors=factors)}


class _TokensPlusPositions(nn.Module):
    """Token embeddings plus position embeddings looked up with a ``(1, T)`` index (GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(7, 3).double(), nn.Embedding(6, 3).double()

    def forward(self, tokens):
        index = torch.arange(tokens.shape[1]).unsqueeze(0)
        return self.tokens(tokens) + self.positions(index)


register(EmbeddingRule())
