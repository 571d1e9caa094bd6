"""The pieces of benchmarks/rl_allocation.py that decide what it reports: disjoint data, the
stratified pool, GVM's measured per-prompt gradient norms, and the rollouts-to-target rule."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from gradnoise import GradStats
from gradnoise.workloads import arithmetic as ar

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import rl_allocation as bench


def test_unique_problems_are_distinct_and_avoid_the_excluded_prompts():
    g = torch.Generator().manual_seed(0)
    seen = ar.make_problems(500, generator=g)
    fresh = bench.unique_problems(300, set(bench.keys(seen)), g)
    keys = bench.keys(fresh)
    assert len(set(keys)) == 300 and not set(keys) & set(bench.keys(seen))
    for prompt, target in zip(fresh.prompts.tolist(), fresh.targets.tolist(), strict=True):
        question = "".join(ar.VOCAB[t] for t in prompt if t != ar.PAD).rstrip("=")
        answer = "".join(ar.VOCAB[t] for t in target if t not in (ar.PAD, ar.EOS))
        assert int(answer) == eval(question)  # each row keeps its own answer


def test_stratified_pool_takes_the_asked_share_of_mid_difficulty_and_fills_shortfalls():
    g = torch.Generator().manual_seed(0)
    rates = torch.cat([torch.full((50,), 0.0), torch.full((30,), 0.5), torch.full((20,), 1.0)])
    pick = bench.stratified_pool(rates, 40, 0.5, g)
    chosen = rates[pick]
    assert len(set(pick.tolist())) == 40
    assert (
        (chosen == 0.5).sum() == 20 and (chosen == 0.0).sum() == 10 and (chosen == 1.0).sum() == 10
    )
    # only 30 mid problems: asking for 90% of 40 takes all 30 and fills from the ends
    chosen = rates[bench.stratified_pool(rates, 40, 0.9, g)]
    assert (chosen == 0.5).sum() == 30 and len(chosen) == 40


def test_gvm_norms_from_gradstats_equal_per_rollout_log_likelihood_gradient_norms():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    policy = ar.TinyGRUPolicy(hidden=16, embed=8)
    problems = ar.make_problems(12, generator=g)
    comps = policy.sample(problems.prompts, generator=g)
    prompt_ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    coef = torch.tensor([0.5, -0.25, 0.0, 1.0, 2.0, -1.0, 0.0, 0.0, 0.0, 0.3, 0.3, -0.6])
    with GradStats(policy, loss_reduction="sum") as stats:
        bench.pg_loss(policy, problems.prompts, comps, coef).backward()
    ids, norms = bench.per_prompt_norms(stats.total_sq_norms(), coef, prompt_ids)

    params = {k: v.detach() for k, v in policy.named_parameters()}

    def log_likelihood(p, x, y):  # sum_t log pi(y_t): the loss with coefficient -1
        return bench.pg_loss(
            lambda a, b: functional_call(policy, p, (a, b)), x[None], y[None], -torch.ones(1)
        )

    per = vmap(grad(log_likelihood), in_dims=(None, 0, 0))(params, problems.prompts, comps)
    rollout_norms = sum(v.flatten(1).pow(2).sum(1) for v in per.values()).sqrt()
    # prompt 2 has only zero coefficients: no reading; the others average their live rollouts
    expected = {0: rollout_norms[[0, 1]].mean(), 1: rollout_norms[3:6].mean()}
    expected[3] = rollout_norms[9:12].mean()
    assert ids.tolist() == [0, 1, 3]
    for i, value in zip(ids.tolist(), norms, strict=True):
        assert math.isclose(value, expected[i], rel_tol=1e-4)


def test_first_reach_interpolates_and_says_never():
    grid = np.array([0.0, 10.0, 20.0, 30.0])
    curve = np.array([0.0, 0.1, 0.3, 0.2])
    assert math.isclose(bench.first_reach(grid, curve, 0.2), 15.0)
    assert bench.first_reach(grid, curve, 0.31) == math.inf
    assert bench.first_reach(grid, curve, 0.0) == 0.0
