r"""Persistent per-prompt state: reward history for allocators and the SPO value tracker.

:class:`PromptHistory` is the one record every history-based allocator reads: for each prompt id
in ``[0, num_prompts)`` the (optionally decayed) number of rollouts ``n``, reward sum ``s`` and sum
of squares ``q``, and the step it was last seen. Rewards are checked (no NaN, inside the declared
range) before anything is written.

:class:`ValueTracker` is the Beta tracker of Xu et al. 2025, "Single-stream Policy Optimization":
with rewards rescaled to ``[0, 1]``, ``alpha <- rho alpha + sum r`` and
``beta <- rho beta + sum (1 - r)``, value ``v = alpha / (alpha + beta)``. SPO adapts ``rho`` to the
policy's KL drift; we keep a fixed ``rho`` (a stated simplification).
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.rl.checks import check_int, check_real, check_reward_range
from gradnoise.rl.groups import check_rewards

__all__ = ["PromptHistory", "ValueTracker", "check_prompt_ids"]


def check_prompt_ids(prompt_ids: torch.Tensor, num_prompts: int, *, where: str) -> torch.Tensor:
    """Return ``prompt_ids`` as a flat long tensor, refusing ids outside ``[0, num_prompts)``."""
    try:
        ids = torch.as_tensor(prompt_ids).reshape(-1)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        ids = torch.full((1,), math.nan)  # refused below as non-integer
    not_int = ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool
    if not_int or (ids.numel() and (ids.min() < 0 or ids.max() >= num_prompts)):
        raise GradNoiseError(
            explain(
                where,
                expected=f"integer prompt ids in [0, {num_prompts})",
                got=f"dtype {ids.dtype}, range [{ids.min().item()}, {ids.max().item()}]"
                if ids.numel() and not ids.is_complex()
                else f"dtype {ids.dtype}",
                fix="number prompts 0..num_prompts-1, or build it with a larger num_prompts",
            )
        )
    return ids.long()


def check_observation(
    prompt_ids: torch.Tensor,
    rewards: torch.Tensor,
    *,
    num_prompts: int,
    reward_range: tuple[float, float],
    where: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate one batch of ``(prompt id, reward)`` pairs; return them flat, rewards in [0, 1]."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    ids = check_prompt_ids(prompt_ids, num_prompts, where=where)
    if ids.numel() == 0 or ids.shape != rewards.shape:
        raise GradNoiseError(
            explain(
                where,
                expected="one prompt id per reward and at least one reward (a non-empty group)",
                got=f"{ids.numel()} prompt ids and {rewards.numel()} rewards",
                fix="repeat each prompt id once per sampled response, e.g. repeat_interleave",
            )
        )
    check_rewards(rewards, where=where, reward_range=reward_range)
    lo, hi = reward_range
    return ids, (rewards - lo) / (hi - lo)


class PromptHistory:
    """Per-prompt count ``n``, sum ``s`` and square sum ``q`` of [0, 1] rewards, ``last_seen``."""

    def __init__(self, num_prompts: int) -> None:
        self.n = torch.zeros(num_prompts, dtype=torch.float64)
        self.s = torch.zeros(num_prompts, dtype=torch.float64)
        self.q = torch.zeros(num_prompts, dtype=torch.float64)
        self.last_seen = torch.full((num_prompts,), -1, dtype=torch.long)
        self.step = 0

    def add(self, ids: torch.Tensor, unit_rewards: torch.Tensor) -> None:
        """Add validated observations (rewards already in [0, 1]) and advance the step."""
        self.n.index_add_(0, ids, torch.ones_like(unit_rewards))
        self.s.index_add_(0, ids, unit_rewards)
        self.q.index_add_(0, ids, unit_rewards.pow(2))
        self.last_seen[ids] = self.step
        self.step += 1

    def pass_rate(self, ids: torch.Tensor, *, prior: float = 1.0) -> torch.Tensor:
        """Laplace-smoothed mean ``(s + prior/2) / (n + prior)``; 0.5 for unseen prompts."""
        return (self.s[ids] + prior / 2) / (self.n[ids] + prior)

    def state_dict(self) -> dict:
        return {
            "n": self.n.clone(),
            "s": self.s.clone(),
            "q": self.q.clone(),
            "last_seen": self.last_seen.clone(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.n, self.s, self.q = state["n"].clone(), state["s"].clone(), state["q"].clone()
        self.last_seen, self.step = state["last_seen"].clone(), int(state["step"])


class ValueTracker:
    """SPO's per-prompt Beta value tracker with fixed discount ``rho`` (module docstring)."""

    def __init__(
        self,
        num_prompts: int,
        *,
        rho: float = 0.9,
        prior: tuple[float, float] = (0.5, 0.5),
        reward_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        real = isinstance(rho, Real) and not isinstance(rho, bool)
        if not (real and 0.0 < rho <= 1.0):
            raise GradNoiseError(
                explain(
                    "ValueTracker(rho)",
                    expected="a discount in (0, 1]",
                    got=repr(rho),
                    fix="use rho close to 1 for slow policies, e.g. 0.9",
                )
            )
        num_prompts = check_int(
            num_prompts,
            where="ValueTracker",
            name="num_prompts",
            minimum=1,
            fix="pass the size of the prompt pool",
        )
        try:
            a0, b0 = prior
        except (TypeError, ValueError):
            a0 = b0 = None
        fix = "pass Beta prior pseudo-counts > 0, e.g. prior=(0.5, 0.5)"
        a0 = check_real(a0, where="ValueTracker", name="prior[0]", lo=0.0, lo_open=True, fix=fix)
        b0 = check_real(b0, where="ValueTracker", name="prior[1]", lo=0.0, lo_open=True, fix=fix)
        reward_range = check_reward_range(reward_range, where="ValueTracker")
        self.num_prompts, self.rho, self.reward_range = num_prompts, float(rho), reward_range
        self.alpha = torch.full((num_prompts,), a0, dtype=torch.float64)
        self.beta = torch.full((num_prompts,), b0, dtype=torch.float64)

    def values(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Tracked values ``v = alpha / (alpha + beta)``, on the caller's reward scale."""
        ids = check_prompt_ids(prompt_ids, self.num_prompts, where="ValueTracker.values")
        lo, hi = self.reward_range
        return lo + (hi - lo) * self.alpha[ids] / (self.alpha[ids] + self.beta[ids])

    def update(self, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> None:
        """Discount the seen prompts' counts once, then add their new rewards."""
        ids, unit = check_observation(
            prompt_ids,
            rewards,
            num_prompts=self.num_prompts,
            reward_range=self.reward_range,
            where="ValueTracker.update",
        )
        seen = torch.unique(ids)
        self.alpha[seen] *= self.rho
        self.beta[seen] *= self.rho
        self.alpha.index_add_(0, ids, unit)
        self.beta.index_add_(0, ids, 1 - unit)

    def state_dict(self) -> dict:
        return {"alpha": self.alpha.clone(), "beta": self.beta.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.beta = state["alpha"].clone(), state["beta"].clone()
