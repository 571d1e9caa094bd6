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
    check_grads,
    check_group,
    check_records,
    is_real,
    named_groups,
    named_records,
    param_labels,
    require_names,
)
from gradnoise.stats.quantities import gsnr

__all__ = ["VRGD", "vrgd_scale", "vrgd_step"]

OPTIONS = ("lr", "gamma", "betas", "eps", "weight_decay")


def vrgd_scale(record, *, gamma: float) -> torch.Tensor:
    """The bounded, mean-normalized GSNR factor :math:`s` of one parameter's record."""
    r = gsnr(record, unbiased=False)  # the paper's plug-in ratio
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
    check_inputs: bool = True,
) -> None:
    """One VR-Adam step in place; ``records[i]`` is the elementwise GradMoments of ``params[i]``.

    Raises ``GradNoiseError`` before any change on a sparse or non-finite gradient or a record
    that does not fit its parameter; ``check_inputs=False`` skips that for a caller that has
    already checked (the shell checks every group first).
    """
    if check_inputs:
        labels = [f"parameter {i}" for i in range(len(params))]
        check_records("vrgd_step", labels, params, records, elementwise=True)
        check_grads("vrgd_step", params, grads, labels)
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
        options = {"lr": lr, "gamma": gamma, "betas": betas, "eps": eps}
        options["weight_decay"] = weight_decay
        _check_options("VRGD", options)
        super().__init__(params, options)
        require_names(self, "VRGD")

    def add_param_group(self, param_group: dict) -> None:
        """Add a group after checking its hyperparameters (merged over the defaults)."""
        check_group(self, param_group, _check_options)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None, *, moments=None):  # type: ignore[override]
        """Apply one update from this batch's gradients and elementwise GradStats ``moments``.

        ``closure`` (optional, as in ``torch.optim``) runs first under ``torch.enable_grad()``;
        its loss is returned. Run it inside the ``GradStats`` context that ``moments`` reads.
        Parameters without a gradient (frozen or unused) are skipped and need no record,
        as ``torch.optim`` skips them. Everything is checked before any parameter or state
        changes: a frozen parameter that still holds a gradient is refused by name, as are
        sparse or non-finite gradients and records of another shape or of one example.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # everything is checked before any parameter or state changes
        records = named_records(self, moments, "VRGD", elementwise=True)
        labels = param_labels(self)
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        check_grads("VRGD", params, [p.grad for p in params], [labels[p] for p in params])
        for params, grads, recs, states, options in named_groups(self, records, OPTIONS):
            vrgd_step(params, grads, recs, states, **options, check_inputs=False)
        return loss


def _check_options(owner: str, o: dict) -> None:
    """Check VRGD hyperparameters (constructor defaults or one param group)."""
    lr, gamma, eps, wd = o["lr"], o["gamma"], o["eps"], o["weight_decay"]
    check(owner, "lr", lr, is_real(lr) and lr > 0, "a positive learning rate", "use e.g. lr=1e-3")
    ok = is_real(gamma) and 0 <= gamma < 1
    check(owner, "gamma", gamma, ok, "a bound in [0, 1)", "use e.g. gamma=0.1")
    check_betas(owner, o["betas"])
    check(owner, "eps", eps, is_real(eps) and eps > 0, "a positive float", "use e.g. eps=1e-8")
    check(owner, "weight_decay", wd, is_real(wd) and wd >= 0, "a float >= 0", "use 0.0")
