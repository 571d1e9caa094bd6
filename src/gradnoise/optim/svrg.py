r"""SVRG: stochastic variance-reduced gradient (Johnson & Zhang 2013) with an explicit snapshot.

At a snapshot :math:`\tilde x` the full (or a large-batch) gradient
:math:`\mu = \nabla F(\tilde x)` is stored; every inner step uses the control variate

.. math::
    v_t = \nabla f_i(x_t) - \nabla f_i(\tilde x) + \mu,\qquad
    b_t = \beta b_{t-1} + v_t,\qquad x_{t+1} = x_t - \eta\,(b_t + \lambda x_t)

(:math:`\beta = 0`: the original method). Defazio & Bottou 2019 ("On the Ineffectiveness of
Variance Reduced Optimization for Deep Learning") show that in deep networks the snapshot's
gradients decorrelate from the current ones within a fraction of an epoch, so the control variate
stops reducing variance; the benchmark measures exactly that trade-off. Each step costs two
gradient evaluations of its batch, and each snapshot one pass over the snapshot data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch.optim import Optimizer

from gradnoise.errors import NotReadyError, explain
from gradnoise.optim._common import check, check_group, grads_at, is_real, require_closure

__all__ = ["SVRG", "svrg_step"]


@torch.no_grad()
def svrg_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    snapshot_grads: Sequence[torch.Tensor],
    full_grads: Sequence[torch.Tensor],
    states: Sequence[dict],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """One SVRG step in place with the control-variate gradient ``v_t`` of the module docstring."""
    for param, g, g_snap, mu, state in zip(
        params, grads, snapshot_grads, full_grads, states, strict=True
    ):
        v = g - g_snap + mu
        if momentum:
            buf = state.setdefault("momentum_buffer", torch.zeros_like(param))
            v = buf.mul_(momentum).add_(v)
        param.mul_(1 - lr * weight_decay).add_(v, alpha=-lr)


class SVRG(Optimizer):
    """``torch.optim`` shell around :func:`svrg_step`.

    Call :meth:`snapshot` with a closure that accumulates the full-data (or large-batch) gradient
    of the *mean* loss into ``.grad`` at the start of each epoch, then ``step(closure)`` with a
    closure over one batch as usual.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-2,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        options = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        _check_options("SVRG", options)
        super().__init__(params, options)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group after checking its hyperparameters (merged over the defaults)."""
        check_group(self, param_group, _check_options)
        super().add_param_group(param_group)

    @torch.no_grad()
    def snapshot(self, full_closure: Callable[[], object]) -> None:
        """Store the snapshot :math:`\\tilde x = x` and :math:`\\mu = \\nabla F(\\tilde x)`."""
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        full = grads_at(params, params, full_closure)
        for param, mu in zip(params, full, strict=True):
            self.state[param]["snapshot"] = param.detach().clone()
            self.state[param]["full_grad"] = mu

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        closure = require_closure("SVRG", closure)
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if not all("snapshot" in self.state[p] for p in params):
            raise NotReadyError(
                explain(
                    "SVRG.step",
                    expected="a snapshot taken with opt.snapshot(full_closure)",
                    got="no snapshot",
                    fix="call opt.snapshot(...) at the start of every epoch, before step()",
                )
            )
        with torch.enable_grad():
            loss = closure()
        everyone = [p for p in params if p.grad is not None]
        point = [self.state[p]["snapshot"] for p in everyone]
        snap = dict(zip(everyone, grads_at(everyone, point, closure), strict=True))
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad.detach().clone() for p in params]
            states = [self.state[p] for p in params]
            full = [s["full_grad"] for s in states]
            options = {k: group[k] for k in ("lr", "momentum", "weight_decay")}
            svrg_step(params, grads, [snap[p] for p in params], full, states, **options)
        return loss


def _check_options(owner: str, o: dict) -> None:
    """Check SVRG hyperparameters (constructor defaults or one param group)."""
    lr, mom, wd = o["lr"], o["momentum"], o["weight_decay"]
    check(owner, "lr", lr, is_real(lr) and lr > 0, "a positive learning rate", "use e.g. lr=1e-2")
    ok = is_real(mom) and 0 <= mom < 1
    check(owner, "momentum", mom, ok, "a float in [0, 1)", "use 0 or 0.9")
    check(owner, "weight_decay", wd, is_real(wd) and wd >= 0, "a float >= 0", "use 0.0")
