"""An :class:`~gradnoise.evaluation.summary.Evaluation` as rich tables and lines of text.

Names, paths and reasons come from the user's files, so they are rich ``Text`` (never parsed as
markup: a system called ``[bold]`` prints as written)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from gradnoise.evaluation.summary import Comparison, Evaluation

__all__ = ["renderables"]


def _g(value: float) -> str:
    return f"{value:.4g}"


def _span(low: float, high: float) -> str:
    return f"[{low:.4g}, {high:.4g}]"


def _level(evaluation: Evaluation) -> str:
    for system in evaluation.systems:
        if system.items is not None:
            return f"{system.items.confidence:.0%}"
    return "the"


def _items_table(evaluation: Evaluation) -> Table:
    level = _level(evaluation)
    header = ("system", "items", "score", f"{level} interval", "std. error", "item sd")
    table = Table(
        *header,
        title="score over items (percentile bootstrap: i.i.d. items, model fixed)",
    )
    for system in evaluation.systems:
        i = system.items
        if i is None:
            table.add_row(Text(system.name), "1", "-", "-", "-", "-")
        else:
            cells = (_g(i.estimate), _span(i.low, i.high), _g(i.standard_error), _g(i.sd))
            table.add_row(Text(system.name), str(i.n), *cells)
    return table


def _seeds_table(evaluation: Evaluation) -> Table | None:
    rows = [s for s in evaluation.systems if s.seeds is not None]
    if not rows:
        return None
    header = ("system", "seeds", "mean", "over seeds", "seed sd", "over items+seeds", "variance")
    table = Table(
        *header,
        title="score over seeds (intervals: t over i.i.d. seeds; items+seeds: two-way random "
        "effects; variance: share from items / seeds / rest)",
    )
    for system in rows:
        s, c = system.seeds, system.components
        both, shares = "-", "-"
        if c is not None:
            both = _span(c.low, c.high)
            total = c.standard_error**2
            if total > 0:
                parts = (c.from_items, c.from_seeds, c.from_residual)
                shares = " / ".join(f"{p / total:.0%}" for p in parts)
        cells = (_g(s.estimate), _span(s.low, s.high), _g(s.sd), both, shares)
        table.add_row(Text(system.name), str(s.n), *cells)
    return table


def _pass_table(evaluation: Evaluation) -> Table | None:
    rows = [(s.name, p) for s in evaluation.systems for p in s.pass_at_k]
    if not rows:
        return None
    header = ("system", "k", "pass@k", "interval", "std. error", "problems")
    table = Table(
        *header,
        title="unbiased pass@k (Chen et al. 2021; error over i.i.d. problems)",
    )
    for name, p in rows:
        cells = (_g(p.estimate), _span(p.low, p.high), _g(p.standard_error))
        table.add_row(Text(name), str(p.k), *cells, str(p.n_problems))
    return table


def comparison_lines(comparison: Comparison) -> list[str]:
    """The paired comparison in plain sentences."""
    head = f"{comparison.a} - {comparison.b}"
    extra = ""
    if comparison.only_a or comparison.only_b:
        extra = f" ({comparison.only_a} + {comparison.only_b} unshared item(s) left out)"
    r = comparison.result
    if r is None:
        return [f"{head}: {comparison.note}{extra}"]
    level = f"{r.t.confidence:.0%}"
    return [
        f"{head} = {_g(r.difference)} on {r.n} shared items{extra}",
        f"  {level} paired bootstrap {_span(r.bootstrap.low, r.bootstrap.high)}, "
        f"paired t {_span(r.t.low, r.t.high)}, sd of differences {_g(r.sd)}",
        f"  sign test: {r.wins} wins, {r.losses} losses, {r.ties} ties, "
        f"exact two-sided p = {r.sign_test_p:.3g}",
        f"  minimum detectable difference (alpha {1 - r.t.confidence:.2g}, power 0.8): "
        f"{_g(r.minimum_detectable)}",
    ]


def skipped_lines(evaluation: Evaluation) -> list[str]:
    """One line per file with skipped lines: the count and the first reasons."""
    lines = []
    for path, count in evaluation.skipped.items():
        if count:
            first = "; ".join(f"line {n}: {why}" for n, why in evaluation.problems[path])
            more = ", ..." if count > len(evaluation.problems[path]) else ""
            lines.append(f"skipped {count} unusable line(s) of {path} ({first}{more})")
    return lines


def renderables(evaluation: Evaluation) -> list:
    """What ``gradnoise evaluate`` prints, in order: tables, then lines of ``Text`` (the
    comparison, notes, skipped lines)."""
    tables = (_items_table(evaluation), _seeds_table(evaluation), _pass_table(evaluation))
    lines = comparison_lines(evaluation.comparison) if evaluation.comparison else []
    for system in evaluation.systems:
        lines += [f"note ({system.name}): {note}" for note in system.notes]
    lines += [f"note: {note}" for note in evaluation.notes]
    lines += skipped_lines(evaluation)
    return [t for t in tables if t is not None] + [Text(line) for line in lines]
