r"""Rollout allocators: who gets how many samples, behind one small protocol.

A training step offers ``C`` candidate prompts and a rollout budget. The trainer loops::

    stats = RolloutStats.fresh(candidates, reward_range=allocator.reward_range)
    while (counts := allocator.allocate(stats, budget - stats.total)).sum() > 0:
        rewards = sample(candidates.repeat_interleave(counts))      # your generator + verifier
        stats = stats.add(counts, rewards)
    allocator.update(ids_of_all_rollouts, all_rewards)             # once per step

(:func:`gradnoise.rl.loop.collect_rollouts` is that loop.) ``allocate`` returns the *additional*
samples per candidate for this round (zeros when done), so one-shot rules (uniform, GVM, VADE,
VAS) and multi-round rules (DAPO dynamic sampling, Reinforce-Ada) share the protocol. ``update``
feeds the persistent per-prompt history. Every allocator is deterministic given ``seed`` and
resumes exactly from ``state_dict()``; all input checks run before any state changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from numbers import Integral
from typing import Protocol

import numpy as np
import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.rl.groups import check_rewards
from gradnoise.rl.tracker import PromptHistory, check_observation, check_prompt_ids

__all__ = ["Allocator", "AllocatorBase", "RolloutStats", "Uniform", "apportion"]


@dataclass(frozen=True)
class RolloutStats:
    """What this step has collected per candidate: ``counts``, and sums of rewards scaled to
    ``[0, 1]`` (``unit_sum``, ``unit_sq``) and of rewards above the midpoint (``positives``)."""

    prompt_ids: torch.Tensor
    counts: torch.Tensor
    unit_sum: torch.Tensor
    unit_sq: torch.Tensor
    positives: torch.Tensor
    reward_range: tuple[float, float] = (0.0, 1.0)

    @classmethod
    def fresh(cls, prompt_ids: torch.Tensor, *, reward_range=(0.0, 1.0)) -> RolloutStats:
        ids = torch.as_tensor(prompt_ids).reshape(-1).long()
        unique, counts = torch.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise GradNoiseError(
                explain(
                    "RolloutStats.fresh(prompt_ids)",
                    expected="distinct candidate prompt ids (one group per prompt)",
                    got=f"duplicated ids {unique[counts > 1][:5].tolist()}",
                    fix="deduplicate the candidates, e.g. torch.unique(candidates)",
                )
            )
        zeros = torch.zeros(len(ids), dtype=torch.float64)
        counts = torch.zeros(len(ids), dtype=torch.long)
        return cls(ids, counts, zeros, zeros.clone(), counts.clone(), tuple(reward_range))

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def add(self, counts: torch.Tensor, rewards: torch.Tensor) -> RolloutStats:
        """Fold in one round: ``counts[c]`` new rewards for candidate ``c``, flat in order."""
        counts = torch.as_tensor(counts).long()
        rewards = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
        check_rewards(rewards, where="RolloutStats.add", reward_range=self.reward_range)
        if counts.shape != self.counts.shape or int(counts.sum()) != rewards.numel():
            raise GradNoiseError(
                explain(
                    "RolloutStats.add",
                    expected=f"{len(self.counts)} counts summing to the number of rewards",
                    got=f"{tuple(counts.shape)} counts summing to {int(counts.sum())}, "
                    f"{rewards.numel()} rewards",
                    fix="pass the counts allocate() returned and one reward per rollout",
                )
            )
        lo, hi = self.reward_range
        unit = (rewards - lo) / (hi - lo)
        where = torch.repeat_interleave(torch.arange(len(counts)), counts)
        add = lambda t, v: t.clone().index_add_(0, where, v.to(t.dtype))  # noqa: E731
        return replace(
            self,
            counts=self.counts + counts,
            unit_sum=add(self.unit_sum, unit),
            unit_sq=add(self.unit_sq, unit.pow(2)),
            positives=add(self.positives, (unit > 0.5).long()),
        )

    def informative(self) -> torch.Tensor:
        """Candidates whose collected rewards are not all equal (non-zero group variance)."""
        n = self.counts.clamp(min=1).double()
        var = self.unit_sq / n - (self.unit_sum / n).pow(2)
        return (self.counts >= 2) & (var > 1e-12)


class Allocator(Protocol):
    """The protocol: ``allocate(stats, budget) -> counts``, ``update(prompt_ids, rewards)``."""

    reward_range: tuple[float, float]

    def allocate(self, stats: RolloutStats, budget: int) -> torch.Tensor: ...
    def update(self, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def apportion(weights: torch.Tensor, budget: int, *, lo: int = 0, hi: int | None = None):
    """Integers ``n_i`` in ``[lo, hi]`` summing to ``budget`` (when feasible), ``n_i ~ w_i``.

    Water-filling: the free budget above ``lo`` goes in proportion to ``w``, capped at ``hi``,
    remainders by largest fractional part (ties to the lower index, so the result is
    deterministic).
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    ints = all(isinstance(v, Integral) and not isinstance(v, bool) for v in (budget, lo))
    if not torch.isfinite(w).all() or not ints:
        bad = torch.nonzero(~torch.isfinite(w.reshape(-1))).reshape(-1)[:5].tolist()
        raise GradNoiseError(
            explain(
                "apportion",
                expected="finite weights and integer budget, lo and hi",
                got=f"non-finite weights at positions {bad}"
                if bad
                else f"budget={budget!r}, lo={lo!r}, hi={hi!r}",
                fix="replace inf/NaN weights (e.g. torch.nan_to_num) and pass integer counts",
            )
        )
    w = w.clamp(min=0)
    hi = budget if hi is None else hi
    n = torch.full((len(w),), lo, dtype=torch.long)
    free = budget - int(n.sum())
    while free > 0 and (open_ := n < hi).any():
        ww = torch.where(open_, w, torch.zeros_like(w))
        ww = ww if ww.sum() > 0 else open_.double()
        share = ww / ww.sum() * free
        add = torch.minimum(share.floor().long(), hi - n)
        if add.sum() == 0:  # hand out the last few one by one, largest share first
            order = torch.argsort(-share, stable=True)
            add[order[open_[order]][:free]] = 1
        n, free = n + add, free - int(add.sum())
    return n


