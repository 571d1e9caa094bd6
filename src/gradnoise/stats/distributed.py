r"""torch.distributed: merge moments across ranks and measure the noise scale inside DDP for free.

**Rank merge.** Every field of :class:`GradMoments` is a sum, so the records of all ranks combine
exactly with one ``all_reduce(SUM)`` of their concatenation (:func:`all_reduce_moments`).
:class:`gradnoise.stats.merged.MergedStats` does that for a whole ``GradStats`` under DDP (each
rank's GradStats sees its local examples before DDP's all-reduce) and gathers the per-example
norms, so a monitor on every rank reads the statistics of all ranks' examples.

**DDP communication hook** (the idea of k-diffusion's ``DDPGradientStatsHook``, made general).
With ``W`` ranks each holding the mean gradient :math:`g_r` of ``b`` local examples, DDP averages
them into :math:`\bar g` over ``W b`` examples. Those are two batch sizes (McCandlish et al. 2018,
appendix A.1):

.. math::
    \text{small: } \frac1W \sum_r \|g_r\|^2 \text{ at } B = b,\qquad
    \text{big: } \|\bar g\|^2 \text{ at } B = W b,

so :class:`NoiseScaleHook` needs no extra backward: inside DDP's backward it takes per-parameter
norms of each bucket before its mean all-reduce (one fused ``_foreach_norm``).
:meth:`NoiseScaleHook.record` then averages the squared local norms over ranks together with the
ranks' batch sizes in one tiny extra all-reduce (one float per parameter, plus two), reads the
norms of the reduced ``param.grad`` and returns a :class:`TwoBatchNorms` for
:class:`gradnoise.stats.running.NoiseScale`. Reading the two batch sizes back is the one host
sync. float16 gradients are refused (squared norms overflow its range).

**Uneven batches.** With rank ``r`` holding :math:`b_r` examples and a mean loss, DDP's average
:math:`\bar g = \frac1W\sum_r g_r` has :math:`E\|\bar g\|^2 = \|G\|^2 + \mathrm{tr}\Sigma\,
\frac{1}{W^2}\sum_r \frac1{b_r}` and the mean of the local norms has
:math:`\|G\|^2 + \mathrm{tr}\Sigma \frac1W \sum_r \frac1{b_r}`: the two batch sizes are
:math:`H` and :math:`W H`, with :math:`H = W / \sum_r b_r^{-1}` the harmonic mean of the ranks'
batch sizes (:math:`b` when they are equal). With a sum loss each local gradient is divided by
its own :math:`b_r` before averaging and the reduced gradient is the mean over all
:math:`N = \sum_r b_r` examples: sizes :math:`H` and :math:`N`. Every rank gets the same record.

**Gradient accumulation** (``no_sync()`` for K micro-batches, then one synchronized backward):
the local gradient holds all K micro-batches, so pass ``local_batch_size`` = the examples it
holds, ``K * b`` (with each micro-batch's loss divided by K, as usual). Passing ``b`` would halve
the estimate for K = 2; ``record`` refuses it when it saw K forward passes of ``b`` examples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from gradnoise.errors import GradNoiseError, NotReadyError, explain
from gradnoise.stats.moments import GradMoments
from gradnoise.stats.twobatch import TwoBatchNorms

__all__ = ["NoiseScaleHook", "all_reduce_moments", "gather_ragged"]

Preconditioner = Callable[[], Mapping[str, torch.Tensor] | None]


def all_reduce_moments(
    moments: Mapping[str, GradMoments], *, group: dist.ProcessGroup | None = None
) -> dict[str, GradMoments]:
    """Merge every rank's per-parameter records into the records of all ranks' examples.

    One ``all_reduce`` of the concatenated fields; ``n`` travels in the same buffer. All ranks
    must pass the same parameter names with the same shapes (and all or none ``elem_sq_sum``).
    """
    names = list(moments)
    fields = [_fields(moments[name]) for name in names]
    flat = torch.cat([torch.cat([f.reshape(-1) for f in group_]) for group_ in fields])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    merged, offset = {}, 0
    for name, group_ in zip(names, fields, strict=True):
        parts = []
        for field in group_:
            parts.append(flat[offset : offset + field.numel()].reshape(field.shape))
            offset += field.numel()
        merged[name] = _from_fields(parts, moments[name].elem_sq_sum is not None)
    return merged


def gather_ragged(
    local: torch.Tensor, sizes: tuple[int, ...], *, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Every rank's ``(..., b_r)`` tensor, concatenated along the last dim in rank order: one
    ``all_gather``, padded to the largest ``b_r``."""
    longest = max(sizes)
    padded = local.new_zeros(*local.shape[:-1], longest)
    padded[..., : local.shape[-1]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[..., :size] for part, size in zip(parts, sizes, strict=True)], -1)


