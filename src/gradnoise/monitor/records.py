"""Metric records: built from one measured step, written as JSON lines, read back tolerantly.

``metrics.jsonl`` holds one ``{"kind": "step", ...}`` record per measured step and, when a run
ends cleanly, one ``{"kind": "run", ...}`` summary (timings, overhead, coverage). Non-finite
floats are written as ``null`` so the file stays standard JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.stats.engine import GradStats
from gradnoise.stats.running import step_estimates

__all__ = [
    "METRICS_FILE",
    "Metrics",
    "as_number",
    "clean",
    "finite_number",
    "read_metrics",
    "step_record",
    "write_line",
]

METRICS_FILE = "metrics.jsonl"


def clean(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``None`` (recursively), ready for JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(item) for item in value]
    return value


def as_number(value) -> float | None:
    """A JSON number as a float (ints beyond float range become +-inf); None, booleans and
    non-numbers give None."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def finite_number(value) -> float | None:
    """:func:`as_number` when it is finite, else None (what a plot or a difference can use)."""
    number = as_number(value)
    return number if number is not None and math.isfinite(number) else None


def _layer_estimates(stats: GradStats) -> dict[str, dict[str, float]]:
    """Per parameter, this batch's unbiased tr(Sigma), |G|^2 and their ratio, the layer GSNR."""
    names, traces, sqs = step_estimates(stats)
    traces, sqs = traces.tolist(), sqs.tolist()
    ratios = [q / t if t > 0 else math.nan for t, q in zip(traces, sqs, strict=True)]
    return {
        "layer_trace": dict(zip(names, traces, strict=True)),
        "layer_grad_sq": dict(zip(names, sqs, strict=True)),
        "gsnr": dict(zip(names, ratios, strict=True)),
    }


def _layer_norms(stats: GradStats) -> dict[str, list[float]]:
    """Per parameter, this batch's per-example gradient norms to 4 significant digits (the
    per-layer tail index needs the samples; 4 digits keep the file about 4x smaller)."""
    per_example = stats.per_example_sq_norms()
    rows = torch.stack(list(per_example.values())).clamp_min(0).sqrt().tolist()
    return {
        name: [float(f"{v:.4g}") for v in row] for name, row in zip(per_example, rows, strict=True)
    }


def step_record(stats: GradStats, reading, *, step: int, loss: float, seconds: float) -> dict:
    """The record of one measured step: this batch's statistics and the running noise scale."""
    batch = stats.noise_scale()
    norms = stats.total_sq_norms().clamp_min(0).sqrt()
    return clean(
        {
            "kind": "step",
            "step": step,
            "time": seconds,
            "loss": loss,
            "batch_size": stats.batch_size,
            "b_simple": reading.b_simple,
            "ci_low": reading.ci_low,
            "ci_high": reading.ci_high,
            "skipped_steps": reading.skipped,
            "b_batch": batch.b_simple,
            "trace_sigma": batch.trace_sigma,
            "grad_sq_norm": batch.grad_sq_norm,
            "layer_noise_scale": dict(reading.per_layer),
            **(_layer_estimates(stats) if stats.batch_size >= 2 else {}),
            "example_norms": [round(v, 6) for v in norms.tolist()],
            "layer_example_norms": _layer_norms(stats),
        }
    )


@dataclass
class Metrics:
    """The contents of a metrics file: step records, the run summary, and skipped lines."""

    steps: list[dict] = field(default_factory=list)
    run: dict | None = None
    skipped: int = 0

    @property
    def batch_size(self) -> int:
        return int(self.steps[-1].get("batch_size") or 0)


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or record.get("kind") not in ("step", "run"):
        return None
    if record["kind"] == "step" and not isinstance(record.get("step"), int):
        return None
    return record


_NUMBER_FIELDS = (
    "time",
    "loss",
    "heldout_loss",
    "b_simple",
    "ci_low",
    "ci_high",
    "b_batch",
    "trace_sigma",
    "grad_sq_norm",
)
_RUN_NUMBER_FIELDS = (
    "train_seconds",
    "monitor_seconds",
    "plain_step_median",
    "measured_step_median",
    "overhead_seconds",
    "overhead_fraction",
    "measured_step_ratio",
    "report_seconds",
    "loss_floor",
)


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _is_count(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _bad_field(record: dict) -> tuple[str, str] | None:
    """The first field of ``record`` whose JSON type the report cannot use, and what it needs."""
    numbers = _NUMBER_FIELDS if record["kind"] == "step" else _RUN_NUMBER_FIELDS
    for key in numbers:
        if not _is_number(record.get(key)):
            return key, "a number or null"
    counts = ("batch_size", "skipped_steps") if record["kind"] == "step" else ("steps", "every")
    for key in counts + (("skipped_steps",) if record["kind"] == "run" else ()):
        if not _is_count(record.get(key)):
            return key, "an integer or null"
    if record["kind"] == "run":
        coverage = record.get("coverage")
        if coverage is not None and not isinstance(coverage, dict):
            return "coverage", "an object {parameter: how}"
        return None
    for key in ("gsnr", "layer_noise_scale", "layer_trace", "layer_grad_sq"):
        value = record.get(key, {})
        if not isinstance(value, dict) or not all(_is_number(v) for v in value.values()):
            return key, "an object {parameter: number or null}"
    norms = record.get("example_norms", [])
    if not _is_number_list(norms):
        return "example_norms", "a list of numbers"
    layers = record.get("layer_example_norms", {})
    if not isinstance(layers, dict) or not all(_is_number_list(v) for v in layers.values()):
        return "layer_example_norms", "an object {parameter: list of numbers}"
    return None


def _is_number_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_number(v) for v in value)


def _check_types(path: Path, number: int, record: dict) -> None:
    bad = _bad_field(record)
    if bad is None:
        return
    key, expected = bad
    raise GradNoiseError(
        explain(
            f"{path}, line {number}, field {key!r}",
            expected=expected,
            got=f"{json.dumps(record[key])[:60]} ({type(record[key]).__name__})",
            fix=f"fix or delete line {number} (files written by gradnoise never hold this)",
        )
    )


def read_metrics(directory: str | Path) -> Metrics:
    """Read ``directory/metrics.jsonl``; corrupt lines are skipped and counted, never fatal.

    A line that parses but holds a field of the wrong JSON type (a string where a number
    belongs) is refused with an error naming the file, the line and the field.
    """
    path = Path(directory) / METRICS_FILE
    if not path.is_file():
        raise GradNoiseError(
            explain(
                f"gradnoise report {directory}",
                expected=f"a directory that holds {METRICS_FILE}",
                got="a directory without it" if Path(directory).is_dir() else "no such directory",
                fix="pass the --out directory of a `gradnoise profile` run or of a Monitor",
            )
        )
    metrics = Metrics()
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            metrics.skipped += 1
            continue
        _check_types(path, number, record)
        if record["kind"] == "run":
            metrics.run = record
        else:
            metrics.steps.append(record)
    if not metrics.steps:
        raise GradNoiseError(
            explain(
                f"gradnoise report {directory}",
                expected=f"at least one step record in {METRICS_FILE}",
                got=f"none ({metrics.skipped} unreadable lines)",
                fix="run more steps than --every so that at least one step is measured",
            )
        )
    return metrics


def write_line(handle, record: dict) -> None:
    """Append one record as a JSON line and flush, so a crash loses at most the current line."""
    handle.write(json.dumps(clean(record), allow_nan=False) + "\n")
    handle.flush()
