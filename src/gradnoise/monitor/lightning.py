"""A PyTorch Lightning callback that runs a :class:`~gradnoise.monitor.Monitor` during ``fit``.

Install Lightning (``pip install lightning``), then::

    trainer = lightning.Trainer(callbacks=[GradNoiseCallback(out="runs/noise", every=40)])

Each training batch (forward, backward and optimizer step) is one monitor step; one in ``every``
runs under GradStats. ``training_step`` must return the batch-mean loss (or ``{"loss": ...}``).
"""

from __future__ import annotations

from pathlib import Path

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    from pytorch_lightning.callbacks import Callback

from gradnoise.monitor.monitor import Monitor

__all__ = ["GradNoiseCallback"]


def _loss(outputs):
    return outputs.get("loss") if isinstance(outputs, dict) else outputs


class GradNoiseCallback(Callback):
    """Gradient-noise profiling for ``lightning.Trainer.fit`` (keywords go to :class:`Monitor`)."""

    def __init__(self, *, out: str | Path | None = None, every: int = 40, **monitor_kwargs) -> None:
        super().__init__()
        self.out, self.every, self.kwargs = out, every, monitor_kwargs
        self.monitor: Monitor | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.monitor = Monitor(pl_module, out=self.out, every=self.every, **self.kwargs)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.monitor.begin_step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.monitor.end_step(_loss(outputs))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.run = self.monitor.close()
