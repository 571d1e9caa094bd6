import json
import math

import pytest

from gradnoise.errors import GradNoiseError
from gradnoise.monitor.records import clean, read_metrics
from gradnoise.monitor.report import write_report


def _step(step, **extra):
    record = {
        "kind": "step",
        "step": step,
        "time": 0.1 * step,
        "loss": 2.0 - 0.1 * step,
        "batch_size": 8,
        "b_simple": 10.0 + step,
        "ci_low": 11.0,
        "ci_high": math.inf,
        "b_batch": 9.0,
        "trace_sigma": 1.0,
        "grad_sq_norm": 0.1,
        "gsnr": {"w": 0.1, "b": 2.0},
        "example_norms": [1.0, 2.0, 3.0],
    }
    return json.dumps(clean(record | extra))


def _write(directory, lines):
    directory.mkdir(exist_ok=True)
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def test_clean_turns_non_finite_floats_into_null_recursively():
    assert clean({"a": math.nan, "b": [math.inf, 1.0], "c": "x"}) == {
        "a": None,
        "b": [None, 1.0],
        "c": "x",
    }


def test_corrupt_lines_are_skipped_and_counted_and_the_rest_is_kept(tmp_path):
    lines = [
        _step(1),
        "{not json",
        '["a list"]',
        '{"kind": "step", "step": "x"}',
        "",
        '{"kind": "other"}',
        _step(2),
        '{"kind": "run", "every": 1}',
        _step(3)[:20],
    ]
    metrics = read_metrics(_write(tmp_path / "m", lines))
    assert [r["step"] for r in metrics.steps] == [1, 2]
    assert metrics.skipped == 5 and metrics.run == {"kind": "run", "every": 1}


def test_report_rerenders_and_mentions_skipped_lines(tmp_path):
    directory = _write(tmp_path / "m", [_step(1), "garbage", _step(2), _step(3)])
    html = write_report(directory).read_text()
    assert "1 unreadable line(s) of metrics.jsonl were skipped" in html
    assert html.count("data:image/png;base64,") == 5
    assert "batch size 8 is below the band of the measured noise scale" in html


def test_a_directory_without_metrics_is_refused(tmp_path):
    with pytest.raises(
        GradNoiseError,
        match=r"report .*: expected a directory that holds "
        r"metrics.jsonl, got a directory without it\. Pass the --out",
    ):
        read_metrics(tmp_path)


def test_a_missing_directory_is_refused(tmp_path):
    with pytest.raises(GradNoiseError, match=r"got no such directory"):
        read_metrics(tmp_path / "nope")


def test_metrics_without_any_step_record_are_refused(tmp_path):
    directory = _write(tmp_path / "m", ["oops", '{"kind": "run"}'])
    with pytest.raises(
        GradNoiseError,
        match=r"expected at least one step record in metrics.jsonl, "
        r"got none \(1 unreadable lines\)\. Run more steps than --every",
    ):
        read_metrics(directory)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("loss", "1.5", "expected a number or null"),
        ("batch_size", "8", "expected an integer or null"),
        ("gsnr", [0.1, 0.2], "expected an object {parameter: number or null}"),
        ("example_norms", 3.0, "expected a list of numbers"),
        ("b_simple", {"x": 1}, "expected a number or null"),
        ("layer_noise_scale", {"w": "big"}, "expected an object {parameter: number or null}"),
    ],
)
def test_a_field_of_the_wrong_json_type_names_file_line_and_field(tmp_path, field, value, expected):
    directory = _write(tmp_path / "run", [_step(1), _step(3, **{field: value})])
    with pytest.raises(GradNoiseError) as info:
        write_report(directory)
    message = str(info.value)
    assert f"metrics.jsonl, line 2, field '{field}': {expected}, got" in message
    assert "Fix or delete line 2" in message
    assert not (directory / "report.html").exists()


def test_a_run_record_of_the_wrong_json_type_is_refused(tmp_path):
    run = json.dumps({"kind": "run", "steps": "8", "coverage": {}})
    directory = _write(tmp_path / "run", [_step(1), run])
    with pytest.raises(GradNoiseError, match=r"line 2, field 'steps': expected an integer"):
        read_metrics(directory)
