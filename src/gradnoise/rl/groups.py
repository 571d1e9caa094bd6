r"""The (prompts x samples) reward layout, dense or ragged, and its checks.

Every function in :mod:`gradnoise.rl` reads rewards in one of two layouts:

* **dense**: a ``(P, G)`` tensor, ``P`` prompts with ``G`` sampled responses each;
* **ragged**: a flat ``(N,)`` tensor plus ``sizes`` (``P`` positive ints summing to ``N``); group
  ``p`` owns the next ``sizes[p]`` entries, the order ``torch.repeat_interleave`` produces.

:func:`as_groups` turns either into ``(flat, index, sizes)`` so that group statistics are one
``index_add_`` away, and :func:`like_input` puts a flat result back into the caller's shape.
Checks run here, before any state changes: no NaN, no empty group, rewards inside the declared
range.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradnoise.errors import GradNoiseError, explain

__all__ = ["Groups", "as_groups", "check_rewards", "group_mean", "group_std", "group_sum"]


class Groups:
    """A flat reward vector with its group index: ``flat[i]`` belongs to group ``index[i]``."""

    def __init__(self, flat: torch.Tensor, sizes: torch.Tensor, shape: torch.Size) -> None:
        self.flat = flat
        self.sizes = sizes
        self.index = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        self.shape = shape

    @property
    def num_groups(self) -> int:
        return len(self.sizes)

    def broadcast(self, per_group: torch.Tensor) -> torch.Tensor:
        """Repeat a ``(P,)`` per-group value onto the ``(N,)`` samples."""
        return per_group[self.index]

    def like_input(self, flat: torch.Tensor) -> torch.Tensor:
        """Reshape a flat ``(N,)`` result to the caller's layout (``(P, G)`` or ``(N,)``)."""
        return flat.reshape(self.shape)


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
    """Validate a dense ``(P, G)`` or ragged ``(N,)`` + ``sizes`` layout and index it."""
    rewards = torch.as_tensor(rewards)
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
        sizes_t = torch.full((rewards.shape[0],), rewards.shape[1], dtype=torch.long)
    else:
        sizes_t = torch.as_tensor(sizes, dtype=torch.long).reshape(-1)
        _check_sizes(rewards, sizes_t, where)
    check_rewards(rewards, where=where)
    return Groups(rewards.reshape(-1).to(torch.get_default_dtype()), sizes_t, rewards.shape)


def _check_sizes(rewards: torch.Tensor, sizes: torch.Tensor, where: str) -> None:
    if len(sizes) == 0 or (sizes < 1).any():
        empty = torch.nonzero(sizes < 1).reshape(-1).tolist()
        raise GradNoiseError(
            explain(
                where,
                expected="at least one group and at least one sample in every group",
                got=f"empty groups at positions {empty}" if empty else "no groups",
                fix="drop prompts that received no samples before computing advantages",
            )
        )
    if rewards.dim() != 1 or rewards.numel() != int(sizes.sum()):
        raise GradNoiseError(
            explain(
                where,
                expected=f"flat rewards of length sum(sizes)={int(sizes.sum())}",
                got=f"shape {tuple(rewards.shape)}",
                fix="flatten the rewards group by group, in the order of sizes",
            )
        )


def group_sum(groups: Groups, values: torch.Tensor) -> torch.Tensor:
    """Per-group sums ``S_p = sum_{i in p} values_i`` of a flat ``(N,)`` tensor."""
    return torch.zeros(groups.num_groups, dtype=values.dtype).index_add_(0, groups.index, values)


def group_mean(groups: Groups, values: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group means ``mean_p = S_p / n_p`` (of the rewards when ``values`` is None)."""
    values = groups.flat if values is None else values
    return group_sum(groups, values) / groups.sizes.to(values.dtype)


def group_std(groups: Groups, *, correction: int = 1) -> torch.Tensor:
    """Per-group standard deviation with ``correction`` (1 = Bessel, as ``torch.std``).

    Groups with ``n_p <= correction`` have no defined spread; they get 0, which downstream
    makes their advantages 0 (a lone sample carries no within-group signal).
    """
    centred = groups.flat - groups.broadcast(group_mean(groups))
    dof = (groups.sizes - correction).clamp(min=1).to(centred.dtype)
    std = (group_sum(groups, centred.pow(2)) / dof).sqrt()
    return torch.where(groups.sizes > correction, std, torch.zeros_like(std))
