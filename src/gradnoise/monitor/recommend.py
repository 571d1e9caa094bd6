r"""The plain-language reading of a run: batch size versus the noise scale, the predicted
trade-off of other batch sizes, the noisiest layers, and what profiling cost.

**The model** (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", eq. 2.11):
to reach a given loss, batch size ``B`` needs :math:`S = S_\min (1 + B_\text{noise} / B)`
optimizer steps and :math:`E = E_\min (1 + B / B_\text{noise})` examples, so
:math:`(S/S_\min - 1)(E/E_\min - 1) = 1`. Relative to the batch in use, :math:`B_0`,

.. math::
    \frac{S(B)}{S(B_0)} = \frac{1 + B_\text{noise}/B}{1 + B_\text{noise}/B_0},\qquad
    \frac{E(B)}{E(B_0)} = \frac{1 + B/B_\text{noise}}{1 + B_0/B_\text{noise}}.

The measured ``B_simple`` stands in for :math:`B_\text{noise}` (they agree when the Hessian is
well conditioned; ``gradnoise calibrate`` measures the real critical batch). Every ratio is
monotone in :math:`B_\text{noise}`, so its range over B_simple's band is the range between the
band's ends; an unbounded band gives the limit :math:`B_\text{noise} \to \infty`.

**Learning rate.** When the batch changes, scale the learning rate linearly for SGD (Goyal et
al. 2017) and by the square root for Adam-family optimizers (Malladi et al. 2022), as a starting
point to tune, not a guarantee.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gradnoise.monitor.console import fmt, plain
from gradnoise.monitor.records import as_number
from gradnoise.monitor.summary import (
    WHOLE_MODEL,
    GsnrSummary,
    affine_fits,
    gsnr_ranking,
    tail_indices,
)
from gradnoise.stats.instruments import AffineVarianceFit, TailIndex

__all__ = [
    "TRADE_OFF_HEADER",
    "TradeOff",
    "batch_advice",
    "candidate_batches",
    "instrument_text",
    "layer_advice",
    "lr_rule",
    "overhead_text",
    "trade_off_rows",
    "trade_off_table",
    "trade_offs",
]


@dataclass(frozen=True)
class TradeOff:
    """Predicted cost of ``batch`` relative to the batch in use: ``(value, low, high)`` each."""

    batch: int
    steps: tuple[float, float, float]
    examples: tuple[float, float, float]
    steps_over_min: tuple[float, float, float]
    examples_over_min: tuple[float, float, float]


def _steps_over_min(batch: float, noise: float) -> float:
    return 1 + noise / batch if math.isfinite(noise) else math.inf


def _examples_over_min(batch: float, noise: float) -> float:
    return 1 + batch / noise if noise > 0 else math.inf


def _relative(batch: float, current: float, noise: float) -> tuple[float, float]:
    if noise <= 0:  # the limit B_noise -> 0: steps no longer fall, examples grow with B
        return 1.0, batch / current
    if math.isinf(noise):  # the limit B_noise -> inf: steps scale as 1/B, examples equal
        return current / batch, 1.0
    steps = _steps_over_min(batch, noise) / _steps_over_min(current, noise)
    return steps, _examples_over_min(batch, noise) / _examples_over_min(current, noise)


def _ranged(values: list[float]) -> tuple[float, float, float]:
    """``(value at B_simple, low, high)`` from the values at B_simple and the band's ends."""
    return values[0], min(values), max(values)


def trade_offs(
    current: int, b_simple: float, low: float, high: float, batches: list[int]
) -> list[TradeOff]:
    """The :class:`TradeOff` of every batch in ``batches`` (see the module docstring)."""
    noises = [b_simple, low, high]
    rows = []
    for batch in batches:
        relative = [_relative(batch, current, noise) for noise in noises]
        rows.append(
            TradeOff(
                batch=batch,
                steps=_ranged([r[0] for r in relative]),
                examples=_ranged([r[1] for r in relative]),
                steps_over_min=_ranged([_steps_over_min(batch, n) for n in noises]),
                examples_over_min=_ranged([_examples_over_min(batch, n) for n in noises]),
            )
        )
    return rows


