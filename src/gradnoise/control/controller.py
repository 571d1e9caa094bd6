"""The stateful :class:`BatchSizeController` built on the pure rules of ``batch_size``."""

from __future__ import annotations

import math
import sys

from gradnoise.control.batch_size import (
    LR_RULES,
    BatchDecision,
    _check,
    lr_scale,
    target_accumulation,
    with_hysteresis,
)
from gradnoise.errors import GradNoiseError, explain
from gradnoise.stats.running import NoiseScaleReading

__all__ = ["BatchSizeController"]

_CONFIG = (
    "micro_batch",
    "base_batch",
    "target_multiple",
    "min_accumulation",
    "max_accumulation",
    "hysteresis",
    "grow_only",
    "lr_rule",
    "warmup",
)


class BatchSizeController:
    """Decide the accumulation count and LR multiplier from a running noise scale.

    Example::

        noise, control = NoiseScale(beta=0.9), BatchSizeController(micro_batch=16)
        decision = control.decision()
        for step in range(steps):
            for _ in range(decision.accumulation):            # memory stays that of one micro-batch
                with GradStats(model) as stats:
                    (loss_fn(model, next(batches)) / decision.accumulation).backward()
                noise.update(stats)
            for group in opt.param_groups:
                group["lr"] = base_lr * decision.lr_scale
            opt.step(); opt.zero_grad()
            decision = control.update(noise.estimate())

    Args:
        micro_batch: examples per micro-batch (fixed).
        base_batch: the batch the base learning rate was tuned for (default: ``micro_batch`` times
            ``min_accumulation``).
        target_multiple: aim for ``target_multiple * B_noise`` examples per step.
        min_accumulation, max_accumulation: bounds of the accumulation count.
        hysteresis: change only when the target moves by more than this fraction.
        grow_only: never shrink the batch (Pollux-style growth as the noise scale rises).
        lr_rule: one of ``"adascale"``, ``"sqrt"``, ``"linear"``, ``"none"``.
        warmup: readings to ignore before the first change (the estimate is noisy early).
    """

    def __init__(
        self,
        *,
        micro_batch: int,
        base_batch: int | None = None,
        target_multiple: float = 1.0,
        min_accumulation: int = 1,
        max_accumulation: int = 64,
        hysteresis: float = 0.25,
        grow_only: bool = True,
        lr_rule: str = "adascale",
        warmup: int = 10,
    ) -> None:
        _check("micro_batch", micro_batch, _int_at_least(micro_batch, 1), "an int >= 1", "e.g. 16")
        ok = _int_at_least(min_accumulation, 1)
        _check("min_accumulation", min_accumulation, ok, "an int >= 1", "use 1")
        ok = _int_at_least(max_accumulation, min_accumulation if ok else 1)
        _check("max_accumulation", max_accumulation, ok, "an int >= min_accumulation", "e.g. 64")
        base = micro_batch * min_accumulation if base_batch is None else base_batch
        _check("base_batch", base_batch, _int_at_least(base, 1), "None or an int >= 1", "e.g. 32")
        ok = target_multiple > 0
        _check("target_multiple", target_multiple, ok, "a positive float", "e.g. 1.0")
        _check("hysteresis", hysteresis, hysteresis >= 0, "a float >= 0", "e.g. 0.25")
        ok = lr_rule in LR_RULES
        _check("lr_rule", lr_rule, ok, "one of " + ", ".join(LR_RULES), "use 'adascale' for SGD")
        _check("warmup", warmup, _int_at_least(warmup, 0), "an int >= 0", "e.g. 10")
        self.micro_batch, self.base_batch, self.target_multiple = micro_batch, base, target_multiple
        self.min_accumulation, self.max_accumulation = min_accumulation, max_accumulation
        self.hysteresis, self.grow_only, self.lr_rule, self.warmup = (
            hysteresis,
            grow_only,
            lr_rule,
            warmup,
        )
        self.accumulation, self.updates, self.progress = min_accumulation, 0, 0.0
        self.noise_scale = math.nan

    def decision(self, changed: bool = False) -> BatchDecision:
        """The current decision (without reading anything new)."""
        batch = self.accumulation * self.micro_batch
        scale = lr_scale(self.lr_rule, self.noise_scale, self.base_batch, batch)
        return BatchDecision(self.accumulation, batch, scale, changed)

    def update(self, reading: NoiseScaleReading | float) -> BatchDecision:
        """Read the latest noise scale (a ``NoiseScale.estimate()`` or a float) and decide."""
        value = reading.b_simple if isinstance(reading, NoiseScaleReading) else float(reading)
        self.updates += 1
        previous = self.accumulation
        if math.isfinite(value) and value > 0:
            self.noise_scale = value
            if self.updates > self.warmup:
                # hysteresis acts on the unclipped target, then the bounds: a target beyond
                # max_accumulation reaches it even when the cap is within the band of `previous`
                target = target_accumulation(
                    value,
                    multiple=self.target_multiple,
                    micro_batch=self.micro_batch,
                    lowest=1,
                    highest=sys.maxsize,
                )
                moved = with_hysteresis(previous, target, self.hysteresis, self.grow_only)
                self.accumulation = min(self.max_accumulation, max(self.min_accumulation, moved))
        decision = self.decision(changed=self.accumulation != previous)
        self.progress += decision.lr_scale if self.lr_rule == "adascale" else 1.0
        return decision

    def state_dict(self) -> dict:
        """Configuration and state; :meth:`load_state_dict` continues exactly."""
        config = {key: getattr(self, key) for key in _CONFIG}
        state = {"accumulation": self.accumulation, "updates": self.updates}
        return {**config, **state, "progress": self.progress, "noise_scale": self.noise_scale}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; the configuration must match this controller's."""
        mine = {key: getattr(self, key) for key in _CONFIG}
        theirs = {key: state.get(key) for key in _CONFIG}
        if mine != theirs:
            diff = sorted(k for k in _CONFIG if mine[k] != theirs[k])
            raise GradNoiseError(
                explain(
                    "BatchSizeController.load_state_dict",
                    expected="a state saved by a controller with the same configuration",
                    got=f"different {diff}",
                    fix="construct the controller with the saved arguments first",
                )
            )
        self.accumulation, self.updates = state["accumulation"], state["updates"]
        self.progress, self.noise_scale = state["progress"], state["noise_scale"]


def _int_at_least(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low
