r"""Preconditioned noise scale for Adam-family optimizers (Pollux / AdaptDL).

Adam moves along :math:`P g` with :math:`P = \mathrm{diag}(p)`,
:math:`p = 1 / (\sqrt{\hat v} + \epsilon)`. The noise that decides how well a batch size works for
it is that of the preconditioned gradient (Qiao et al. 2021, "Pollux: Co-adaptive Cluster
Scheduling for Goodput-Optimized Deep Learning", section 3.1; AdaptDL's ``AdamGradientNoiseScale``):

.. math::
    B_\text{pre} = \frac{\mathrm{tr}(P \Sigma P)}{\|P G\|^2}.

Per-example gradients :math:`p \odot g_i` have the record

.. math::
    \text{grad\_sum}' = p \odot \text{grad\_sum},\quad
    \text{sq\_norm\_sum}' = \textstyle\sum_j p_j^2\, \text{elem\_sq\_sum}_j,\quad
    \text{elem\_sq\_sum}' = p^2 \odot \text{elem\_sq\_sum},

so :func:`precondition` needs ``GradStats(model, elementwise=True)``. Feed its output to
:class:`~gradnoise.stats.running.NoiseScale`; for two-batch measurements pass
``preconditioner=adam_preconditioner_fn(optimizer, model)`` to ``NoiseScaleHook``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from gradnoise.errors import GradNoiseError, explain
from gradnoise.stats.moments import GradMoments

__all__ = ["adam_preconditioner", "adam_preconditioner_fn", "precondition"]


def precondition(
    moments: Mapping[str, GradMoments], scales: Mapping[str, torch.Tensor]
) -> dict[str, GradMoments]:
    """The records of the preconditioned per-example gradients ``scales[name] * g_i``.

    Parameters without an entry in ``scales`` are passed through unchanged.
    """
    for name, scale in scales.items():
        _check_record(name, moments.get(name), scale)
    return {
        name: _scaled(record, scales[name]) if name in scales else record
        for name, record in moments.items()
    }


def _scaled(record: GradMoments, scale: torch.Tensor) -> GradMoments:
    sq_scale = scale * scale
    elem = record.elem_sq_sum * sq_scale
    return GradMoments(record.n, record.grad_sum * scale, elem.sum(), elem)


def _check_record(name: str, record: GradMoments | None, scale: torch.Tensor) -> None:
    if record is not None and record.elem_sq_sum is None:
        raise GradNoiseError(
            explain(
                f"precondition({name!r})",
                expected="moments with elem_sq_sum (a diagonal preconditioner mixes coordinates)",
                got="elem_sq_sum=None",
                fix="measure with GradStats(model, elementwise=True)",
            )
        )
    if record is not None and scale.shape != record.grad_sum.shape:
        raise GradNoiseError(
            explain(
                f"precondition({name!r})",
                expected=f"a scale of the parameter's shape {tuple(record.grad_sum.shape)}",
                got=str(tuple(scale.shape)),
                fix="pass one preconditioner tensor per parameter, shaped like it",
            )
        )


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> dict[str, torch.Tensor]:
    r"""Adam's diagonal :math:`p = 1/(\sqrt{v / (1 - \beta_2^t)} + \epsilon)` for every parameter.

    Reads ``exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad``) from ``torch.optim.Adam`` or
    ``AdamW`` state; a parameter without state yet (before the first step) gets ``p = 1``, i.e.
    the plain gradient, as AdaptDL does. Tensor ops only, no host sync.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # names as NoiseScaleHook sees them
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    scales = {}
    for name, param in model.named_parameters():
        if id(param) not in groups:
            continue
        group, state = groups[id(param)], optimizer.state.get(param, {})
        if "exp_avg_sq" not in state:
            scales[name] = torch.ones_like(param)
            continue
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        step = torch.as_tensor(state["step"], dtype=v.dtype, device=v.device)
        correction = 1 - group["betas"][1] ** step
        scales[name] = 1.0 / ((v / correction).sqrt() + group["eps"])
    return scales


def adam_preconditioner_fn(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> Callable[[], dict[str, torch.Tensor]]:
    """A callable that reads :func:`adam_preconditioner` when called (for ``NoiseScaleHook``)."""
    return lambda: adam_preconditioner(optimizer, model)
