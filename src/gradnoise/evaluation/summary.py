"""From results files to every interval that applies: what ``gradnoise evaluate`` prints.

Per system: an item's score is the mean of its records (over seeds and samples); the benchmark
score is the mean over items, with a bootstrap interval over items. With two or more seeds, the
per-seed scores (over the items scored under every seed) get a t interval over seeds, and the
(items, seeds) matrix its variance components. With ``sample`` fields and 0/1 scores, pass@k for
every requested k that each item has samples for. With two systems, their paired comparison on
the items both were scored on.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from gradnoise.errors import GradNoiseError, check_confidence, explain
from gradnoise.evaluation.checks import check_resamples
from gradnoise.evaluation.intervals import (
    Interval,
    VarianceComponents,
    bootstrap_interval,
    seed_interval,
    variance_components,
)
from gradnoise.evaluation.paired import PairedComparison, paired_comparison
from gradnoise.evaluation.passk import PassAtK, pass_at_k_interval
from gradnoise.evaluation.results import EvaluationResults, Record

__all__ = ["Comparison", "Evaluation", "SystemSummary", "item_scores", "summarize"]


@dataclass
class SystemSummary:
    """Everything measured for one system; a part that does not apply is None (or empty)
    and ``notes`` says why."""

    name: str
    records: int
    items: Interval | None
    seeds: Interval | None = None
    per_seed: dict[str, float] = field(default_factory=dict)
    components: VarianceComponents | None = None
    pass_at_k: list[PassAtK] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Comparison:
    """System ``a`` against ``b`` on the ``result.n`` items they share."""

    a: str
    b: str
    result: PairedComparison | None
    only_a: int
    only_b: int
    note: str | None = None


@dataclass
class Evaluation:
    """A summary of one or two results files."""

    systems: list[SystemSummary]
    comparison: Comparison | None
    skipped: dict[str, int]
    problems: dict[str, list[tuple[int, str]]]
    notes: list[str] = field(default_factory=list)


def item_scores(records: list[Record]) -> dict[str, float]:
    """Each item's mean score over its records (seeds and samples), in first-seen order."""
    sums: dict[str, list[float]] = defaultdict(list)
    for record in records:
        sums[record.item].append(record.score)
    return {item: sum(values) / len(values) for item, values in sums.items()}


def _seed_matrix(records: list[Record]) -> tuple[list[str], list[str], torch.Tensor, int]:
    """Seeds, the items scored under all of them, their (items, seeds) mean scores, and how
    many items were left out for missing a seed."""
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for record in records:
        cells[(record.item, record.seed)].append(record.score)
    seeds = list(dict.fromkeys(record.seed for record in records))
    items = list(dict.fromkeys(record.item for record in records))
    complete = [item for item in items if all((item, seed) in cells for seed in seeds)]
    rows = [[sum(cells[i, s]) / len(cells[i, s]) for s in seeds] for i in complete]
    matrix = torch.tensor(rows, dtype=torch.float64).reshape(len(complete), len(seeds))
    return seeds, complete, matrix, len(items) - len(complete)


def _seed_parts(summary: SystemSummary, records: list[Record], confidence: float) -> None:
    if any(record.seed is None for record in records):
        if any(record.seed is not None for record in records):
            summary.notes.append("some records have no seed: no per-seed analysis")
        return
    seeds, complete, matrix, dropped = _seed_matrix(records)
    if len(seeds) < 2:
        return
    if dropped:
        summary.notes.append(f"{dropped} item(s) lack a seed: left out of the per-seed analysis")
    if len(complete) < 1:
        summary.notes.append("no item is scored under every seed: no per-seed analysis")
        return
    per_seed = matrix.mean(0)
    summary.per_seed = dict(zip(seeds, per_seed.tolist(), strict=True))
    summary.seeds = seed_interval(per_seed, confidence=confidence)
    if len(complete) >= 2:
        summary.components = variance_components(matrix, confidence=confidence)


def _pass_parts(
    summary: SystemSummary, records: list[Record], ks: tuple[int, ...], confidence: float
) -> None:
    if not any(record.sample is not None for record in records):
        return
    if any(record.score not in (0.0, 1.0) for record in records):
        summary.notes.append("scores are not all 0/1: no pass@k")
        return
    n: dict[str, int] = defaultdict(int)
    c: dict[str, int] = defaultdict(int)
    for record in records:
        n[record.item] += 1
        c[record.item] += int(record.score)
    fewest = min(n.values())
    usable = [k for k in ks if k <= fewest]
    if len(usable) < len(ks):
        left = ", ".join(str(k) for k in ks if k > fewest)
        summary.notes.append(f"pass@k for k = {left} needs that many samples per item ({fewest})")
    if len(n) < 2:
        summary.notes.append("pass@k needs at least 2 items for its error")
        return
    items = list(n)
    summary.pass_at_k = [
        pass_at_k_interval([n[i] for i in items], [c[i] for i in items], k, confidence=confidence)
        for k in usable
    ]


