"""Accumulate one parameter's per-example pieces over its uses in one backward pass.

A parameter used once contributes squared norms directly. A parameter used k > 1 times (tied
embeddings, a module called twice) has per-example gradient :math:`g_i = \\sum_u g_{i,u}`, whose
squared norm has cross terms between uses; its uses therefore hand over materialized per-example
gradients, summed here, and the norms are taken at the end. Small parameters (norm layers,
biases) hand theirs over too: :func:`settle` takes the norms of all of them when results are read,
one op per group of equal shapes instead of a few small ops per parameter in backward.
"""

from __future__ import annotations

import math

import torch

from gradnoise.errors import GradNoiseError, NonFiniteGradientError, explain
from gradnoise.layers.factors import cross_inner, row_norm_products
from gradnoise.layers.registry import (
    DEFER_NUMEL,
    SQ_NORM_SHORT,
    Pieces,
    batched_sq_norms,
    gram_unsure,
    sq_norm,
)
from gradnoise.stats.moments import GradMoments

__all__ = ["Accumulator", "check_residual", "residual_tolerance", "settle"]


class Accumulator:
    """Running sums of one parameter's pieces (in autograd's gradient scale)."""

    def __init__(self, pieces: Pieces) -> None:
        self.grad = pieces.grad
        self._sq_norms = pieces.sq_norms
        self._elem_sq = pieces.elem_sq
        self._per_example = pieces.per_example
        self.methods = [pieces.method]
        # ||sum_i g_i||^2 of a large gradient while it is still in cache; materialized pieces
        # come from shared parameters, the fallback or small parameters, whose sums may still
        # grow, and small gradients are batched by settle(), so they wait until asked
        shared = pieces.per_example is not None or pieces.factors is not None
        # (kept now when the gradient may be released for a recompute)
        later = shared or (self.grad.numel() <= SQ_NORM_SHORT and pieces.recompute is None)
        self._grad_sq: torch.Tensor | None = None if later else sq_norm(self.grad)
        self._recompute = pieces.recompute
        self._dropped = False  # see drop_grad
        self.unsure = [] if pieces.unsure is None else [pieces.unsure]
        # factored uses (tied weights): every use's factors, and the rounding bound's row sums
        self._factors = None if pieces.factors is None else [pieces.factors]
        self._row_sums = None if pieces.factors is None else _row_sums(pieces.factors)

    def release(self) -> None:
        """Drop the summed gradient when it can be rebuilt from smaller factors.

        Autograd then adopts the tensor as ``param.grad`` instead of copying it (it copies any
        gradient someone else still references); ``summed_grad`` rebuilds it on demand, so later
        in-place changes of ``.grad`` (clipping, zeroing) cannot alter the statistics.
        """
        if self._recompute is not None:
            self.grad = None

    def drop_grad(self) -> None:
        """Forget the summed gradient for good (an FSDP2 shard's: FSDP reduce-scatters and
        frees it), keeping its squared norm."""
        self.grad_sq_norm()
        self.grad, self._recompute, self._dropped = None, None, True

    def summed_grad(self) -> torch.Tensor:
        """``sum_i g_i`` in autograd's scale."""
        if self.grad is None:
            if self._dropped:
                raise GradNoiseError(
                    explain(
                        "GradStats.moments() of an FSDP2-sharded parameter",
                        expected="a parameter whose summed gradient GradStats keeps",
                        got="a shard whose local gradient FSDP reduce-scattered and freed",
                        fix="use gradnoise.stats.fsdp.gather_sharded(stats) for the statistics "
                        "of all ranks' examples (norms, noise scale per parameter)",
                    )
                )
            with torch.no_grad():  # from the block's activations, outside backward
                self.grad = self._recompute()
        return self.grad

    def add(self, pieces: Pieces) -> None:
        self.grad = self.grad + pieces.grad
        self._grad_sq = None
        self._recompute = None
        self.methods.append(pieces.method)
        if pieces.unsure is not None:
            self.unsure.append(pieces.unsure)
        if self._factors is not None and pieces.factors is not None:
            self._add_factored(pieces)
            return
        if self._per_example is None or pieces.per_example is None:
            raise AssertionError("shared parameters must be factored or materialized on every use")
        self._per_example = self._per_example + pieces.per_example

    def _add_factored(self, pieces: Pieces) -> None:
        """||sum_u g_u||^2 = sum_u ||g_u||^2 + 2 sum_{u<v} <g_u, g_v> (see layers/factors.py)."""
        new = pieces.factors
        cross = torch.stack([cross_inner(old, new) for old in self._factors]).sum(0)
        self._sq_norms = self._sq_norms + pieces.sq_norms + 2 * cross
        self._factors.append(new)
        self._row_sums = self._row_sums + _row_sums(new)

    def drop_factors(self) -> None:
        """All uses are in (the parameter's gradient hook ran): keep the rounding flag of the
        cross terms and let the factors (activations, output gradients) go."""
        if self._factors is not None and len(self._factors) > 1:
            flag = gram_unsure(self._row_sums.unsqueeze(1), self._sq_norms)
            if flag is not None:
                self.unsure.append(flag)
        self._factors = None

    def grad_sq_norm(self) -> torch.Tensor:
        """``||sum_i g_i||^2`` in autograd's scale."""
        if self._grad_sq is None:
            self._grad_sq = sq_norm(self.summed_grad())
        return self._grad_sq

    def sq_norms(self) -> torch.Tensor:
        if self._per_example is not None:
            return batched_sq_norms(self._per_example)
        return self._sq_norms

    def elem_sq(self) -> torch.Tensor | None:
        if self._per_example is not None:
            return self._per_example.pow(2).sum(0)
        return self._elem_sq

    def moments(self, batch: int, scale: float, elementwise: bool) -> GradMoments:
        """The record in per-example scale: gradients times ``scale`` (B for a mean loss)."""
        elem_sq = self.elem_sq() if elementwise else None
        return GradMoments(
            n=batch,
            grad_sum=self.summed_grad() * scale,
            sq_norm_sum=self.sq_norms().sum() * scale**2,
            elem_sq_sum=None if elem_sq is None else elem_sq * scale**2,
        )

    def method(self) -> str:
        """The coverage entry: the method, and how many uses when shared."""
        distinct = "+".join(sorted(set(self.methods)))
        uses = len(self.methods)
        return distinct if uses == 1 else f"{distinct} (shared by {uses} uses)"


