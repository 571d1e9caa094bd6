r"""Two-batch-size noise measurements without per-example gradients.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", appendix A.1): a gradient
averaged over :math:`B` examples has :math:`E\|g_B\|^2 = \|G\|^2 + \mathrm{tr}\,\Sigma / B`, so the
squared norms at two batch sizes give unbiased :math:`\|G\|^2` and :math:`\mathrm{tr}\,\Sigma`
(:func:`gradnoise.stats.quantities.two_batch_estimates`).

Under gradient accumulation the micro-batch gradients :math:`g_1..g_K` (each over ``b`` examples)
are the small batch and their mean is the big batch (``K b`` examples)::

    with MicroBatchNorms(model) as micro:
        for xs, ys in micro_batches:                 # K micro-batches of b examples
            (loss_fn(model(xs), ys) / K).backward()  # the usual scaled accumulation
        record = micro.record(micro_batch_size=b)    # TwoBatchNorms, no host sync
        optimizer.step(); optimizer.zero_grad()

:class:`gradnoise.stats.distributed.NoiseScaleHook` builds the same record from DDP buckets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from gradnoise.errors import GradNoiseError, NotReadyError, explain
from gradnoise.stats.quantities import two_batch_estimates

__all__ = ["MicroBatchNorms", "TwoBatchNorms"]


@dataclass(frozen=True)
class TwoBatchNorms:
    """Per-parameter squared gradient norms at two batch sizes (one optimizer step).

    ``small_sq_norms[name]`` is the mean over the small batches of :math:`\\|g_\\text{small}\\|^2`,
    ``big_sq_norms[name]`` is :math:`\\|g_\\text{big}\\|^2`; both are gradients of *mean* losses.
    """

    small_sq_norms: dict[str, torch.Tensor]
    b_small: float
    big_sq_norms: dict[str, torch.Tensor]
    b_big: float

    def __post_init__(self) -> None:
        if not 0 < self.b_small < self.b_big:
            raise GradNoiseError(
                explain(
                    "TwoBatchNorms",
                    expected="0 < b_small < b_big",
                    got=f"b_small={self.b_small}, b_big={self.b_big}",
                    fix="use at least 2 micro-batches (or 2 ranks) per step",
                )
            )
        if set(self.small_sq_norms) != set(self.big_sq_norms):
            raise GradNoiseError(
                explain(
                    "TwoBatchNorms",
                    expected="the same parameter names at both batch sizes",
                    got=f"{sorted(self.small_sq_norms)} and {sorted(self.big_sq_norms)}",
                    fix="record both norms from the same parameters",
                )
            )

    def estimates(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per parameter, the unbiased ``(|G|^2, tr Sigma)`` of :func:`two_batch_estimates`."""
        return {
            name: two_batch_estimates(
                self.small_sq_norms[name], self.b_small, self.big_sq_norms[name], self.b_big
            )
            for name in self.small_sq_norms
        }


class MicroBatchNorms:
    """Collect the squared norm of every micro-batch's gradient with parameter hooks.

    A tensor hook on each trainable parameter sees the gradient of one backward pass before it is
    added to ``.grad``; its squared norm is summed on the device (no host sync). ``record`` reads
    the accumulated ``.grad`` as the big-batch gradient, so ``.grad`` must be zero (or ``None``)
    before the first micro-batch of a step.

    Args:
        model: the module being trained.
        loss_scale: the factor each micro-batch's mean loss was multiplied by before
            ``backward``; ``None`` means ``1/K`` for ``K`` micro-batches (the usual practice).
        preconditioner: optional callable returning ``{name: p}``, read once per step; norms
            are then of ``p * g`` (see :mod:`gradnoise.stats.preconditioned`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_scale: float | None = None,
        preconditioner: Callable[[], Mapping[str, torch.Tensor] | None] | None = None,
    ) -> None:
        if loss_scale is not None and not loss_scale > 0:
            raise GradNoiseError(
                explain(
                    "MicroBatchNorms(loss_scale=...)",
                    expected="a positive float or None",
                    got=repr(loss_scale),
                    fix="pass the factor you multiply each micro-batch loss by, e.g. 1/K",
                )
            )
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.loss_scale = loss_scale
        self.preconditioner = preconditioner
        self._handles: list = []
        self._clear()

    def _clear(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: Counter[str] = Counter()
        self._scales: Mapping[str, torch.Tensor] | None = None

    def _scaled(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        if self.preconditioner is None:
            return grad
        if self._scales is None:
            self._scales = self.preconditioner() or {}
        return grad * self._scales[name] if name in self._scales else grad

    def __enter__(self) -> MicroBatchNorms:
        self._clear()
        for name, param in self.params.items():
            self._handles.append(param.register_hook(self._hook(name)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            sq = self._scaled(name, grad.detach()).pow(2).sum()
            self._sums[name] = self._sums[name] + sq if name in self._sums else sq
            self._counts[name] += 1

        return hook

    def record(self, *, micro_batch_size: int) -> TwoBatchNorms:
        """The step's :class:`TwoBatchNorms`; clears the sums for the next step.

        Parameters that got no gradient in any micro-batch are left out; one that got a gradient
        in only some micro-batches is refused (its two batch sizes would differ).
        """
        steps = self._check_record(micro_batch_size)
        scale = self.loss_scale if self.loss_scale is not None else 1.0 / steps
        names = [n for n in self.params if self._counts[n] == steps]
        small = {n: self._sums[n] / (steps * scale**2) for n in names}
        big = {
            n: self._scaled(n, self.params[n].grad.detach()).pow(2).sum() / (scale * steps) ** 2
            for n in names
        }
        self._clear()
        return TwoBatchNorms(small, micro_batch_size, big, micro_batch_size * steps)

    def _check_record(self, micro_batch_size: int) -> int:
        """Raise before any state changes; return the number of micro-batches."""
        what = "MicroBatchNorms.record"
        if not (isinstance(micro_batch_size, int) and micro_batch_size > 0):
            fix = "pass the number of examples in each micro-batch"
            got = repr(micro_batch_size)
            raise GradNoiseError(
                explain(
                    f"{what}(micro_batch_size=...)", expected="a positive int", got=got, fix=fix
                )
            )
        steps = max(self._counts.values(), default=0)
        if steps < 2:
            expected = "at least 2 micro-batch backward passes since the last record"
            fix = "call record() once per optimizer step, after all micro-batches"
            raise NotReadyError(explain(what, expected=expected, got=f"{steps}", fix=fix))
        partial = sorted(n for n, count in self._counts.items() if count != steps)
        if partial:
            expected = f"every used parameter in all {steps} micro-batches"
            fix = "use the same parameters in every micro-batch, or measure them with GradStats"
            raise GradNoiseError(
                explain(what, expected=expected, got=f"partial use of {partial}", fix=fix)
            )
        return steps
