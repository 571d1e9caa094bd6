r"""MARS: variance reduction inside a preconditioned optimizer (Yuan et al. 2024, arXiv:2411.10438).

MARS ("Make vAriance Reduction Shine") corrects each stochastic gradient with a scaled difference
of consecutive gradients, in the style of STORM, and then feeds it to AdamW or Lion (Algorithm 1,
the practical "MARS-approx" form that reuses the previous step's gradient):

.. math::
    c_t = g_t + \gamma \frac{\beta_1}{1 - \beta_1} (g_t - g_{t-1}),\qquad
    c_t \leftarrow c_t / \max(1, \|c_t\| / \text{clip})\quad\text{(per tensor)},

    \text{AdamW:}\quad m_t = \beta_1 m_{t-1} + (1-\beta_1) c_t,\;
    v_t = \beta_2 v_{t-1} + (1-\beta_2) c_t^2,\;
    \theta \leftarrow \theta - \eta\Big(\frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)}
    + \epsilon} + \lambda\theta\Big),

    \text{Lion:}\quad m_t = \beta_1 m_{t-1} + (1-\beta_1) c_t,\;
    \theta \leftarrow \theta - \eta\,(\mathrm{sign}(m_t) + \lambda\theta).

At the first step :math:`g_0 := g_1`, so the correction is zero. ``gamma=0`` gives AdamW (with
clipping of the gradient per tensor) or, for the Lion instance, signed momentum with one
:math:`\beta` (original Lion interpolates with a second coefficient; only ``betas[0]`` is used).

**Non-finite and sparse gradients.** A NaN or inf gradient would poison ``exp_avg`` and ``prev``
for good, and for the Lion instance ``sign(NaN) = 0`` then freezes the parameters without any NaN
showing. So :func:`mars_step` checks every gradient first (one host sync per step) and raises
:class:`~gradnoise.errors.GradNoiseError` *before* anything changes: the step is skipped, the
parameters and the state are exactly as before, and training continues once the caller drops the
batch (catch the error, ``zero_grad()``, go on). Sparse gradients are refused the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch.optim import Optimizer

from gradnoise.optim._common import (
    check,
    check_betas,
    check_grads,
    check_group,
    group_tensors,
    is_real,
    param_labels,
)

__all__ = ["MARS", "mars_correction", "mars_step"]

VARIANTS = ("adamw", "lion")
OPTIONS = ("lr", "betas", "eps", "weight_decay", "gamma", "clip", "variant")


def mars_correction(
    grad: torch.Tensor, prev_grad: torch.Tensor, *, gamma: float, beta1: float, clip: float | None
) -> torch.Tensor:
    r"""The corrected, clipped gradient :math:`c_t` of the module docstring (no host sync)."""
    c = grad + (gamma * beta1 / (1 - beta1)) * (grad - prev_grad)
    if clip is not None:
        c = c * (clip / c.norm().clamp_min(1e-30)).clamp(max=1.0)
    return c


@torch.no_grad()
def mars_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    gamma: float,
    clip: float | None,
    variant: str,
    check_finite: bool = True,
) -> None:
    """One MARS step in place; ``states[i]`` holds ``step``, the two moments and ``prev``.

    Raises ``GradNoiseError`` before any change on a sparse or non-finite gradient (module
    docstring); ``check_finite=False`` skips that check for a caller that has already run it.
    """
    if check_finite:
        check_grads("MARS", params, grads)
    beta1, beta2 = betas
    for param, grad, state in zip(params, grads, states, strict=True):
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(param), prev=grad.clone())
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        c = mars_correction(grad, state["prev"], gamma=gamma, beta1=beta1, clip=clip)
        state["prev"].copy_(grad)
        state["exp_avg"].mul_(beta1).add_(c, alpha=1 - beta1)
        param.mul_(1 - lr * weight_decay)
        if variant == "lion":
            param.add_(state["exp_avg"].sign(), alpha=-lr)
            continue
        state["exp_avg_sq"].mul_(beta2).addcmul_(c, c, value=1 - beta2)
        bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(eps)
        param.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)


def _check_options(owner: str, o: dict) -> None:
    """Check MARS hyperparameters (constructor defaults or one param group)."""
    lr, eps, wd, gamma, clip = o["lr"], o["eps"], o["weight_decay"], o["gamma"], o["clip"]
    check(owner, "lr", lr, is_real(lr) and lr > 0, "a positive learning rate", "use e.g. lr=3e-3")
    check_betas(owner, o["betas"])
    check(owner, "eps", eps, is_real(eps) and eps > 0, "a positive float", "use e.g. eps=1e-8")
    check(owner, "weight_decay", wd, is_real(wd) and wd >= 0, "a float >= 0", "use 0.0")
    ok = is_real(gamma) and gamma >= 0
    check(owner, "gamma", gamma, ok, "a float >= 0", "use the paper's gamma=0.025")
    ok = clip is None or (is_real(clip) and clip > 0)
    check(owner, "clip", clip, ok, "None or a positive norm", "use clip=1.0 or None")
    ok = isinstance(o["variant"], str) and o["variant"] in VARIANTS
    check(owner, "variant", o["variant"], ok, "'adamw' or 'lion'", "pick one of the two")


class MARS(Optimizer):
    """``torch.optim`` shell around :func:`mars_step` (``variant="adamw"`` or ``"lion"``).

    Defaults follow the paper's GPT-2 runs: ``betas=(0.95, 0.99)``, ``gamma=0.025``, ``clip=1``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 3e-3,
        *,
        betas: tuple[float, float] = (0.95, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        gamma: float = 0.025,
        clip: float | None = 1.0,
        variant: str = "adamw",
    ) -> None:
        options = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma=gamma)
        options.update(clip=clip, variant=variant)
        _check_options("MARS", options)
        super().__init__(params, options)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group after checking its hyperparameters (merged over the defaults)."""
        check_group(self, param_group, _check_options)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [(group, *group_tensors(group)) for group in self.param_groups]
        # every group is checked before any group is updated, so a refused step changes nothing
        params = [p for _, ps, _ in groups for p in ps]
        labels = param_labels(self)
        check_grads(
            "MARS", params, [g for *_, gs in groups for g in gs], [labels[p] for p in params]
        )
        for group, params, grads in groups:
            options = {k: group[k] for k in OPTIONS}
            states = [self.state[p] for p in params]
            mars_step(params, grads, states, **options, check_finite=False)
        return loss