def _fields(record: GradMoments) -> list[torch.Tensor]:
    g = record.grad_sum
    count = torch.tensor([float(record.n)], dtype=g.dtype, device=g.device)
    fields = [count, g, record.sq_norm_sum.to(g.dtype).reshape(1)]
    return fields + ([record.elem_sq_sum] if record.elem_sq_sum is not None else [])


def _from_fields(parts: list[torch.Tensor], elementwise: bool) -> GradMoments:
    n = round(float(parts[0]))
    elem = parts[3].clone() if elementwise else None
    return GradMoments(n, parts[1].clone(), parts[2].reshape(()).clone(), elem)


class NoiseScaleHook:
    """DDP communication hook that records two-batch gradient norms (see the module docstring).

    Example::

        ddp = DistributedDataParallel(model)
        hook = NoiseScaleHook(ddp)
        noise = NoiseScale()
        for x, y in loader:                       # b examples per rank
            loss_fn(ddp(x), y).backward()         # the hook runs inside backward
            noise.update(hook.record(local_batch_size=b))
            optimizer.step(); optimizer.zero_grad()

    Args:
        ddp_model: a ``DistributedDataParallel`` module, before its first backward.
        loss_reduction: ``"mean"`` (DDP's usual per-rank mean loss) or ``"sum"``.
        preconditioner: optional callable returning ``{name: p}``; norms are then of ``p * g``
            (the preconditioned noise scale, see :mod:`gradnoise.stats.preconditioned`).
    """

    def __init__(
        self,
        ddp_model: nn.Module,
        *,
        loss_reduction: str = "mean",
        preconditioner: Preconditioner | None = None,
    ) -> None:
        _check_ddp(ddp_model, loss_reduction)
        self.group = ddp_model.process_group
        self.world_size = dist.get_world_size(self.group)
        self.loss_reduction = loss_reduction
        self.preconditioner = preconditioner
        self._names = {id(p): name for name, p in ddp_model.module.named_parameters()}
        self._clear()
        self._forwards = (0, 0)  # forward passes and examples since the last synced backward
        self._synced_forwards = (0, 0)  # those that the last synchronized backward covered
        ddp_model.register_forward_pre_hook(self._count_forward, with_kwargs=True)
        ddp_model.register_comm_hook(self, NoiseScaleHook._hook)

    def _clear(self) -> None:
        self._buckets: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self._norms: dict[int, list[torch.Tensor]] = {}
        self._pending: torch.Tensor | None = None  # local squared norms of the last backward
        self._scales: Mapping[str, torch.Tensor] | None = None

    def _scaled(self, names: list[str], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.preconditioner is None:
            return grads
        if self._scales is None:
            self._scales = self.preconditioner() or {}  # read once per step
        scales = self._scales
        return [g * scales[n] if n in scales else g for n, g in zip(names, grads, strict=True)]

    @staticmethod
    def _hook(self, bucket):  # no annotations: DDP checks them, and they are strings here
        """Local norms (one fused op), then DDP's mean all-reduce, as ``allreduce_hook`` does.

        The hook runs on the backward thread, so it does as few Python-level ops as it can.
        """
        params = [(self._names[id(p)], p) for p in bucket.parameters()]
        self._buckets[bucket.index()] = params
        grads = self._scaled([name for name, _ in params], bucket.gradients())
        self._norms[bucket.index()] = torch._foreach_norm(grads)
        buffer = bucket.buffer().div_(self.world_size)
        future = dist.all_reduce(buffer, group=self.group, async_op=True).get_future()
        if bucket.is_last():  # every bucket's hook has run: keep the local squared norms
            norms = torch.stack([n for i in sorted(self._norms) for n in self._norms[i]])
            self._pending = norms.pow_(2)
            # the forwards since the previous synchronized backward (K under no_sync()), so
            # recording only some steps is not mistaken for accumulation
            self._synced_forwards, self._forwards = self._forwards, (0, 0)
        return future.then(_value)

    def record(self, *, local_batch_size: int) -> TwoBatchNorms:
        """The last step's :class:`TwoBatchNorms` (per parameter); clears it for the next step.

        ``local_batch_size`` is the number of examples in this rank's gradient since the last
        synchronized step (``K * b`` under ``no_sync()`` accumulation); ranks may differ (see
        the module docstring). Call it on every rank right after ``backward()``, before the
        gradients are clipped or zeroed: the big-batch norms are read from ``param.grad``.
        """
        check_record("NoiseScaleHook", self._pending is not None, local_batch_size)
        self._check_accumulation(local_batch_size)
        local = self._pending.to(torch.float64)
        names, big = self._reduced_norms()
        position = {name: i for i, name in enumerate(names)}
        order = [n for n in self._names.values() if n in position]  # the module's order
        index = torch.tensor([position[n] for n in order])
        return two_batch_from_rank_sums(
            order,
            local[index],
            float(local_batch_size),
            world_size=self.world_size,
            group=self.group,
            loss_reduction=self.loss_reduction,
            big=big[index],
        )

    def _check_accumulation(self, local_batch_size: int) -> None:
        """Refuse the per-micro-batch size after several forward passes (``no_sync()``)."""
        forwards, examples = self._synced_forwards
        if forwards > 1 and examples == forwards * local_batch_size:
            raise GradNoiseError(
                explain(
                    "NoiseScaleHook.record(local_batch_size=...)",
                    expected="the examples in this rank's gradient since the last synchronized "
                    f"step ({examples} over {forwards} forward passes)",
                    got=f"local_batch_size={local_batch_size}, one micro-batch",
                    fix=f"pass local_batch_size={examples} under gradient accumulation",
                )
            )

    def _count_forward(self, module, args, kwargs) -> None:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is not None and first.dim() > 0:
            forwards, examples = self._forwards
            self._forwards = (forwards + 1, examples + first.shape[0])

    def _reduced_norms(self) -> tuple[list[str], torch.Tensor]:
        """Names and squared norms of the reduced gradients; clears the step."""
        params = [item for i in sorted(self._buckets) for item in self._buckets[i]]
        names = [name for name, _ in params]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for _, p in params]  # unused
        big = torch.stack(torch._foreach_norm(self._scaled(names, grads)))
        self._clear()
        return names, big.to(torch.float64).pow(2)


