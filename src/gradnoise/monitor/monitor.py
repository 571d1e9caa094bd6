"""Monitor: gradient-noise profiling for any training loop, on a schedule, with sinks.

Example::

    with Monitor(model, out="runs/demo", every=40) as monitor:
        for batch in batches:
            with monitor.step() as step:
                loss = loss_fn(model, batch)     # mean over the batch
                loss.backward()
                step.loss = loss
            optimizer.step()
            optimizer.zero_grad()
    # runs/demo: metrics.jsonl, plots/*.png, report.html (and tensorboard/ when installed)

Every ``every``-th step runs inside :class:`~gradnoise.stats.engine.GradStats`; the others run
untouched. Host syncs (``.item()``, ``.tolist()``) happen only on measured steps.

On several processes (a ``torch.distributed`` process group of more than one rank, as DDP,
Accelerate and the HF Trainer set up) every rank measures its own examples and the measured
steps' statistics are merged across ranks (:class:`~gradnoise.stats.merged.MergedStats`), so
the noise scale is the global batch's; only rank 0 writes files and the console. Every rank must
create the monitor and step it alike (the merge is a collective).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from gradnoise.errors import GradNoiseError, NonFiniteGradientError, explain
from gradnoise.monitor.checks import check_every, check_out_dir
from gradnoise.monitor.console import ConsoleView
from gradnoise.monitor.noise import NoiseScale
from gradnoise.monitor.records import clean, step_record
from gradnoise.monitor.sinks import Sink, make_sinks
from gradnoise.monitor.timing import overhead_summary
from gradnoise.stats.engine import GradStats
from gradnoise.stats.merged import MergedStats

__all__ = ["Monitor", "StepHandle"]


@dataclass
class StepHandle:
    """What ``with monitor.step() as step`` yields; set ``step.loss`` to log the loss.

    ``step.extras`` (numbers by name, e.g. ``{"heldout_loss": 2.1}``) are added to the step's
    record when the step is measured.
    """

    loss: torch.Tensor | float | None = None
    extras: dict = field(default_factory=dict)


class Monitor:
    """Measures the gradient noise of ``model`` every ``every`` steps and sends records to sinks.

    Args:
        model: the module being trained (its loss must be a mean over the batch).
        out: directory for metrics.jsonl, TensorBoard events, plots and report.html; ``None``
            keeps records in memory only (``monitor.records``).
        every: measure one step in ``every``; the rest run without hooks.
        console: show the live rich view; ``total_steps`` sizes its progress bar.
        tensorboard: also write TensorBoard events when the package is installed.
        elementwise: also collect elementwise moments (per-coordinate variances; the per-layer
            GSNR does not need them, so they are off by default).
        beta: smoothing of the running noise scale (per measured step).
        report: write plots and report.html on :meth:`close`.
        merge_ranks: merge every measured step over the ranks of the default process group
            (``None``: whenever one of more than one rank is initialized); rank 0 writes.

    Raises:
        GradNoiseError: at construction, before anything is written, for a bad ``every`` or
            ``out`` or a model GradStats cannot measure (``BatchCouplingError`` for BatchNorm in
            training mode: call ``.eval()`` on it or use GroupNorm / LayerNorm).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        out: str | Path | None = None,
        every: int = 40,
        console: bool = False,
        total_steps: int | None = None,
        tensorboard: bool = True,
        elementwise: bool = False,
        beta: float = 0.9,
        report: bool = True,
        merge_ranks: bool | None = None,
    ) -> None:
        check_every(every)
        if not isinstance(model, nn.Module):
            raise GradNoiseError(
                explain(
                    "Monitor(model)",
                    expected="a torch.nn.Module",
                    got=type(model).__name__,
                    fix="pass the model itself",
                )
            )
        # Refuse a model whose per-example gradients are undefined (BatchNorm in training mode,
        # batch_first=False layers, ...) now, not at the first measured step: building the
        # engine checks every module.
        GradStats(model, elementwise=elementwise)
        self.merge_ranks = _several_ranks() if merge_ranks is None else bool(merge_ranks)
        writes = not self.merge_ranks or dist.get_rank() == 0
        self.out = check_out_dir(out) if out is not None and writes else None
        self.model, self.every, self.elementwise, self.report = model, every, elementwise, report
        self.noise = NoiseScale(beta=beta)
        self.records: list[dict] = []
        self.skipped_steps = 0  # measured steps left out because their gradients were not finite
        self.meta: dict = {}
        self.coverage: dict[str, str] | None = None
        self._sinks: list[Sink] = make_sinks(self.out, tensorboard=tensorboard) if self.out else []
        self._view = ConsoleView(total_steps) if console and writes else None
        self._step, self._started, self._stats, self._t0 = 0, None, None, None
        self._plain: list[float] = []
        self._measured: list[float] = []
        self._own = 0.0
        self._loss_sum, self._loss_count = None, 0

    # ----------------------------------------------------------------------------- stepping
    def measuring(self, step: int | None = None) -> bool:
        """Whether step ``step`` (default: the next one) is a measured step."""
        return ((self._step if step is None else step) + 1) % self.every == 0

    def begin_step(self) -> None:
        """Call before the forward pass of every training step."""
        if self._t0 is not None:
            raise GradNoiseError(
                explain(
                    "Monitor.begin_step",
                    expected="end_step() after every begin_step()",
                    got="two begin_step() calls in a row",
                    fix="call end_step() when the backward pass of a step is done",
                )
            )
        self._t0 = time.perf_counter()
        self._started = self._started or self._t0
        if self.measuring():
            self._stats = GradStats(self.model, elementwise=self.elementwise).__enter__()

    def end_step(
        self, loss: torch.Tensor | float | None = None, extras: dict | None = None
    ) -> dict | None:
        """Call after the backward pass; returns the record on measured steps, else ``None``."""
        if self._t0 is None:
            raise GradNoiseError(
                explain(
                    "Monitor.end_step",
                    expected="a begin_step() before it",
                    got="end_step() without begin_step()",
                    fix="call begin_step() before the forward pass of each step",
                )
            )
        stats, self._stats = self._stats, None
        if stats is not None:
            stats.__exit__(None, None, None)
        body, self._t0 = time.perf_counter() - self._t0, None
        own_start = time.perf_counter()
        record = self._finish_step(stats, body, loss, extras or {})
        self._step += 1
        self._own += time.perf_counter() - own_start
        return record

    def _finish_step(self, stats: GradStats | None, body: float, loss, extras: dict) -> dict | None:
        if loss is not None:
            value = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
            self._loss_count += 1
        (self._measured if stats is not None else self._plain).append(body)
        record = self._measure(stats, extras) if stats is not None else None
        if self._view is not None:
            self._view.tick(self._step, record, self.records)
        return record

    def _finite(self, stats: GradStats | MergedStats) -> bool:
        """Whether the measured step's gradients are finite (one sync; measured steps only)."""
        try:
            norms = stats.total_sq_norms()
        except NonFiniteGradientError:
            return False
        return bool(torch.isfinite(norms).all())

    def _measure(self, stats: GradStats, extras: dict) -> dict | None:
        if self.merge_ranks:
            stats = MergedStats(stats)
        if not self._finite(stats):
            # An inf/NaN step (fp16 overflow, a bad batch) is counted, never averaged in.
            self.noise.skip()
            self.skipped_steps += 1
            return None
        self.noise.update(stats)
        if self.coverage is None:
            self.coverage = stats.coverage()
        loss = float(self._loss_sum) / self._loss_count if self._loss_count else None
        self._loss_sum, self._loss_count = None, 0
        record = step_record(
            stats,
            self.noise.estimate(),
            step=self._step,
            loss=loss,
            seconds=time.perf_counter() - self._started,
        ) | clean({key: float(value) for key, value in extras.items()})
        self.records.append(record)
        for sink in self._sinks:
            sink.write(record)
        return record

    def step(self) -> _StepContext:
        """``with monitor.step() as step:`` around one forward and backward pass."""
        return _StepContext(self)

    # ----------------------------------------------------------------------------- ending
    def summary(self) -> dict:
        """The run record: timings, measured overhead, coverage and ``meta``."""
        total = time.perf_counter() - self._started if self._started else 0.0
        timing = overhead_summary(self._plain, self._measured, self._own, total)
        return {
            "kind": "run",
            "every": self.every,
            "steps": self._step,
            "skipped_steps": self.skipped_steps,
            **timing,
            "coverage": self.coverage or {},
            **self.meta,
        }

    def close(self) -> dict:
        """Write the run record, close the sinks and (with ``out``) render the report."""
        run = self.summary()
        for sink in self._sinks:
            sink.write(run)
            sink.close()
        self._sinks = []
        if self._view is not None:
            self._view.close()
            self._view = None
        if self.out is not None and self.report and self.records:
            from gradnoise.monitor.report import write_report

            start = time.perf_counter()
            write_report(self.out)
            run["report_seconds"] = time.perf_counter() - start
        return run

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _several_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _StepContext:
    def __init__(self, monitor: Monitor) -> None:
        self.monitor, self.handle = monitor, StepHandle()

    def __enter__(self) -> StepHandle:
        self.monitor.begin_step()
        return self.handle

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            stats, self.monitor._stats, self.monitor._t0 = self.monitor._stats, None, None
            if stats is not None:
                stats.__exit__(exc_type, exc, tb)
            return
        self.monitor.end_step(self.handle.loss, self.handle.extras)
