"""A minimal private stand-in for ``gradnoise.stats.running.NoiseScale`` (issue 3).

Used only while the real class has not landed; it keeps the same constructor, ``update``,
``estimate`` and ``state_dict`` contract. Estimate: the ratio of exponential moving averages of
the per-step unbiased ``tr Sigma`` and ``|G|^2``; the interval comes from the spread of the
per-step ``|G|^2`` values (delta method on the denominator, which dominates the uncertainty).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import NormalDist

from gradnoise.stats.moments import GradMoments
from gradnoise.stats.quantities import gradient_noise_scale


@dataclass(frozen=True)
class NoiseScaleReading:
    """The running noise scale with its interval and ingredients."""

    b_simple: float
    ci_low: float
    ci_high: float
    trace_sigma: float
    grad_sq_norm: float
    per_layer: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    defined: bool = False


def _per_param(source) -> dict[str, GradMoments]:
    if isinstance(source, GradMoments):
        return {"all": source}
    if isinstance(source, Mapping):
        return dict(source)
    return source.moments()


class NoiseScale:
    """Running simple noise scale over steps (stand-in; see the module docstring)."""

    def __init__(
        self, *, beta: float = 0.95, window: int | None = None, confidence: float = 0.9
    ) -> None:
        self.beta, self.window, self.confidence = beta, window, confidence
        self._ema: dict[str, list[float]] = {}  # name -> [trace, grad_sq, grad_sq^2]
        self._steps = 0

    def _mix(self, key: str, values: list[float]) -> None:
        old = self._ema.get(key)
        self._ema[key] = (
            values
            if old is None
            else [self.beta * o + (1 - self.beta) * v for o, v in zip(old, values, strict=True)]
        )

    def update(self, source) -> None:
        """Fold one step's moments (GradStats, mapping of GradMoments, or GradMoments) in."""
        per_param = _per_param(source)
        self._steps += 1
        for name, record in per_param.items():
            est = gradient_noise_scale(record)
            self._mix(name, [est.trace_sigma, est.grad_sq_norm, est.grad_sq_norm**2])
        total = gradient_noise_scale(per_param)
        self._mix("", [total.trace_sigma, total.grad_sq_norm, total.grad_sq_norm**2])

    def _interval(self, trace: float, grad: float, grad_sq: float) -> tuple[float, float]:
        n_eff = min(self._steps, (1 + self.beta) / (1 - self.beta))
        spread = math.sqrt(max(grad_sq - grad**2, 0.0) / max(n_eff, 1.0))
        z = NormalDist().inv_cdf(0.5 + self.confidence / 2)
        low_g, high_g = grad - z * spread, grad + z * spread
        ci_low = trace / high_g if high_g > 0 else math.nan
        return ci_low, (trace / low_g if low_g > 0 else math.inf)

    def estimate(self) -> NoiseScaleReading:
        """The current reading; ``defined`` is False until the |G|^2 average is positive."""
        if not self._ema:
            return NoiseScaleReading(math.nan, math.nan, math.nan, math.nan, math.nan)
        trace, grad, grad_sq = self._ema[""]
        per_layer = {k: v[0] / v[1] if v[1] > 0 else math.nan for k, v in self._ema.items() if k}
        b_simple = trace / grad if grad > 0 else math.nan
        low, high = self._interval(trace, grad, grad_sq)
        return NoiseScaleReading(
            b_simple, low, high, trace, grad, per_layer, self._steps, not math.isnan(b_simple)
        )

    def state_dict(self) -> dict:
        """Plain-data state for checkpoints."""
        return {"ema": {k: list(v) for k, v in self._ema.items()}, "steps": self._steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state written by :meth:`state_dict`."""
        self._ema = {k: list(v) for k, v in state["ema"].items()}
        self._steps = int(state["steps"])
