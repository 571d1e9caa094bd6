"""Property-based fuzzing of the report reader: random ``metrics.jsonl`` files.

Strategies (hypothesis, derandomized; see tests/README.md):

* **valid records**: step records with every field a gradnoise run writes (numbers or null,
  per-layer objects, per-example norms) and run records with the timing fields, coverage and
  metadata; sometimes with extra unknown fields;
* **wrong types**: one field of a valid record replaced by a JSON value of another type (string,
  bool, list, object, null where an object belongs), or removed;
* **odd numbers**: NaN and Infinity literals (which Python's json accepts), integers beyond a
  float's range, -0.0, 1e308;
* **unreadable lines**: text that is not JSON, JSON that is not an object, objects without a
  known ``kind``, step records without an integer ``step``, invalid UTF-8, blank lines.

Asserted: ``read_metrics`` either raises ``GradNoiseError`` or returns exactly the readable
records in file order (the run record last seen, the others skipped and counted); a record whose
checked field has the wrong JSON type is refused with an error naming its line and field; and
whatever the reader accepts, ``render_html`` (the report's text) renders and a sample of files
goes through ``write_report`` with its plots, without any exception other than
``GradNoiseError``.

Properties that fail today are ``known_bug`` tests (strict xfails listed with reproducers in
tests/README.md).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gradnoise.errors import GradNoiseError
from gradnoise.monitor.records import METRICS_FILE, read_metrics
from gradnoise.monitor.report import render_html, write_report
from tests.fuzz import fuzz_settings

NAMES = ["0.weight", "0.bias", "head.weight"]
STEP_NUMBERS = ["time", "loss", "b_simple", "ci_low", "ci_high", "b_batch", "trace_sigma"]
STEP_NUMBERS += ["grad_sq_norm", "heldout_loss"]
STEP_COUNTS = ["batch_size", "skipped_steps"]
STEP_LAYERS = ["gsnr", "layer_noise_scale", "layer_trace", "layer_grad_sq"]
RUN_NUMBERS = ["train_seconds", "monitor_seconds", "plain_step_median", "measured_step_median"]
RUN_NUMBERS += ["overhead_seconds", "overhead_fraction", "measured_step_ratio", "report_seconds"]
RUN_NUMBERS += ["loss_floor"]
RUN_COUNTS = ["steps", "every", "skipped_steps"]

number = st.floats(-1e6, 1e6, allow_nan=False)
maybe_number = st.one_of(st.none(), number)
odd_number = st.sampled_from([math.nan, math.inf, -math.inf, 10**400, -(10**400), -0.0, 1e308])
wrong = st.one_of(
    st.text(max_size=4),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=2),
)


@st.composite
def step_records(draw, step: int) -> dict:
    record = {"kind": "step", "step": step, "batch_size": draw(st.integers(1, 512))}
    for key in STEP_NUMBERS:
        record[key] = draw(maybe_number)
    for key in STEP_LAYERS:
        names = draw(st.lists(st.sampled_from(NAMES), unique=True))
        record[key] = {name: draw(maybe_number) for name in names}
    record["example_norms"] = draw(st.lists(st.floats(0, 1e3), max_size=6))
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3))
    record["layer_example_norms"] = {
        name: draw(st.lists(st.floats(0, 1e3), max_size=6)) for name in names
    }
    return record


@st.composite
def run_records(draw) -> dict:
    record = {
        "kind": "run",
        "steps": draw(st.integers(0, 10**4)),
        "every": draw(st.integers(1, 50)),
    }
    record.update(
        skipped_steps=draw(st.integers(0, 5)),
        plain_steps=draw(st.integers(0, 100)),
        measured_steps=draw(st.integers(0, 100)),
        workload=draw(st.sampled_from(["custom", "charlm", "images"])),
        coverage={name: draw(st.sampled_from(["linear", "frozen"])) for name in NAMES},
    )
    for key in RUN_NUMBERS:
        record[key] = draw(st.floats(0, 1e4) if key != "overhead_fraction" else maybe_number)
    if record["overhead_fraction"] is None and draw(st.booleans()):
        del record["measured_step_ratio"]  # a run without plain steps has no ratio
    return record


def _mutate(record: dict, draw) -> tuple[dict, str]:
    """One field (not ``kind`` or ``step``) changed to another JSON type, or removed."""
    record = dict(record)
    key = draw(st.sampled_from(sorted(k for k in record if k not in ("kind", "step"))))
    if draw(st.integers(0, 3)) == 0:
        del record[key]  # a missing field reads as null
    else:
        record[key] = draw(wrong)
    return record, key


def _refused_field(record: dict, key: str) -> str | None:
    """``key`` if the reader must refuse its value: a checked field of an undocumented type."""
    if key in record and key in _checked_fields(record["kind"]):
        return None if _fits(key, record[key], record["kind"]) else key
    return None


def _checked_fields(kind: str) -> set[str]:
    if kind == "step":
        return {*STEP_NUMBERS, *STEP_COUNTS, *STEP_LAYERS, "example_norms", "layer_example_norms"}
    return {*RUN_NUMBERS, *RUN_COUNTS, "coverage"}


def _fits(key: str, value, kind: str) -> bool:
    """Whether ``value`` is of a JSON type the report documents for ``key``."""
    is_num = lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))  # noqa: E731
    if key in (*STEP_COUNTS, *RUN_COUNTS):
        return value is None or (isinstance(value, int) and not isinstance(value, bool))
    if key in STEP_LAYERS:
        return isinstance(value, dict) and all(is_num(v) for v in value.values())
    if key == "example_norms":
        return isinstance(value, list) and all(is_num(v) for v in value)
    if key == "layer_example_norms":
        return isinstance(value, dict) and all(
            isinstance(v, list) and all(is_num(x) for x in v) for v in value.values()
        )
    if key == "coverage":
        return value is None or isinstance(value, dict)
    return is_num(value)


def _unreadable(draw) -> bytes:
    return draw(
        st.sampled_from(
            [
                b"{not json",
                b"[1, 2, 3]",
                b'"a string"',
                b"42",
                b"null",
                b'{"kind": "other", "step": 1}',
                b'{"step": 3}',
                b'{"kind": "step", "step": "3"}',
                b'{"kind": "step", "step": 2.5}',
                b'{"kind": "step"}',
                b"\xff\xfe\x00garbage",
                b'{"kind": "step", "step": 1',
            ]
        )
    )


@st.composite
def metric_files(draw):
    """``(lines as bytes, expected)``: ``("refused", line, field)`` or ``("read", steps, run,
    skipped)`` with the records the reader must return."""
    lines, steps, run, skipped, refusal = [], [], None, 0, None
    for line_no in range(1, draw(st.integers(0, 8)) + 1):
        kind = draw(st.sampled_from(["step"] * 4 + ["run", "wrong", "odd", "unreadable", "blank"]))
        if kind == "blank":
            lines.append(b"   ")
            continue
        if kind == "unreadable":
            lines.append(_unreadable(draw))
            skipped += 1
            continue
        record = (
            draw(run_records())
            if draw(st.integers(0, 3)) == 0
            else draw(step_records(draw(st.integers(0, 10**6))))
        )
        if draw(st.integers(0, 4)) == 0:
            record["extra_field"] = draw(st.one_of(number, st.text(max_size=3)))
        if kind == "wrong":
            record, key = _mutate(record, draw)
        elif kind == "odd":
            keys = [k for k in record if k in _checked_fields(record["kind"])]
            key = draw(
                st.sampled_from(
                    [k for k in keys if k not in ("coverage", "layer_example_norms", *STEP_LAYERS)]
                )
            )
            if key == "example_norms":
                record[key] = [draw(odd_number)]
            else:
                record[key] = draw(odd_number)
        else:
            key = None
        field = None if key is None else _refused_field(record, key)
        if field is not None and refusal is None:
            refusal = (line_no, field)
        lines.append(json.dumps(record).encode())
        if record["kind"] == "run":
            run = record
        else:
            steps.append(record)
    if refusal is not None:
        return lines, ("refused", *refusal)
    return lines, ("read", steps, run, skipped)


def _write(directory: Path, lines: list[bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / METRICS_FILE).write_bytes(b"\n".join(lines) + b"\n")
    return directory


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@fuzz_settings(250)
@given(metric_files())
def test_the_reader_returns_the_records_or_a_gradnoise_error(tmp_path_factory, case):
    lines, expected = case
    directory = _write(tmp_path_factory.mktemp("run"), lines)
    if expected[0] == "refused":
        _, line, field = expected
        with pytest.raises(GradNoiseError, match=rf"line {line}, field {re.escape(repr(field))}"):
            read_metrics(directory)
        return
    _, steps, run, skipped = expected
    if not steps:
        with pytest.raises(GradNoiseError, match="at least one step record"):
            read_metrics(directory)
        return
    metrics = read_metrics(directory)
    assert _same(metrics.steps, steps) and _same(metrics.run, run)
    assert metrics.skipped == skipped


@fuzz_settings(250, shrink=False)
@given(metric_files())
@example(
    case=([b'{"kind": "step", "step": 1, "batch_size": 32, "loss": 1' + b"0" * 400 + b"}"], None)
)
def test_whatever_the_reader_accepts_renders(tmp_path_factory, case):
    lines, _ = case
    directory = _write(tmp_path_factory.mktemp("run"), lines)
    try:
        metrics = read_metrics(directory)
        page = render_html(metrics, {})
    except GradNoiseError:
        return
    assert page.startswith("<!DOCTYPE html>")


@fuzz_settings(12, shrink=False)
@given(metric_files())
@example(
    case=([b'{"kind": "step", "step": 1, "batch_size": 32, "example_norms": [Infinity]}'], None)
)
def test_accepted_files_render_a_full_report_with_plots(tmp_path_factory, case):
    lines, _ = case
    directory = _write(tmp_path_factory.mktemp("run"), lines)
    try:
        path = write_report(directory)
    except GradNoiseError:
        return
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


@fuzz_settings(30)
@given(st.sampled_from(["missing", "file", "dir-named-metrics"]))
def test_a_directory_without_a_readable_metrics_file_is_refused(tmp_path_factory, how):
    base = tmp_path_factory.mktemp("run")
    if how == "file":
        (base / "plain").write_text("x")
        target = base / "plain"
    elif how == "dir-named-metrics":
        (base / METRICS_FILE).mkdir()
        target = base
    else:
        target = base / "nope"
    with pytest.raises(GradNoiseError):
        read_metrics(target)
