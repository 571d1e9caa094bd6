"""A Hugging Face ``transformers`` TrainerCallback that runs a :class:`~gradnoise.monitor.Monitor`.

Install transformers, then::

    Trainer(model=model, args=args, train_dataset=data, callbacks=[GradNoiseTrainerCallback(
        out="runs/noise", every=40)])

Every optimizer step is one monitor step; one in ``every`` runs under GradStats. GradStats sees
one backward per block, so ``gradient_accumulation_steps`` must be 1. The model's loss must be the
mean over the batch. The Trainer does not hand the loss to callbacks, so records carry no loss.

On several processes (``torchrun``, Accelerate) the :class:`Monitor` merges each measured step
over the ranks, so the series is the global batch's, and only rank 0 writes ``out``.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from gradnoise.errors import GradNoiseError, explain
from gradnoise.monitor.monitor import Monitor

__all__ = ["GradNoiseTrainerCallback"]


class GradNoiseTrainerCallback(TrainerCallback):
    """Gradient-noise profiling for ``transformers.Trainer`` (keywords go to :class:`Monitor`)."""

    def __init__(self, *, out: str | Path | None = None, every: int = 40, **monitor_kwargs) -> None:
        self.out, self.every, self.kwargs = out, every, monitor_kwargs
        self.monitor: Monitor | None = None
        self.run: dict | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.gradient_accumulation_steps != 1:
            raise GradNoiseError(
                explain(
                    "GradNoiseTrainerCallback",
                    expected="gradient_accumulation_steps=1 (one backward per measured step)",
                    got=f"gradient_accumulation_steps={args.gradient_accumulation_steps}",
                    fix="set gradient_accumulation_steps=1 "
                    "in TrainingArguments, or use Monitor with GradStats moments merged by hand",
                )
            )
        self.monitor = Monitor(model, out=self.out, every=self.every, **self.kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        self.monitor.begin_step()

    def on_step_end(self, args, state, control, **kwargs):
        self.monitor.end_step()

    def on_train_end(self, args, state, control, **kwargs):
        self.run = self.monitor.close()