def two_batch_from_rank_sums(
    names: list[str],
    local: torch.Tensor,
    local_batch_size: float,
    *,
    world_size: int,
    group: dist.ProcessGroup | None,
    loss_reduction: str,
    big: torch.Tensor | None = None,
    big_partial: torch.Tensor | None = None,
) -> TwoBatchNorms:
    """The record from this rank's ``(P,)`` squared local-gradient norms (float64).

    The reduced gradient (the mean over ranks, as DDP's all-reduce and FSDP2's reduce-scatter
    compute it) comes as ``big``, its squared norms (the same on every rank), or as
    ``big_partial``, this rank's part of them (its shard's), summed over ranks here. One
    ``all_reduce`` of the local norms, the batch sizes and any partial norms; batch sizes as in
    the module docstring (harmonic mean H and W H, or H and N for a sum loss).
    """
    b = local_batch_size
    if loss_reduction == "sum":
        local = local / (b * b)  # this rank's mean-loss gradient
    sizes = torch.tensor([1.0 / b, b], dtype=torch.float64, device=local.device)
    parts = [local] if big_partial is None else [local, big_partial.to(local)]
    buffer = torch.cat([*parts, sizes])
    dist.all_reduce(buffer, group=group)
    inverse_sum, total = buffer[-2:].tolist()  # the one host sync
    harmonic = world_size / inverse_sum
    count = len(names)
    small = buffer[:count] / world_size
    if big_partial is not None:
        big = buffer[count : 2 * count]
    if loss_reduction == "sum":  # the reduced gradient is (N / W) times the mean
        big_batch, big = total, big / (total / world_size) ** 2
    else:
        big_batch = harmonic * world_size
    small_norms = dict(zip(names, small.unbind(), strict=True))
    big_norms = dict(zip(names, big.unbind(), strict=True))
    return TwoBatchNorms(small_norms, harmonic, big_norms, big_batch)


