"""FSDP2 (``fully_shard``): which registered parameters are shards, and the tensors the forward
really uses.

Under FSDP2 a module's registered parameters are DTensor shards. Before the module's forward,
FSDP all-gathers each shard into an *unsharded* parameter (a plain ``nn.Parameter``, created on
the first all-gather and reused by every later one, its storage freed and refilled), swaps it
into the module, and computes with it; autograd accumulates the local gradient into it, and
FSDP's post-backward reduce-scatters that gradient into the shard's ``.grad`` (the mean over
ranks). GradStats therefore follows the unsharded parameters: every rank sees complete weights
and its own examples, so its per-example norms are complete; only sums over ranks are missing,
and :mod:`gradnoise.stats.fsdp` adds them.

This module only reads FSDP2's state (``FSDPModule._get_fsdp_state()``, its parameter groups'
``FSDPParam`` objects); it changes nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ShardedParam", "fsdp_modules", "is_dtensor", "sharded_params"]


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 or tensor parallel)."""
    return type(tensor).__name__ == "DTensor" or hasattr(tensor, "_local_tensor")


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to, outermost first."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


class ShardedParam:
    """One FSDP2-managed parameter: its shard, and the unsharded parameter once it exists."""

    def __init__(self, fsdp_param: Any, owner: nn.Module) -> None:
        self._fsdp_param = fsdp_param
        self.owner = owner  # the FSDP module whose forward all-gathers it

    @property
    def sharded(self) -> torch.Tensor:
        return self._fsdp_param.sharded_param

    @property
    def unsharded(self) -> nn.Parameter | None:
        """The all-gathered parameter the forward uses; None before the first all-gather."""
        return getattr(self._fsdp_param, "_unsharded_param", None)

    @property
    def local_grad(self) -> torch.Tensor | None:
        """This rank's shard of the reduced gradient (FSDP's mean over ranks), or None."""
        grad = self.sharded.grad
        return None if grad is None else grad.to_local()


def sharded_params(model: nn.Module) -> dict[int, ShardedParam]:
    """``id(shard) -> ShardedParam`` for every parameter FSDP2 manages in ``model``."""
    found = {}
    for module in fsdp_modules(model):
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch versions with one group per state
            group = state._fsdp_param_group
            groups = [] if group is None else [group]
        for group in groups:
            for fsdp_param in group.fsdp_params:
                found[id(fsdp_param.sharded_param)] = ShardedParam(fsdp_param, module)
    return found