def _power_of_two(value: float) -> int:
    """The nearest power of two, kept within [2, 2**40] (no batch is larger)."""
    return 2 ** min(40, max(1, round(math.log2(min(max(value, 2.0), 2.0**40)))))


def candidate_batches(current: int, b_simple: float) -> list[int]:
    """The batch in use and powers of two at a quarter, half, one and two times B_simple."""
    around = {_power_of_two(b_simple * f) for f in (0.25, 0.5, 1.0, 2.0)}
    return sorted(around | {current})


def lr_rule(optimizer: str | None) -> str:
    """The learning-rate rule of thumb for ``optimizer`` (a class name), in one sentence."""
    name = (optimizer or "").lower()
    if name.startswith("sgd"):
        rule = "scale the learning rate in proportion to the batch (the linear rule for SGD)"
    elif any(key in name for key in ("adam", "lion", "lamb", "rmsprop", "adafactor", "sophia")):
        rule = (
            f"scale the learning rate by the square root of the batch ratio (the rule for "
            f"Adam-family optimizers such as {optimizer})"
        )
    else:
        rule = (
            "scale the learning rate linearly with the batch for SGD, by its square root for "
            "Adam-family optimizers"
        )
    return f"When you change the batch, {rule}, as a starting point to tune."


def _x(value: float) -> str:
    return "unbounded" if math.isinf(value) else f"{fmt(value, 2)}x"


def _span(triple: tuple[float, float, float]) -> str:
    value, low, high = triple
    if fmt(low, 2) == fmt(high, 2):
        return _x(value)
    return f"{_x(value)} ({fmt(low, 2)} to {_x(high)})"


def trade_off_rows(rows: list[TradeOff], current: int) -> list[tuple[str, str, str, str]]:
    """Table cells: batch, steps and examples relative to now, and steps over the minimum."""
    return [
        (
            f"{row.batch}" + (" (now)" if row.batch == current else ""),
            _span(row.steps),
            _span(row.examples),
            _span(row.steps_over_min),
        )
        for row in rows
    ]


TRADE_OFF_HEADER = ("batch", "steps vs now", "examples vs now", "steps / minimum steps")


def trade_off_table(batch_size: int, record: dict) -> list[tuple[str, str, str, str]]:
    """The report's and the console's trade-off cells from a step record (empty when the noise
    scale is undefined: nothing to predict from)."""
    b, low, high = _reading(record)
    if b is None or not _is_batch(batch_size):
        return []
    rows = trade_offs(batch_size, b, low, high, candidate_batches(batch_size, b))
    return trade_off_rows(rows, batch_size)


def batch_advice(
    batch_size: int, record: dict, first: dict | None = None, *, optimizer: str | None = None
) -> str:
    """One paragraph on the batch size, from the last step record's running reading."""
    if not _is_batch(batch_size):
        return (
            f"The batch size of the last record ({batch_size!r}) is not a positive count, so no "
            "trade-off can be predicted. " + lr_rule(optimizer)
        )
    b, low, high = _reading(record)
    if b is None:
        return (
            f"At batch size {batch_size} the mean gradient could not be told apart from its "
            "noise: the noise scale is likely far above the batch size, where doubling the "
            "batch nearly halves the steps for about the same examples. Profile again with a "
            "larger --batch-size to place the noise scale. " + lr_rule(optimizer)
        )
    unbounded = math.isinf(high)
    band = f"{fmt(low)} to {fmt(high)}"
    current = trade_offs(batch_size, b, low, high, [batch_size])[0]
    if batch_size < low:
        where = "below the band of"
    elif batch_size > high:
        where = "above the band of"
    else:
        where = "within the band of"
    text = (
        f"Your batch size {batch_size} is {where} the measured noise scale, B_simple ~ "
        f"{fmt(b)} (90% band {band}). Under McCandlish et al.'s model it takes "
        f"{_span(current.steps_over_min)} the minimum number of steps and "
        f"{_span(current.examples_over_min)} the minimum number of examples to reach a loss. "
    )
    target = _power_of_two(b)
    if target != batch_size:
        move = trade_offs(batch_size, b, low, high, [target])[0]
        text += (
            f"A batch of {target} is predicted to take {_span(move.steps)} the steps for "
            f"{_span(move.examples)} the examples; the table lists other sizes. "
        )
    if unbounded:
        text += (
            f"The band is unbounded above: the data show B_noise > {fmt(low)} but not by how "
            "much, so the ranges run to the limit of a very large noise scale. "
        )
    return text + lr_rule(optimizer) + _growth(first, b)


