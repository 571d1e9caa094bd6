r"""Prompt selection by posterior or score: VADE (Thompson sampling) and MMR1's VAS.

Both choose which ``prompts_per_step`` of the candidates to sample and give each an equal share
of the budget; they differ in how they rank prompts.
"""

from __future__ import annotations

import numpy as np
import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.rl.allocators import AllocatorBase, RolloutStats, apportion
from gradnoise.rl.checks import check_int, check_real
from gradnoise.rl.tracker import check_prompt_ids

__all__ = ["VADE", "VarianceAwareSampling"]


def _equal_split(chosen: torch.Tensor, num_candidates: int, budget: int) -> torch.Tensor:
    counts = torch.zeros(num_candidates, dtype=torch.long)
    counts[chosen] = apportion(torch.ones(len(chosen)), budget)
    return counts


class VADE(AllocatorBase):
    r"""VADE-style selection: Beta posterior per prompt, Thompson sampling on expected signal.

    Each prompt keeps evidence ``(A, B)`` (decayed success/failure counts, rewards in [0, 1]);
    its posterior over the pass rate is ``Beta(a0 + A, b0 + B)``. A step draws
    ``theta ~ Beta(.)`` per candidate and picks the ``prompts_per_step`` largest expected
    information of a group of ``n = budget // prompts_per_step`` samples,
    ``1 - theta^n - (1 - theta)^n``: the probability that the group's rewards are not all equal,
    i.e. that it carries any GRPO gradient at all (``score="group"``); ``score="bernoulli"`` uses
    ``theta (1 - theta)``, the reward variance, instead. Exploration comes from the posterior
    width. Two-scale decay, as we read the method: every step all evidence shrinks by
    ``rho_long`` (slow policy drift), and a prompt's own evidence shrinks by ``rho_short`` when it
    is observed again (its old rollouts came from an older policy).
    The exact decay schedule of the paper may differ; these two rates are its stated intent.
    """

    def __init__(
        self,
        num_prompts: int,
        prompts_per_step: int,
        *,
        seed: int,
        prior: tuple[float, float] = (1.0, 1.0),
        rho_long: float = 0.99,
        rho_short: float = 0.5,
        score: str = "group",
        reward_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__(num_prompts, prompts_per_step, seed=seed, reward_range=reward_range)
        where = "VADE"
        try:
            a0, b0 = prior
        except (TypeError, ValueError):
            a0 = b0 = None
        fix = "pass Beta prior pseudo-counts > 0, e.g. prior=(1.0, 1.0)"
        a0 = check_real(a0, where=where, name="prior[0]", lo=0.0, lo_open=True, fix=fix)
        b0 = check_real(b0, where=where, name="prior[1]", lo=0.0, lo_open=True, fix=fix)
        fix = "pass decay rates in (0, 1], e.g. rho_long=0.99 and rho_short=0.5"
        rho_long = check_real(
            rho_long, where=where, name="rho_long", lo=0.0, hi=1.0, lo_open=True, fix=fix
        )
        rho_short = check_real(
            rho_short, where=where, name="rho_short", lo=0.0, hi=1.0, lo_open=True, fix=fix
        )
        if score not in ("group", "bernoulli"):
            raise GradNoiseError(
                explain(
                    "VADE(score)",
                    expected='"group" or "bernoulli"',
                    got=repr(score),
                    fix='use score="group" (the default) or score="bernoulli"',
                )
            )
        self.prior, self.rho_long, self.rho_short = (a0, b0), rho_long, rho_short
        self.score = score
        self.evidence = torch.zeros(2, num_prompts, dtype=torch.float64)

    def posterior(self, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.evidence[:, prompt_ids]
        return a + self.prior[0], b + self.prior[1]

    def allocate(self, stats: RolloutStats, budget: int) -> torch.Tensor:
        budget = self._check_call(stats, budget, self.prompts_per_step * self.min_group)
        if stats.total > 0:
            return torch.zeros(len(stats.prompt_ids), dtype=torch.long)
        a, b = self.posterior(stats.prompt_ids)
        theta = torch.from_numpy(self.rng.beta(a.numpy(), b.numpy()))
        n = budget // self.prompts_per_step
        info = theta * (1 - theta) if self.score == "bernoulli" else 1 - theta**n - (1 - theta) ** n
        chosen = torch.argsort(-info, stable=True)[: self.prompts_per_step]
        return _equal_split(chosen, len(stats.prompt_ids), budget)

    def _before_add(self, ids: torch.Tensor, unit: torch.Tensor) -> None:
        self.evidence *= self.rho_long
        self.evidence[:, torch.unique(ids)] *= self.rho_short
        self.evidence[0].index_add_(0, ids, unit)
        self.evidence[1].index_add_(0, ids, 1 - unit)

    def _extra_state(self) -> dict:
        return {"evidence": self.evidence.clone()}

    def _load_extra(self, state: dict) -> None:
        self.evidence = state["evidence"].clone()


class VarianceAwareSampling(AllocatorBase):
    r"""MMR1 Variance-Aware Sampling (Leng et al. 2025, "MMR1", sec. 3).

    Variance Promotion Score ``VPS = w_o OVS + w_t TDS`` with the outcome variance score
    ``OVS = 4 p (1 - p)`` (Bernoulli variance of correctness, scaled to [0, 1]) and a trajectory
    diversity score ``TDS`` in [0, 1] supplied by :meth:`observe_diversity` (MMR1 uses
    inverse self-BLEU; default 0 when not supplied). A fraction ``mix`` of the batch is drawn
    without replacement with probability ``~ VPS`` (unseen prompts score 1, optimistic), the rest
    uniformly; scores refresh every ``refresh_every`` steps, as MMR1's ``T_update``.
    """

    def __init__(
        self,
        num_prompts: int,
        prompts_per_step: int,
        *,
        seed: int,
        mix: float = 0.5,
        weight_outcome: float = 1.0,
        weight_diversity: float = 0.0,
        refresh_every: int = 1,
        reward_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__(num_prompts, prompts_per_step, seed=seed, reward_range=reward_range)
        where = "VarianceAwareSampling"
        mix = check_real(
            mix, where=where, name="mix", lo=0.0, hi=1.0, fix="pass a fraction in [0, 1]"
        )
        fix = "pass finite non-negative score weights, e.g. 1.0 and 0.0"
        weights = tuple(
            check_real(w, where=where, name=name, lo=0.0, fix=fix)
            for w, name in (
                (weight_outcome, "weight_outcome"),
                (weight_diversity, "weight_diversity"),
            )
        )
        refresh_every = check_int(
            refresh_every,
            where=where,
            name="refresh_every",
            minimum=1,
            fix="refresh the scores every step (1) or every few steps",
        )
        self.mix, self.refresh_every = mix, refresh_every
        self.weights = weights
        self.diversity = torch.zeros(num_prompts, dtype=torch.float64)
        self.scores = torch.ones(num_prompts, dtype=torch.float64)

    def observe_diversity(self, prompt_ids: torch.Tensor, tds: torch.Tensor) -> None:
        """Record per-prompt trajectory diversity scores in [0, 1] (checked before any write)."""
        where = "VarianceAwareSampling.observe_diversity"
        ids = check_prompt_ids(prompt_ids, self.num_prompts, where=where)
        tds = torch.as_tensor(tds, dtype=torch.float64).reshape(-1)
        if (
            tds.shape != ids.shape
            or not torch.isfinite(tds).all()
            or (tds < 0).any()
            or (tds > 1).any()
        ):
            raise GradNoiseError(
                explain(
                    where,
                    expected="one diversity score in [0, 1] per prompt id",
                    got=f"{tds.numel()} scores for {ids.numel()} ids: {tds.tolist()[:4]}",
                    fix="pass a normalised diversity per prompt, e.g. 1 - self-BLEU",
                )
            )
        self.diversity[ids] = tds

    def _refresh(self) -> None:
        seen = self.history.n > 0
        p = self.history.s / self.history.n.clamp(min=1)
        vps = self.weights[0] * 4 * p * (1 - p) + self.weights[1] * self.diversity
        self.scores = torch.where(seen, vps, torch.ones_like(vps))

    def allocate(self, stats: RolloutStats, budget: int) -> torch.Tensor:
        budget = self._check_call(stats, budget, self.prompts_per_step * self.min_group)
        if stats.total > 0:
            return torch.zeros(len(stats.prompt_ids), dtype=torch.long)
        k_weighted = round(self.mix * self.prompts_per_step)
        score = self.scores[stats.prompt_ids].numpy() + 1e-6
        first = self.rng.choice(len(score), size=k_weighted, replace=False, p=score / score.sum())
        rest = np.setdiff1d(np.arange(len(score)), first)
        second = self.rng.choice(rest, size=self.prompts_per_step - k_weighted, replace=False)
        chosen = torch.from_numpy(np.concatenate([first, second])).long()
        return _equal_split(chosen, len(stats.prompt_ids), budget)

    def update(self, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> None:
        """Record the step, then refresh the scores every ``refresh_every`` steps."""
        super().update(prompt_ids, rewards)
        if self.history.step % self.refresh_every == 0:
            self._refresh()

    def _extra_state(self) -> dict:
        return {"diversity": self.diversity.clone(), "scores": self.scores.clone()}

    def _load_extra(self, state: dict) -> None:
        self.diversity, self.scores = state["diversity"].clone(), state["scores"].clone()
