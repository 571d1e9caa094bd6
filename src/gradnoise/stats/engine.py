"""GradStats: per-example gradient statistics of every layer from one ordinary backward pass.

:func:`gradnoise.layers.plan.plan_coverage` gives every trainable parameter an owner once; each
``with`` block installs a fresh :class:`~gradnoise.stats.recorder.Recorder` (the capture half: the
function mode, the autograd functions, the hooks) and removes it on exit, on error too. The
results are assembled lazily from what it recorded, and the only host syncs happen when they are
asked for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradnoise.errors import GradNoiseError, NotReadyError, explain
from gradnoise.layers.plan import Plan, plan_coverage
from gradnoise.stats.accumulate import Accumulator
from gradnoise.stats.moments import GradMoments
from gradnoise.stats.quantities import NoiseScaleEstimate, noise_scale_from_sums
from gradnoise.stats.recorder import Recorder

__all__ = ["GradStats"]

_REDUCTIONS = ("mean", "sum")
_FALLBACKS = ("vmap", "error")


class GradStats:
    """Per-example gradient statistics for every layer, from one forward and backward.

    Example::

        with GradStats(model) as stats:
            loss = F.cross_entropy(model(x), y)   # mean over the batch
            loss.backward()
        stats.per_example_sq_norms()  # {name: (B,) tensor of ||grad l_i||^2}
        stats.moments()               # {name: GradMoments}
        stats.noise_scale()           # B_simple of the whole model

    Args:
        model: the module whose parameters are measured.
        loss_reduction: ``"mean"`` if the loss is (1/B) sum_i l_i, ``"sum"`` if it is sum_i l_i.
            With ``"mean"`` every per-example gradient is B times what reaches the layer, a factor
            applied to the results.
        elementwise: also collect ``elem_sq_sum`` (needed for elementwise variance and GSNR).
        fallback: ``"vmap"`` measures modules without a rule with ``torch.func``; ``"error"``
            refuses them.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_reduction: str = "mean",
        elementwise: bool = False,
        fallback: str = "vmap",
    ) -> None:
        _check_choice("loss_reduction", loss_reduction, _REDUCTIONS)
        _check_choice("fallback", fallback, _FALLBACKS)
        if not isinstance(model, nn.Module):
            raise GradNoiseError(
                explain(
                    "GradStats(model)",
                    expected="a torch.nn.Module",
                    got=type(model).__name__,
                    fix="pass the model itself, not its parameters or output",
                )
            )
        self.model = model
        self.loss_reduction = loss_reduction
        self.elementwise = bool(elementwise)
        self._plan: Plan = plan_coverage(model, fallback)
        self._recorder: Recorder | None = None  # the last block's
        self._open = False
        self._checked = False
        self._moments: dict[str, GradMoments] | None = None

    # ----------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> GradStats:
        if self._open:
            raise GradNoiseError(
                explain(
                    "GradStats.__enter__",
                    expected="a GradStats block that is not already open",
                    got="a nested or repeated `with` on the same object",
                    fix="create one GradStats per block",
                )
            )
        self._recorder = Recorder(self._plan, elementwise=self.elementwise)
        self._checked, self._moments = False, None
        self._recorder.install()
        self._open = True
        return self

    def __exit__(self, *exc_info) -> None:
        self._open = False
        self._recorder.remove(*exc_info)

    # ----------------------------------------------------------------------------- results
    def _measured(self) -> dict[str, Accumulator]:
        """The accumulators of measured parameters, after the readiness and residual checks."""
        recorder = self._require_recorder()
        if not self._checked:
            recorder.check_ready()
            recorder.check_residuals()
            self._checked = True
        return {name: recorder.acc[name] for name in self._plan.params if name in recorder.acc}

    def _require_recorder(self) -> Recorder:
        if self._recorder is None:
            raise NotReadyError(
                explain(
                    "GradStats results",
                    expected="a `with GradStats(model) as stats:` block with a backward pass",
                    got="a GradStats that was never entered",
                    fix="run the forward and backward inside the block first",
                )
            )
        return self._recorder

    @property
    def _scale(self) -> float:
        """Per-example gradients are ``scale`` times what reaches the layers (B for a mean)."""
        return float(self._recorder.batch) if self.loss_reduction == "mean" else 1.0

    @property
    def batch_size(self) -> int:
        """The batch size seen on dim 0 of the layer inputs."""
        self._measured()
        return self._recorder.batch

    def moments(self) -> dict[str, GradMoments]:
        """Per-parameter :class:`GradMoments` of the per-example gradients of this batch."""
        if self._moments is None:
            self._moments = {
                name: acc.moments(self._recorder.batch, self._scale, self.elementwise)
                for name, acc in self._measured().items()
            }
        return dict(self._moments)

    def per_example_sq_norms(self) -> dict[str, torch.Tensor]:
        """Per-parameter ``(B,)`` tensors of squared per-example gradient norms."""
        return {name: acc.sq_norms() * self._scale**2 for name, acc in self._measured().items()}

    def total_sq_norms(self) -> torch.Tensor:
        """``(B,)`` squared norms of the whole-model per-example gradients."""
        return torch.stack(list(self.per_example_sq_norms().values())).sum(0)

    def noise_scale(self) -> NoiseScaleEstimate:
        """Whole-model simple noise scale of this batch (see ``gradient_noise_scale``).

        Reads two scalars per parameter (the summed squared per-example norms and the squared
        norm of the summed gradient), so it builds no moments: the same numbers as
        ``gradient_noise_scale(stats.moments())``.
        """
        measured = self._measured()
        sq_norm_sum = torch.stack([acc.sq_norms().sum() for acc in measured.values()]).sum()
        sum_sq_norm = torch.stack([acc.grad_sq_norm() for acc in measured.values()]).sum()
        _require_batch(self._recorder.batch)
        return noise_scale_from_sums(
            self._recorder.batch, sq_norm_sum * self._scale**2, sum_sq_norm * self._scale**2
        )

    def coverage(self) -> dict[str, str]:
        """How each parameter was measured (``gram``, ``bmm``, ...) or ``skipped: <reason>``."""
        recorder = self._require_recorder()
        if not recorder.backward_started:
            raise NotReadyError(
                explain(
                    "GradStats.coverage",
                    expected="a backward pass inside the block",
                    got="no backward pass yet",
                    fix="run loss.backward() inside the block first",
                )
            )
        report = {}
        for name in self._plan.params:
            acc = recorder.acc.get(name)
            unused = "skipped: no gradient (unused in the forward pass)"
            report[name] = acc.method() if acc is not None else unused
        for name in self._plan.frozen:
            report[name] = "skipped: frozen (requires_grad=False)"
        return report


def _require_batch(batch: int) -> None:
    if batch < 2:
        raise GradNoiseError(
            explain(
                "GradStats.noise_scale",
                expected="a batch of at least 2 examples (a variance needs two samples)",
                got=f"batch size {batch}",
                fix="use a batch size of 2 or more, or merge several steps' moments first",
            )
        )


def _check_choice(argument: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise GradNoiseError(
            explain(
                f"GradStats({argument}=...)",
                expected=" or ".join(repr(c) for c in choices),
                got=repr(value),
                fix=f"pass {argument}={choices[0]!r} (the default) or one of the other choices",
            )
        )
