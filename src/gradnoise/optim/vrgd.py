r"""VRGD: GSNR-scaled updates for large batches (Jiang, Liu et al. 2023, "Accelerating Large Batch
Training via Gradient Signal to Noise Ratio"), fed by GradStats moments.

The per-coordinate GSNR (Liu et al. 2020) :math:`r_j = \bar g_j^2 / \hat\sigma_j^2` of this batch,
normalized by its mean over the parameter tensor and bounded by :math:`\gamma`, scales the base
update elementwise, so coordinates whose gradient is mostly signal move further:

.. math::
    s_j = \mathrm{clip}\Big(\frac{r_j}{\frac1d\sum_k r_k},\ 1 - \gamma,\ 1 + \gamma\Big),\qquad
    \theta_j \leftarrow \theta_j - \eta\,\big(s_j\, u_j + \lambda\theta_j\big),

with :math:`u` Adam's :math:`\hat m / (\sqrt{\hat v} + \epsilon)` (VR-Adam). :math:`\gamma = 0`
recovers AdamW. GSNR needs ``GradStats(model, elementwise=True)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch.optim import Optimizer

from gradnoise.optim._common import (
    adam_direction,
    check,
    check_betas,
    named_groups,
    named_records,
    require_names,
)
from gradnoise.stats.quantities import gsnr

__all__ = ["VRGD", "vrgd_scale", "vrgd_step"]

OPTIONS = ("lr", "gamma", "betas", "eps", "weight_decay")


def vrgd_scale(record, *, gamma: float) -> torch.Tensor:
    """The bounded, mean-normalized GSNR factor :math:`s` of one parameter's record."""
    r = gsnr(record)
    return (r / r.mean().clamp_min(1e-30)).clamp(1 - gamma, 1 + gamma)


@torch.no_grad()
def vrgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    records: Sequence,
    states: Sequence[dict],
    *,
    lr: float,
    gamma: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One VR-Adam step in place; ``records[i]`` is the elementwise GradMoments of ``params[i]``."""
    for param, grad, record, state in zip(params, grads, records, states, strict=True):
        scale = vrgd_scale(record, gamma=gamma).to(param.dtype)
        direction = adam_direction(state, grad, betas=betas, eps=eps)
        param.mul_(1 - lr * weight_decay).sub_(lr * scale * direction)


class VRGD(Optimizer):
    """``torch.optim`` shell around :func:`vrgd_step`; build it from named parameters.

    Example::

        opt = VRGD(model.named_parameters(), lr=3e-3, gamma=0.1)
        with GradStats(model, elementwise=True) as stats:
            loss_fn(model(x), y).backward()
        opt.step(moments=stats)
    """

    def __init__(
        self,
        params: Iterable[tuple[str, torch.Tensor]] | Iterable[dict],
        lr: float = 1e-3,
        *,
        gamma: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        check("VRGD", "lr", lr, lr > 0, "a positive learning rate", "use e.g. lr=1e-3")
        check("VRGD", "gamma", gamma, 0 <= gamma < 1, "a bound in [0, 1)", "use e.g. gamma=0.1")
        check_betas("VRGD", betas)
        check("VRGD", "eps", eps, eps > 0, "a positive float", "use e.g. eps=1e-8")
        check("VRGD", "weight_decay", weight_decay, weight_decay >= 0, "a float >= 0", "use 0.0")
        defaults = {"lr": lr, "gamma": gamma, "betas": betas, "eps": eps}
        super().__init__(params, {**defaults, "weight_decay": weight_decay})
        require_names(self, "VRGD")

    @torch.no_grad()
    def step(self, closure=None, *, moments=None) -> None:  # type: ignore[override]
        """Apply one update from this batch's gradients and elementwise GradStats ``moments``."""
        records = named_records(self, moments, "VRGD")
        for params, grads, recs, states, options in named_groups(self, records, OPTIONS):
            vrgd_step(params, grads, recs, states, **options)
