r"""Allocators that adapt within a step or from per-prompt history: DAPO, GVM-RAFT, Reinforce-Ada.

All follow the protocol of :mod:`gradnoise.rl.allocators`: the first ``prompts_per_step``
candidates form the step's batch unless the rule says otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.rl.allocators import AllocatorBase, RolloutStats, apportion
from gradnoise.rl.checks import check_int
from gradnoise.rl.tracker import check_prompt_ids

__all__ = ["GVM", "DynamicSampling", "ReinforceAda"]


class DynamicSampling(AllocatorBase):
    r"""DAPO dynamic sampling (Yu et al. 2025, "DAPO", sec. 3.2): sample groups of ``group_size``
    for candidates in order until ``prompts_per_step`` groups have non-zero reward variance or the
    budget runs out; zero-variance groups are then dropped from the update
    (:func:`gradnoise.rl.loop.zero_variance_mask`). The first round must afford all
    ``prompts_per_step`` groups.
    """

    def __init__(
        self,
        num_prompts: int,
        prompts_per_step: int,
        *,
        group_size: int,
        seed: int,
        reward_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__(num_prompts, prompts_per_step, seed=seed, reward_range=reward_range)
        self.group_size = check_int(
            group_size,
            where="DynamicSampling",
            name="group_size",
            minimum=2,
            fix="sample at least 2 responses per prompt (a group variance needs two)",
        )

    def allocate(self, stats: RolloutStats, budget: int) -> torch.Tensor:
        budget = self._check_call(stats, budget, self.prompts_per_step * self.group_size)
        counts = torch.zeros(len(stats.prompt_ids), dtype=torch.long)
        need = self.prompts_per_step - int(stats.informative().sum())
        fresh = torch.nonzero(stats.counts == 0).reshape(-1)
        take = fresh[: max(0, min(need, budget // self.group_size))]
        counts[take] = self.group_size
        return counts


class GVM(AllocatorBase):
    r"""GVM-RAFT allocation (Yao et al. 2025, "Optimizing Chain-of-Thought Reasoners via Gradient
    Variance Minimization in Rejection Sampling and RL", sec. 3).

    For prompt ``i`` with acceptance rate ``p_i`` and gradient norm ``G_i``, the rejection-sampling
    gradient from ``n_i`` samples has variance ``~ G_i^2 (1 - p_i) / (p_i n_i)``; minimising the
    sum subject to ``sum n_i = N`` gives ``n_i ~ G_i sqrt((1 - p_i) / p_i)``. We estimate ``p_i``
    from history with a Laplace prior, ``G_i`` from :meth:`observe_grad_norms` (a prompt not yet
    measured takes the mean of the measured norms, so the weights stay on one scale; 1 before any
    measurement, which is what the rule reduces to without gradients), and clip ``n_i`` to
    ``[min_samples, max_samples]``. The paper's exact estimator details (a
    pre-sampling pass per iteration) are replaced by this running history.
    """

    def __init__(
        self,
        num_prompts: int,
        prompts_per_step: int,
        *,
        seed: int,
        min_samples: int = 2,
        max_samples: int | None = None,
        reward_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__(num_prompts, prompts_per_step, seed=seed, reward_range=reward_range)
        fix = "pass integer sample counts with 0 <= min_samples <= max_samples (or None)"
        self.min_samples = check_int(
            min_samples, where="GVM", name="min_samples", minimum=0, fix=fix
        )
        if max_samples is not None:
            lowest = max(1, self.min_samples)
            max_samples = check_int(
                max_samples, where="GVM", name="max_samples", minimum=lowest, fix=fix
            )
        self.max_samples = max_samples
        self.grad_norms = torch.ones(num_prompts, dtype=torch.float64)
        self.measured = torch.zeros(num_prompts, dtype=torch.bool)

    def observe_grad_norms(self, prompt_ids: torch.Tensor, norms: torch.Tensor) -> None:
        """Record measured per-prompt gradient norms ``G_i`` (finite, non-negative)."""
        ids = check_prompt_ids(prompt_ids, self.num_prompts, where="GVM.observe_grad_norms")
        norms = torch.as_tensor(norms, dtype=torch.float64).reshape(-1)
        if norms.shape != ids.shape or not torch.isfinite(norms).all() or (norms < 0).any():
            raise GradNoiseError(
                explain(
                    "GVM.observe_grad_norms",
                    expected="one finite norm >= 0 per prompt id",
                    got=f"{norms.numel()} norms for {ids.numel()} ids: {norms.tolist()[:4]}",
                    fix="pass the gradient norm of each prompt's group",
                )
            )
        self.grad_norms[ids] = norms
        self.measured[ids] = True

    def norms(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``G_i``: its last measured norm, else the mean of the measured ones, else 1."""
        unmeasured = self.grad_norms[self.measured].mean() if self.measured.any() else 1.0
        return torch.where(self.measured[prompt_ids], self.grad_norms[prompt_ids], unmeasured)

    def weights(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        p = self.history.pass_rate(prompt_ids)
        return self.norms(prompt_ids) * ((1 - p) / p).sqrt()

    def allocate(self, stats: RolloutStats, budget: int) -> torch.Tensor:
        budget = self._check_call(stats, budget, self.prompts_per_step * self.min_samples)
        counts = torch.zeros(len(stats.prompt_ids), dtype=torch.long)
        if stats.total == 0:
            batch = stats.prompt_ids[: self.prompts_per_step]
            counts[: self.prompts_per_step] = apportion(
                self.weights(batch), budget, lo=self.min_samples, hi=self.max_samples
            )
        return counts

    def _extra_state(self) -> dict:
        return {"grad_norms": self.grad_norms.clone(), "measured": self.measured.clone()}

    def _load_extra(self, state: dict) -> None:
        self.grad_norms = state["grad_norms"].clone()
        self.measured = state["measured"].clone()


class ReinforceAda(AllocatorBase):
    r"""Reinforce-Ada adaptive sampling (Xiong et al. 2025, "Reinforce-Ada: An Adaptive Sampling
    Framework for Reinforce-Style LLM Training"), online successive elimination.

    Rounds of ``round_size`` samples go to every still-active prompt of the batch (fewest samples
    first when the budget is short). A prompt is eliminated once it has signal:

    * plain (``balanced=False``, the paper's "Reinforce-Ada-pos"): at least one positive reward;
    * balanced: at least ``target // 2`` positive and ``target // 2`` non-positive rewards,

    or when it reaches ``max_samples``. "Positive" means above the midpoint of ``reward_range``.
    The paper then down-samples each prompt to a fixed group and uses global statistics for the
    baseline (:func:`gradnoise.rl.advantages.global_baseline_advantages`).
    """

    def __init__(
        self,
        num_prompts: int,
        prompts_per_step: int,
        *,
        seed: int,
        round_size: int = 4,
        balanced: bool = False,
        target: int = 8,
        max_samples: int = 32,
        reward_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__(num_prompts, prompts_per_step, seed=seed, reward_range=reward_range)
        where = "ReinforceAda"
        fix = "pass integer round_size >= 2, target >= 2 and max_samples >= 2"
        self.round_size = check_int(round_size, where=where, name="round_size", minimum=2, fix=fix)
        self.target = check_int(target, where=where, name="target", minimum=2, fix=fix)
        self.max_samples = check_int(
            max_samples, where=where, name="max_samples", minimum=2, fix=fix
        )
        if not isinstance(balanced, (bool, np.bool_)):
            raise GradNoiseError(
                explain(
                    "ReinforceAda(balanced)",
                    expected="True or False",
                    got=repr(balanced),
                    fix="pass balanced=True for the balanced elimination rule",
                )
            )
        self.balanced = bool(balanced)

    def active(self, stats: RolloutStats) -> torch.Tensor:
        """Batch candidates that still lack signal and have room for more samples."""
        half = self.target // 2
        negatives = stats.counts - stats.positives
        done = (
            (stats.positives >= half) & (negatives >= half)
            if self.balanced
            else stats.positives >= 1
        )
        alive = ~done & (stats.counts < self.max_samples)
        alive[self.prompts_per_step :] = False
        return alive

    def allocate(self, stats: RolloutStats, budget: int) -> torch.Tensor:
        budget = self._check_call(stats, budget, self.prompts_per_step * self.min_group)
        counts = torch.zeros(len(stats.prompt_ids), dtype=torch.long)
        alive = torch.nonzero(self.active(stats)).reshape(-1)
        alive = alive[torch.argsort(stats.counts[alive], stable=True)]
        room = (self.max_samples - stats.counts[alive]).clamp(max=self.round_size)
        for c, r in zip(alive.tolist(), room.tolist(), strict=True):
            give = min(r, budget - int(counts.sum()))
            counts[c] = give if give >= self.min_group or stats.counts[c] > 0 else 0
        return counts
