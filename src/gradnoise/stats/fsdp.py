r"""FSDP2 (``fully_shard``): per-example statistics and the two-batch noise scale of all ranks.

**Per-example statistics.** ``GradStats`` follows the unsharded parameters FSDP2 computes with
(:mod:`gradnoise.layers.sharding`), so on every rank it measures complete per-example norms of
that rank's examples. What no rank has is the summed gradient of all examples; FSDP2
reduce-scatters it into the shards' ``.grad`` (the mean over ranks of the local gradients), so
:math:`\|\sum_i g_i\|^2 = c^2 \sum_r \|\mathrm{shard}_r\|^2`, with :math:`c = N` (all examples)
for a mean loss and :math:`c = W` (ranks) for a sum loss. :func:`gather_sharded` adds that up
with two small collectives per step: one ``all_reduce`` of :math:`2P + W + 1` numbers (per
parameter: the local sum of squared per-example norms and the squared norm of the local shard of
the reduced gradient; the ranks' batch sizes), and one ``all_gather`` of the ranks' ``(B,)``
whole-model per-example norms. No gradient-sized tensor moves, and GradStats keeps no copy of the
local gradient (FSDP frees it after the reduce-scatter).

**Two-batch noise scale** (:class:`FSDPNoiseScaleHook`, McCandlish et al. 2018, A.1, as
:class:`~gradnoise.stats.distributed.NoiseScaleHook` does for DDP): the rank's local gradient
before the reduce-scatter is the small batch (its norm is taken by a post-accumulate-grad hook on
each unsharded parameter), the reduced gradient the big one (its norm summed over the shards).
One ``all_reduce`` of :math:`2P + 2` numbers per measured step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gradnoise.errors import (
    GradNoiseError,
    NonFiniteGradientError,
    NotReadyError,
    UnsupportedModuleError,
    explain,
)
from gradnoise.layers.sharding import ShardedParam, sharded_params
from gradnoise.stats.distributed import (
    check_hook_reduction,
    check_record,
    gather_ragged,
    two_batch_from_rank_sums,
)
from gradnoise.stats.engine import GradStats
from gradnoise.stats.quantities import NoiseScaleEstimate, noise_scale_from_sums
from gradnoise.stats.twobatch import TwoBatchNorms

__all__ = ["FSDPNoiseScaleHook", "ShardedStats", "gather_sharded", "local_norm_rows"]


@dataclass(frozen=True)
class ShardedStats:
    r"""One step's statistics over the examples of every rank.

    ``per_example`` holds the ``(N,)`` whole-model squared per-example gradient norms, rank 0's
    examples first (and ``per_parameter`` each parameter's, when gathered); ``sq_norm_sums[name]``
    is :math:`\sum_i \|g_i\|^2` and ``grad_sq_norms[name]`` :math:`\|\sum_i g_i\|^2` of each
    parameter, over all N examples (per-example scale). ``batch_sizes`` are the ranks' local
    batch sizes. A rank whose gradients were not finite contributes NaN.
    """

    per_example: torch.Tensor
    sq_norm_sums: dict[str, torch.Tensor]
    grad_sq_norms: dict[str, torch.Tensor]
    batch_sizes: tuple[int, ...]
    per_parameter: dict[str, torch.Tensor] | None = None

    @property
    def n(self) -> int:
        return sum(self.batch_sizes)

    def noise_scale(self) -> NoiseScaleEstimate:
        """Whole-model B_simple over all ranks' examples (the unsharded model's on the same
        data)."""
        total = torch.stack(list(self.sq_norm_sums.values())).sum()
        summed = torch.stack(list(self.grad_sq_norms.values())).sum()
        return noise_scale_from_sums(self.n, total, summed)

    def layer_estimates(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        r"""Per parameter, the unbiased ``(names, tr Sigma, |G|^2)`` as float64 vectors (what
        :class:`~gradnoise.stats.running.NoiseScale` averages):
        :math:`\mathrm{tr}\Sigma = (S - \|s\|^2/n)/(n-1)`, :math:`\|G\|^2 = \|s\|^2/n^2 -
        \mathrm{tr}\Sigma/n`."""
        names, n = list(self.sq_norm_sums), self.n
        sums = torch.stack([self.sq_norm_sums[k] for k in names]).to(torch.float64)
        summed = torch.stack([self.grad_sq_norms[k] for k in names]).to(torch.float64)
        traces = (sums - summed / n) / (n - 1)
        return names, traces, summed / n**2 - traces / n

    def noise_scale_per_layer(self) -> dict[str, NoiseScaleEstimate]:
        """B_simple of every parameter separately."""
        return {
            name: noise_scale_from_sums(self.n, self.sq_norm_sums[name], self.grad_sq_norms[name])
            for name in self.sq_norm_sums
        }


def gather_sharded(
    stats: GradStats, *, group: dist.ProcessGroup | None = None, per_parameter: bool = False
) -> ShardedStats:
    """Combine every rank's ``GradStats`` of an FSDP2 model into all ranks' statistics.

    Call it on every rank after the block's ``backward()`` (the shards' norms are taken when
    FSDP2 reduce-scatters, so an optimizer step or ``zero_grad()`` in between does no harm).
    The shards must hold no gradient before the block (``zero_grad()`` with
    ``set_to_none=True``, the default). A mean loss needs the same local batch size on every
    rank (FSDP2 then averages local means into the global mean); a sum loss may have uneven
    batches. ``per_parameter=True`` also gathers each parameter's per-example norms (one
    ``(P, B)`` gather instead of ``(B,)``).
    """
    _sharded_of(stats, group)
    if stats.loss_reduction == "weighted":
        raise GradNoiseError(
            explain(
                "gather_sharded",
                expected="a GradStats with loss_reduction 'mean' or 'sum'",
                got="loss_reduction='weighted'",
                fix="gather the weighted records with all_reduce_moments on an unsharded copy",
            )
        )
    names = list(stats._plan.params)  # the same on every rank, used here or not
    local = local_norm_rows(stats, names)
    _require_fresh_shards(stats, names)
    shard_sq = torch.stack([_shard_sq_norm(stats, n) for n in names]).to(local.device)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.zeros(world, dtype=torch.float64, device=local.device)
    sizes[rank] = local.shape[1]
    buffer = torch.cat([local.sum(1).to(torch.float64), shard_sq, sizes])
    dist.all_reduce(buffer, group=group)
    count = len(names)
    batch_sizes = tuple(round(b) for b in buffer[2 * count :].tolist())  # the one host sync
    factor = _sum_factor(stats.loss_reduction, batch_sizes)
    summed = (buffer[count : 2 * count] * factor**2).unbind()
    rows = gather_ragged(local if per_parameter else local.sum(0), batch_sizes, group=group)
    return ShardedStats(
        per_example=rows.sum(0) if per_parameter else rows,
        sq_norm_sums=dict(zip(names, buffer[:count].unbind(), strict=True)),
        grad_sq_norms=dict(zip(names, summed, strict=True)),
        batch_sizes=batch_sizes,
        per_parameter=dict(zip(names, rows.unbind(), strict=True)) if per_parameter else None,
    )


def local_norm_rows(stats: GradStats, names: list[str]) -> torch.Tensor:
    """``(P, B)`` squared per-example norms of ``names`` on this rank: zeros for a parameter
    unused here, NaN everywhere when the gradients are not finite (so every rank still takes
    part in the collectives and sees the step as non-finite)."""
    try:
        norms = stats.per_example_sq_norms()  # runs the residual checks
    except NonFiniteGradientError:
        batch = stats._recorder.batch
        return torch.full((len(names), batch), float("nan"))
    like = next(iter(norms.values()))
    return torch.stack([norms[n] if n in norms else torch.zeros_like(like) for n in names])


def _sharded_of(stats: GradStats, group) -> dict[str, ShardedParam]:
    """The shards of every measured parameter; refuses models with unsharded ones."""
    sharded = stats._plan.sharded
    plain = [name for name in stats._plan.params if name not in sharded]
    if not sharded or plain:
        raise GradNoiseError(
            explain(
                "gather_sharded",
                expected="a GradStats of a model whose trainable parameters FSDP2 shards "
                "(fully_shard on the root, and on submodules as usual)",
                got="no sharded parameters" if not sharded else f"{plain[0]!r} unsharded",
                fix="apply fully_shard(model) to the root module; under DDP use "
                "all_reduce_moments or NoiseScaleHook",
            )
        )
    if stats.elementwise:
        raise GradNoiseError(
            explain(
                "gather_sharded",
                expected="GradStats(model) without elementwise=True",
                got="elementwise=True, whose parameter-sized sums FSDP2 does not shard",
                fix="drop elementwise=True under FSDP2",
            )
        )
    refuse_replicated(sharded, "gather_sharded", group)
    return sharded


def refuse_replicated(shards: dict[str, ShardedParam], where: str, group) -> None:
    """The shards of every rank must be disjoint pieces of one gradient (plain FSDP2 over the
    group): with HSDP (a replicated mesh dim) or a sub-mesh, summing shard norms over the
    group would count replicas more than once."""
    world = dist.get_world_size(group)
    for name, shard in shards.items():
        placements = [type(p).__name__ for p in shard.sharded.placements]
        mesh_size = shard.sharded.device_mesh.size()
        if "Replicate" in placements or mesh_size != world:
            raise UnsupportedModuleError(
                explain(
                    where,
                    expected=f"FSDP2 sharding of every parameter over all {world} ranks of the "
                    "group (one mesh dim, Shard placements)",
                    got=f"{name!r} placed as {placements} on a mesh of {mesh_size} ranks (HSDP "
                    "or a sub-mesh)",
                    fix="shard over one mesh dim spanning the group, or pass that dim's process "
                    "group as group=",
                )
            )


def _require_fresh_shards(stats: GradStats, names: list[str]) -> None:
    stale = [name for name in stats._recorder.stale_shards if name in names]
    if stale:
        raise GradNoiseError(
            explain(
                "gather_sharded",
                expected="sharded gradients that hold only this block's backward",
                got=f"{stale[0]!r} had a .grad before the block (accumulated or zeroed in place)",
                fix="call optimizer.zero_grad() (set_to_none=True) before every measured step",
            )
        )


def _shard_sq_norm(stats: GradStats, name: str) -> torch.Tensor:
    """||this rank's shard of the reduced gradient||^2, taken when FSDP2 reduce-scattered it
    (0 for a parameter no rank used: FSDP2 reduces nothing for it)."""
    recorder = stats._recorder
    norm = recorder.shard_sq_norms.get(name)
    if norm is not None:
        return norm
    if name in recorder.acc:
        raise NotReadyError(
            explain(
                "gather_sharded",
                expected="FSDP2's reduce-scatter of every measured parameter in the block",
                got=f"no reduced gradient of {name!r} (gradient sync off: "
                "set_requires_gradient_sync(False))",
                fix="measure a step whose backward synchronizes gradients",
            )
        )
    return torch.zeros((), dtype=torch.float64)


def _sum_factor(loss_reduction: str, batch_sizes: tuple[int, ...]) -> float:
    """c with sum_i g_i = c * (FSDP's mean over ranks of the local gradients)."""
    if loss_reduction == "sum":
        return float(len(batch_sizes))
    if len(set(batch_sizes)) > 1:
        raise GradNoiseError(
            explain(
                "gather_sharded (loss_reduction='mean')",
                expected="the same local batch size on every rank",
                got=f"local batch sizes {list(batch_sizes)}: FSDP2's average of local means is "
                "then not the mean over all examples",
                fix="use equal local batches, or a sum loss with GradStats(loss_reduction='sum')",
            )
        )
    return float(sum(batch_sizes))


class FSDPNoiseScaleHook:
    """Two-batch gradient norms from an FSDP2 step (see the module docstring).

    Example::

        fully_shard(block) for each block; fully_shard(model)
        hook = FSDPNoiseScaleHook(model)
        noise = NoiseScale()
        for x, y in loader:                          # b examples per rank
            loss_fn(model(x), y).backward()          # FSDP reduce-scatters as usual
            noise.update(hook.record(local_batch_size=b))
            optimizer.step(); optimizer.zero_grad()

    Args:
        model: the root module, with ``fully_shard`` applied.
        loss_reduction: ``"mean"`` (each rank's mean loss) or ``"sum"``.
        group: the process group FSDP2 shards over (default: the world).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_reduction: str = "mean",
        group: dist.ProcessGroup | None = None,
    ) -> None:
        shards = _model_shards(model, loss_reduction, group)
        self.group, self.loss_reduction = group, loss_reduction
        self.world_size = dist.get_world_size(group)
        self._shards = shards  # name -> ShardedParam, in the module's order
        self._hooked: dict[str, torch.Tensor] = {}  # name -> the unsharded parameter hooked
        self._local: dict[str, torch.Tensor] = {}  # name -> local squared norm, last backward
        self._accumulating = False  # this step's gradient adds onto an earlier backward's
        owners: dict[int, tuple[nn.Module, list[str]]] = {}
        for name, shard in shards.items():
            owners.setdefault(id(shard.owner), (shard.owner, []))[1].append(name)
        self._handles = [
            owner.register_forward_pre_hook(self._follow(names)) for owner, names in owners.values()
        ]
        self._handles.append(model.register_forward_pre_hook(self._count_forward))

    def remove(self) -> None:
        """Remove every hook this object registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _follow(self, names: list[str]):
        """After FSDP's pre-forward (it prepends its hook) the unsharded parameters exist;
        hook the ones not hooked yet (FSDP reuses them from step to step)."""

        def pre_hook(module, args) -> None:
            for name in names:
                unsharded = self._shards[name].unsharded
                if unsharded is not None and self._hooked.get(name) is not unsharded:
                    self._hooked[name] = unsharded
                    handle = unsharded.register_post_accumulate_grad_hook(self._local_norm(name))
                    self._handles.append(handle)

        return pre_hook

    def _local_norm(self, name: str):
        def hook(param: torch.Tensor) -> None:
            self._local[name] = torch.linalg.vector_norm(param.grad, dtype=torch.float64).pow(2)

        return hook

    def _count_forward(self, module, args) -> None:
        """A forward that starts while shards hold a gradient accumulates onto it."""
        self._accumulating = any(s.sharded.grad is not None for s in self._shards.values())

    def record(self, *, local_batch_size: int) -> TwoBatchNorms:
        """The last step's :class:`TwoBatchNorms` (per parameter); clears it for the next step.

        Call it on every rank right after ``backward()``, before the gradients are clipped or
        zeroed: the big-batch norms are read from the shards' ``.grad``.
        """
        check_record("FSDPNoiseScaleHook", bool(self._local), local_batch_size)
        if self._accumulating:
            raise GradNoiseError(
                explain(
                    "FSDPNoiseScaleHook.record",
                    expected="a step whose sharded gradients hold one backward (zeroed before it)",
                    got="gradients accumulated over several backward passes",
                    fix="record steps without gradient accumulation, or measure with GradStats "
                    "and gather_sharded",
                )
            )
        names = list(self._shards)
        zero = torch.zeros((), dtype=torch.float64)
        local = torch.stack([self._local.get(n, zero) for n in names])
        reduced = torch.stack([_reduced_sq_norm(self._shards[n]) for n in names])
        self._local.clear()
        return two_batch_from_rank_sums(
            names,
            local,
            float(local_batch_size),
            world_size=self.world_size,
            group=self.group,
            loss_reduction=self.loss_reduction,
            big_partial=reduced,
        )


def _reduced_sq_norm(shard: ShardedParam) -> torch.Tensor:
    grad = shard.local_grad
    if grad is None:
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(grad, dtype=torch.float64).pow(2)


def _model_shards(model: nn.Module, loss_reduction: str, group) -> dict[str, ShardedParam]:
    check_hook_reduction("FSDPNoiseScaleHook", loss_reduction)
    found = sharded_params(model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    shards = {name: found[id(p)] for name, p in trainable if id(p) in found}
    if not shards:
        raise GradNoiseError(
            explain(
                "FSDPNoiseScaleHook",
                expected="a module with fully_shard applied (FSDP2)",
                got=f"{type(model).__name__} with no FSDP2-sharded trainable parameters",
                fix="call fully_shard(model) first; under DDP use NoiseScaleHook",
            )
        )
    refuse_replicated(shards, "FSDPNoiseScaleHook", group)
    if dist.get_world_size(group) < 2:
        raise GradNoiseError(
            explain(
                "FSDPNoiseScaleHook",
                expected="a process group of at least 2 ranks (two batch sizes)",
                got="world size 1",
                fix="in a single process use GradStats or MicroBatchNorms instead",
            )
        )
    return shards
