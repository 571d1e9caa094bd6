r"""MeZO: zeroth-order SGD at inference memory, as a pure update plus a thin Optimizer shell.

Malladi et al. 2023. Each step draws a seed, estimates the projected gradient from two in-place
perturbed forward passes and moves along the regenerated direction:

.. math::
    p_t = \frac{L(\theta + \epsilon z_t) - L(\theta - \epsilon z_t)}{2\epsilon},\qquad
    \theta \leftarrow (1 - \eta\lambda)\,\theta - \eta \sum_{s = t-H+1}^{t} w_{t-s}\, p_s z_s,

with :math:`w_i \propto \beta^i` normalized over a window of :math:`H` steps. ``momentum=0`` is
plain MeZO-SGD (:math:`H = 1`); ``momentum > 0`` is a momentum variant in the spirit of
ZO-AdaMU (Jiang et al. 2024) that keeps only the last ``H`` (seed, p) pairs, never a
parameter-sized buffer. ``density < 1`` is Sparse-MeZO (Liu et al. 2024): only the smallest
``density`` fraction of each tensor (by magnitude, chosen at each step) is perturbed and updated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch.optim import Optimizer

from gradnoise.errors import GradNoiseError, explain
from gradnoise.optim._common import is_real
from gradnoise.perturbation import directions, magnitude_masks, projected_gradient

__all__ = ["MeZO", "mezo_step", "momentum_weights"]


def momentum_weights(momentum: float, length: int) -> list[float]:
    r"""Normalized weights :math:`w_i \propto \beta^i`, newest first, for ``length`` steps."""
    raw = [momentum**i for i in range(length)]
    return [w / sum(raw) for w in raw]


@torch.no_grad()
def mezo_step(
    params: Sequence[torch.Tensor],
    loss: Callable[[], torch.Tensor],
    *,
    seed: int,
    lrs: Sequence[float],
    eps: float,
    weight_decays: Sequence[float],
    history: list[tuple[int, float]],
    momentum: float = 0.0,
    window: int = 1,
    density: float = 1.0,
) -> tuple[float, list[tuple[int, float]]]:
    """One MeZO step in place; returns the mean of the two losses and the new seed history."""
    masks = None if density == 1.0 else magnitude_masks(params, density)
    slope, plus, minus = projected_gradient(loss, params, seed, eps, masks)
    history = [(seed, slope), *history][: window if momentum > 0 else 1]
    weights = momentum_weights(momentum, len(history))
    for param, lr, decay in zip(params, lrs, weight_decays, strict=True):
        if decay:
            param.mul_(1 - lr * decay)
    for (past_seed, past_slope), weight in zip(history, weights, strict=True):
        for (param, z), lr in zip(directions(params, past_seed, masks), lrs, strict=True):
            param.add_(z, alpha=-lr * weight * past_slope)
    return (plus + minus) / 2, history


def _check(name: str, value: float, ok: bool, expected: str, fix: str) -> None:
    if not ok:
        raise GradNoiseError(explain(f"MeZO {name}", expected=expected, got=repr(value), fix=fix))


def _check_group_options(where: str, o: dict) -> None:
    lr, wd = o["lr"], o["weight_decay"]
    _check(f"{where}lr", lr, is_real(lr) and lr > 0, "a positive learning rate", "use e.g. lr=1e-4")
    ok = is_real(wd) and wd >= 0
    _check(f"{where}weight_decay", wd, ok, "a float >= 0", "use 0.0")


class MeZO(Optimizer):
    """``torch.optim`` shell around :func:`mezo_step`; ``step(closure)`` needs a loss closure.

    The closure only computes the loss (no ``backward``); it runs twice per step under
    ``torch.no_grad``. The step counter, base seed and seed history live in ``state_dict``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        *,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        window: int = 8,
        density: float = 1.0,
        seed: int = 0,
    ) -> None:
        _check_group_options("", {"lr": lr, "weight_decay": weight_decay})
        _check("eps", eps, eps > 0, "a positive perturbation scale", "use e.g. eps=1e-3")
        _check("momentum", momentum, 0 <= momentum < 1, "a float in [0, 1)", "use 0 or 0.9")
        _check("window", window, window >= 1, "an int >= 1", "use e.g. window=8")
        _check("density", density, 0 < density <= 1, "a fraction in (0, 1]", "use 1.0 or 0.25")
        defaults = {"lr": lr, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.options = {"eps": eps, "momentum": momentum, "window": window, "density": density}
        self.state["mezo"] = {"step": 0, "seed": int(seed), "history": []}

    def add_param_group(self, param_group: dict) -> None:
        """Add a group after checking its ``lr`` and ``weight_decay`` (merged over the defaults)."""
        if isinstance(param_group, dict):
            extra = {k: v for k, v in param_group.items() if k != "params"}
            where = f"param_groups[{len(self.param_groups)}] "
            _check_group_options(where, {**self.defaults, **extra})
        super().add_param_group(param_group)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> float:  # type: ignore[override]
        if closure is None:
            raise GradNoiseError(
                explain(
                    "MeZO.step",
                    expected="a closure that returns the loss at the current parameters",
                    got="closure=None",
                    fix="call opt.step(lambda: loss_fn(model, *batch)); no backward() is needed",
                )
            )
        params, lrs, decays = [], [], []
        for group in self.param_groups:
            trainable = [p for p in group["params"] if p.requires_grad]
            params += trainable
            lrs += [group["lr"]] * len(trainable)
            decays += [group["weight_decay"]] * len(trainable)
        state = self.state["mezo"]
        seed = (state["seed"] * 1_000_033 + state["step"]) % (2**62)
        loss, history = mezo_step(
            params, closure, seed=seed, lrs=lrs, weight_decays=decays,
            history=state["history"], **self.options,
        )  # fmt: skip
        # a new dict, so a state_dict taken earlier is not changed by later steps
        self.state["mezo"] = {**state, "step": state["step"] + 1, "history": history}
        return loss
