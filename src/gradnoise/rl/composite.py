r"""Composition of a prompt selector with a within-prompt sampler, behind the allocator protocol.

A *selector* (:class:`~gradnoise.rl.bandits.VADE`, :class:`~gradnoise.rl.bandits.
VarianceAwareSampling`, or any one-shot allocator) decides *which* candidates a step samples; a
*sampler* (:class:`~gradnoise.rl.adaptive.ReinforceAda`) decides *how many* samples each of them
gets, round by round. :class:`SelectThenSample` is the small object that joins them; neither part
knows about the other.
"""

from __future__ import annotations

import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.rl.allocators import RolloutStats, apportion
from gradnoise.rl.checks import as_int, check_budget
from gradnoise.rl.tracker import check_observation

__all__ = ["SelectThenSample"]


class SelectThenSample:
    r"""Selector picks the prompts, sampler samples within them, leftover budget tops them up.

    Per step, with candidates ``C`` and budget ``B``:

    1. the selector's first-round allocation on the fresh step names the chosen set
       ``S = {c : n_c > 0}`` (its counts are not used otherwise);
    2. the sampler runs its rounds on ``S`` alone (its ``allocate`` sees the step's statistics
       restricted to ``S``, in the selector's candidate order);
    3. when the sampler stops with budget left, the rest goes in equal shares to the groups of ``S``
       that already carry signal (rewards not all equal), each up to ``top_up_cap`` samples; groups
       without signal get none, so the top-up never adds a zero-variance group.

    Both parts see every rollout of the step in ``update``, so the selector's posterior learns
    from the sampler's extra rounds too. With ``VADE`` as selector and
    ``ReinforceAda(balanced=True, target=2)`` as sampler, this is the combination of Thompson
    selection on ``P(group has signal) = 1 - theta^n - (1 - theta)^n`` (VADE) with Reinforce-Ada's
    "sample until the group holds both a success and a failure, up to a cap" (Xiong et al. 2025,
    "Reinforce-Ada", balanced elimination with one positive and one negative): the selector keeps
    hopeless and solved prompts out, the sampler rescues unlucky all-equal groups of the rest.
    Deterministic given the parts' seeds; ``state_dict`` holds both parts and the step's choice.
    """

    def __init__(self, selector, sampler, *, top_up_cap: int | None = None) -> None:
        bad = [
            f"{k}: selector {getattr(selector, k, None)}, sampler {getattr(sampler, k, None)}"
            for k in ("num_prompts", "prompts_per_step", "reward_range")
            if getattr(selector, k, None) != getattr(sampler, k, None)
        ]
        cap = None if top_up_cap is None else as_int(top_up_cap)
        if bad or (top_up_cap is not None and (cap is None or cap < 1)):
            raise GradNoiseError(
                explain(
                    "SelectThenSample",
                    expected="selector and sampler with equal num_prompts, prompts_per_step and "
                    "reward_range, and top_up_cap >= 1 or None",
                    got="; ".join(bad) or f"top_up_cap={top_up_cap!r}",
                    fix="build both parts for the same pool, batch size and reward range",
                )
            )
        self.selector, self.sampler, self.top_up_cap = selector, sampler, cap
        self.num_prompts, self.prompts_per_step = selector.num_prompts, selector.prompts_per_step
        self.reward_range = selector.reward_range
        self.chosen = torch.zeros(0, dtype=torch.long)  # candidate positions chosen this step

    @property
    def history(self):
        """The selector's per-prompt history (every rollout of every step)."""
        return self.selector.history

    def allocate(self, stats: RolloutStats, budget: int) -> torch.Tensor:
        """One round: on a fresh step the selector names the chosen set, then the sampler (or
        the top-up) allocates within it. The budget is checked (an int >= 0) before either part
        is asked, so a bad one changes nothing."""
        budget = check_budget(budget, where="SelectThenSample.allocate")
        if not isinstance(stats, RolloutStats):
            raise GradNoiseError(
                explain(
                    "SelectThenSample.allocate",
                    expected="a RolloutStats (the step's statistics so far)",
                    got=type(stats).__name__,
                    fix="start the step with RolloutStats.fresh(candidates)",
                )
            )
        if stats.total == 0:
            picked = self.selector.allocate(stats, budget)
            self.chosen = torch.nonzero(picked > 0).reshape(-1)
        counts = torch.zeros(len(stats.prompt_ids), dtype=torch.long)
        sub = _restrict(stats, self.chosen)
        extra = self.sampler.allocate(sub, budget)
        if int(extra.sum()) == 0 and budget > 0:
            extra = self._top_up(sub, budget)
        counts[self.chosen] = extra
        return counts

    def _top_up(self, sub: RolloutStats, budget: int) -> torch.Tensor:
        signal = sub.informative()
        if not signal.any():
            return torch.zeros(len(sub.counts), dtype=torch.long)
        cap = budget + int(sub.counts.max()) if self.top_up_cap is None else self.top_up_cap
        room = torch.where(signal, (cap - sub.counts).clamp(min=0), torch.zeros_like(sub.counts))
        return apportion(signal.double(), min(budget, int(room.sum())), hi=room)

    def update(self, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> None:
        """Feed the step's rollouts to both parts; checks run before either is touched."""
        check_observation(
            prompt_ids,
            rewards,
            num_prompts=self.num_prompts,
            reward_range=self.reward_range,
            where="SelectThenSample.update",
        )
        self.selector.update(prompt_ids, rewards)
        self.sampler.update(prompt_ids, rewards)

    def state_dict(self) -> dict:
        return {
            "selector": self.selector.state_dict(),
            "sampler": self.sampler.state_dict(),
            "chosen": self.chosen.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; both parts are checked before either is changed."""
        where = "SelectThenSample.load_state_dict"
        keys = {"selector", "sampler", "chosen"}
        ok = isinstance(state, dict) and set(state) == keys and torch.is_tensor(state["chosen"])
        if ok:
            chosen = state["chosen"]
            ok = chosen.dtype == torch.long and chosen.dim() == 1
            ok = ok and not (chosen.numel() and bool((chosen < 0).any()))
        if not ok:
            raise GradNoiseError(
                explain(
                    where,
                    expected=f"a SelectThenSample state_dict with keys {sorted(keys)} and "
                    "state['chosen'] a 1-D int64 tensor of candidate positions >= 0",
                    got=_describe_state(state, keys),
                    fix="load a state saved by SelectThenSample with the same parts",
                )
            )
        for part, name in ((self.selector, "selector"), (self.sampler, "sampler")):
            if hasattr(part, "check_state_dict"):
                part.check_state_dict(state[name])
        self.selector.load_state_dict(state["selector"])
        self.sampler.load_state_dict(state["sampler"])
        self.chosen = state["chosen"].clone()


def _restrict(stats: RolloutStats, keep: torch.Tensor) -> RolloutStats:
    return RolloutStats(
        stats.prompt_ids[keep],
        stats.counts[keep],
        stats.unit_sum[keep],
        stats.unit_sq[keep],
        stats.positives[keep],
        stats.reward_range,
    )


def _describe_state(state, keys: set) -> str:
    if not isinstance(state, dict):
        return type(state).__name__
    if set(state) != keys:
        return f"keys {sorted(map(str, state))}"
    chosen = state["chosen"]
    if not torch.is_tensor(chosen):
        return f"state['chosen'] of type {type(chosen).__name__}"
    return f"state['chosen'] of shape {tuple(chosen.shape)} {chosen.dtype}"
