r"""Per-example gradients in factored form, for parameters used more than once (tied weights).

A use of a weight :math:`W \in R^{o \times d}` by a linear-like op gives example i the gradient
:math:`W_{iu} = L_{iu}^T R_{iu} = \sum_t l_{iut} r_{iut}^T`: rows :math:`l_t \in R^o` and
:math:`r_t \in R^d` over the use's positions t (a linear layer: output gradients and inputs; an
embedding: one-hot rows of the looked-up ids and the output gradients). Example i's gradient is
the sum over uses, so

.. math::
    \|W_i\|^2 = \sum_u \|W_{iu}\|^2 + 2 \sum_{u < v} \langle W_{iu}, W_{iv} \rangle,\qquad
    \langle W_{iu}, W_{iv} \rangle = \sum_{s, t} (L_{iu} L_{iv}^T)_{st} (R_{iu} R_{iv}^T)_{st}.

Each use's own term comes from its rule's usual path; the cross terms cost one Gram pair per
pair of uses, :math:`B T_u T_v (o + d)` multiply-adds, and :math:`B T_u T_v d` only when one side
is an embedding (:math:`L_{iu} L_{iv}^T` is then a gather of the other side's rows at the ids, or
an equality mask when both are). Nothing of size :math:`B o d` is formed, where the materialized
alternative sums ``(B, o, d)`` per-example gradients (a tied GPT-2 head and embedding: B V d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Factors", "cross_inner", "row_norm_products"]


@dataclass(frozen=True)
class Factors:
    """One use's per-example gradient :math:`L_i^T R_i` of an ``(o, d)`` weight.

    ``left`` is ``(B, T, o)``, or ``None`` when the rows are one-hot at ``ids`` ``(B, T)``
    (an embedding lookup); ``right`` is ``(B, T, d)``. Rows of padding positions are zero.
    """

    right: torch.Tensor
    left: torch.Tensor | None = None
    ids: torch.Tensor | None = None

    def transposed(self) -> Factors:
        """The factors of the transposed weight ``(d, o)``: the sides swap (dense only)."""
        if self.left is None:
            raise ValueError("an embedding's factors have no transpose")
        return Factors(right=self.left, left=self.right)


def _left_gram(u: Factors, v: Factors) -> torch.Tensor:
    """``(B, T_u, T_v)``: :math:`L_u L_v^T`."""
    if u.left is not None and v.left is not None:
        return torch.bmm(u.left, v.left.mT)
    if u.left is not None:  # v one-hot: column t of L_v^T picks row ids_v[t] of L_u^T
        index = v.ids.unsqueeze(1).expand(-1, u.left.shape[1], -1)
        return u.left.gather(2, index)
    if v.left is not None:
        return _left_gram(v, u).mT
    return (u.ids.unsqueeze(2) == v.ids.unsqueeze(1)).to(u.right.dtype)


def cross_inner(u: Factors, v: Factors) -> torch.Tensor:
    """``(B,)``: :math:`\\langle L_u^T R_u, L_v^T R_v \\rangle_F` per example."""
    right = torch.bmm(u.right, v.right.mT)
    return (_left_gram(u, v) * right).sum((1, 2))


def row_norm_products(factors: Factors) -> torch.Tensor:
    """``(B, T)``: :math:`|l_t| |r_t|` per row, for the rounding bound of the cross terms."""
    right = torch.linalg.vector_norm(factors.right, dim=2)
    if factors.left is None:
        return right  # one-hot rows have norm 1
    return torch.linalg.vector_norm(factors.left, dim=2) * right
