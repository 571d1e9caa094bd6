r"""``gradnoise calibrate``: measure the critical batch size and set it beside the noise scale.

The noise scale ``B_simple`` *predicts* the critical batch; this command *measures* it, the way
McCandlish et al. (2018, section 2.2 and fig. 5) did:

1. **Fixed-batch runs.** For every batch size ``B`` in ``batches``, AdamW runs with learning rates
   ``lr_ref * sqrt(B / B_ref) * f`` for ``f`` in ``lr_factors`` (the square-root rule as the
   centre of a small grid; every run warms up linearly over ``warmup`` steps), on fresh data
   from the workload's stream, until it reaches the last loss target or spends
   ``budget_factor`` times the reference run's examples. The held-out loss is evaluated every
   ``eval_examples`` examples.
2. **Targets.** The reference run (``B_ref``, ``f = 1``, ``budget_examples`` examples) sets the loss
   targets: its held-out loss at ``target_fractions`` of its budget. The steps a run needs to
   reach a target are read where its held-out curve first crosses it, linearly interpolated
   between evaluations; each batch size keeps its best learning rate per target.
3. **Fit.** For each target, :math:`S(B) = S_\min + E_\min / B` (McCandlish et al. eq. 2.11:
   :math:`S = S_\min (1 + B_\text{crit}/B)`, so :math:`E = E_\min (1 + B/B_\text{crit})` and
   :math:`(S/S_\min - 1)(E/E_\min - 1) = 1`) is fitted by least squares in :math:`1/B`, with
   relative errors (each point weighted by :math:`1/S^2`), giving
   :math:`B_\text{crit} = E_\min / S_\min`. With several seeds the interval is the spread of the
   per-seed fits.
4. **B_simple at the same losses.** The reference run measures GradStats every
   ``measure_every`` steps; ``B_simple(L)`` is the ratio of the means of
   :math:`\mathrm{tr}\,\Sigma` and :math:`\|G\|^2` over the measured steps within 20% of the step
   where that run crossed ``L``.

The output is ``calibration.json`` (every run's curve, the fits and the comparison) and
``calibration.png``; ``gradnoise report`` shows the comparison when the file is present.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.monitor.profile import heldout_loss
from gradnoise.monitor.records import clean
from gradnoise.stats.engine import GradStats
from gradnoise.stats.running import step_estimates
from gradnoise.workloads import Workload, get_workload

__all__ = [
    "CALIBRATION_FILE",
    "CalibrationSettings",
    "Curve",
    "agreement_text",
    "calibrate",
    "crossing_step",
    "fit_critical_batch",
    "plot_calibration",
    "read_calibration",
]

CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class CalibrationSettings:
    """Everything a calibration depends on (the defaults fit the built-in workloads)."""

    workload: str = "markov"
    batches: tuple[int, ...] = (8, 16, 32, 64, 128)
    lr_factors: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    reference_batch: int | None = None  # None: the middle of ``batches``
    reference_lr: float | None = None  # None: the workload's own
    budget_examples: int = 12_800
    budget_factor: float = 3.0
    eval_examples: int = 640
    target_fractions: tuple[float, ...] = (0.5, 0.75, 1.0)
    warmup: int = 20
    measure_every: int = 4
    seeds: tuple[int, ...] = (0,)

    @property
    def reference(self) -> int:
        """The reference batch: ``reference_batch``, or the middle one of ``batches``."""
        if self.reference_batch is not None:
            return self.reference_batch
        ordered = sorted(self.batches)
        return ordered[len(ordered) // 2]


@dataclass
class Curve:
    """One fixed-batch run: held-out loss at the examples (and steps) where it was evaluated."""

    batch: int
    lr: float
    seed: int
    steps: list[int] = field(default_factory=list)
    heldout: list[float] = field(default_factory=list)
    seconds: float = 0.0
    noise: list[tuple[int, float, float]] = field(default_factory=list)  # (step, tr, |G|^2)


def crossing_step(curve: Curve, target: float) -> float | None:
    """The first step where the held-out loss reaches ``target`` (linear interpolation between
    evaluations), or None if it never does."""
    points = list(zip(curve.steps, curve.heldout, strict=True))
    for (s0, l0), (s1, l1) in itertools.pairwise(points):
        if l1 <= target < l0:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    if points and points[0][1] <= target:
        return float(points[0][0])
    return None


def fit_critical_batch(batches: list[int], steps: list[float]) -> dict:
    r"""Fit :math:`S = S_\min + E_\min / B` by least squares on relative errors.

    Returns ``{"s_min", "e_min", "b_crit"}``; ``b_crit`` is NaN when the fit has no positive
    ``S_min`` and ``E_min`` (the data do not follow the hyperbola) or fewer than 3 points.
    """
    nan = {"s_min": math.nan, "e_min": math.nan, "b_crit": math.nan}
    if len(batches) < 3:
        return nan
    x = torch.tensor([[1.0, 1.0 / b] for b in batches], dtype=torch.float64)
    y = torch.tensor(steps, dtype=torch.float64)
    weights = 1.0 / y  # rows scaled by 1/S: least squares on relative residuals
    solution = torch.linalg.lstsq(x * weights[:, None], (y * weights)[:, None]).solution
    s_min, e_min = solution[:, 0].tolist()
    if not (s_min > 0 and e_min > 0):
        return nan
    return {"s_min": s_min, "e_min": e_min, "b_crit": e_min / s_min}


def _schedule(optimizer: torch.optim.Optimizer, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))


def train_curve(
    workload: Workload,
    *,
    lr: float,
    max_examples: int,
    eval_examples: int,
    warmup: int,
    stop_below: float | None = None,
    measure_every: int | None = None,
    seed: int = 0,
) -> Curve:
    """Train ``workload`` with AdamW at a fixed batch and record its held-out curve."""
    batch = 0
    optimizer = torch.optim.AdamW(workload.model.parameters(), lr=lr)
    scheduler = _schedule(optimizer, warmup)
    curve = Curve(batch=0, lr=lr, seed=seed)
    start, examples, next_eval = time.perf_counter(), 0, 0
    for step, data in enumerate(workload.batches):
        batch = data[0].shape[0]
        if examples >= next_eval:
            loss = heldout_loss(workload)
            curve.steps.append(step)
            curve.heldout.append(loss)
            next_eval += eval_examples
            if stop_below is not None and loss <= stop_below:
                break
        if examples >= max_examples:
            break
        measured = measure_every is not None and step % measure_every == measure_every - 1
        if measured:
            with GradStats(workload.model) as stats:
                workload.loss(workload.model, data).backward()
            _, traces, sqs = step_estimates(stats)
            curve.noise.append((step, float(traces.detach().sum()), float(sqs.detach().sum())))
        else:
            workload.loss(workload.model, data).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        examples += batch
    curve.batch, curve.seconds = batch, time.perf_counter() - start
    return curve


def b_simple_at(curve: Curve, step: float) -> float:
    """Ratio of the mean tr(Sigma) and |G|^2 over measured steps within 20% of ``step``."""
    near = [(t, q) for s, t, q in curve.noise if 0.8 * step <= s + 1 <= 1.2 * step]
    if not near:
        return math.nan
    trace = sum(t for t, _ in near) / len(near)
    grad_sq = sum(q for _, q in near) / len(near)
    return trace / grad_sq if grad_sq > 0 else math.nan


def _check(settings: CalibrationSettings) -> None:
    problems = []
    if len(settings.batches) < 3 or any(b < 2 for b in settings.batches):
        problems.append(("--batches", "at least 3 batch sizes, each >= 2", settings.batches))
    if settings.reference not in settings.batches:
        problems.append(("--reference-batch", "one of --batches", settings.reference))
    if not settings.seeds:
        problems.append(("--seeds", "at least one seed", settings.seeds))
    if settings.budget_examples < 4 * settings.eval_examples:
        problems.append(
            ("--budget", f"at least 4 evaluations ({4 * settings.eval_examples} examples)", None)
        )
    if problems:
        where, expected, got = problems[0]
        raise GradNoiseError(
            explain(
                f"gradnoise calibrate {where}",
                expected=expected,
                got=repr(got),
                fix="see `gradnoise calibrate --help` for the defaults",
            )
        )


def _run(settings: CalibrationSettings, batch: int, factor: float, seed: int, **kwargs) -> Curve:
    workload = get_workload(settings.workload, batch_size=batch, seed=seed)
    lr_ref = settings.reference_lr or workload.lr
    lr = lr_ref * math.sqrt(batch / settings.reference) * factor
    return train_curve(
        workload,
        lr=lr,
        eval_examples=settings.eval_examples,
        warmup=settings.warmup,
        seed=seed,
        **kwargs,
    )


def calibrate_seed(
    settings: CalibrationSettings, seed: int, progress: Callable[[str], None]
) -> dict:
    """One seed: the reference run, every other run, and the per-target fits."""
    reference = _run(
        settings,
        settings.reference,
        1.0,
        seed,
        max_examples=settings.budget_examples,
        measure_every=settings.measure_every,
    )
    progress(f"seed {seed}: reference run B={reference.batch} in {reference.seconds:.0f} s")
    targets = _targets(reference, settings)
    runs = [reference]
    for batch in settings.batches:
        for factor in settings.lr_factors:
            if batch == settings.reference and factor == 1.0:
                continue
            curve = _run(
                settings,
                batch,
                factor,
                seed,
                max_examples=int(settings.budget_factor * settings.budget_examples),
                stop_below=min(targets),
            )
            runs.append(curve)
            progress(f"seed {seed}: B={batch} lr={curve.lr:.2g} in {curve.seconds:.0f} s")
    return {"seed": seed, "targets": targets, "runs": runs, "fits": _fits(runs, targets, reference)}


def _targets(reference: Curve, settings: CalibrationSettings) -> list[float]:
    """Held-out losses of the reference run at ``target_fractions`` of its examples."""
    last = reference.steps[-1]
    losses = []
    for fraction in settings.target_fractions:
        index = min(
            range(len(reference.steps)), key=lambda i: abs(reference.steps[i] - fraction * last)
        )
        losses.append(min(reference.heldout[: index + 1]))
    return sorted(set(losses), reverse=True)


def _fits(runs: list[Curve], targets: list[float], reference: Curve) -> list[dict]:
    fits = []
    for target in targets:
        best: dict[int, tuple[float, float]] = {}  # batch -> (steps, lr)
        lrs: dict[int, list[float]] = {}
        for curve in runs:
            lrs.setdefault(curve.batch, []).append(curve.lr)
            step = crossing_step(curve, target)
            if step is not None and step > 0 and step < best.get(curve.batch, (math.inf,))[0]:
                best[curve.batch] = (step, curve.lr)
        batches = sorted(best)
        fit = fit_critical_batch(batches, [best[b][0] for b in batches])
        crossing = crossing_step(reference, target)
        fits.append(
            {
                "target": target,
                "steps": {str(b): best[b][0] for b in batches},
                "best_lr": {str(b): best[b][1] for b in batches},
                # the best rate at the edge of the grid: a wider grid might do better
                "lr_at_edge": [b for b in batches if best[b][1] in (min(lrs[b]), max(lrs[b]))],
                "not_reached": sorted(set(lrs) - set(best)),
                **fit,
                "b_simple": b_simple_at(reference, crossing) if crossing else math.nan,
            }
        )
    return fits


def calibrate(
    settings: CalibrationSettings = CalibrationSettings(),
    *,
    out: str | Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict:
    """Run the calibration (see the module docstring); writes ``calibration.json`` to ``out``."""
    _check(settings)
    start = time.perf_counter()
    per_seed = [calibrate_seed(settings, seed, progress) for seed in settings.seeds]
    result = {
        "kind": "calibration",
        "settings": asdict(settings),
        "seconds": time.perf_counter() - start,
        "seeds": [{**s, "runs": [asdict(r) for r in s["runs"]]} for s in per_seed],
        "summary": summarize(per_seed),
    }
    if out is not None:
        directory = Path(out)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CALIBRATION_FILE).write_text(json.dumps(clean(result), indent=1))
    return result


def read_calibration(directory: str | Path) -> dict | None:
    """``directory/calibration.json`` if present (None otherwise); refuses a corrupt file."""
    path = Path(directory) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
        ok = result.get("kind") == "calibration" and result["summary"] and result["seeds"]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise GradNoiseError(
            explain(
                str(path),
                expected="a calibration written by gradnoise calibrate",
                got="a file that does not parse as one",
                fix="run gradnoise calibrate again, or delete the file",
            )
        )
    return _restore_nan(result)


def _restore_nan(value):
    """JSON nulls back to NaN in the numeric fields the summaries and plots read."""
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {k: _restore_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_nan(v) for v in value]
    return value


def summarize(per_seed: list[dict]) -> list[dict]:
    """Per target level (by index): median and range over seeds of B_crit, B_simple and ratio."""
    rows = []
    for level in range(min(len(s["fits"]) for s in per_seed)):
        fits = [s["fits"][level] for s in per_seed]
        crit = [f["b_crit"] for f in fits]
        simple = [f["b_simple"] for f in fits]
        ratios = [c / b for c, b in zip(crit, simple, strict=True) if b > 0]
        rows.append(
            {
                "target": statistics.median(f["target"] for f in fits),
                "b_crit": _spread(crit),
                "b_simple": _spread(simple),
                "ratio": _spread(ratios),
            }
        )
    return rows


def _spread(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"median": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    return {
        "median": statistics.median(finite),
        "low": min(finite),
        "high": max(finite),
        "n": len(finite),
    }


def plot_calibration(result: dict, path: str | Path) -> Path:
    """Left: steps against examples at each target (points per batch size, the fitted
    hyperbola). Right: the measured critical batch and B_simple at each target loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for level, fit in enumerate(result["seeds"][0]["fits"]):
        color = f"C{level}"
        points = sorted((int(b), s) for b, s in fit["steps"].items())
        left.plot([b * s for b, s in points], [s for _, s in points], "o", color=color)
        for b, s in points:
            left.annotate(str(b), (b * s, s), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if fit.get("b_crit") is not None and math.isfinite(fit["b_crit"]):
            grid = [2 ** (k / 4) for k in range(0, 41)]
            left.plot(
                [b * (fit["s_min"] + fit["e_min"] / b) for b in grid],
                [fit["s_min"] + fit["e_min"] / b for b in grid],
                "-",
                color=color,
                lw=1,
                label=f"loss {fit['target']:.3f}: B_crit {fit['b_crit']:.0f}",
            )
    left.set(xscale="log", yscale="log", xlabel="examples", ylabel="steps")
    left.set_title("Steps vs examples to each loss (fit: S = S_min + E_min / B)", fontsize=9)
    left.legend(fontsize=7)
    rows = result["summary"]
    targets = [r["target"] for r in rows]
    for key, label, marker in (
        ("b_crit", "measured B_crit", "o-"),
        ("b_simple", "B_simple", "s--"),
    ):
        medians = [r[key]["median"] for r in rows]
        low = [r[key]["median"] - r[key]["low"] for r in rows]
        high = [r[key]["high"] - r[key]["median"] for r in rows]
        right.errorbar(targets, medians, yerr=[low, high], fmt=marker, label=label, capsize=3)
    right.invert_xaxis()
    right.set(xlabel="held-out loss target (training goes right)", ylabel="batch size")
    right.set_title("Critical batch vs noise scale (median, range over seeds)", fontsize=9)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def agreement_text(result: dict) -> str:
    """One plain sentence per target on how the measured B_crit and B_simple agree."""
    from gradnoise.monitor.console import fmt

    parts = []
    seeds = len(result["seeds"])
    for row in result["summary"]:
        crit, simple, ratio = row["b_crit"], row["b_simple"], row["ratio"]
        if not ratio["n"]:
            parts.append(f"at loss {fmt(row['target'], 4)} the fit or B_simple is undefined")
            continue
        spread = "" if seeds == 1 else f" (range {fmt(ratio['low'], 2)} to {fmt(ratio['high'], 2)})"
        parts.append(
            f"at loss {fmt(row['target'], 4)} the measured critical batch is {fmt(crit['median'])} "
            f"and B_simple {fmt(simple['median'])}: a ratio of {fmt(ratio['median'], 2)}{spread}"
        )
    largest = max(result["settings"]["batches"])
    beyond = [r for r in result["summary"] if r["b_crit"]["median"] > largest]
    if beyond:
        parts.append(
            f"at {len(beyond)} target(s) the fitted critical batch lies beyond the largest batch "
            f"tried ({largest}), an extrapolation: add larger --batches to pin it down"
        )
    edge = sorted({b for s in result["seeds"] for f in s["fits"] for b in _top_edge(f, s)})
    caveat = (
        f" For batch sizes {', '.join(map(str, edge))} the best learning rate was the largest "
        "of the grid, so their steps may be overestimated: widen --lr-factors to check."
        if edge
        else ""
    )
    return (
        f"Calibration over {seeds} seed(s): " + "; ".join(parts) + ". A ratio near 1 means the "
        "noise scale predicts the batch size past which steps stop falling; McCandlish et al. "
        "found B_simple within a factor of a few of B_crit." + caveat
    )


def _top_edge(fit: dict, seed: dict) -> list[int]:
    """Batch sizes whose best rate for this target was the top of the grid."""
    top: dict[int, float] = {}
    for run in seed["runs"]:
        top[run["batch"]] = max(top.get(run["batch"], 0.0), run["lr"])
    return [int(b) for b, lr in fit["best_lr"].items() if math.isclose(lr, top[int(b)])]
