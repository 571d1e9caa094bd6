"""Refuse modules and calls whose per-example gradients are undefined or would be mis-attributed.

Per-example gradients need every example to pass through the model on its own: a layer that mixes
examples (BatchNorm in training mode normalizes with the batch's statistics) makes "the gradient
of example i" meaningless. Layers that put something other than the batch on dim 0 would have
their rows attributed to the wrong examples. Both are refused with an error that says how to fix
the model, rather than measured wrongly.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

from gradnoise.errors import BatchCouplingError, GradNoiseError, explain

__all__ = [
    "check_batch_norm_call",
    "check_module",
    "needs_check",
    "padded_mean_flag",
    "refuse_padded_mean",
]

_BATCH_FIRST_MODULES = (nn.MultiheadAttention, nn.RNNBase)


def check_module(name: str, module: nn.Module) -> None:
    """Raise if ``module`` couples examples or does not keep examples on dim 0."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and _uses_batch_statistics(module):
        raise BatchCouplingError(
            explain(
                f"module {name!r} ({type(module).__name__})",
                expected="layers that treat each example independently",
                got="batch normalization in training mode, which mixes examples through batch "
                "statistics, so per-example gradients are not defined",
                fix="call model.eval() on the BatchNorm layers (running statistics), or replace "
                "them with GroupNorm or LayerNorm",
            )
        )
    if isinstance(module, _BATCH_FIRST_MODULES) and not getattr(module, "batch_first", False):
        raise GradNoiseError(
            explain(
                f"module {name!r} ({type(module).__name__})",
                expected="examples on dim 0 (batch_first=True)",
                got="batch_first=False, which puts the sequence on dim 0",
                fix=f"construct it as {type(module).__name__}(..., batch_first=True)",
            )
        )


def needs_check(module: nn.Module) -> bool:
    """Modules whose acceptability depends on a mode that may change between blocks."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, *_BATCH_FIRST_MODULES))


def _uses_batch_statistics(module: nn.modules.batchnorm._BatchNorm) -> bool:
    return module.training or module.running_mean is None


def check_batch_norm_call(func: Any, args: tuple, kwargs: dict) -> None:
    """Raise for a functional ``F.batch_norm`` that normalizes with batch statistics."""
    if func is not F.batch_norm:
        return
    training = kwargs.get("training", args[5] if len(args) > 5 else False)
    if training:
        raise BatchCouplingError(
            explain(
                "F.batch_norm(training=True)",
                expected="operations that treat each example independently",
                got="batch normalization with batch statistics, which mixes examples",
                fix="normalize with running statistics (training=False) or use layer/group norm",
            )
        )


_MEAN_LOSSES = (F.cross_entropy, F.nll_loss)


def _loss_args(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
):
    return locals()


def padded_mean_flag(func: Any, args: tuple, kwargs: dict, declared: str, batch: int | None):
    """For a ``reduction="mean"`` classification loss that is not a mean over examples.

    ``F.cross_entropy`` / ``F.nll_loss`` with ``reduction="mean"`` average over the *counted
    targets*, weighted by ``weight[y]``: with class weights, or with targets equal to
    ``ignore_index`` (padding), example i's share of the loss is not 1/B, so a declared
    ``"mean"`` (or ``"sum"``) would scale its gradient wrongly. Class weights raise at once. For
    padding, the targets are split into the batch's examples (``(B T,)`` rows are example-major)
    and a 0-dim bool tensor "the examples count different numbers of targets" is returned,
    checked with the residuals (no host sync in forward); equal counts (a causal LM's one
    ignored last position per sequence) are a plain mean. A declared ``"weighted"`` loss states
    the shares itself. Not seen: a loss reduced by hand (``reduction="none"``, then masked).
    """
    if func not in _MEAN_LOSSES or declared == "weighted":
        return None
    bound = _loss_args(*args, **kwargs)
    if bound["reduction"] != "mean" or bound["size_average"] is False or bound["reduce"] is False:
        return None
    if bound["weight"] is not None:
        raise GradNoiseError(
            explain(
                f"GradStats(loss_reduction={declared!r})",
                expected="a loss that is a plain mean (or sum) over the examples",
                got="a class-weighted mean (weight=...), which gives example i the share "
                "w[y_i] / sum_j w[y_j]",
                fix="declare it: GradStats(model, loss_reduction='weighted') and, in the block, "
                "stats.set_example_weights(w[y] / w[y].sum())",
            )
        )
    target = bound["target"]
    if target.is_floating_point() or not batch or target.numel() % batch:
        return None  # class probabilities (no ignore_index), or rows that are not the batch's
    counts = (target.reshape(batch, -1) != bound["ignore_index"]).sum(1)
    return (counts != counts[0]).any()


def refuse_padded_mean(declared: str) -> None:
    """The error for a mean over counted targets with ignored (padding) targets in the batch."""
    raise GradNoiseError(
        explain(
            f"GradStats(loss_reduction={declared!r})",
            expected="a loss that is a plain mean (or sum) over the examples",
            got="a mean over the counted tokens of a batch with ignored targets (padding, "
            "labels=-100), which gives sequence i the share n_i / N",
            fix="declare it: GradStats(model, loss_reduction='weighted') and, in the block, "
            "stats.set_example_weights(token_mean_weights(labels))",
        )
    )
