"""The Workload record and the registry of built-in workloads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gradnoise.errors import GradNoiseError, explain

__all__ = ["DEFAULT_WORKLOAD", "WORKLOADS", "Workload", "get_workload"]

Batch = tuple[torch.Tensor, ...]


@dataclass
class Workload:
    """A model, an endless stream of batches and the loss that trains it.

    ``loss(model, batch)`` must be the *mean* over the examples of the batch of per-example losses
    (what ``GradStats(model, loss_reduction="mean")`` expects), and every tensor in a batch must
    hold the examples on dim 0. ``heldout`` is a fixed batch never trained on (the profile
    reports its loss at every measured step); ``loss_floor`` is the lowest loss the data allows,
    where it is known (the report then shows the excess loss over it).
    """

    name: str
    model: nn.Module
    batches: Iterator[Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    lr: float = 1e-3
    description: str = ""
    heldout: Batch | None = None
    loss_floor: float | None = None


def _builders() -> dict[str, Callable[..., Workload]]:
    from gradnoise.workloads import charlm, images, markov

    return {"markov": markov.make, "images": images.make, "charlm": charlm.make}


WORKLOADS: tuple[str, ...] = ("markov", "images", "charlm")
DEFAULT_WORKLOAD = "markov"


def get_workload(name: str, *, batch_size: int = 32, seed: int = 0) -> Workload:
    """Build the built-in workload ``name`` (one of :data:`WORKLOADS`).

    ``markov`` (the profile's default) and ``images`` draw fresh examples for every batch;
    ``charlm`` reads a 6,794-character text and memorizes it within a few hundred steps (kept
    for comparison: its noise scale is that of memorization).
    """
    builders = _builders()
    if name not in builders:
        raise GradNoiseError(
            explain(
                "workload",
                expected="one of " + ", ".join(repr(n) for n in WORKLOADS),
                got=repr(name),
                fix="pick a built-in workload, or profile your own model with "
                "--model MODULE:FACTORY",
            )
        )
    if not isinstance(batch_size, int) or batch_size < 2:
        raise GradNoiseError(
            explain(
                "batch_size",
                expected="an int >= 2 (a gradient variance needs two examples)",
                got=repr(batch_size),
                fix="pass --batch-size 2 or more",
            )
        )
    return builders[name](batch_size=batch_size, seed=seed)
