r"""The (prompts x samples) reward layout, dense or ragged, and its checks.

Every function in :mod:`gradnoise.rl` reads rewards in one of two layouts:

* **dense**: a ``(P, G)`` tensor, ``P`` prompts with ``G`` sampled responses each;
* **ragged**: a flat ``(N,)`` tensor plus ``sizes`` (``P`` positive ints summing to ``N``); group
  ``p`` owns the next ``sizes[p]`` entries, the order ``torch.repeat_interleave`` produces.

:func:`as_groups` turns either into ``(flat, index, sizes)`` so that group statistics are one
``index_add_`` away, and :func:`like_input` puts a flat result back into the caller's shape.
Checks run here, before any state changes: no NaN, no empty group, integer ``sizes``, rewards
inside the declared range.

Precision: group statistics are computed in float64 on values scaled by the group's largest
magnitude (:func:`group_max_abs`) and centred before squaring, so a group that repeats one value
has exactly zero spread at any reward level and no magnitude that float64 holds overflows.
Results come back in the rewards' floating dtype when they fit it, and are refused otherwise
(:meth:`Groups.like_input`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.rl.checks import as_int

__all__ = [
    "Groups",
    "as_groups",
    "check_rewards",
    "group_max_abs",
    "group_mean",
    "group_std",
    "group_sum",
]


class Groups:
    """A flat reward vector with its group index: ``flat[i]`` belongs to group ``index[i]``.

    ``flat`` holds the rewards in float64 whatever the caller passed (float32 rounding of a group
    mean, divided by a small ``eps``, would otherwise give a constant group a non-zero
    advantage); ``dtype`` is the dtype results are returned in (:meth:`like_input`).
    """

    def __init__(
        self,
        flat: torch.Tensor,
        sizes: torch.Tensor,
        shape: torch.Size,
        *,
        dtype: torch.dtype | None = None,
        where: str = "gradnoise.rl",
    ) -> None:
        self.flat = flat
        self.sizes = sizes
        self.index = torch.repeat_interleave(torch.arange(len(sizes), device=sizes.device), sizes)
        self.shape = shape
        self.dtype = flat.dtype if dtype is None else dtype
        self.where = where

    @property
    def num_groups(self) -> int:
        return len(self.sizes)

    def broadcast(self, per_group: torch.Tensor) -> torch.Tensor:
        """Repeat a ``(P,)`` per-group value onto the ``(N,)`` samples."""
        return per_group[self.index]

    def like_input(self, flat: torch.Tensor) -> torch.Tensor:
        """Reshape a flat ``(N,)`` float64 result to the caller's layout (``(P, G)`` or ``(N,)``)
        and dtype (the rewards' floating dtype, else the default dtype).

        The inputs were checked finite, so a non-finite result is an overflow: refused, as is a
        result that fits float64 but not the caller's dtype (e.g. float32 rewards near 3e38 whose
        leave-one-out differences reach 6e38); pass float64 rewards to get those.
        """
        if not torch.isfinite(flat).all():
            raise GradNoiseError(
                explain(
                    self.where,
                    expected="advantages that fit in float64",
                    got="an overflow (rewards, lengths or hyperparameters so extreme that an "
                    "advantage is beyond 1.8e308)",
                    fix="rescale the rewards (e.g. divide them by their largest magnitude)",
                )
            )
        out = flat.to(self.dtype)
        if not torch.isfinite(out).all():
            raise GradNoiseError(
                explain(
                    self.where,
                    expected=f"advantages that fit in the rewards' dtype {self.dtype}",
                    got=f"advantages up to {flat.abs().max().item():.4g}",
                    fix="pass the rewards as float64 (the advantages then come back in "
                    "float64), or rescale them",
                )
            )
        return out.reshape(self.shape)


def check_rewards(
    rewards: torch.Tensor, *, where: str, reward_range: tuple[float, float] | None = None
) -> None:
    """Refuse NaN or infinite rewards (an inf reward turns every advantage of its group, or of
    the batch, into NaN/-inf) and, when ``reward_range`` is given, rewards outside ``[lo, hi]``."""
    rewards = torch.as_tensor(rewards)
    if rewards.is_floating_point() and not torch.isfinite(rewards).all():
        flat = rewards.reshape(-1)
        bad = torch.nonzero(~torch.isfinite(flat)).reshape(-1)[:5].tolist()
        raise GradNoiseError(
            explain(
                where,
                expected="finite rewards",
                got=f"NaN rewards or infinite rewards at flat positions {bad} "
                f"(first: index {bad[0]}, "
                f"value {flat[bad[0]].item()})",
                fix="score every response, or drop unscorable ones before computing advantages",
            )
        )
    if reward_range is not None and rewards.numel():
        lo, hi = reward_range
        low, high = rewards.min().item(), rewards.max().item()
        if low < lo or high > hi:
            raise GradNoiseError(
                explain(
                    where,
                    expected=f"rewards inside the declared range [{lo}, {hi}]",
                    got=f"rewards in [{low}, {high}]",
                    fix="rescale the rewards or declare the range they really take",
                )
            )


def as_groups(
    rewards: torch.Tensor, sizes: Sequence[int] | torch.Tensor | None = None, *, where: str
) -> Groups:
    """Validate a dense ``(P, G)`` or ragged ``(N,)`` + ``sizes`` layout and index it.

    ``sizes`` must be a list/tuple of ints or a 1-D integer tensor/array (``"ab"``, ``1.5`` and
    ``[2, 1.5]`` are refused, never truncated). The rewards are held in float64
    (:class:`Groups`); results come back in the rewards' floating dtype (the default dtype for
    integer or bool rewards and for lists).
    """
    rewards = _as_rewards(rewards, where)
    if sizes is None:
        if rewards.dim() != 2 or rewards.shape[1] == 0 or rewards.shape[0] == 0:
            raise GradNoiseError(
                explain(
                    where,
                    expected="a (prompts, samples) tensor with at least one sample per prompt, "
                    "or flat rewards with sizes=",
                    got=f"shape {tuple(rewards.shape)} and no sizes",
                    fix="pass rewards as (P, G), or pass flat rewards with sizes=[n_1, ..., n_P]",
                )
            )
        sizes_t = torch.full(
            (rewards.shape[0],), rewards.shape[1], dtype=torch.long, device=rewards.device
        )
    else:
        sizes_t = _as_sizes(rewards, sizes, where)
    check_rewards(rewards, where=where)
    dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    flat = rewards.reshape(-1).to(torch.float64)
    return Groups(flat, sizes_t, rewards.shape, dtype=dtype, where=where)


def _describe(value) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _as_rewards(rewards, where: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(rewards)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise GradNoiseError(
            explain(
                where,
                expected="rewards as a real tensor or a (nested) list of numbers",
                got=f"{_describe(rewards)}: {err}",
                fix="pass a float tensor of shape (P, G), or flat rewards with sizes=",
            )
        ) from err
    if tensor.is_complex() or tensor.dtype in (torch.quint8, torch.qint8, torch.qint32):
        raise GradNoiseError(
            explain(
                where,
                expected="real (float, integer or bool) rewards",
                got=f"dtype {tensor.dtype}",
                fix="pass real-valued rewards",
            )
        )
    return tensor


def _as_sizes(rewards: torch.Tensor, sizes, where: str) -> torch.Tensor:
    """``sizes`` as a long tensor after checking its type, its values and the rewards' length."""
    values: list[int] | None
    if isinstance(sizes, torch.Tensor):
        integral = not (
            sizes.is_floating_point() or sizes.is_complex() or sizes.dtype == torch.bool
        )
        values = sizes.reshape(-1).tolist() if integral else None
    elif isinstance(sizes, np.ndarray):
        integral = np.issubdtype(sizes.dtype, np.integer)
        values = [int(v) for v in sizes.reshape(-1).tolist()] if integral else None
    elif isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        values = None
    else:
        values = [as_int(v) for v in sizes]
        values = None if any(v is None for v in values) else values
    if values is None:
        raise GradNoiseError(
            explain(
                f"{where}(sizes)",
                expected="sizes as a list (or 1-D integer tensor) of ints, one group size per "
                "prompt",
                got=_describe(sizes),
                fix="pass sizes=[n_1, ..., n_P] with integer counts, e.g. [4, 2, 3]",
            )
        )
    empty = [i for i, v in enumerate(values) if v < 1]
    if not values or empty:
        raise GradNoiseError(
            explain(
                where,
                expected="at least one group and at least one sample in every group",
                got=f"empty groups at positions {empty[:10]}" if empty else "no groups",
                fix="drop prompts that received no samples before computing advantages",
            )
        )
    total = sum(values)
    if rewards.dim() != 1 or rewards.numel() != total:
        raise GradNoiseError(
            explain(
                where,
                expected=f"flat rewards of length sum(sizes)={total}",
                got=f"shape {tuple(rewards.shape)}",
                fix="flatten the rewards group by group, in the order of sizes",
            )
        )
    return torch.tensor(values, dtype=torch.long, device=rewards.device)


