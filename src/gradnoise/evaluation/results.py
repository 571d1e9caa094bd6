"""Evaluation results files: JSON lines, one scored unit per line, read tolerantly.

Each non-blank line is one JSON object::

    {"item": "q17", "score": 0.5}                          one score per item
    {"item": "q17", "seed": 2, "score": 1}                 one per item and seed
    {"item": "q17", "sample": 4, "correct": true}          samples, for pass@k
    {"item": "q17", "system": "baseline", "score": 0}      several systems in one file

* ``item`` (required): a string or an integer; ids are compared as text (``1`` and ``"1"`` are
  the same item).
* ``score`` (a finite number) or ``correct`` (``true`` / ``false`` / ``0`` / ``1``, read as
  1.0 / 0.0): at least one; ``score`` wins when both are given.
* ``system`` (optional string), ``seed`` (optional string or integer), ``sample`` (optional
  integer): which system, seed and sample produced the score. Other fields are ignored.

A line that cannot be used (not JSON, not an object, a missing or wrong-typed field, a
non-finite score, invalid UTF-8, a repeat of an earlier line's system / item / seed / sample)
is skipped and counted, with its line number and reason kept for the first
:data:`KEPT_PROBLEMS`; it never stops the reading. A file with no usable line is an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from gradnoise.errors import GradNoiseError, explain

__all__ = ["KEPT_PROBLEMS", "EvaluationResults", "Record", "parse_record", "read_results"]

KEPT_PROBLEMS = 5


@dataclass(frozen=True)
class Record:
    """One scored unit: ``system`` ("" when the file names none), ``item``, ``seed`` and
    ``sample`` (None when not given; a seed is kept as text), ``score``, and its ``line``."""

    system: str
    item: str
    seed: str | None
    sample: int | None
    score: float
    line: int

    @property
    def key(self) -> tuple:
        return (self.system, self.item, self.seed, self.sample)


@dataclass
class EvaluationResults:
    """The usable records of one file, in file order, and what was skipped.

    ``skipped`` counts the unusable lines; ``problems`` holds ``(line, reason)`` of the first
    :data:`KEPT_PROBLEMS` of them.
    """

    path: Path
    records: list[Record] = field(default_factory=list)
    skipped: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)

    @property
    def systems(self) -> list[str]:
        """System names in order of first appearance ("" for records that name none)."""
        return list(dict.fromkeys(record.system for record in self.records))

    def of(self, system: str) -> list[Record]:
        """The records of one system."""
        return [record for record in self.records if record.system == system]


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer beyond a float
        return math.inf


def _score(record: dict) -> float | str:
    """The record's score, or the reason it has none."""
    if "score" in record:
        score = _number(record["score"])
        if score is None:
            return f"'score' is {type(record['score']).__name__}, not a number"
        return score if math.isfinite(score) else "'score' is not finite"
    if "correct" in record:
        correct = record["correct"]
        if correct in (True, False, 0, 1) and not isinstance(correct, float):
            return float(correct)
        return f"'correct' is {json.dumps(correct)[:30]}, not true/false/0/1"
    return "no 'score' or 'correct' field"


def _text_id(record: dict, name: str, *, integer_ok: bool) -> str | None:
    value = record.get(name)
    if value is None or (isinstance(value, str) and value):
        return value
    if integer_ok and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{name!r} is {json.dumps(value)[:30]}, not a non-empty string")


def parse_record(text: str, line: int) -> Record | str:
    """One line as a :class:`Record`, or the reason it cannot be used."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return "not JSON"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if "item" not in record or record["item"] is None:
        return "no 'item' field"
    try:
        item = _text_id(record, "item", integer_ok=True)
        seed = _text_id(record, "seed", integer_ok=True)
        system = _text_id(record, "system", integer_ok=False) or ""
    except ValueError as reason:
        return str(reason)
    sample = record.get("sample")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int)):
        return f"'sample' is {json.dumps(sample)[:30]}, not an integer"
    score = _score(record)
    if isinstance(score, str):
        return score
    return Record(system, item, seed, sample, score, line)


def _lines(path: Path) -> list[bytes]:
    try:
        return path.read_bytes().split(b"\n")
    except OSError as error:
        raise GradNoiseError(
            explain(
                f"results file {str(path)!r}",
                expected="a readable JSON-lines file",
                got=error.strerror or str(error),
                fix="pass the path of a .jsonl file with one scored item per line",
            )
        ) from error


def read_results(path: str | Path) -> EvaluationResults:
    """Read a results file (module docstring); unusable lines are skipped and counted."""
    path = Path(path)
    if path.is_dir():
        raise GradNoiseError(
            explain(
                f"results file {str(path)!r}",
                expected="a file",
                got="a directory",
                fix="pass the path of the .jsonl file itself",
            )
        )
    results, seen = EvaluationResults(path), {}
    for number, raw in enumerate(_lines(path), start=1):
        if not raw.strip():
            continue
        try:
            parsed = parse_record(raw.decode("utf-8"), number)
        except UnicodeDecodeError:
            parsed = "not UTF-8"
        if isinstance(parsed, Record) and parsed.key in seen:
            parsed = f"repeats line {seen[parsed.key]} (same system, item, seed and sample)"
        if isinstance(parsed, str):
            results.skipped += 1
            if len(results.problems) < KEPT_PROBLEMS:
                results.problems.append((number, parsed))
            continue
        seen[parsed.key] = number
        results.records.append(parsed)
    if not results.records:
        first = "".join(f"; line {n}: {why}" for n, why in results.problems[:1])
        raise GradNoiseError(
            explain(
                f"results file {str(path)!r}",
                expected='at least one usable line such as {"item": "q1", "score": 1.0}',
                got=f"none ({results.skipped} unusable line(s){first})",
                fix="write one JSON object per line with an 'item' and a 'score' or 'correct'",
            )
        )
    return results
