"""Allocators: the shared contract (table-driven), each rule's behaviour, and every error."""

import copy

import pytest
import torch

from gradnoise.errors import GradNoiseError
from gradnoise.rl.adaptive import GVM, DynamicSampling, ReinforceAda
from gradnoise.rl.allocators import RolloutStats, Uniform, apportion
from gradnoise.rl.bandits import VADE, VarianceAwareSampling
from gradnoise.rl.loop import collect_rollouts

POOL, P, BUDGET = 40, 4, 32
PASS = torch.linspace(0, 1, POOL)  # prompt i solves with probability PASS[i]

FACTORIES = {
    "uniform": lambda seed: Uniform(POOL, P, seed=seed),
    "dapo": lambda seed: DynamicSampling(POOL, P, group_size=4, seed=seed),
    "gvm": lambda seed: GVM(POOL, P, seed=seed, max_samples=16),
    "ada": lambda seed: ReinforceAda(POOL, P, seed=seed, round_size=2),
    "ada_balanced": lambda seed: ReinforceAda(POOL, P, seed=seed, balanced=True, target=4),
    "vade": lambda seed: VADE(POOL, P, seed=seed),
    "vas": lambda seed: VarianceAwareSampling(POOL, P, seed=seed),
}


def env_step(allocator, step):
    """One step against Bernoulli(PASS) prompts; every random draw is seeded by the step."""
    g = torch.Generator().manual_seed(step)
    candidates = torch.randperm(POOL, generator=g)[:12]
    sample = lambda ids: ((torch.rand(len(ids), generator=g) < PASS[ids]).double(), None)  # noqa: E731
    ro = collect_rollouts(allocator, candidates, BUDGET, sample)
    return candidates, ro


def run(allocator, steps, start=0):
    return [(ro.prompt_ids.tolist(), ro.sizes.tolist()) for _, ro in
            (env_step(allocator, s) for s in range(start, start + steps))]  # fmt: skip


@pytest.mark.parametrize("name", FACTORIES)
def test_contract_budget_candidates_and_groups(name):
    allocator = FACTORIES[name](0)
    for step in range(6):
        candidates, ro = env_step(allocator, step)
        assert 0 < len(ro.rewards) <= BUDGET
        assert set(ro.prompt_ids.tolist()) <= set(candidates.tolist())
        assert (ro.sizes >= 1).all() and int(ro.sizes.sum()) == len(ro.rewards)
    assert allocator.history.n.sum().item() > 0


@pytest.mark.parametrize("name", FACTORIES)
def test_deterministic_given_seed_and_resumes_exactly_from_state_dict(name):
    first, second = FACTORIES[name](7), FACTORIES[name](7)
    assert run(first, 5) == run(second, 5)
    state = copy.deepcopy(first.state_dict())
    expected = run(first, 5, start=5)
    resumed = FACTORIES[name](123)  # a different seed: everything must come from the state
    resumed.load_state_dict(state)
    assert run(resumed, 5, start=5) == expected


def test_seeds_matter_for_randomised_allocators():
    for name in ("vade", "vas"):
        assert run(FACTORIES[name](0), 8) != run(FACTORIES[name](1), 8)


def test_apportion_is_proportional_bounded_and_exact():
    n = apportion(torch.tensor([1.0, 2.0, 3.0, 0.0]), 13, lo=2, hi=5)
    # 2 each, then the free 5 by weight: shares 0.83, 1.67, 2.5, 0 -> floors 0, 1, 2, 0 and the
    # two left over to the largest fractional parts (0.83, 0.67), as the docstring says
    assert n.tolist() == [3, 4, 4, 2] and int(n.sum()) == 13
    # a share above its cap is capped and the rest shared again (water-filling)
    assert apportion(torch.tensor([10.0, 1.0, 1.0]), 9, hi=4).tolist() == [4, 3, 2]
    assert apportion(torch.ones(16), 128).tolist() == [8] * 16


def test_uniform_splits_the_budget_over_the_first_prompts():
    counts = Uniform(POOL, P, seed=0).allocate(RolloutStats.fresh(torch.arange(10)), 30)
    assert counts.tolist() == [8, 8, 7, 7] + [0] * 6