def _summarize_system(
    name: str, records: list[Record], ks: tuple[int, ...], settings: dict
) -> SystemSummary:
    scores = item_scores(records)
    summary = SystemSummary(name=name, records=len(records), items=None)
    if len(scores) >= 2:
        summary.items = bootstrap_interval(list(scores.values()), **settings)
    else:
        summary.notes.append("only one item: no interval over items")
    _seed_parts(summary, records, settings["confidence"])
    _pass_parts(summary, records, ks, settings["confidence"])
    return summary


def _compare(a: str, b: str, records: dict[str, list[Record]], settings: dict) -> Comparison:
    score_a, score_b = item_scores(records[a]), item_scores(records[b])
    shared = [item for item in score_a if item in score_b]
    only_a, only_b = len(score_a) - len(shared), len(score_b) - len(shared)
    if len(shared) < 2:
        note = f"{len(shared)} shared item(s): a paired comparison needs at least 2"
        return Comparison(a, b, None, only_a, only_b, note)
    result = paired_comparison(
        [score_a[i] for i in shared], [score_b[i] for i in shared], **settings
    )
    return Comparison(a, b, result, only_a, only_b)


def _named(results: EvaluationResults, other: EvaluationResults | None):
    """``{display name: records}`` of every system; with ``other``, one system per file."""
    if other is None:
        name = results.path.stem
        return {system or name: results.of(system) for system in results.systems}
    names = []
    for part in (results, other):
        if len(part.systems) != 1:
            raise GradNoiseError(
                explain(
                    f"--compare with {str(part.path)!r}",
                    expected="one system per file",
                    got=f"systems {', '.join(map(repr, part.systems))}",
                    fix="compare two systems of one file with --systems A,B",
                )
            )
        names.append(part.systems[0] or part.path.stem)
    if names[0] == names[1]:
        names = [str(results.path), str(other.path)]
    return {names[0]: results.records, names[1]: other.records}


def _pair(named: dict, systems: tuple[str, str] | None) -> tuple[str, str] | None:
    if systems is None:
        return tuple(named) if len(named) == 2 else None
    missing = [name for name in systems if name not in named]
    if len(systems) != 2 or systems[0] == systems[1] or missing:
        raise GradNoiseError(
            explain(
                "--systems",
                expected=f"two different systems of the file, from {', '.join(named)}",
                got=", ".join(systems) + (f" (not found: {', '.join(missing)})" if missing else ""),
                fix="name two of the file's systems, as in --systems A,B",
            )
        )
    return systems


def summarize(
    results: EvaluationResults,
    *,
    other: EvaluationResults | None = None,
    systems: tuple[str, str] | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Evaluation:
    """Every interval that applies to ``results`` (and ``other``, compared with it)."""
    if other is not None and systems is not None:
        raise GradNoiseError(
            explain(
                "summarize",
                expected="other= or systems=, not both",
                got="both",
                fix="compare two files with other=, or two systems of one file with systems=",
            )
        )
    check_confidence("summarize confidence", confidence)
    check_resamples("summarize", resamples)
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad or not ks:
        raise GradNoiseError(
            explain(
                "summarize ks (--k)",
                expected="one or more positive integers",
                got=repr(tuple(ks)),
                fix="use for example --k 1,5,10",
            )
        )
    named = _named(results, other)
    pair = _pair(named, systems)
    settings = {"confidence": confidence, "resamples": resamples, "seed": seed}
    summaries = [_summarize_system(name, recs, ks, settings) for name, recs in named.items()]
    comparison = _compare(*pair, named, settings) if pair else None
    files = [results] if other is None else [results, other]
    notes = []
    if pair is None and len(named) > 2:
        notes.append(f"{len(named)} systems: pass --systems A,B to compare two of them")
    return Evaluation(
        systems=summaries,
        comparison=comparison,
        skipped={str(part.path): part.skipped for part in files},
        problems={str(part.path): part.problems for part in files},
        notes=notes,
    )
