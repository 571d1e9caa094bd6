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

import math
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.rl.checks import as_int, check_budget, check_int, check_reward_range
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
        reward_range = check_reward_range(reward_range, where="RolloutStats.fresh")
        try:
            ids = torch.as_tensor(prompt_ids).reshape(-1)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            ids = torch.full((1,), math.nan)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise GradNoiseError(
                explain(
                    "RolloutStats.fresh(prompt_ids)",
                    expected="integer candidate prompt ids",
                    got=f"dtype {ids.dtype}",
                    fix="pass the candidates as a long tensor, e.g. torch.arange(n)",
                )
            )
        ids = ids.long()
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
        return cls(ids, counts, zeros, zeros.clone(), counts.clone(), reward_range)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def add(self, counts: torch.Tensor, rewards: torch.Tensor) -> RolloutStats:
        """Fold in one round: ``counts[c]`` new rewards for candidate ``c``, flat in order."""
        try:
            counts = torch.as_tensor(counts)
            rewards = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise GradNoiseError(
                explain(
                    "RolloutStats.add",
                    expected="integer counts and real rewards as tensors",
                    got=f"{type(counts).__name__} counts, {type(rewards).__name__} rewards: {err}",
                    fix="pass the counts allocate() returned and one reward per rollout",
                )
            ) from err
        check_rewards(rewards, where="RolloutStats.add", reward_range=self.reward_range)
        integral = not (
            counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool
        )
        counts = counts.long() if integral else counts
        if (
            not integral
            or counts.shape != self.counts.shape
            or (counts < 0).any()
            or int(counts.sum()) != rewards.numel()
        ):
            raise GradNoiseError(
                explain(
                    "RolloutStats.add",
                    expected=f"{len(self.counts)} non-negative integer counts summing to the "
                    "number of rewards",
                    got=f"{tuple(counts.shape)} counts summing to {int(counts.sum())}, "
                    f"{rewards.numel()} rewards"
                    if integral
                    else f"counts of dtype {counts.dtype}",
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


def _as_caps(hi, size: int) -> torch.Tensor | None:
    """``hi`` (an int, or a tensor/list of ints, one per weight) as a long tensor, else None."""
    if as_int(hi) is not None:
        return torch.full((size,), as_int(hi), dtype=torch.long)
    try:
        caps = torch.as_tensor(hi)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None
    if caps.is_floating_point() or caps.is_complex() or caps.dtype == torch.bool:
        return None
    if caps.dim() == 0:
        return torch.full((size,), int(caps), dtype=torch.long)
    return caps.reshape(-1).long() if caps.numel() == size else None


def apportion(weights: torch.Tensor, budget: int, *, lo: int = 0, hi=None) -> torch.Tensor:
    """Integers ``n_i`` in ``[lo, hi]`` summing to ``budget`` (when feasible), ``n_i ~ w_i``.

    Water-filling: the free budget above ``lo`` goes in proportion to ``w`` (negative weights
    count as 0; all-zero weights share equally); an entry whose share exceeds its cap ``hi`` is
    set to the cap and the rest is shared again among the others. Once no share exceeds its cap,
    each entry gets the floor of its share and the remainders go one each to the largest
    fractional parts (ties to the lower index, so the result is deterministic): uncapped, this
    is the largest-remainder (Hamilton) method. ``hi`` is an int, one int per weight, or None
    (no cap); ``budget`` and ``lo >= 0`` are ints (``2.5``, ``None``, ``True`` are refused).
    """
    try:
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        w = torch.full((1,), math.nan, dtype=torch.float64)
    budget_i, lo_i = as_int(budget), as_int(lo)
    caps = None
    if budget_i is not None:
        caps = _as_caps(budget_i if hi is None else hi, len(w))
    if (
        not torch.isfinite(w).all()
        or budget_i is None
        or lo_i is None
        or lo_i < 0
        or caps is None
        or (caps < 0).any()
    ):
        bad = torch.nonzero(~torch.isfinite(w)).reshape(-1)[:5].tolist()
        raise GradNoiseError(
            explain(
                "apportion",
                expected="finite weights and integer budget, lo >= 0 and hi >= 0 "
                "(an int or one per weight)",
                got=f"non-finite weights at positions {bad}"
                if bad
                else f"budget={budget!r}, lo={lo!r}, hi={hi!r}",
                fix="replace inf/NaN weights (e.g. torch.nan_to_num) and pass integer counts",
            )
        )
    w = w.clamp(min=0)
    n = torch.full((len(w),), lo_i, dtype=torch.long)
    free = budget_i - int(n.sum())
    open_ = n < caps
    while free > 0 and open_.any():
        ww = torch.where(open_, w, torch.zeros_like(w))
        ww = ww if ww.sum() > 0 else open_.double()
        share = ww / ww.sum() * free
        over = open_ & (share > (caps - n).double())
        if over.any():  # water-filling: cap these, share the rest again among the others
            n = torch.where(over, caps, n)
        else:
            base = torch.where(open_, share.floor().long(), torch.zeros_like(n))
            left = free - int(base.sum())
            frac = (share - base).tolist()
            n = n + base
            room = (open_ & (n < caps)).tolist()
            order = sorted((i for i in range(len(w)) if room[i]), key=lambda i: (-frac[i], i))
            n[order[: max(left, 0)]] += 1
        free = budget_i - int(n.sum())
        open_ = n < caps
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
        name = type(self).__name__
        fix = "size the pool and the per-step batch consistently"
        num_prompts = check_int(num_prompts, where=name, name="num_prompts", minimum=1, fix=fix)
        prompts_per_step = check_int(prompts_per_step, where=name, name="prompts_per_step", fix=fix)
        seed = check_int(seed, where=name, name="seed", minimum=0, fix="pass an int seed >= 0")
        if prompts_per_step < 1 or num_prompts < prompts_per_step:
            raise GradNoiseError(
                explain(
                    name,
                    expected="1 <= prompts_per_step <= num_prompts",
                    got=f"prompts_per_step={prompts_per_step}, num_prompts={num_prompts}",
                    fix=fix,
                )
            )
        reward_range = check_reward_range(reward_range, where=name)
        self.num_prompts, self.prompts_per_step = num_prompts, prompts_per_step
        self.reward_range = reward_range
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

    def _check_call(self, stats: RolloutStats, budget: int, need: int) -> int:
        """Validate one ``allocate`` call before anything (the RNG included) changes; return
        the budget as an int (an integer >= 0: ``None``, ``64.5``, NaN and ``"64"`` are
        refused)."""
        where = f"{type(self).__name__}.allocate"
        if not isinstance(stats, RolloutStats):
            raise GradNoiseError(
                explain(
                    where,
                    expected="a RolloutStats (the step's statistics so far)",
                    got=type(stats).__name__,
                    fix="start the step with RolloutStats.fresh(candidates) and fold rounds in "
                    "with stats.add(counts, rewards)",
                )
            )
        budget = check_budget(budget, where=where)
        check_prompt_ids(stats.prompt_ids, self.num_prompts, where=where)
        if len(stats.prompt_ids) < self.prompts_per_step or (stats.total == 0 and budget < need):
            raise GradNoiseError(
                explain(
                    where,
                    expected=f"at least {self.prompts_per_step} candidates and a budget of at "
                    f"least {need} rollouts (the prompts that must be sampled)",
                    got=f"{len(stats.prompt_ids)} candidates and budget {budget}",
                    fix="raise the rollout budget or lower prompts_per_step",
                )
            )
        return budget

    def state_dict(self) -> dict:
        return {
            "allocator": type(self).__name__,
            "history": self.history.state_dict(),
            "rng": self.rng.bit_generator.state,
            **self._extra_state(),
        }

    def check_state_dict(self, state: dict) -> None:
        """Raise ``GradNoiseError`` unless ``state`` has the layout of this allocator's own,
        finite float tensors and an RNG state that ``PCG64`` accepts (tried on a scratch
        generator, so a corrupted one is refused before anything changes)."""
        where = f"{type(self).__name__}.load_state_dict"
        check_state_like(where, self.state_dict(), state)
        step = state["history"]["step"]
        if not 0 <= step < 2**62:  # last_seen is int64
            raise GradNoiseError(
                explain(
                    where,
                    expected="state['history']['step'], the number of steps seen, in [0, 2**62)",
                    got=repr(step),
                    fix="load a state saved by state_dict(), unmodified",
                )
            )
        try:
            np.random.PCG64().state = state["rng"]
        except Exception as err:  # numpy raises ValueError, TypeError, OverflowError, ...
            raise GradNoiseError(
                explain(
                    where,
                    expected="a valid PCG64 bit-generator state in state['rng']",
                    got=f"{type(err).__name__}: {err}",
                    fix="load a state saved by state_dict(), unmodified",
                )
            ) from err

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` of the same allocator type and pool size; the whole
        state is checked (:meth:`check_state_dict`) before anything changes."""
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
        # every float tensor of an allocator state is a count, sum, score or norm: finite, >= 0
        if theirs.is_floating_point() and not (torch.isfinite(theirs) & (theirs >= 0)).all():
            fail(f"{path} holds NaN, infinite or negative values")
    elif isinstance(mine, str):
        if theirs != mine:
            fail(f"{path}={theirs!r}, expected {mine!r}")
    elif isinstance(mine, int) and (not isinstance(theirs, int) or isinstance(theirs, bool)):
        fail(f"{path} is a {type(theirs).__name__}, not an int")


class Uniform(AllocatorBase):
    """GRPO's default: the first ``prompts_per_step`` candidates, ``budget / P`` samples each."""

    def allocate(self, stats: RolloutStats, budget: int) -> torch.Tensor:
        budget = self._check_call(stats, budget, self.prompts_per_step * self.min_group)
        counts = torch.zeros(len(stats.prompt_ids), dtype=torch.long)
        if stats.total == 0:
            counts[: self.prompts_per_step] = apportion(torch.ones(self.prompts_per_step), budget)
        return counts