def test_dapo_keeps_sampling_until_enough_groups_have_signal():
    alloc = DynamicSampling(POOL, 2, group_size=2, seed=0)
    stats = RolloutStats.fresh(torch.arange(6))
    assert alloc.allocate(stats, 12).tolist() == [2, 2, 0, 0, 0, 0]
    stats = stats.add(torch.tensor([2, 2, 0, 0, 0, 0]), torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert alloc.allocate(stats, 8).tolist() == [0, 0, 2, 0, 0, 0]  # one informative, one more
    stats = stats.add(torch.tensor([0, 0, 2, 0, 0, 0]), torch.tensor([1.0, 0.0]))
    assert alloc.allocate(stats, 6).sum() == 0


def test_gvm_allocates_by_grad_norm_times_sqrt_odds_of_failure():
    alloc = GVM(POOL, 3, seed=0, min_samples=1)
    alloc.update(
        torch.tensor([0] * 4 + [1] * 4 + [2] * 4),
        torch.tensor([1.0] * 3 + [0.0] + [1.0] + [0.0] * 3 + [1.0, 0.0] * 2),
    )
    alloc.observe_grad_norms(torch.tensor([2]), torch.tensor([3.0]))
    p = (torch.tensor([3.0, 1.0, 2.0]) + 0.5) / 5
    # prompts 0 and 1 were never measured: they take the mean of the measured norms (3)
    w = torch.tensor([3.0, 3.0, 3.0]) * ((1 - p) / p).sqrt()
    counts = alloc.allocate(RolloutStats.fresh(torch.arange(3)), 60)
    assert counts.tolist() == apportion(w, 60, lo=1).tolist()
    assert counts[1] > counts[0]
    alloc.observe_grad_norms(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    w = torch.tensor([1.0, 2.0, 3.0]) * ((1 - p) / p).sqrt()
    counts = alloc.allocate(RolloutStats.fresh(torch.arange(3)), 60)
    assert counts.tolist() == apportion(w, 60, lo=1).tolist()
    assert alloc.norms(torch.tensor([3])).item() == 2.0  # unmeasured: mean of 1, 2, 3


def test_reinforce_ada_plain_stops_at_a_success_and_balanced_needs_both():
    solved, hopeless = torch.tensor([1.0]), torch.tensor([0.0])
    for balanced, expect_second_round in ((False, [0, 2]), (True, [2, 2])):
        alloc = ReinforceAda(POOL, 2, seed=0, round_size=2, balanced=balanced, target=4)
        stats = RolloutStats.fresh(torch.tensor([0, 1]))
        assert alloc.allocate(stats, 16).tolist() == [2, 2]
        stats = stats.add(torch.tensor([2, 2]), torch.cat([solved, solved, hopeless, hopeless]))
        assert alloc.allocate(stats, 12).tolist() == expect_second_round


def test_vade_thompson_prefers_prompts_with_middling_pass_rates():
    alloc = VADE(POOL, 2, seed=0, rho_long=1.0, rho_short=1.0)
    ids = torch.tensor([0] * 40 + [1] * 40 + [2] * 40 + [3] * 40)
    rewards = torch.cat([torch.ones(40), torch.zeros(40), torch.tensor([1.0, 0.0] * 40)])
    alloc.update(ids, rewards)
    for _ in range(20):  # Beta(41, 1) gives theta(1-theta) < 0.1 w.p. > 0.999; Beta(21, 21) ~0.25
        counts = alloc.allocate(RolloutStats.fresh(torch.arange(4)), 8)
        assert counts.tolist() == [0, 0, 4, 4]


def test_vade_two_scale_decay():
    alloc = VADE(POOL, 1, seed=0, rho_long=0.9, rho_short=0.5)
    alloc.update(torch.tensor([0, 0]), torch.tensor([1.0, 0.0]))
    alloc.update(torch.tensor([0, 1]), torch.tensor([1.0, 1.0]))
    # prompt 0: (1, 1) -> *0.9 *0.5 + (1, 0); prompt 1: (0, 0) + (1, 0)
    torch.testing.assert_close(
        alloc.evidence[:, :2], torch.tensor([[1.45, 1.0], [0.45, 0.0]], dtype=torch.float64)
    )


def test_vas_samples_by_variance_promotion_score():
    alloc = VarianceAwareSampling(POOL, 2, seed=0, mix=1.0)
    alloc.update(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([1.0, 1, 0, 0, 1, 0, 0, 1]))
    for _ in range(20):  # prompts 0 and 1 have VPS 0 (weight 1e-6), 2 and 3 have VPS 1
        assert alloc.allocate(RolloutStats.fresh(torch.arange(4)), 8).tolist() == [0, 0, 4, 4]


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda a: a.update(torch.tensor([0, 1]), torch.tensor([0.5, 1.5])),
            "declared range \\[0.0, 1.0\\]",
        ),
        (
            lambda a: a.update(torch.tensor([0, 1]), torch.tensor([0.5, float("nan")])),
            "NaN rewards",
        ),
        (
            lambda a: a.update(torch.tensor([], dtype=torch.long), torch.tensor([])),
            "non-empty group",
        ),
        (lambda a: a.update(torch.tensor([0, 1, 2]), torch.ones(2)), "one prompt id per reward"),
        (
            lambda a: a.update(torch.tensor([0, 99]), torch.ones(2)),
            "integer prompt ids in \\[0, 40\\)",
        ),
        (
            lambda a: a.allocate(RolloutStats.fresh(torch.arange(8)), 7),
            "budget of at least 8 rollouts",
        ),
        (lambda a: a.allocate(RolloutStats.fresh(torch.arange(3)), 64), "at least 4 candidates"),
        (
            lambda a: RolloutStats.fresh(torch.arange(4)).add(
                torch.tensor([1, 0, 0, 0]), torch.ones(2)
            ),
            "counts summing",
        ),
        (
            lambda a: RolloutStats.fresh(torch.arange(2)).add(
                torch.tensor([1, 0]), torch.tensor([3.0])
            ),
            "declared range",
        ),
    ],
)
@pytest.mark.parametrize("name", ["uniform", "vade", "gvm"])
def test_bad_input_is_refused_before_any_state_changes(name, call, match):
    allocator = FACTORIES[name](0)
    before = copy.deepcopy(allocator.state_dict())
    with pytest.raises(GradNoiseError, match=match):
        call(allocator)
    after = allocator.state_dict()
    assert all(torch.equal(before["history"][k], after["history"][k]) for k in ("n", "s", "q"))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: Uniform(4, 8, seed=0), "1 <= prompts_per_step <= num_prompts"),
        (lambda: Uniform(8, 2, seed=0, reward_range=(1.0, 0.0)), "reward_range lo < hi"),
        (
            lambda: DynamicSampling(POOL, P, group_size=8, seed=0).allocate(
                RolloutStats.fresh(torch.arange(8)), 31
            ),
            "at least 32 rollouts",
        ),
        (
            lambda: GVM(POOL, P, seed=0).observe_grad_norms(
                torch.tensor([0]), torch.tensor([-1.0])
            ),
            "one finite norm >= 0",
        ),
    ],
)
def test_construction_and_helper_errors(call, match):
    with pytest.raises(GradNoiseError, match=match):
        call()
