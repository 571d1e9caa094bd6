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

__all__ = ["check_batch_norm_call", "check_module"]

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
