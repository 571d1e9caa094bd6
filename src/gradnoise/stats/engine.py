"""GradStats: per-example gradient statistics of every layer from one ordinary backward pass.

:func:`gradnoise.layers.plan.plan_for` builds the plan of tracked parameters once per model; each
``with`` block installs a fresh :class:`~gradnoise.stats.recorder.Recorder` (the capture half: the
function mode, the autograd functions, the hooks) and removes it on exit, on error too. The
results are assembled lazily from what it recorded, and the only host syncs happen when they are
asked for.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
from torch import nn

from gradnoise.errors import GradNoiseError, NotReadyError, explain
from gradnoise.layers.plan import Plan, plan_for
from gradnoise.stats.accumulate import Accumulator, settle
from gradnoise.stats.moments import GradMoments
from gradnoise.stats.quantities import (
    NoiseScaleEstimate,
    layer_estimates_from_sums,
    noise_scale_from_sums,
)
from gradnoise.stats.recorder import Recorder

__all__ = ["GradStats", "token_mean_weights"]

_REDUCTIONS = ("mean", "sum", "weighted")
_OPEN_BLOCKS: list[GradStats] = []  # the open block, if any: blocks do not nest
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
        loss_reduction: ``"mean"`` if the loss is (1/B) sum_i l_i, ``"sum"`` if it is sum_i l_i,
            ``"weighted"`` if it is sum_i w_i l_i with weights declared in every block by
            :meth:`set_example_weights` (a padded token mean: ``w = token_mean_weights(labels)``
            and l_i the sequence's own token mean). With ``"mean"`` every per-example gradient
            is B times what reaches the layer, a factor applied to the results; in general it is
            1 / w_i.
        elementwise: also collect ``elem_sq_sum`` (needed for elementwise variance and GSNR).
        fallback: ``"vmap"`` measures parameters that some use no rule takes with ``torch.func``
            over the innermost module holding them; ``"error"`` refuses such uses.

    A ``torch.compile``-d model may be passed (or its original module): inside the block it runs
    eagerly, so measured steps are exact and unmeasured steps keep the compiled graph.
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
        self.model = _uncompiled(model)
        self._compiled = self.model is not model or _compiled_in_place(self.model)
        self.loss_reduction = loss_reduction
        self.elementwise = bool(elementwise)
        self.fallback = fallback
        self._plan: Plan = plan_for(self.model, fallback)
        self._recorder: Recorder | None = None  # the last block's
        self._open = False
        self._checked = False
        self._moments: dict[str, GradMoments] | None = None
        self._estimates: tuple | None = None
        self._rows: tuple | None = None  # see _sq_norm_rows

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
        if _OPEN_BLOCKS:
            raise GradNoiseError(
                explain(
                    "GradStats.__enter__",
                    expected="one open GradStats block at a time",
                    got="a block opened inside another one (on "
                    f"{type(_OPEN_BLOCKS[-1].model).__name__})",
                    fix="close the outer block first, or measure both models with one GradStats "
                    "on a module that holds them",
                )
            )
        self._replan_if_changed()
        self._recorder = Recorder(
            self._plan, elementwise=self.elementwise, loss_reduction=self.loss_reduction
        )
        self._checked, self._moments, self._weights = False, None, None
        self._estimates, self._rows = None, None
        self._eager = _eager_stance(self._compiled)
        self._eager.__enter__()
        try:
            self._recorder.install()
        except BaseException:
            self._eager.__exit__(None, None, None)
            raise
        self._open = True
        _OPEN_BLOCKS.append(self)
        return self

    def __exit__(self, *exc_info) -> None:
        self._open = False
        if self in _OPEN_BLOCKS:
            _OPEN_BLOCKS.remove(self)
        try:
            self._recorder.remove(*exc_info)
        finally:
            self._eager.__exit__(*exc_info)

    def _replan_if_changed(self) -> None:
        """Rebuild the plan when parameters were swapped, reloaded, frozen or unfrozen."""
        if not self._plan.is_current():
            self._plan = plan_for(self.model, self.fallback)

    # ----------------------------------------------------------------------------- results
    def _measured(self) -> dict[str, Accumulator]:
        """The accumulators of measured parameters, after the readiness and residual checks."""
        recorder = self._require_recorder()
        measured = {name: recorder.acc[name] for name in self._plan.params if name in recorder.acc}
        if not self._checked:
            recorder.check_ready()
            recorder.check_residuals()
            settle(measured.values(), self.elementwise)
            self._checked = True
        return measured

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

    def set_example_weights(self, weights: torch.Tensor) -> None:
        r"""Declare this block's loss as :math:`L = \sum_i w_i l_i`, ``weights`` of shape (B,).

        Example i's gradient is then :math:`g_i = \nabla l_i`, ``1 / w_i`` times what reaches
        the layers: for the padded causal-LM loss (token mean over the batch) ``weights =
        token_mean_weights(labels)`` makes :math:`l_i` the sequence's own token mean. The
        moments are the *effective* record of the weighted estimator
        :math:`\hat G = \sum_i w_i g_i / W` (:math:`W = \sum_i w_i`): with
        :math:`n_{eff} = W^2 / \sum_i w_i^2` (Kish) as ``n``, ``grad_sum`` :math:`= n_{eff}\hat G`
        and ``sq_norm_sum`` :math:`= n_{eff}^2 \sum_i w_i^2 \|g_i\|^2 / W^2`, the standard
        formulas of :mod:`gradnoise.stats.quantities` give the unbiased
        :math:`\|G\|^2 = (\|\hat G\|^2 - \sum_i \tilde w_i^2 \|g_i\|^2) / (1 - \sum_i
        \tilde w_i^2)` and :math:`\mathrm{tr}\,\Sigma` of examples drawn independently of
        their weights. Uniform weights give exactly the ``"mean"`` results.
        """
        if self.loss_reduction != "weighted":
            raise GradNoiseError(
                explain(
                    "GradStats.set_example_weights",
                    expected="a GradStats built with loss_reduction='weighted'",
                    got=f"loss_reduction={self.loss_reduction!r}",
                    fix="construct GradStats(model, loss_reduction='weighted')",
                )
            )
        if not self._open:
            raise GradNoiseError(
                explain(
                    "GradStats.set_example_weights",
                    expected="a call inside the `with` block whose loss the weights describe",
                    got="a call outside any open block",
                    fix="call it inside the block, once per batch",
                )
            )
        self._weights = _checked_weights(weights)
        self._moments, self._estimates = None, None

    def _example_weights(self) -> torch.Tensor | None:
        """The declared (B,) weights, checked against the batch; None unless ``"weighted"``."""
        if self.loss_reduction != "weighted":
            return None
        batch = self._recorder.batch
        if self._weights is None or self._weights.shape != (batch,):
            raise GradNoiseError(
                explain(
                    "GradStats(loss_reduction='weighted')",
                    expected=f"weights of shape ({batch},) declared in this block",
                    got="none" if self._weights is None else f"shape {tuple(self._weights.shape)}",
                    fix="call stats.set_example_weights(w) inside every block, e.g. "
                    "w = token_mean_weights(labels)",
                )
            )
        return self._weights

    @property
    def _count(self) -> int | float:
        """``n`` of the records: B, or the effective number of a weighted loss."""
        weights = self._example_weights()
        if weights is None:
            return self._recorder.batch
        return float(weights.sum() ** 2 / weights.pow(2).sum())

    @property
    def _scale(self) -> float:
        """Records are ``scale`` times what reaches the layers (B for a mean, n_eff / W)."""
        weights = self._example_weights()
        if weights is None:
            return float(self._recorder.batch) if self.loss_reduction == "mean" else 1.0
        return self._count / float(weights.sum())

    def _example_scale(self) -> torch.Tensor | float:
        """Per-example gradients are this times what reaches the layers: B, 1 or 1 / w_i."""
        weights = self._example_weights()
        return self._scale if weights is None else 1.0 / weights

    @property
    def batch_size(self) -> int:
        """The batch size seen on dim 0 of the layer inputs."""
        self._measured()
        return self._recorder.batch

    def moments(self) -> dict[str, GradMoments]:
        """Per-parameter :class:`GradMoments` of the per-example gradients of this batch."""
        if self._moments is None:
            measured = self._measured()  # its checks come before the batch size is read
            count, scale = self._count, self._scale  # each reads the weights: once per block
            self._moments = {
                name: acc.moments(count, scale, self.elementwise) for name, acc in measured.items()
            }
        return dict(self._moments)

    def layer_estimates(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Per parameter, the unbiased ``(names, tr Sigma, |G|^2)`` of this batch as float64
        vectors, the numbers of :func:`~gradnoise.stats.quantities.layer_estimates` on
        :meth:`moments` (computed once per block, for the running noise scale and the monitor's
        record alike). Like :meth:`noise_scale` it reads two scalars per parameter, so no
        gradient-sized record is built: this runs on every measured step."""
        if self._estimates is None:
            names, sq_norm_sums, sum_sq_norms = self._norm_sums()
            count, squared_scale = self._count, self._scale**2
            _require_batch(count, "GradStats.layer_estimates")
            traces, grad_sqs = layer_estimates_from_sums(
                count, sq_norm_sums * squared_scale, sum_sq_norms * squared_scale
            )
            self._estimates = (names, traces, grad_sqs)
        return self._estimates

    def _norm_sums(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Per parameter, float64 ``sum_i ||g_i||^2`` and ``||sum_i g_i||^2`` in autograd's
        scale."""
        measured = self._measured()
        names, rows = self._sq_norm_rows()
        if isinstance(rows, torch.Tensor):
            sq_norm_sums = rows.sum(1).to(torch.float64)
        else:
            sq_norm_sums = torch.stack([row.sum().to(torch.float64) for row in rows])
        sum_sq_norms = torch.stack(
            [acc.grad_sq_norm().to(torch.float64) for acc in measured.values()]
        )
        return names, sq_norm_sums, sum_sq_norms

    def per_example_sq_norms(self) -> dict[str, torch.Tensor]:
        """Per-parameter ``(B,)`` tensors of squared per-example gradient norms."""
        names, rows = self._sq_norm_rows()
        scale = self._example_scale()
        if isinstance(rows, torch.Tensor):  # one op for all parameters, rows are views
            return dict(zip(names, (rows * scale**2).unbind(), strict=True))
        return {name: row * scale**2 for name, row in zip(names, rows, strict=True)}

    def _sq_norm_rows(self) -> tuple[list[str], torch.Tensor | list[torch.Tensor]]:
        """Every measured parameter's ``(B,)`` squared norms in autograd's scale, stacked into
        one ``(P, B)`` tensor when they share a dtype and device (else a list)."""
        if self._rows is None:
            measured = self._measured()
            rows = [acc.sq_norms() for acc in measured.values()]
            if len({(row.dtype, row.device) for row in rows}) == 1:
                rows = torch.stack(rows)
            self._rows = (list(measured), rows)
        return self._rows

    def total_sq_norms(self) -> torch.Tensor:
        """``(B,)`` squared norms of the whole-model per-example gradients."""
        return torch.stack(list(self.per_example_sq_norms().values())).sum(0)

    def noise_scale(self) -> NoiseScaleEstimate:
        """Whole-model simple noise scale of this batch (see ``gradient_noise_scale``).

        Reads two scalars per parameter (the summed squared per-example norms and the squared
        norm of the summed gradient), so it builds no moments: the same numbers as
        ``gradient_noise_scale(stats.moments())``.
        """
        _, sq_norm_sums, sum_sq_norms = self._norm_sums()
        count, squared_scale = self._count, self._scale**2
        _require_batch(count, "GradStats.noise_scale")
        return noise_scale_from_sums(
            count, sq_norm_sums.sum() * squared_scale, sum_sq_norms.sum() * squared_scale
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
            if acc is not None and name in self._plan.sharded:
                report[name] += " (FSDP2 shard)"
        for name in self._plan.frozen:
            report[name] = "skipped: frozen (requires_grad=False)"
        return report


def _checked_weights(weights: Any) -> torch.Tensor:
    """The weights, detached, after checking they are one finite positive float per example."""
    problem = _weights_problem(weights)
    if problem is not None:
        raise GradNoiseError(
            explain(
                "GradStats.set_example_weights",
                expected="a 1-d floating tensor of finite, positive weights, one per example",
                got=problem,
                fix="drop examples that carry no loss (fully padded rows) and pass w_i > 0, e.g. "
                "token_mean_weights(labels)",
            )
        )
    return weights.detach()


def _weights_problem(weights: Any) -> str | None:
    if not isinstance(weights, torch.Tensor):
        return repr(weights)
    described = f"a {weights.dtype} tensor of shape {tuple(weights.shape)}"
    if weights.dim() != 1 or not weights.is_floating_point():
        return described
    if not bool(torch.isfinite(weights).all() and (weights > 0).all()):
        return described + " with a weight <= 0 or not finite"
    return None


def token_mean_weights(
    labels: torch.Tensor, *, ignore_index: int = -100, shift: bool = True
) -> torch.Tensor:
    r"""Weights :math:`w_i = n_i / \sum_j n_j` of a token mean over a padded batch.

    :math:`n_i` counts the tokens of sequence i that enter the loss: labels other than
    ``ignore_index``, after the one-position shift a causal LM applies to its labels
    (``shift=True``, as transformers' ``labels=`` does; ``shift=False`` for labels already
    aligned with the logits). With these weights the token mean is :math:`\sum_i w_i l_i`,
    :math:`l_i` the sequence's own token mean.
    """
    counted = labels[:, 1:] if shift else labels
    tokens = (counted != ignore_index).sum(1).to(torch.float64)
    return tokens / tokens.sum()


def _uncompiled(model: Any) -> Any:
    """The module a ``torch.compile(model)`` wrapper compiles (names without ``_orig_mod.``)."""
    original = getattr(model, "_orig_mod", None)
    return original if isinstance(original, nn.Module) else model


def _compiled_in_place(model: nn.Module) -> bool:
    """``model.compile()`` compiles a module in place."""
    return getattr(model, "_compiled_call_impl", None) is not None


def _eager_stance(compiled: bool):
    """Compiled code runs eagerly inside the block, so the function mode sees every op.

    ``torch.compile`` would otherwise trace the engine's Python into its graphs (graph breaks,
    or errors from inside the model). Outside the block the compiled graphs are used as before.
    Switching the stance costs ~0.3 ms, a tenth of a small model's step, so it is done only for
    a compiled model or once dynamo has compiled something in this process (compile before the
    first measured block, or pass the compiled model itself); ``set_stance`` exists from torch
    2.6 on, and older versions get no change.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or not (compiled or _dynamo_has_compiled()):
        return contextlib.nullcontext()
    return set_stance("force_eager")


def _dynamo_has_compiled() -> bool:
    dynamo_utils = sys.modules.get("torch._dynamo.utils")
    return dynamo_utils is not None and bool(dynamo_utils.counters["frames"])


def _require_batch(batch: int | float, where: str) -> None:
    if batch < 2:
        raise GradNoiseError(
            explain(
                where,
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