def group_sum(groups: Groups, values: torch.Tensor) -> torch.Tensor:
    """Per-group sums ``S_p = sum_{i in p} values_i`` of a flat ``(N,)`` tensor."""
    zeros = torch.zeros(groups.num_groups, dtype=values.dtype, device=values.device)
    return zeros.index_add_(0, groups.index, values)


def group_max_abs(groups: Groups, values: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group ``max_i |values_i|``, 1 for an all-zero group: dividing by it keeps every sum
    and square of a group inside ``[-n, n]``, so statistics never overflow whatever the
    magnitude (1e200 squared is beyond float64). Exact for constant groups: ``v / |v| = +-1``."""
    values = groups.flat if values is None else values
    zeros = torch.zeros(groups.num_groups, dtype=values.dtype, device=values.device)
    top = zeros.scatter_reduce_(0, groups.index, values.abs(), reduce="amax", include_self=True)
    return torch.where(top > 0, top, torch.ones_like(top))


def group_mean(groups: Groups, values: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group means ``mean_p = S_p / n_p`` (of the rewards when ``values`` is None).

    Computed on values scaled by :func:`group_max_abs` (no overflow), with one correction pass
    ``mean += sum(v - mean) / n``; a group that repeats one value gets exactly that value.
    """
    values = groups.flat if values is None else values
    scale = group_max_abs(groups, values)
    x = values / groups.broadcast(scale)
    n = groups.sizes.to(values.dtype)
    mean = group_sum(groups, x) / n
    mean = mean + group_sum(groups, x - groups.broadcast(mean)) / n
    return scale * mean


def group_std(
    groups: Groups, values: torch.Tensor | None = None, *, correction: int = 1
) -> torch.Tensor:
    """Per-group standard deviation with ``correction`` (1 = Bessel, as ``torch.std``), of the
    rewards when ``values`` is None; two-pass (centred before squaring) on scaled values.

    Groups with ``n_p <= correction`` have no defined spread; they get 0, which downstream
    makes their advantages 0 (a lone sample carries no within-group signal).
    """
    values = groups.flat if values is None else values
    scale = group_max_abs(groups, values)
    x = values / groups.broadcast(scale)
    centred = x - groups.broadcast(group_mean(groups, x))
    dof = (groups.sizes - correction).clamp(min=1).to(values.dtype)
    std = scale * (group_sum(groups, centred.pow(2)) / dof).sqrt()
    return torch.where(groups.sizes > correction, std, torch.zeros_like(std))
