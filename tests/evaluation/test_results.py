"""Reading results files: the schema, skipped-and-counted lines, and the errors."""

import json

import pytest

from gradnoise.errors import GradNoiseError
from gradnoise.evaluation import Record, read_results
from gradnoise.evaluation.results import KEPT_PROBLEMS


def _write(path, lines):
    path.write_bytes(
        b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines)
    )
    return path


def test_every_documented_form_is_read(tmp_path):
    lines = [
        json.dumps({"item": "q1", "score": 0.5}),
        json.dumps({"item": 2, "seed": 3, "score": 1}),
        json.dumps({"item": "q3", "sample": 4, "correct": True}),
        json.dumps({"item": "q4", "system": "base", "correct": 0, "extra": [1, 2]}),
        json.dumps({"item": "q5", "score": 0.25, "correct": True}),  # score wins
        "",
        "   ",
    ]
    results = read_results(_write(tmp_path / "r.jsonl", lines))
    assert results.skipped == 0 and results.problems == []
    assert results.records == [
        Record("", "q1", None, None, 0.5, 1),
        Record("", "2", "3", None, 1.0, 2),
        Record("", "q3", None, 4, 1.0, 3),
        Record("base", "q4", None, None, 0.0, 4),
        Record("", "q5", None, None, 0.25, 5),
    ]
    assert results.systems == ["", "base"]
    assert [r.item for r in results.of("base")] == ["q4"]


BAD = [
    ("not json", "not JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"score": 1}', "no 'item' field"),
    ('{"item": null, "score": 1}', "no 'item' field"),
    ('{"item": 1.5, "score": 1}', "'item' is 1.5, not a non-empty string"),
    ('{"item": "", "score": 1}', "'item' is \"\", not a non-empty string"),
    ('{"item": true, "score": 1}', "'item' is true, not a non-empty string"),
    ('{"item": 1}', "no 'score' or 'correct' field"),
    ('{"item": 1, "score": "0.5"}', "'score' is str, not a number"),
    ('{"item": 1, "score": true}', "'score' is bool, not a number"),
    ('{"item": 1, "score": NaN}', "'score' is not finite"),
    ('{"item": 1, "score": Infinity}', "'score' is not finite"),
    ('{"item": 1, "score": 1' + "0" * 400 + "}", "'score' is not finite"),
    ('{"item": 1, "correct": 2}', "'correct' is 2, not true/false/0/1"),
    ('{"item": 1, "correct": 1.0}', "'correct' is 1.0, not true/false/0/1"),
    ('{"item": 1, "correct": "yes"}', "'correct' is \"yes\", not true/false/0/1"),
    ('{"item": 1, "seed": 1.5, "score": 1}', "'seed' is 1.5, not a non-empty string"),
    ('{"item": 1, "system": 3, "score": 1}', "'system' is 3, not a non-empty string"),
    ('{"item": 1, "sample": "a", "score": 1}', "'sample' is \"a\", not an integer"),
    ('{"item": 1, "sample": true, "score": 1}', "'sample' is true, not an integer"),
    (b'{"item": "\xff", "score": 1}', "not UTF-8"),
]


@pytest.mark.parametrize(("line", "reason"), BAD, ids=[reason for _, reason in BAD])
def test_a_malformed_line_is_skipped_with_its_reason(tmp_path, line, reason):
    good = json.dumps({"item": "ok", "score": 1.0})
    results = read_results(_write(tmp_path / "r.jsonl", [good, line, good.replace("ok", "ok2")]))
    assert [r.item for r in results.records] == ["ok", "ok2"]
    assert results.skipped == 1 and results.problems == [(2, reason)]


def test_repeats_are_skipped_and_counted_and_only_the_first_problems_are_kept(tmp_path):
    good = json.dumps({"item": 1, "seed": 0, "score": 1.0})
    lines = [good, good, json.dumps({"item": "1", "seed": "0", "score": 0.0})]
    lines += ["bad"] * 10 + [json.dumps({"item": 1, "seed": 1, "score": 0.0})]
    results = read_results(_write(tmp_path / "r.jsonl", lines))
    assert len(results.records) == 2 and results.skipped == 12
    assert len(results.problems) == KEPT_PROBLEMS
    assert results.problems[:2] == [
        (2, "repeats line 1 (same system, item, seed and sample)"),
        (3, "repeats line 1 (same system, item, seed and sample)"),
    ]


def test_a_file_with_nothing_usable_is_an_error(tmp_path):
    path = _write(tmp_path / "bad.jsonl", ["nope", '{"item": 1}'])
    with pytest.raises(
        GradNoiseError,
        match=r"results file '.*bad\.jsonl': expected at least one usable line such as "
        r'\{"item": "q1", "score": 1\.0\}, got none \(2 unusable line\(s\); line 1: not JSON\)\. '
        r"Write one JSON object per line",
    ):
        read_results(path)


def test_an_empty_file_is_an_error(tmp_path):
    with pytest.raises(GradNoiseError, match=r"got none \(0 unusable line\(s\)\)\. Write one"):
        read_results(_write(tmp_path / "empty.jsonl", [b""]))


def test_a_missing_file_and_a_directory_are_errors(tmp_path):
    with pytest.raises(
        GradNoiseError,
        match=r"results file '.*missing\.jsonl': expected a readable JSON-lines file, got No "
        r"such file or directory\. Pass the path of a \.jsonl file",
    ):
        read_results(tmp_path / "missing.jsonl")
    with pytest.raises(
        GradNoiseError,
        match=r"results file '.*': expected a file, got a directory\. Pass the path of the",
    ):
        read_results(tmp_path)
