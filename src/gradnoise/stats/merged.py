"""GradStats read over the examples of every rank: DDP (and Accelerate, the HF Trainer) or FSDP2.

:class:`MergedStats` offers the reading side of :class:`~gradnoise.stats.engine.GradStats`
(per-example norms, per-layer estimates, noise scale, batch size, coverage) for all ranks'
examples, so the monitor on every rank sees what one process would see on the concatenated
batch. Under DDP each rank's GradStats measured its local examples before DDP's all-reduce, and
the records merge exactly (:func:`~gradnoise.stats.distributed.all_reduce_moments`, one
gradient-sized all-reduce per *measured* step); under FSDP2 the summed gradient is the
reduce-scattered shards' (:func:`~gradnoise.stats.fsdp.gather_sharded`, no gradient-sized
traffic). Either way the per-parameter per-example norms travel in one ``(P, B)`` all-gather.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gradnoise.errors import GradNoiseError, explain
from gradnoise.stats.distributed import all_reduce_moments, gather_ragged
from gradnoise.stats.engine import GradStats
from gradnoise.stats.fsdp import gather_sharded, local_norm_rows
from gradnoise.stats.moments import GradMoments
from gradnoise.stats.quantities import NoiseScaleEstimate, gradient_noise_scale, layer_estimates

__all__ = ["MergedStats"]


class MergedStats:
    """One measured step's statistics over the examples of every rank (see the module docstring).

    Build it on every rank after the block's backward (it runs collectives). Per-example norms
    are in rank order, rank 0's examples first. A rank whose gradients are not finite
    contributes NaN, so every rank sees the same non-finite step and can skip it.
    """

    def __init__(self, stats: GradStats, *, group: dist.ProcessGroup | None = None) -> None:
        self._coverage = stats.coverage
        self._moments: dict[str, GradMoments] | None = None
        self._estimates: tuple | None = None
        if stats._plan.sharded:
            sharded = gather_sharded(stats, group=group, per_parameter=True)
            self.batch_sizes, self._norms, self._sharded = (
                sharded.batch_sizes,
                sharded.per_parameter,
                sharded,
            )
            return
        names = list(stats._plan.params)
        rows = local_norm_rows(stats, names)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        sizes = torch.zeros(world, dtype=torch.float64)
        sizes[rank] = rows.shape[1]
        dist.all_reduce(sizes, group=group)
        self.batch_sizes = tuple(round(b) for b in sizes.tolist())
        self._moments = all_reduce_moments(_local_moments(stats, names, rows), group=group)
        gathered = gather_ragged(rows, self.batch_sizes, group=group)
        self._norms = dict(zip(names, gathered.unbind(), strict=True))

    @property
    def batch_size(self) -> int:
        """Examples on all ranks."""
        return sum(self.batch_sizes)

    def moments(self) -> dict[str, GradMoments]:
        """The merged per-parameter records (DDP only: FSDP2 keeps no summed gradient)."""
        if self._moments is None:
            raise GradNoiseError(
                explain(
                    "MergedStats.moments",
                    expected="a data-parallel (DDP) model, whose summed gradients every rank has",
                    got="an FSDP2 model: each rank holds a shard of the summed gradient",
                    fix="use per-layer estimates (layer_estimates(), noise_scale()) instead",
                )
            )
        return dict(self._moments)

    def layer_estimates(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Per parameter, the unbiased ``(names, tr Sigma, |G|^2)`` over all ranks' examples."""
        if self._moments is None:
            return self._sharded.layer_estimates()
        if self._estimates is None:
            self._estimates = layer_estimates(self._moments)
        return self._estimates

    def per_example_sq_norms(self) -> dict[str, torch.Tensor]:
        return dict(self._norms)

    def total_sq_norms(self) -> torch.Tensor:
        return torch.stack(list(self._norms.values())).sum(0)

    def noise_scale(self) -> NoiseScaleEstimate:
        if self._moments is None:
            return self._sharded.noise_scale()
        return gradient_noise_scale(self._moments)

    def coverage(self) -> dict[str, str]:
        return self._coverage()


def _local_moments(stats: GradStats, names: list[str], rows: torch.Tensor) -> dict:
    """This rank's records of ``names``: zero for a parameter unused here, NaN when the
    gradients are not finite (``rows`` is then NaN), so the all-reduce still matches."""
    batch = rows.shape[1]
    measured = stats.moments() if not torch.isnan(rows).all() else {}
    records = {}
    for name in names:
        if name in measured:
            records[name] = measured[name]
            continue
        param = stats._plan.params[name]
        fill = float("nan") if not measured else 0.0
        records[name] = GradMoments(
            batch,
            torch.full(param.shape, fill, dtype=torch.float32, device=param.device),
            torch.tensor(fill, device=param.device),
        )
    return records
