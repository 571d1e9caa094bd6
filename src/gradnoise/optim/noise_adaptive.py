r"""Noise-adaptive layerwise learning rates, fed by GradStats.

For SGD on a locally quadratic loss the best step along the batch gradient shrinks with the noise
(McCandlish et al. 2018, eq. 2.6): :math:`\eta_\text{opt}(B) = \eta_\text{max} / (1 +
B_\text{noise}/B)`, with :math:`B_\text{noise} = \mathrm{tr}\,\Sigma / \|G\|^2`. Applied per layer
(per parameter tensor :math:`l`) with running averages of the unbiased per-step estimates of
:math:`\mathrm{tr}\,\Sigma_l` and :math:`\|G_l\|^2` (averaged separately, then divided, as in
:class:`gradnoise.stats.NoiseScale`):

.. math::
    \rho_l = \mathrm{clip}\Big(\frac{\overline{\|G_l\|^2}}{\overline{\|G_l\|^2} +
    \overline{\mathrm{tr}\,\Sigma_l} / B},\ \rho_\text{min},\ 1\Big),\qquad
    \theta_l \leftarrow \theta_l - \eta\,\rho_l\,(u_l + \lambda\theta_l),

where :math:`u_l` is the heavy-ball momentum :math:`b \leftarrow \mu b + g` (``base="sgd"``) or
Adam's :math:`\hat m / (\sqrt{\hat v} + \epsilon)` (``base="adam"``). Layers whose gradient is
mostly noise take smaller steps; with no noise every :math:`\rho_l = 1` and the base optimizer is
recovered. (The same idea as noise-adaptive layerwise step sizes in the recent literature; the gain
formula here is the SGD-optimal one above, applied to both bases.)
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
from gradnoise.stats.quantities import trace_covariance

__all__ = ["NoiseAdaptive", "noise_adaptive_step", "noise_gain"]

OPTIONS = ("lr", "beta", "floor", "base", "momentum", "betas", "eps", "weight_decay")


def noise_gain(
    trace: torch.Tensor, grad_sq: torch.Tensor, batch: int, *, floor: float
) -> torch.Tensor:
    r""":math:`\rho = \|G\|^2 / (\|G\|^2 + \mathrm{tr}\Sigma / B)`, ``floor`` where undefined."""
    gain = grad_sq / (grad_sq + trace / batch).clamp_min(1e-30)
    return torch.where(grad_sq > 0, gain, torch.zeros_like(gain)).clamp(floor, 1.0)


def _running(state: dict, trace: torch.Tensor, grad_sq: torch.Tensor, beta: float):
    """Bias-corrected exponential averages of the two estimates (ratio of averages)."""
    if "trace_avg" not in state:
        state.update(trace_avg=torch.zeros_like(trace), sq_avg=torch.zeros_like(grad_sq), count=0)
    state["count"] += 1
    state["trace_avg"].mul_(beta).add_(trace, alpha=1 - beta)
    state["sq_avg"].mul_(beta).add_(grad_sq, alpha=1 - beta)
    correction = 1 - beta ** state["count"]
    return state["trace_avg"] / correction, state["sq_avg"] / correction


@torch.no_grad()
def noise_adaptive_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    records: Sequence,
    states: Sequence[dict],
    *,
    lr: float,
    beta: float,
    floor: float,
    base: str,
    momentum: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    check_inputs: bool = True,
) -> None:
    """One step in place; ``records[i]`` is the GradMoments of ``params[i]`` for this batch.

    Raises ``GradNoiseError`` before any change on a sparse or non-finite gradient or a record
    that does not fit its parameter; ``check_inputs=False`` skips that for a caller that has
    already checked (the shell checks every group first).
    """
    if check_inputs:
        labels = [f"parameter {i}" for i in range(len(params))]
        check_records("noise_adaptive_step", labels, params, records, elementwise=False)
        check_grads("noise_adaptive_step", params, grads, labels)
    for param, grad, record, state in zip(params, grads, records, states, strict=True):
        trace = trace_covariance(record).to(param.dtype)
        grad_sq = record.mean.pow(2).sum().to(param.dtype) - trace / record.n
        trace_avg, sq_avg = _running(state, trace, grad_sq, beta)
        gain = noise_gain(trace_avg, sq_avg, record.n, floor=floor)
        state["gain"] = gain
        if base == "adam":
            direction = adam_direction(state, grad, betas=betas, eps=eps)
        else:
            direction = state.setdefault("momentum_buffer", torch.zeros_like(param))
            direction.mul_(momentum).add_(grad)
        param.mul_(1 - lr * weight_decay * gain).sub_(lr * gain * direction)


class NoiseAdaptive(Optimizer):
    """``torch.optim`` shell around :func:`noise_adaptive_step`; build it from named parameters.

    Example::

        opt = NoiseAdaptive(model.named_parameters(), lr=0.1)
        with GradStats(model) as stats:
            loss_fn(model(x), y).backward()
        opt.step(moments=stats)   # or stats.moments()
    """

    def __init__(
        self,
        params: Iterable[tuple[str, torch.Tensor]] | Iterable[dict],
        lr: float = 1e-2,
        *,
        base: str = "sgd",
        beta: float = 0.9,
        floor: float = 0.05,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        options = dict(lr=lr, base=base, beta=beta, floor=floor, momentum=momentum)
        options.update(betas=betas, eps=eps, weight_decay=weight_decay)
        _check_options("NoiseAdaptive", options)
        super().__init__(params, options)
        require_names(self, "NoiseAdaptive")

    def add_param_group(self, param_group: dict) -> None:
        """Add a group after checking its hyperparameters (merged over the defaults)."""
        check_group(self, param_group, _check_options)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None, *, moments=None):  # type: ignore[override]
        """Apply one update from this batch's gradients and GradStats ``moments``.

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
        records = named_records(self, moments, "NoiseAdaptive", elementwise=False)
        labels = param_labels(self)
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        check_grads("NoiseAdaptive", params, [p.grad for p in params], [labels[p] for p in params])
        for params, grads, recs, states, options in named_groups(self, records, OPTIONS):
            noise_adaptive_step(params, grads, recs, states, **options, check_inputs=False)
        return loss


def _check_options(owner: str, o: dict) -> None:
    """Check NoiseAdaptive hyperparameters (constructor defaults or one param group)."""
    lr, base, beta, floor, mom = o["lr"], o["base"], o["beta"], o["floor"], o["momentum"]
    eps, wd = o["eps"], o["weight_decay"]
    check(owner, "lr", lr, is_real(lr) and lr > 0, "a positive learning rate", "use e.g. lr=1e-2")
    ok = isinstance(base, str) and base in ("sgd", "adam")
    check(owner, "base", base, ok, "'sgd' or 'adam'", "pick one")
    ok = is_real(beta) and 0 <= beta < 1
    check(owner, "beta", beta, ok, "a float in [0, 1)", "use e.g. beta=0.9")
    ok = is_real(floor) and 0 < floor <= 1
    check(owner, "floor", floor, ok, "a gain floor in (0, 1]", "use 0.05")
    ok = is_real(mom) and 0 <= mom < 1
    check(owner, "momentum", mom, ok, "a float in [0, 1)", "use 0.9")
    check_betas(owner, o["betas"])
    check(owner, "eps", eps, is_real(eps) and eps > 0, "a positive float", "use e.g. eps=1e-8")
    check(owner, "weight_decay", wd, is_real(wd) and wd >= 0, "a float >= 0", "use 0.0")
