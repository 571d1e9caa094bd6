r"""The rollout loop that drives any allocator, and the zero-variance filter.

:func:`collect_rollouts` runs the protocol of :mod:`gradnoise.rl.allocators` against a sampling
function and returns the rollouts as flat ``(prompt_ids, rewards)`` plus ragged group ``sizes``,
ready for the advantage functions of :mod:`gradnoise.rl.advantages`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradnoise.rl.allocators import Allocator, RolloutStats
from gradnoise.rl.groups import as_groups, group_std

__all__ = ["Rollouts", "collect_rollouts", "zero_variance_mask"]


@dataclass(frozen=True)
class Rollouts:
    """One step's rollouts, grouped by prompt (candidate order), plus whatever ``sample`` made."""

    prompt_ids: torch.Tensor  # (N,) one id per rollout, grouped
    rewards: torch.Tensor  # (N,)
    sizes: torch.Tensor  # (P,) samples per sampled prompt, all >= 1
    payload: list  # the second return value of every sample() call, in round order
    rounds: int
    order: torch.Tensor  # grouped[k] = round_order[order[k]]: maps payload rows to groups

    @property
    def group_ids(self) -> torch.Tensor:
        """The prompt id of each group, shape ``(P,)``."""
        starts = torch.cumsum(self.sizes, 0) - self.sizes
        return self.prompt_ids[starts]


def collect_rollouts(
    allocator: Allocator,
    candidates: torch.Tensor,
    budget: int,
    sample: Callable[[torch.Tensor], tuple[torch.Tensor, object]],
    *,
    max_rounds: int = 64,
) -> Rollouts:
    """Ask ``allocator`` round by round, call ``sample(prompt_ids) -> (rewards, payload)``, and
    finally ``allocator.update`` once with every rollout of the step."""
    stats = RolloutStats.fresh(candidates, reward_range=allocator.reward_range)
    ids, rewards, payload, rounds = [], [], [], 0
    while rounds < max_rounds:
        counts = allocator.allocate(stats, budget - stats.total)
        if int(counts.sum()) == 0:
            break
        round_ids = stats.prompt_ids.repeat_interleave(counts)
        round_rewards, extra = sample(round_ids)
        stats = stats.add(counts, round_rewards)
        ids.append(round_ids)
        rewards.append(torch.as_tensor(round_rewards).reshape(-1))
        payload.append(extra)
        rounds += 1
    return _grouped(allocator, stats, ids, rewards, payload, rounds)


def _grouped(allocator, stats, ids, rewards, payload, rounds) -> Rollouts:
    flat_ids, flat_rewards = torch.cat(ids), torch.cat(rewards)
    allocator.update(flat_ids, flat_rewards)
    position = {int(p): i for i, p in enumerate(stats.prompt_ids)}
    order = torch.argsort(torch.tensor([position[int(p)] for p in flat_ids]), stable=True)
    sizes = stats.counts[stats.counts > 0]
    return Rollouts(flat_ids[order], flat_rewards[order], sizes, payload, rounds, order)


def zero_variance_mask(rewards: torch.Tensor, sizes=None) -> torch.Tensor:
    """Per-group ``True`` where all rewards are equal (no GRPO signal); DAPO drops these groups."""
    groups = as_groups(rewards, sizes, where="zero_variance_mask")
    return group_std(groups, correction=0) <= 1e-12