def _is_batch(value) -> bool:
    """A batch size the trade-off can use: an int in [1, 2**40]."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 2**40


def _reading(record: dict) -> tuple[float | None, float | None, float | None]:
    """``(b_simple, low, high)`` of a record as floats, or three Nones when B_simple is not
    positive (undefined; only a hand-made record holds a negative one).

    The file writes both NaN (no interval yet, one step) and inf (unbounded above) as null: two
    nulls mean no band (``low = high = b_simple``), a null ``ci_high`` alone an unbounded one.
    """
    b, low, high = (as_number(record.get(k)) for k in ("b_simple", "ci_low", "ci_high"))
    if b is None or not 0 < b < math.inf:
        return None, None, None
    if low is None and high is None:
        return b, b, b
    low = min(max(low or 0.0, 0.0), b)
    high = math.inf if high is None else max(high, b)
    return b, low, high


def _growth(first: dict | None, b: float) -> str:
    start = first.get("b_simple") if first else None
    if start is None or start <= 0 or b < 2 * start:
        return ""
    return (
        f" The noise scale grew from {fmt(start)} to {fmt(b)} during the run, as it usually "
        "does while the loss falls: a batch size that grows with it keeps the balance."
    )


def layer_advice(steps: list[dict], count: int = 3) -> str:
    """One paragraph naming the parameters with the lowest and the highest late GSNR."""
    ranked = [(n, g) for n, g in gsnr_ranking(steps) if math.isfinite(g.value)]
    if not ranked:
        return "No per-layer GSNR was recorded (it needs batches of 2 or more examples)."

    def named(items) -> str:
        return ", ".join(f"{name} ({_gsnr_text(g)})" for name, g in items)

    quiet = [name for name, g in ranked if not g.low > 0]
    text = (
        f"Lowest signal-to-noise (GSNR = |G|^2 / tr(Sigma) over the late half of training, "
        f"90% band): {named(ranked[:count])}. Highest: {named(ranked[::-1][:count])}."
    )
    if quiet:
        text += (
            f" {len(quiet)} of {len(ranked)} parameters have a band that reaches 0: at this "
            "batch size their mean gradient cannot be told apart from its noise; they gain "
            "most from larger batches or a smaller learning rate."
        )
    return text


def _gsnr_text(g: GsnrSummary) -> str:
    if not math.isfinite(g.low):
        return plain(g.value)
    return f"{plain(g.value)}, {plain(g.low)} to {plain(g.high)}"


OVERHEAD_FIELDS = (
    "overhead_fraction",
    "measured_steps",
    "every",
    "measured_step_ratio",
    "plain_step_median",
    "monitor_seconds",
    "train_seconds",
)


def instrument_text(steps: list[dict]) -> str:
    """The tail index of the late per-example norms and the affine-variance fit over the run,
    whole model and per layer, in plain words (see :mod:`gradnoise.monitor.summary`)."""
    tails, fits = tail_indices(steps), affine_fits(steps)
    parts = [
        _tail_text(tails),
        _layer_tails_text(tails),
        _affine_text(fits),
        _layer_fits_text(fits),
    ]
    return " ".join(p for p in parts if p)


def _layers(items: dict) -> dict:
    return {name: value for name, value in items.items() if name != WHOLE_MODEL}


def _tail_text(tails: dict[str, TailIndex]) -> str:
    tail = tails.get(WHOLE_MODEL)
    if tail is None:
        return "Too few per-example norms for a tail index."
    verdict = (
        "heavy: the per-example variance may not exist, so averages of norms are unreliable"
        if tail.heavy
        else "a tail with finite variance"
        if tail.low > 2
        else "not clearly above or below 2"
    )
    return (
        f"Tail index of the late per-example gradient norms (Hill, largest {tail.k} of "
        f"{tail.n}): {fmt(tail.alpha, 2)} (90% {fmt(tail.low, 2)} to {fmt(tail.high, 2)}), "
        f"{verdict}."
    )


def _layer_tails_text(tails: dict[str, TailIndex]) -> str:
    layers = _layers(tails)
    if not layers:
        return ""
    heavy = [name for name, t in layers.items() if t.heavy]
    heaviest = next(iter(layers.items()))
    text = (
        f"Per layer, the heaviest tail is {heaviest[0]} ({fmt(heaviest[1].alpha, 2)}, 90% "
        f"{fmt(heaviest[1].low, 2)} to {fmt(heaviest[1].high, 2)})"
    )
    if heavy:
        shown = ", ".join(heavy[:3]) + (f" and {len(heavy) - 3} more" if len(heavy) > 3 else "")
        return text + f"; {len(heavy)} of {len(layers)} have a significantly heavy tail: {shown}."
    return text + f"; none of the {len(layers)} layers has a significantly heavy tail."


def _affine_text(fits: dict[str, AffineVarianceFit]) -> str:
    fit = fits.get(WHOLE_MODEL)
    if fit is None:
        return "Too few measured steps to test the affine noise model."
    verdict = "consistent with it" if fit.holds else f"not affine ({fit.reason})"
    return (
        f"Affine noise model tr(Sigma) = sigma0^2 + sigma1^2 |G|^2 over {fit.steps} measured "
        f"steps: sigma0^2 = {fmt(fit.sigma0_sq)}, sigma1^2 = {fmt(fit.sigma1_sq)} "
        f"(R^2 {fmt(fit.r_squared, 2)}), {verdict}."
    )


def _layer_fits_text(fits: dict[str, AffineVarianceFit]) -> str:
    layers = _layers(fits)
    if not layers:
        return ""
    failing = [name for name, fit in layers.items() if not fit.holds]
    if not failing:
        return f"Per layer, the affine model is consistent with all {len(layers)} layers."
    shown = ", ".join(failing[:3]) + (f" and {len(failing) - 3} more" if len(failing) > 3 else "")
    return (
        f"Per layer, it fails for {len(failing)} of {len(layers)} (about "
        f"{fmt(0.1 * len(layers), 1)} would by chance at 90%): {shown}."
    )


def overhead_text(run: dict | None) -> str:
    """One sentence on the measured cost of profiling."""
    values = {key: as_number((run or {}).get(key)) for key in OVERHEAD_FIELDS}
    if any(v is None or not math.isfinite(v) for v in values.values()):
        return (
            "The profiling overhead was not measured (the run ended early or had no plain steps)."
        )
    v = values
    return (
        f"Profiling cost {100 * v['overhead_fraction']:.1f}% of the training time: "
        f"{int(v['measured_steps'])} measured steps (one in {int(v['every'])}) took "
        f"{v['measured_step_ratio']:.2f}x the median plain step "
        f"({1000 * v['plain_step_median']:.1f} ms), plus {v['monitor_seconds']:.2f} s "
        f"of monitor work, over {v['train_seconds']:.1f} s of training."
    )
