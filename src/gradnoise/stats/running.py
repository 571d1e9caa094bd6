r"""NoiseScale: a running simple noise scale with a confidence interval.

Every step gives unbiased estimates :math:`t_s` of :math:`\mathrm{tr}\,\Sigma` and :math:`q_s` of
:math:`\|G\|^2` (per parameter; whole-model values are their sums). McCandlish et al. 2018
(appendix A.1) average the two *separately* and divide afterwards,

.. math::
    \hat B_\text{simple} = \frac{\sum_s w_s t_s}{\sum_s w_s q_s},

with weights :math:`w_s` of a bias-corrected exponential average (``beta``) or a sliding window
of the last ``window`` steps. Averaging per-step ratios instead is biased (a ratio of noisy
numbers), which is why ratios are never averaged here.

**Interval.** Steps are treated as independent draws (batch means: each step's batch is one
"batch"). With :math:`\bar t, \bar q` the weighted means, :math:`C` the weighted sample covariance
of :math:`(t_s, q_s)` (divided by :math:`1 - \sum w_s^2`, weights normalized) and
:math:`V = C \sum_s w_s^2` the covariance of the means, the interval is Fieller's for the ratio of
two means: all :math:`R \ge 0` with

.. math::
    (\bar t - R \bar q)^2 \le z^2 (V_{tt} - 2 R V_{tq} + R^2 V_{qq}),

:math:`z` the Student-t quantile of ``confidence`` with :math:`1/\sum_s w_s^2 - 1` degrees of
freedom (Kish's effective sample size minus one). When :math:`\bar q` is not significantly positive
the set is unbounded and ``ci_high`` is ``inf``; ``b_simple`` itself is NaN whenever
:math:`\bar q \le 0`. The interval assumes a stationary gradient distribution over the averaging
horizon; in training, keep the horizon short relative to how fast the noise scale moves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from gradnoise.errors import GradNoiseError, check_confidence, explain
from gradnoise.stats.averaging import (
    EmaAverage,
    WindowAverage,
    ema_sq_weight,
    fieller_interval,
    student_quantile,
)
from gradnoise.stats.engine import GradStats
from gradnoise.stats.fsdp import ShardedStats
from gradnoise.stats.moments import GradMoments
from gradnoise.stats.quantities import layer_estimates, two_batch_estimates
from gradnoise.stats.twobatch import TwoBatchNorms

__all__ = ["NoiseScale", "NoiseScaleReading", "step_estimates"]

Source = GradStats | Mapping[str, GradMoments] | GradMoments | TwoBatchNorms | ShardedStats


@dataclass(frozen=True)
class NoiseScaleReading:
    """One reading of :class:`NoiseScale` (floats; NaN where undefined, never clipped)."""

    b_simple: float
    ci_low: float
    ci_high: float
    trace_sigma: float
    grad_sq_norm: float
    per_layer: dict[str, float]
    steps: int
    defined: bool
    skipped: int = 0


def _two_batch_vectors(record: TwoBatchNorms) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """All parameters at once: :func:`two_batch_estimates` is elementwise."""
    names = list(record.small_sq_norms)
    small = torch.stack([record.small_sq_norms[n] for n in names]).to(torch.float64)
    big = torch.stack([record.big_sq_norms[n] for n in names]).to(torch.float64)
    sqs, traces = two_batch_estimates(small, record.b_small, big, record.b_big)
    return names, traces, sqs


def step_estimates(source: Source) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Per-parameter unbiased ``(names, tr Sigma, |G|^2)`` of one step, as float64 vectors.

    A bare :class:`GradMoments` gives one entry named ``""``.
    """
    if callable(getattr(source, "layer_estimates", None)):
        return source.layer_estimates()  # ShardedStats, MergedStats: all ranks' examples
    if isinstance(source, GradMoments):
        source = {"": source}
    if isinstance(source, TwoBatchNorms):
        return _two_batch_vectors(source)
    if isinstance(source, Mapping) and source:
        bad = [name for name, record in source.items() if not isinstance(record, GradMoments)]
        if bad:
            raise GradNoiseError(
                explain(
                    "NoiseScale.update",
                    expected="a dict of GradMoments (one per parameter)",
                    got=f"{type(source[bad[0]]).__name__} for {bad[0]!r}",
                    fix="pass stats.moments() or the GradStats object itself",
                )
            )
        return layer_estimates(source)
    else:
        raise GradNoiseError(
            explain(
                "NoiseScale.update",
                expected="GradStats, a non-empty dict of GradMoments, GradMoments or TwoBatchNorms",
                got=type(source).__name__ if not isinstance(source, Mapping) else "an empty dict",
                fix="pass stats (after backward), stats.moments() or MicroBatchNorms.record()",
            )
        )


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


