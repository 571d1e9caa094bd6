r"""torch.distributed: merge moments across ranks and measure the noise scale inside DDP for free.

**Rank merge.** Every field of :class:`GradMoments` is a sum, so the records of all ranks combine
exactly with one ``all_reduce(SUM)`` of their concatenation (:func:`all_reduce_moments`).

**DDP communication hook** (the idea of k-diffusion's ``DDPGradientStatsHook``, made general).
With ``W`` ranks each holding the mean gradient :math:`g_r` of ``b`` local examples, DDP averages
them into :math:`\bar g` over ``W b`` examples. Those are two batch sizes (McCandlish et al. 2018,
appendix A.1):

.. math::
    \text{small: } \frac1W \sum_r \|g_r\|^2 \text{ at } B = b,\qquad
    \text{big: } \|\bar g\|^2 \text{ at } B = W b,

so :class:`NoiseScaleHook` needs no extra backward: inside DDP's backward it takes per-parameter
norms of each bucket before its mean all-reduce (one fused ``_foreach_norm``), and averages the
squared local norms over ranks with one tiny extra all-reduce (one float per parameter) launched
right after the last bucket's. :meth:`NoiseScaleHook.record` waits for that one, reads the norms
of the reduced ``param.grad`` and returns a :class:`TwoBatchNorms` for
:class:`gradnoise.stats.running.NoiseScale`; nothing syncs with the host. float16 gradients are
refused (squared norms overflow its range).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from gradnoise.errors import GradNoiseError, NotReadyError, explain
from gradnoise.stats.moments import GradMoments
from gradnoise.stats.twobatch import TwoBatchNorms

__all__ = ["NoiseScaleHook", "all_reduce_moments"]

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
        ddp_model.register_comm_hook(self, NoiseScaleHook._hook)

    def _clear(self) -> None:
        self._buckets: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self._norms: dict[int, list[torch.Tensor]] = {}
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
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
        if bucket.is_last():  # every bucket's hook has run: average the local norms over ranks
            norms = torch.stack([n for i in sorted(self._norms) for n in self._norms[i]])
            self._pending = (dist.all_reduce(norms.pow_(2), group=self.group, async_op=True), norms)
        return future.then(_value)

    def record(self, *, local_batch_size: int) -> TwoBatchNorms:
        """The last step's :class:`TwoBatchNorms` (per parameter); clears it for the next step.

        Call it right after ``backward()``, before the gradients are clipped or zeroed: the
        big-batch norms are read from the reduced ``param.grad``.
        """
        _check_record(self._pending is not None, local_batch_size)
        names, small, big = self._step_norms()
        b = float(local_batch_size)
        factor = b * b if self.loss_reduction == "sum" else 1.0
        small, big = small / (self.world_size * factor), big / factor
        position = {name: i for i, name in enumerate(names)}
        order = [n for n in self._names.values() if n in position]  # the module's order
        index = torch.tensor([position[n] for n in order])
        small_norms = dict(zip(order, small[index].unbind(), strict=True))
        big_norms = dict(zip(order, big[index].unbind(), strict=True))
        return TwoBatchNorms(small_norms, b, big_norms, b * self.world_size)

    def _step_norms(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Names, rank-summed local squared norms and reduced squared norms; clears the step."""
        work, small = self._pending
        work.wait()  # launched with the last bucket, so long finished on a real model
        params = [item for i in sorted(self._buckets) for item in self._buckets[i]]
        names = [name for name, _ in params]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for _, p in params]  # unused
        big = torch.stack(torch._foreach_norm(self._scaled(names, grads)))
        self._clear()
        return names, small.to(torch.float64), big.to(torch.float64).pow(2)


def _check_record(pending: bool, local_batch_size: int) -> None:
    if not (isinstance(local_batch_size, int) and local_batch_size > 0):
        raise GradNoiseError(
            explain(
                "NoiseScaleHook.record(local_batch_size=...)",
                expected="a positive int (examples per rank in this step)",
                got=repr(local_batch_size),
                fix="pass the per-rank batch size, e.g. len(x)",
            )
        )
    if not pending:
        raise NotReadyError(
            explain(
                "NoiseScaleHook.record",
                expected="a DDP backward pass since the last record",
                got="no synchronized backward (or record() called twice)",
                fix="call record() once per step, after loss.backward() outside no_sync()",
            )
        )


def _value(future: torch.futures.Future) -> torch.Tensor:
    return future.value()[0]


def _check_ddp(ddp_model: nn.Module, loss_reduction: str) -> None:
    if loss_reduction not in ("mean", "sum"):
        raise GradNoiseError(
            explain(
                "NoiseScaleHook(loss_reduction=...)",
                expected="'mean' or 'sum'",
                got=repr(loss_reduction),
                fix="pass the reduction of each rank's loss over its local batch",
            )
        )
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