@torch.no_grad()
def settle(accumulators, elementwise: bool) -> None:
    """Take the pending reductions of every accumulator at once (all uses are in): the squared
    norms of handed-over per-example gradients, and ``||sum_i g_i||^2`` of small gradients, one
    :func:`~gradnoise.layers.registry.batched_sq_norms` per group of equal shapes."""
    rows: dict[tuple, list[Accumulator]] = {}
    grads: dict[tuple, list[Accumulator]] = {}
    for acc in accumulators:
        pending = acc._per_example
        if pending is not None and pending.numel() <= DEFER_NUMEL:
            rows.setdefault(_group_key(pending), []).append(acc)
        if acc._grad_sq is None and acc.grad is not None and acc.grad.numel() <= SQ_NORM_SHORT:
            grads.setdefault(_group_key(acc.grad), []).append(acc)
    for group in rows.values():
        stacked = torch.stack([acc._per_example for acc in group])  # (k, B, *shape)
        norms = batched_sq_norms(stacked.flatten(0, 1)).view(len(group), -1)
        elem_sq = stacked.pow(2).sum(1) if elementwise else [None] * len(group)
        for acc, norm, squares in zip(group, norms, elem_sq, strict=True):
            acc._sq_norms, acc._elem_sq, acc._per_example = norm, squares, None
    for group in grads.values():
        norms = batched_sq_norms(torch.stack([acc.grad for acc in group]))
        for acc, norm in zip(group, norms, strict=True):
            acc._grad_sq = norm


def _group_key(tensor: torch.Tensor) -> tuple:
    return (tuple(tensor.shape), tensor.dtype, tensor.device)


def _row_sums(factors) -> torch.Tensor:
    """``(B,)`` sums over a use's rows of ``|l_t| |r_t|`` (the Gram rounding bound's terms)."""
    return row_norm_products(factors).sum(1)


def residual_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the residual check for gradients of ``dtype``."""
    if dtype == torch.float64:
        return 1e-8
    if dtype == torch.float32:
        return 1e-3
    return 4 * torch.finfo(dtype).eps


def check_residual(
    name: str, residual_sq: float, total_sq: float, dtype: torch.dtype, acc: Accumulator | None
) -> None:
    """Raise if autograd's gradient differs from the sum of the measured per-example gradients.

    Compares norms: ``||grad - measured|| <= tol ||grad||`` with ``tol`` 1e-8 in float64, 1e-3 in
    float32 (the rules sum in another order than autograd) and 4 eps in half precision, whose
    gradients autograd rounds once per use while the rules sum them in float32.
    """
    tolerance = residual_tolerance(dtype)
    residual, total = residual_sq**0.5, total_sq**0.5
    if not math.isfinite(residual) or not math.isfinite(total):
        raise NonFiniteGradientError(
            explain(
                f"parameter {name!r}",
                expected="finite gradients",
                got="a gradient with NaN or inf entries (||grad||^2 = "
                f"{total_sq!r}, difference from the measured sum {residual_sq!r})",
                fix="find the non-finite loss or activation (torch.autograd.detect_anomaly), or "
                "skip the step; statistics of a non-finite step are not defined",
            )
        )
    if residual <= tolerance * max(total, 1e-30):
        return
    where = "no measured layer" if acc is None else "layers gradnoise measures only in part"
    raise GradNoiseError(
        explain(
            f"parameter {name!r}",
            expected="a gradient that is the sum of the per-example gradients gradnoise measured",
            got=f"a gradient that reached it through {where} (relative difference "
            f"{residual / max(total, 1e-30):.2e}), e.g. `x @ W.T` on a tracked "
            "weight outside any module, a regularizer added to the loss, or a forward run under "
            "torch.no_grad() and recomputed in backward (torch.utils.checkpoint with "
            "use_reentrant=True)",
            fix="use the parameter inside the model's modules, add weight decay through the "
            "optimizer rather than the loss inside the block, and turn gradient checkpointing "
            "off for measured steps",
        )
    )
