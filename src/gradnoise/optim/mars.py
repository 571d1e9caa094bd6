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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch.optim import Optimizer

from gradnoise.optim._common import check, check_betas, group_tensors

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
) -> None:
    """One MARS step in place; ``states[i]`` holds ``step``, the two moments and ``prev``."""
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
        check("MARS", "lr", lr, lr > 0, "a positive learning rate", "use e.g. lr=3e-3")
        check_betas("MARS", betas)
        check("MARS", "eps", eps, eps > 0, "a positive float", "use e.g. eps=1e-8")
        check("MARS", "weight_decay", weight_decay, weight_decay >= 0, "a float >= 0", "use 0.0")
        check("MARS", "gamma", gamma, gamma >= 0, "a float >= 0", "use the paper's gamma=0.025")
        ok = clip is None or clip > 0
        check("MARS", "clip", clip, ok, "None or a positive norm", "use clip=1.0 or None")
        ok = variant in VARIANTS
        check("MARS", "variant", variant, ok, "'adamw' or 'lion'", "pick one of the two")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma=gamma)
        super().__init__(params, {**defaults, "clip": clip, "variant": variant})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = group_tensors(group)
            options = {k: group[k] for k in OPTIONS}
            mars_step(params, grads, [self.state[p] for p in params], **options)
        return loss