class NoiseScale:
    """Running :math:`B_\\text{simple}` with a confidence interval (see the module docstring).

    Example::

        noise = NoiseScale(beta=0.95)
        for x, y in loader:
            with GradStats(model) as stats:
                loss_fn(model(x), y).backward()
            noise.update(stats)          # tensor ops only, no host sync
            optimizer.step(); optimizer.zero_grad()
        reading = noise.estimate()       # the only host sync
        reading.b_simple, reading.ci_low, reading.ci_high

    Args:
        beta: weight of the past in the bias-corrected exponential average (0 <= beta < 1).
        window: if given, average the last ``window`` steps with equal weights instead.
        confidence: coverage of the interval, in (0, 1).
    """

    def __init__(
        self, *, beta: float = 0.95, window: int | None = None, confidence: float = 0.9
    ) -> None:
        _check("beta", beta, 0 <= beta < 1, "a float in [0, 1)", "e.g. beta=0.95")
        ok = window is None or (isinstance(window, int) and window >= 2)
        _check("window", window, ok, "None or an int >= 2", "e.g. window=100")
        check_confidence("NoiseScale(confidence=...)", confidence)
        self.beta, self.window, self.confidence = beta, window, confidence
        self._names: list[str] | None = None
        self._avg = EmaAverage(beta) if window is None else WindowAverage(window)
        self._device = torch.device("cpu")
        self._pending_skips = 0  # skips before the first readable step (width still unknown)

    @property
    def steps(self) -> int:
        """Steps in the average; skipped (non-finite) ones are not counted. One host sync."""
        return self._avg.steps

    @property
    def skipped(self) -> int:
        """Steps left out because their record held NaN or inf (one host sync)."""
        return self._avg.skipped

    def skip(self) -> None:
        """Count a step whose record could not be read at all (e.g. GradStats refused it as
        non-finite) as skipped, without touching the average."""
        if self._names is None:
            self._pending_skips += 1
            return
        device = self._device
        nothing = torch.zeros(2 * len(self._names), dtype=torch.float64, device=device)
        zz = torch.zeros(2, 2, dtype=torch.float64, device=device)
        self._avg.push(nothing, zz, torch.zeros((), dtype=torch.bool, device=device))

    def update(self, source: Source) -> None:
        """Add one step's record: GradStats, ``{name: GradMoments}``, GradMoments, TwoBatchNorms,
        or the ShardedStats of an FSDP2 step."""
        names, traces, sqs = step_estimates(source)
        if self._names is not None and names != self._names and set(names) == set(self._names):
            order = torch.tensor([names.index(n) for n in self._names], device=traces.device)
            names, traces, sqs = self._names, traces[order], sqs[order]
        if self._names is not None and names != self._names:
            raise GradNoiseError(
                explain(
                    "NoiseScale.update",
                    expected=f"the parameters of the earlier steps ({len(self._names)} names)",
                    got=f"{len(names)} names, differing in {sorted(set(names) ^ set(self._names))}",
                    fix="feed records of the same parameters every step, or start a new NoiseScale",
                )
            )
        x, z = torch.cat([traces, sqs]), torch.stack([traces.sum(), sqs.sum()])
        # A step with NaN/inf anywhere (an fp16 overflow, one bad batch) is skipped and counted
        # instead of poisoning the average for good; tensor ops, no host sync.
        ok = torch.isfinite(x).all() & torch.isfinite(z).all()
        self._avg.push(x, torch.outer(z, z), ok)
        self._names, self._device = names, x.device
        for _ in range(self._pending_skips):
            self.skip()
        self._pending_skips = 0

    def estimate(self, *, confidence: float | None = None) -> NoiseScaleReading:
        """Read the running estimate (the one place with host syncs).

        ``confidence`` overrides the constructor's level for this reading only.
        """
        level = self.confidence if confidence is None else confidence
        level = check_confidence("NoiseScale(confidence=...)", level)
        skipped = self.skipped + self._pending_skips
        if self.steps == 0:
            nan = math.nan
            return NoiseScaleReading(nan, nan, nan, nan, nan, {}, 0, False, skipped)
        mean_x, mean_zz, sq_weight = self._avg.moments()
        half = len(self._names)
        per_trace, per_sq = mean_x[:half].tolist(), mean_x[half:].tolist()
        trace, grad_sq = sum(per_trace), sum(per_sq)
        per_layer = {
            n: _ratio(t, q) for n, t, q in zip(self._names, per_trace, per_sq, strict=True)
        }
        per_layer.pop("", None)
        low, high = self._interval(trace, grad_sq, mean_zz.tolist(), sq_weight, level)
        b_simple = _ratio(trace, grad_sq)
        defined = not math.isnan(b_simple)
        return NoiseScaleReading(
            b_simple, low, high, trace, grad_sq, per_layer, self.steps, defined, skipped
        )

    @staticmethod
    def _interval(
        t: float, q: float, zz: list, sq_weight: float, level: float
    ) -> tuple[float, float]:
        if sq_weight >= 1.0 - 1e-9:
            return math.nan, math.nan  # one step: no spread to estimate a variance from
        factor = sq_weight / (1.0 - sq_weight)
        means = (t, q)
        cov = [[factor * (zz[i][j] - means[i] * means[j]) for j in range(2)] for i in range(2)]
        dof = 1.0 / sq_weight - 1.0  # Kish's effective sample size, minus one
        return fieller_interval(t, q, cov, student_quantile(0.5 + level / 2, dof))

    def state_dict(self) -> dict:
        """Everything needed to continue the estimate after a restart."""
        config = {"beta": self.beta, "window": self.window, "confidence": self.confidence}
        return {**config, "names": self._names, "average": self._avg.state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; ``beta`` and ``window`` must match this object's.

        Everything is checked before anything changes; a refused state leaves this object as
        it was.
        """
        if not isinstance(state, Mapping):
            _refuse_state(f"a {type(state).__name__}, not a dict")
        mine = {"beta": self.beta, "window": self.window}
        theirs = {key: state.get(key) for key in mine}
        same = all(
            type(theirs[k]) in (int, float, type(None)) and theirs[k] == mine[k] for k in mine
        )
        if not same or "average" not in state:
            raise GradNoiseError(
                explain(
                    "NoiseScale.load_state_dict",
                    expected=f"a state saved by NoiseScale with {mine}",
                    got=f"{theirs}" if "average" in state else "a dict without 'average'",
                    fix="construct NoiseScale with the saved beta and window first",
                )
            )
        names, average = state.get("names"), state["average"]
        problem = _state_problem(names, average, self.window, self.beta)
        if problem:
            _refuse_state(problem)
        self._avg.load(average)
        self._names = None if names is None else list(names)


def _refuse_state(problem: str) -> None:
    raise GradNoiseError(
        explain(
            "NoiseScale.load_state_dict",
            expected="a state saved by NoiseScale.state_dict (names, steps and averages "
            "of matching types and lengths)",
            got=problem,
            fix="load an unmodified state_dict saved by NoiseScale",
        )
    )


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _float64(value, shape: tuple) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.float64 and value.shape == shape


def _state_problem(names, average, window, beta) -> str | None:
    """What is wrong with a saved ``(names, average)`` pair, or None; nothing is changed."""
    if not isinstance(average, Mapping):
        return f"average of type {type(average).__name__}"
    steps, skipped = average.get("steps"), average.get("skipped", 0)
    if not _is_count(steps):
        return f"steps={steps!r}"
    if not _is_count(skipped):
        return f"skipped={skipped!r}"
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) for n in names)
    ):
        return f"names of type {type(names).__name__}"
    if names is None and steps + skipped > 0:
        return f"names=None after {steps + skipped} steps"
    width = 0 if names is None else 2 * len(names)
    keys = ("steps", "rows") if window is not None else ("steps", "sq_weight", "x", "zz")
    missing = [k for k in keys if k not in average]
    if missing:
        return f"average without {missing}"
    if window is not None:
        return _window_problem(average, steps, skipped, window, width)
    return _ema_problem(average, steps, beta, width)


def _window_problem(average, steps: int, skipped: int, window: int, width: int) -> str | None:
    rows, ok = average["rows"], average.get("ok")
    if rows is None:
        return None if steps + skipped == 0 else "rows=None after steps > 0"
    if not (isinstance(rows, torch.Tensor) and rows.dim() == 2):
        return f"rows of type {type(rows).__name__}"
    if not _float64(rows, (rows.shape[0], width)):
        return f"rows of shape {tuple(rows.shape)} {rows.dtype}, expected (k, {width}) float64"
    count = rows.shape[0]
    if ok is not None and not (
        isinstance(ok, torch.Tensor) and ok.dtype == torch.bool and ok.shape == (count,)
    ):
        return f"ok of type {type(ok).__name__}, expected a ({count},) bool tensor"
    good = count if ok is None else int(ok.sum())
    if count > window or count > steps + skipped or good > steps:
        return f"steps={steps} with {count} rows (skipped {skipped}, window {window})"
    return None


def _ema_problem(average, steps: int, beta: float, width: int) -> str | None:
    x, zz, sq = average["x"], average["zz"], average["sq_weight"]
    if steps == 0 and x is None and zz is None:
        return None
    if not _float64(x, (width,)):
        return f"x of shape {getattr(x, 'shape', type(x).__name__)}, expected ({width},) float64"
    if not _float64(zz, (2, 2)):
        return f"zz of shape {getattr(zz, 'shape', type(zz).__name__)}, expected (2, 2) float64"
    if steps == 0:  # only skipped steps so far: the averages are still zeros
        return None
    expected = ema_sq_weight(beta, steps)
    if (
        not isinstance(sq, (int, float))
        or isinstance(sq, bool)
        or not math.isclose(sq, expected, rel_tol=1e-6)
    ):
        return f"sq_weight={sq!r}, expected {expected!r} after {steps} steps"
    return None


def _check(argument: str, value, ok: bool, expected: str, fix: str) -> None:
    if not ok:
        raise GradNoiseError(
            explain(f"NoiseScale({argument}=...)", expected=expected, got=repr(value), fix=fix)
        )
