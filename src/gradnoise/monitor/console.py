"""The live console view: progress, loss, the running noise scale and the noisiest layers.

Drawn with rich. It refreshes by hand, at most ``refresh_hz`` times a second and only from the
training thread, so its cost is part of the monitor's measured overhead (no render thread).
"""

from __future__ import annotations

import math
import time

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gradnoise.monitor.summary import gsnr_ranking

__all__ = ["ConsoleView", "fmt", "noisiest", "plain"]


def fmt(value: float | None, digits: int = 3) -> str:
    """A number as prose writes it: ``digits`` significant figures, never scientific notation.

    ``837.4 -> "837"``, ``12345 -> "12,300"``, ``0.000123 -> "0.000123"``; ``None`` or NaN reads
    ``n/a`` and infinity ``unbounded``.
    """
    if value is None:
        return "n/a"
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range, e.g. from a hand-edited metrics file
        value = math.inf if value > 0 else -math.inf
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "unbounded" if value > 0 else "-unbounded"
    if abs(value) >= 1e15:  # no batch or ratio is this large: say so rather than print 16 digits
        return "more than 10^15" if value > 0 else "less than -10^15"
    rounded = float(f"{value:.{digits}g}")  # significant figures, then written out in full
    if rounded == int(rounded) and abs(rounded) >= 1:
        return f"{int(rounded):,}"
    return np.format_float_positional(rounded, trim="-")


plain = fmt


def noisiest(steps: list[dict], count: int = 3) -> list[tuple[str, float]]:
    """The ``count`` parameters with the lowest late GSNR so far (the report's ranking)."""
    ranked = gsnr_ranking(steps)
    return [(name, g.value) for name, g in ranked if math.isfinite(g.value)][:count]


def _table(record: dict, steps: list[dict]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    band = f"[{fmt(record.get('ci_low'))}, {fmt(record.get('ci_high'))}]"
    table.add_row("loss", fmt(record.get("loss"), 4))
    table.add_row("noise scale B_simple", f"{fmt(record.get('b_simple'))}  90% band {band}")
    table.add_row("batch size now", str(record.get("batch_size")))
    layers = ", ".join(f"{name} ({fmt(v, 2)})" for name, v in noisiest(steps))
    table.add_row("lowest GSNR layers", layers or "n/a")
    if record.get("skipped_steps"):
        table.add_row("skipped (NaN/inf) steps", str(record["skipped_steps"]))
    return table


class ConsoleView:
    """A rich ``Live`` display fed by the monitor on every step."""

    def __init__(
        self, total: int | None, *, console: Console | None = None, refresh_hz: float = 4.0
    ) -> None:
        self._progress = Progress(
            TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        self._task = self._progress.add_task("steps", total=total)
        self._table = Table()
        self._live = Live(self._group(), console=console, auto_refresh=False)
        self._interval, self._last = 1.0 / refresh_hz, 0.0
        self._live.start()

    def _group(self) -> Group:
        return Group(self._progress, self._table)

    def tick(self, step: int, record: dict | None = None, steps: list[dict] = ()) -> None:
        """Advance to ``step``; redraw if a record arrived or the refresh interval passed.

        ``steps`` are the step records so far (for the layer ranking the report will show).
        """
        self._progress.update(self._task, completed=step + 1)
        if record is not None:
            self._table = _table(record, list(steps) or [record])
            self._live.update(self._group())
        now = time.perf_counter()
        if record is not None or now - self._last >= self._interval:
            self._live.refresh()
            self._last = now

    def close(self) -> None:
        self._live.refresh()
        self._live.stop()
