"""GradMoments: the one record every gradient statistic in gradnoise is computed from.

For per-example gradients g_1, ..., g_n of one parameter (or one layer) the record holds

    n             the number of examples (for a weighted loss the effective number
                  n_eff = (sum_i w_i)^2 / sum_i w_i^2: ``GradStats(loss_reduction="weighted")``),
    grad_sum      sum_i g_i                      (same shape as the parameter),
    sq_norm_sum   sum_i ||g_i||^2                (a 0-dim tensor),
    elem_sq_sum   sum_i g_i * g_i, elementwise   (optional, same shape as the parameter).

All three sums are additive, so records of micro-batches, accumulation steps or ranks combine
exactly with :meth:`GradMoments.merge`. Means, variances, the noise scale and the GSNR are pure
functions of the record and live in :mod:`gradnoise.stats.quantities`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from gradnoise.errors import GradNoiseError, explain

__all__ = ["GradMoments", "common_count", "merge_all", "total_moments"]


@dataclass(frozen=True)
class GradMoments:
    """Sufficient statistics of ``n`` per-example gradients (see the module docstring)."""

    n: int | float
    grad_sum: torch.Tensor
    sq_norm_sum: torch.Tensor
    elem_sq_sum: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, (int, float)) or not self.n >= 1:
            raise GradNoiseError(
                explain(
                    "GradMoments.n",
                    expected="a positive int (the number of examples), or a float >= 1 (the "
                    "effective number of a weighted loss)",
                    got=repr(self.n),
                    fix="build moments from at least one example",
                )
            )
        if self.elem_sq_sum is not None and self.elem_sq_sum.shape != self.grad_sum.shape:
            raise GradNoiseError(
                explain(
                    "GradMoments.elem_sq_sum",
                    expected=f"the shape of grad_sum {tuple(self.grad_sum.shape)}",
                    got=str(tuple(self.elem_sq_sum.shape)),
                    fix="pass the elementwise sum of squares of the same parameter",
                )
            )

    @classmethod
    def from_per_example(cls, grads: torch.Tensor) -> GradMoments:
        """Build the record from materialized per-example gradients of shape ``(n, *shape)``."""
        flat = grads.reshape(grads.shape[0], -1)
        return cls(
            n=grads.shape[0],
            grad_sum=grads.sum(0),
            sq_norm_sum=flat.pow(2).sum(),
            elem_sq_sum=grads.pow(2).sum(0),
        )

    @property
    def mean(self) -> torch.Tensor:
        """The mean gradient ``grad_sum / n``."""
        return self.grad_sum / self.n

    def merge(self, other: GradMoments) -> GradMoments:
        """Combine two records of disjoint example sets; exact, since every field is a sum."""
        if self.grad_sum.shape != other.grad_sum.shape:
            raise GradNoiseError(
                explain(
                    "GradMoments.merge",
                    expected=f"moments of the same parameter shape {tuple(self.grad_sum.shape)}",
                    got=str(tuple(other.grad_sum.shape)),
                    fix="merge records of the same parameter only",
                )
            )
        both_elementwise = self.elem_sq_sum is not None and other.elem_sq_sum is not None
        return GradMoments(
            n=self.n + other.n,
            grad_sum=self.grad_sum + other.grad_sum,
            sq_norm_sum=self.sq_norm_sum + other.sq_norm_sum,
            elem_sq_sum=self.elem_sq_sum + other.elem_sq_sum if both_elementwise else None,
        )

    def to(self, *args, **kwargs) -> GradMoments:
        """Move or cast every tensor field, like :meth:`torch.Tensor.to`."""
        elem = self.elem_sq_sum
        return GradMoments(
            n=self.n,
            grad_sum=self.grad_sum.to(*args, **kwargs),
            sq_norm_sum=self.sq_norm_sum.to(*args, **kwargs),
            elem_sq_sum=None if elem is None else elem.to(*args, **kwargs),
        )


def merge_all(records: Iterable[GradMoments]) -> GradMoments:
    """Merge a non-empty sequence of records of the same parameter (micro-batches, ranks)."""
    records = list(records)
    if not records:
        raise GradNoiseError(
            explain(
                "merge_all",
                expected="at least one GradMoments",
                got="an empty sequence",
                fix="collect moments from at least one backward pass before merging",
            )
        )
    merged = records[0]
    for record in records[1:]:
        merged = merged.merge(record)
    return merged


def total_moments(per_param: Mapping[str, GradMoments]) -> GradMoments:
    """Concatenate per-parameter records into one whole-model record over the same examples.

    The whole-model per-example gradient is the concatenation of the parameters' gradients, so its
    squared norm is the sum of theirs: ``sq_norm_sum`` adds up, and ``grad_sum`` (and
    ``elem_sq_sum``) are the flattened concatenations.
    """
    records = list(per_param.values())
    n = common_count(records, "total_moments")
    elementwise = all(record.elem_sq_sum is not None for record in records)
    return GradMoments(
        n=n,
        grad_sum=torch.cat([record.grad_sum.reshape(-1) for record in records]),
        sq_norm_sum=torch.stack([record.sq_norm_sum for record in records]).sum(),
        elem_sq_sum=(
            torch.cat([record.elem_sq_sum.reshape(-1) for record in records])
            if elementwise
            else None
        ),
    )


def common_count(records: list[GradMoments], where: str) -> int:
    """The ``n`` shared by per-parameter records of one set of examples; raise if none is."""
    if not records:
        raise GradNoiseError(
            explain(
                where,
                expected="a non-empty mapping of parameter name to GradMoments",
                got="an empty mapping",
                fix="run a backward pass inside GradStats before asking for totals",
            )
        )
    counts = {record.n for record in records}
    if len(counts) != 1:
        raise GradNoiseError(
            explain(
                where,
                expected="records over the same examples (one common n)",
                got=f"n values {sorted(counts)}",
                fix="merge each parameter over the same micro-batches before combining",
            )
        )
    return records[0].n
