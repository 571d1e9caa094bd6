r"""A batch-size controller that grows the effective batch toward a multiple of the noise scale.

The gradient noise scale :math:`B_\text{noise} = \mathrm{tr}\,\Sigma / \|G\|^2` is the batch size
past which a bigger batch stops buying proportionally faster progress (McCandlish et al. 2018);
training near :math:`B \approx B_\text{noise}` balances steps against examples, and Pollux (Qiao
et al. 2021) adapts the batch as :math:`B_\text{noise}` grows during training. The controller
keeps the micro-batch fixed (memory stays flat) and picks the number of accumulated micro-batches

.. math::
    k^* = \mathrm{clip}\big(\lceil m B_\text{noise} / b \rceil,\ k_\text{min},\ k_\text{max}\big),

moving to :math:`k^*` only when it differs from the current :math:`k` by more than a factor
:math:`1 + h` (hysteresis; by default it only grows). The learning rate is scaled by a stated rule
relative to the base batch :math:`B_0`:

* ``"adascale"`` (SGD; Johnson et al. 2020): the gain
  :math:`r = \frac{\mathrm{tr}\Sigma / B_0 + \|G\|^2}{\mathrm{tr}\Sigma / B + \|G\|^2}
  = \frac{1 + B_\text{noise}/B_0}{1 + B_\text{noise}/B} \in [1, B / B_0]`; the sum of gains is
  AdaScale's scale-invariant iteration count (:attr:`BatchSizeController.progress`), which an LR
  schedule can be driven by;
* ``"sqrt"`` (Adam): :math:`\sqrt{B / B_0}`, the square-root rule of the SDE view of adaptive
  methods (Malladi et al. 2022);
* ``"linear"``: :math:`B / B_0` (Goyal et al. 2017); ``"none"``: 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gradnoise.errors import GradNoiseError, explain

__all__ = [
    "LR_RULES",
    "BatchDecision",
    "adascale_gain",
    "lr_scale",
    "target_accumulation",
    "with_hysteresis",
]

LR_RULES = ("adascale", "sqrt", "linear", "none")


def adascale_gain(noise_scale: float, base_batch: int, batch: int) -> float:
    """AdaScale's gain ``(1 + B_noise / B_0) / (1 + B_noise / B)`` (1 where undefined)."""
    if not math.isfinite(noise_scale) or noise_scale <= 0:
        return 1.0
    return (1 + noise_scale / base_batch) / (1 + noise_scale / batch)


def lr_scale(rule: str, noise_scale: float, base_batch: int, batch: int) -> float:
    """The learning-rate multiplier of ``rule`` (one of :data:`LR_RULES`) at batch ``batch``."""
    if rule == "adascale":
        return adascale_gain(noise_scale, base_batch, batch)
    if rule == "sqrt":
        return math.sqrt(batch / base_batch)
    return batch / base_batch if rule == "linear" else 1.0


def target_accumulation(
    noise_scale: float, *, multiple: float, micro_batch: int, lowest: int, highest: int
) -> int:
    """``clip(ceil(multiple * B_noise / micro_batch), lowest, highest)``; NaN -> ``lowest``."""
    if not math.isfinite(noise_scale) or noise_scale <= 0:
        return lowest if math.isnan(noise_scale) or noise_scale <= 0 else highest
    return max(lowest, min(highest, math.ceil(multiple * noise_scale / micro_batch)))


def with_hysteresis(current: int, target: int, hysteresis: float, grow_only: bool) -> int:
    """``target`` if it moved by more than a factor ``1 + hysteresis``, else ``current``."""
    if target > current * (1 + hysteresis):
        return target
    if not grow_only and target * (1 + hysteresis) < current:
        return target
    return current


@dataclass(frozen=True)
class BatchDecision:
    """What to do for the next optimizer step."""

    accumulation: int  # micro-batches to accumulate
    batch_size: int  # accumulation * micro_batch
    lr_scale: float  # multiply the base learning rate by this
    changed: bool  # whether the accumulation changed at this update


def _check(name: str, value: object, ok: bool, expected: str, fix: str) -> None:
    if not ok:
        what = f"BatchSizeController({name}=...)"
        raise GradNoiseError(explain(what, expected=expected, got=repr(value), fix=fix))