def check_record(where: str, pending: bool, local_batch_size: int) -> None:
    """The checks of ``record(local_batch_size=...)`` shared by the DDP and FSDP2 hooks."""
    if not (isinstance(local_batch_size, int) and local_batch_size > 0):
        raise GradNoiseError(
            explain(
                f"{where}.record(local_batch_size=...)",
                expected="a positive int (examples per rank in this step)",
                got=repr(local_batch_size),
                fix="pass the per-rank batch size, e.g. len(x)",
            )
        )
    if not pending:
        raise NotReadyError(
            explain(
                f"{where}.record",
                expected="a synchronized backward pass since the last record",
                got="no synchronized backward (or record() called twice)",
                fix="call record() once per step, after loss.backward() outside no_sync()",
            )
        )


def _value(future: torch.futures.Future) -> torch.Tensor:
    return future.value()[0]


def check_hook_reduction(where: str, loss_reduction: str) -> None:
    """The ``loss_reduction`` check shared by the DDP and FSDP2 hooks."""
    if loss_reduction not in ("mean", "sum"):
        raise GradNoiseError(
            explain(
                f"{where}(loss_reduction=...)",
                expected="'mean' or 'sum'",
                got=repr(loss_reduction),
                fix="pass the reduction of each rank's loss over its local batch",
            )
        )


def _check_ddp(ddp_model: nn.Module, loss_reduction: str) -> None:
    check_hook_reduction("NoiseScaleHook", loss_reduction)
    if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
        raise GradNoiseError(
            explain(
                "NoiseScaleHook",
                expected="a torch.nn.parallel.DistributedDataParallel module",
                got=type(ddp_model).__name__,
                fix="wrap the model in DistributedDataParallel first (single process: use "
                "GradStats or MicroBatchNorms)",
            )
        )
    low = sorted({str(p.dtype) for p in ddp_model.parameters() if p.dtype == torch.float16})
    if low:
        raise GradNoiseError(
            explain(
                "NoiseScaleHook",
                expected="float32, float64 or bfloat16 gradients",
                got=f"parameters of dtype {low[0]}",
                fix="keep fp32 master parameters (torch.autocast) or use bfloat16",
            )
        )
    if dist.get_world_size(ddp_model.process_group) < 2:
        raise GradNoiseError(
            explain(
                "NoiseScaleHook",
                expected="a process group of at least 2 ranks (two batch sizes)",
                got="world size 1",
                fix="in a single process use GradStats or MicroBatchNorms instead",
            )
        )