class AllocatorBase:
    """Shared pieces: the checked ``update``, the per-prompt history, the seeded RNG, state."""

    min_group = 2  # a group variance needs two samples

    def __init__(
        self,
        num_prompts: int,
        prompts_per_step: int,
        *,
        seed: int,
        reward_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if (
            prompts_per_step < 1
            or num_prompts < prompts_per_step
            or reward_range[0] >= reward_range[1]
        ):
            raise GradNoiseError(
                explain(
                    type(self).__name__,
                    expected="1 <= prompts_per_step <= num_prompts and reward_range lo < hi",
                    got=f"prompts_per_step={prompts_per_step}, num_prompts={num_prompts}, "
                    f"reward_range={reward_range}",
                    fix="size the pool and the per-step batch consistently",
                )
            )
        self.num_prompts, self.prompts_per_step = num_prompts, prompts_per_step
        self.reward_range = tuple(float(x) for x in reward_range)
        self.history = PromptHistory(num_prompts)
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def update(self, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> None:
        """Record one step's rollouts (flat ids, one per reward); checks run before any write."""
        ids, unit = check_observation(
            prompt_ids,
            rewards,
            num_prompts=self.num_prompts,
            reward_range=self.reward_range,
            where=f"{type(self).__name__}.update",
        )
        self._before_add(ids, unit)
        self.history.add(ids, unit)

    def _before_add(self, ids: torch.Tensor, unit: torch.Tensor) -> None:
        """Hook for allocators with extra state (e.g. decaying posteriors)."""

    def _check_call(self, stats: RolloutStats, budget: int, need: int) -> None:
        check_prompt_ids(
            stats.prompt_ids, self.num_prompts, where=f"{type(self).__name__}.allocate"
        )
        if len(stats.prompt_ids) < self.prompts_per_step or (stats.total == 0 and budget < need):
            raise GradNoiseError(
                explain(
                    f"{type(self).__name__}.allocate",
                    expected=f"at least {self.prompts_per_step} candidates and a budget of at "
                    f"least {need} rollouts (the prompts that must be sampled)",
                    got=f"{len(stats.prompt_ids)} candidates and budget {budget}",
                    fix="raise the rollout budget or lower prompts_per_step",
                )
            )

    def state_dict(self) -> dict:
        return {
            "allocator": type(self).__name__,
            "history": self.history.state_dict(),
            "rng": self.rng.bit_generator.state,
            **self._extra_state(),
        }

    def check_state_dict(self, state: dict) -> None:
        """Raise ``GradNoiseError`` unless ``state`` has the layout of this allocator's own."""
        check_state_like(f"{type(self).__name__}.load_state_dict", self.state_dict(), state)

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` of the same allocator type and pool size (checked)."""
        self.check_state_dict(state)
        self.history.load_state_dict(state["history"])
        self.rng.bit_generator.state = state["rng"]
        self._load_extra(state)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra(self, state: dict) -> None:
        pass


def check_state_like(where: str, mine, theirs, path: str = "state") -> None:
    """Compare a loaded state with a fresh one: same keys, types, tensor shapes and dtypes."""

    def fail(got: str) -> None:
        raise GradNoiseError(
            explain(
                where,
                expected=f"a state_dict of the same allocator type and pool size ({path})",
                got=got,
                fix="load a state saved by an allocator built with the same class and arguments",
            )
        )

    if isinstance(mine, dict):
        if not isinstance(theirs, dict):
            fail(f"{path} is a {type(theirs).__name__}, not a dict")
        if set(mine) != set(theirs):
            fail(f"{path} keys {sorted(map(str, theirs))}, expected {sorted(map(str, mine))}")
        for key in mine:
            check_state_like(where, mine[key], theirs[key], f"{path}[{key!r}]")
    elif isinstance(mine, torch.Tensor):
        if not isinstance(theirs, torch.Tensor):
            fail(f"{path} is a {type(theirs).__name__}, not a tensor")
        if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            fail(
                f"{path} of shape {tuple(theirs.shape)} {theirs.dtype}, expected "
                f"{tuple(mine.shape)} {mine.dtype}"
            )
    elif isinstance(mine, str):
        if theirs != mine:
            fail(f"{path}={theirs!r}, expected {mine!r}")
    elif isinstance(mine, int) and not isinstance(theirs, int):
        fail(f"{path} is a {type(theirs).__name__}, not an int")


class Uniform(AllocatorBase):
    """GRPO's default: the first ``prompts_per_step`` candidates, ``budget / P`` samples each."""

    def allocate(self, stats: RolloutStats, budget: int) -> torch.Tensor:
        self._check_call(stats, budget, self.prompts_per_step * self.min_group)
        counts = torch.zeros(len(stats.prompt_ids), dtype=torch.long)
        if stats.total == 0:
            counts[: self.prompts_per_step] = apportion(torch.ones(self.prompts_per_step), budget)
        return counts
