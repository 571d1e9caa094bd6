r"""Adam's second-moment estimate against the measured gradient moments, and when it has settled.

Adam keeps :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2)\, \hat g_t^{\,2}` elementwise, with
:math:`\hat g_t` the minibatch gradient of B examples, and divides by :math:`\sqrt{\hat v_t}`,
:math:`\hat v_t = v_t / (1 - \beta_2^t)`. Its target is :math:`E[\hat g^2] = \mu^2 + \sigma^2/B`
per coordinate, so summed over a parameter's coordinates

.. math::
    E\Big[\sum_j \hat v_j\Big] \approx \|G\|^2 + \mathrm{tr}\,\Sigma / B

while the gradient distribution changes slowly against the EMA's memory
:math:`1/(1-\beta_2)` steps. :class:`SecondMomentProbe` reads, per parameter and measured step,
from GradStats' unbiased :math:`\|G\|^2` and :math:`\mathrm{tr}\,\Sigma` of the same batch:

* ``noise_share`` :math:`= (\mathrm{tr}\Sigma/B) / (\|G\|^2 + \mathrm{tr}\Sigma/B)`: the part of
  Adam's target that is minibatch noise. Near 1, the preconditioner normalises by the noise (the
  regime where Adam behaves like sign descent); near 0, by the signal.
* ``tracking`` :math:`= (\|G\|^2 + \mathrm{tr}\Sigma/B) / \sum_j \hat v_j`: 1 when the EMA holds
  the current second moment; far from 1 when it lags a changing gradient scale (early training,
  after a learning-rate change) or its memory is short against the noise of one batch's estimate.
* ``change`` :math:`= \|\hat v_t - \hat v_s\|_1 / \|\hat v_s\|_1` since the previous probe s.

``settled`` in the STEP sense (Lu et al. 2023, "STEP: Learning N:M Structured Sparsity Masks from
Scratch with Precondition": freeze the variance once sampled changes have concentrated): the
last ``window`` changes have a mean whose one-sided upper bound, mean + 2 sd / sqrt(window), is
below ``tolerance``. This is the concentration idea, not the paper's exact switching rule. The
change per probe scales with :math:`1-\beta_2` and the probe interval: with Adam's default
0.999, a jump of the gradient scale moves :math:`\hat v` by only ~0.1% of the jump per step, so
read ``tracking`` (which sees the lag at once) beside ``settled``.
One batch's numbers are noisy (the unbiased :math:`\|G\|^2` can be negative, and a ratio of
noisy numbers is biased): pool probes through the parts each reading carries, ``signal``
:math:`\|G\|^2`, ``noise`` :math:`\mathrm{tr}\Sigma/B` and ``v_hat_sum`` :math:`\sum_j \hat v_j`,
e.g. noise share = sum(noise) / sum(signal + noise) over the last probes.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.stats.moments import GradMoments
from gradnoise.stats.quantities import gradient_noise_scale

__all__ = ["SecondMomentProbe", "SecondMomentReading"]


@dataclass(frozen=True)
class SecondMomentReading:
    """One parameter at one probe (see the module docstring for each field)."""

    noise_share: float
    tracking: float
    change: float
    settled: bool
    adam_step: int
    signal: float
    noise: float
    v_hat_sum: float


class SecondMomentProbe:
    """Compare an Adam-family optimizer's ``exp_avg_sq`` with GradStats' moments, per parameter.

    ``optimizer`` is any optimizer whose state holds ``exp_avg_sq`` and ``step`` per parameter
    (Adam, AdamW, NAdam, RAdam); ``named_parameters`` maps names (as ``GradStats`` reports them)
    to the parameters. Call :meth:`update` after ``optimizer.step()`` on measured steps.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters,
        *,
        window: int = 5,
        tolerance: float = 0.05,
    ) -> None:
        if not (isinstance(window, int) and window >= 2):
            raise GradNoiseError(
                explain(
                    "SecondMomentProbe window",
                    expected="an int >= 2 (changes whose concentration is tested)",
                    got=repr(window),
                    fix="use for example window=5",
                )
            )
        if not (isinstance(tolerance, (int, float)) and tolerance > 0):
            raise GradNoiseError(
                explain(
                    "SecondMomentProbe tolerance",
                    expected="a number > 0 (relative L1 change per probe)",
                    got=repr(tolerance),
                    fix="use for example tolerance=0.05",
                )
            )
        self.optimizer = optimizer
        self.params = dict(named_parameters)
        self.beta2 = {name: self._beta2(p) for name, p in self.params.items()}
        self.window, self.tolerance = window, float(tolerance)
        self._previous: dict[str, torch.Tensor] = {}
        self._changes: dict[str, deque] = {name: deque(maxlen=window) for name in self.params}

    def _beta2(self, param: torch.Tensor) -> float:
        for group in self.optimizer.param_groups:
            if any(p is param for p in group["params"]):
                betas = group.get("betas")
                if betas is None:
                    break
                return float(betas[1])
        raise GradNoiseError(
            explain(
                "SecondMomentProbe",
                expected="parameters of an Adam-family optimizer (param groups with 'betas')",
                got=f"a parameter not in {type(self.optimizer).__name__}'s groups, or no betas",
                fix="pass the optimizer that steps these parameters (Adam, AdamW, ...)",
            )
        )

    def _v_hat(self, name: str) -> tuple[torch.Tensor, int]:
        state = self.optimizer.state.get(self.params[name], {})
        if "exp_avg_sq" not in state:
            raise GradNoiseError(
                explain(
                    f"SecondMomentProbe ({name!r})",
                    expected="an optimizer state with 'exp_avg_sq' (after optimizer.step())",
                    got=f"state keys {sorted(state)}",
                    fix="call update() after optimizer.step() of an Adam-family optimizer",
                )
            )
        step = int(state["step"])
        return state["exp_avg_sq"].detach().double() / (1.0 - self.beta2[name] ** step), step

    def update(self, moments: Mapping[str, GradMoments]) -> dict[str, SecondMomentReading]:
        """Readings for every parameter both the probe and ``moments`` know."""
        readings = {}
        for name in self.params:
            if name not in moments:
                continue
            v_hat, step = self._v_hat(name)
            estimate = gradient_noise_scale({name: moments[name]})
            noise = float(estimate.trace_sigma) / float(moments[name].n)
            target = float(estimate.grad_sq_norm) + noise
            total = float(v_hat.sum())
            previous = self._previous.get(name)
            change = math.nan
            if previous is not None and float(previous.abs().sum()) > 0:
                change = float((v_hat - previous).abs().sum() / previous.abs().sum())
                self._changes[name].append(change)
            self._previous[name] = v_hat.clone()
            readings[name] = SecondMomentReading(
                noise_share=noise / target if target > 0 else math.nan,
                tracking=target / total if total > 0 else math.nan,
                change=change,
                settled=self._settled(name),
                adam_step=step,
                signal=float(estimate.grad_sq_norm),
                noise=noise,
                v_hat_sum=total,
            )
        return readings

    def _settled(self, name: str) -> bool:
        changes = self._changes[name]
        if len(changes) < self.window:
            return False
        bound = statistics.fmean(changes) + 2 * statistics.stdev(changes) / math.sqrt(len(changes))
        return bound < self.tolerance
