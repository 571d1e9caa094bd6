r"""STORM: stochastic recursive momentum (Cutkosky & Orabona 2019, "Momentum-Based Variance
Reduction in Non-Convex SGD", eq. (3)), with a constant step size.

Each step evaluates the gradient of the *same* sample :math:`\xi_t` at the current and the
previous iterate and corrects the momentum with their difference:

.. math::
    d_t = \nabla f(x_t; \xi_t) + (1 - a)\,\big(d_{t-1} - \nabla f(x_{t-1}; \xi_t)\big),\qquad
    x_{t+1} = x_t - \eta\,(d_t + \lambda x_t),

with :math:`d_1 = \nabla f(x_1; \xi_1)`. The paper's adaptive :math:`\eta_t, a_t` schedule is
replaced by constants (use an LR scheduler for decay); ``a = 1`` is plain SGD. Each step costs two
gradient evaluations of the batch, which the benchmark counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch.optim import Optimizer

from gradnoise.optim._common import check, check_group, grads_at, is_real, require_closure

__all__ = ["STORM", "storm_step"]


@torch.no_grad()
def storm_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    prev_point_grads: Sequence[torch.Tensor] | None,
    states: Sequence[dict],
    *,
    lr: float,
    a: float,
    weight_decay: float,
) -> None:
    """One STORM step in place; ``prev_point_grads`` is None at the first step."""
    for i, (param, grad, state) in enumerate(zip(params, grads, states, strict=True)):
        if "d" not in state:
            state["d"] = grad.clone()
        else:
            state["d"].sub_(prev_point_grads[i]).mul_(1 - a).add_(grad)
        state["prev_param"] = param.detach().clone()
        param.mul_(1 - lr * weight_decay).add_(state["d"], alpha=-lr)


class STORM(Optimizer):
    """``torch.optim`` shell around :func:`storm_step`; ``step(closure)`` needs a closure.

    The closure must zero the gradients, compute the loss of the current batch and call
    ``backward()``; the shell calls it a second time at the previous iterate (same batch).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-2,
        *,
        a: float = 0.1,
        weight_decay: float = 0.0,
    ) -> None:
        options = {"lr": lr, "a": a, "weight_decay": weight_decay}
        _check_options("STORM", options)
        super().__init__(params, options)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group after checking its hyperparameters (merged over the defaults)."""
        check_group(self, param_group, _check_options)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        closure = require_closure("STORM", closure)
        with torch.enable_grad():
            loss = closure()
        everyone = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        prev = {}
        if everyone and all("prev_param" in self.state[p] for p in everyone):
            point = [self.state[p]["prev_param"] for p in everyone]
            prev = dict(zip(everyone, grads_at(everyone, point, closure), strict=True))
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad.detach().clone() for p in params]
            at_prev = [prev[p] for p in params] if prev else None
            options = {k: group[k] for k in ("lr", "a", "weight_decay")}
            storm_step(params, grads, at_prev, [self.state[p] for p in params], **options)
        return loss


def _check_options(owner: str, o: dict) -> None:
    """Check STORM hyperparameters (constructor defaults or one param group)."""
    lr, a, wd = o["lr"], o["a"], o["weight_decay"]
    check(owner, "lr", lr, is_real(lr) and lr > 0, "a positive learning rate", "use e.g. lr=1e-2")
    ok = is_real(a) and 0 < a <= 1
    check(owner, "a", a, ok, "a momentum correction in (0, 1]", "use e.g. a=0.1")
    check(owner, "weight_decay", wd, is_real(wd) and wd >= 0, "a float >= 0", "use 0.0")
