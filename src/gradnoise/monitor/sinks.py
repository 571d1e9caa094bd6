"""Where records go: a JSON-lines file, TensorBoard event files (when installed), the console.

A sink has ``write(record)`` and ``close()``. ``make_sinks`` picks the file sinks for a directory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

from gradnoise.monitor.records import METRICS_FILE, write_line

__all__ = ["JsonlSink", "Sink", "TensorBoardSink", "make_sinks", "tensorboard_available"]


class Sink(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends every record to ``directory/metrics.jsonl`` (truncated when the sink opens)."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / METRICS_FILE
        self._handle = self.path.open("w")

    def write(self, record: dict) -> None:
        write_line(self._handle, record)

    def close(self) -> None:
        self._handle.close()


def tensorboard_available() -> bool:
    """True when the ``tensorboard`` package (the ``[tensorboard]`` extra) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardSink:
    """Scalars (loss, noise scale and band, per-layer GSNR) and the per-example norm histogram."""

    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(Path(directory) / "tensorboard"))

    def write(self, record: dict) -> None:
        if record.get("kind") != "step":
            return
        step = record["step"]
        for key in ("loss", "b_simple", "ci_low", "ci_high", "b_batch"):
            if record.get(key) is not None:
                self._writer.add_scalar(f"noise/{key}", record[key], step)
        for name, value in record.get("gsnr", {}).items():
            if value is not None:
                self._writer.add_scalar(f"gsnr/{name}", value, step)
        if record.get("example_norms"):
            self._writer.add_histogram("per_example_grad_norm", _tensor(record), step)

    def close(self) -> None:
        self._writer.close()


def _tensor(record: dict):
    import torch

    return torch.tensor(record["example_norms"])


def make_sinks(directory: Path, *, tensorboard: bool = True) -> list[Sink]:
    """The JSONL sink, plus TensorBoard when asked for and installed."""
    sinks: list[Sink] = [JsonlSink(directory)]
    if tensorboard and tensorboard_available():
        sinks.append(TensorBoardSink(directory))
    return sinks
