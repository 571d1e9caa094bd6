"""SelectThenSample: a prompt selector composed with a within-prompt sampler."""

import copy

import pytest
import torch

from gradnoise.errors import GradNoiseError
from gradnoise.rl.adaptive import ReinforceAda
from gradnoise.rl.allocators import RolloutStats, Uniform
from gradnoise.rl.bandits import VADE
from gradnoise.rl.composite import SelectThenSample
from gradnoise.rl.loop import collect_rollouts, zero_variance_mask

POOL, P, BUDGET = 40, 4, 32
# a pool like the benchmark's: most prompts hopeless or solved, a quarter in between
PASS = torch.cat([torch.zeros(15), torch.ones(15), torch.linspace(0.2, 0.8, 10)])


def composite(seed, selector=VADE, **kw):
    return SelectThenSample(
        selector(POOL, P, seed=seed),
        ReinforceAda(POOL, P, seed=seed, balanced=True, target=2, round_size=2, max_samples=12),
        **kw,
    )


def env_step(allocator, step):
    g = torch.Generator().manual_seed(step)
    candidates = torch.randperm(POOL, generator=g)[:16]
    sample = lambda ids: ((torch.rand(len(ids), generator=g) < PASS[ids]).double(), None)  # noqa: E731
    return candidates, collect_rollouts(allocator, candidates, BUDGET, sample)


def run(allocator, steps, start=0):
    out = []
    for s in range(start, start + steps):
        _, ro = env_step(allocator, s)
        out.append((ro.prompt_ids.tolist(), ro.rewards.tolist()))
    return out


def test_composite_obeys_the_budget_and_samples_only_candidates():
    alloc = composite(0)
    for step in range(8):
        candidates, ro = env_step(alloc, step)
        assert len(ro.rewards) <= BUDGET and len(ro.sizes) <= P
        assert set(ro.prompt_ids.tolist()) <= set(candidates.tolist())
    # both parts saw every rollout, the extra rounds included
    assert alloc.selector.history.n.sum() == alloc.sampler.history.n.sum() == alloc.history.n.sum()
    assert alloc.history.n.sum() > 8 * P * 2


def test_composite_is_deterministic_and_resumes_exactly_from_state_dict():
    first, second = composite(3), composite(3)
    assert run(first, 4) == run(second, 4)
    state = copy.deepcopy(first.state_dict())
    expected = run(first, 4, start=4)
    resumed = composite(99)
    resumed.load_state_dict(state)
    assert run(resumed, 4, start=4) == expected
    assert run(composite(0), 6) != run(composite(1), 6)


def test_composite_resumes_mid_step_with_the_chosen_prompts():
    alloc = composite(5)
    run(alloc, 3)
    stats = RolloutStats.fresh(torch.arange(16))
    first = alloc.allocate(stats, BUDGET)
    stats = stats.add(first, torch.zeros(int(first.sum())))  # all-equal: the sampler goes on
    resumed = composite(77)
    resumed.load_state_dict(copy.deepcopy(alloc.state_dict()))
    second = alloc.allocate(stats, BUDGET - stats.total)
    assert (second > 0).sum() == P and torch.equal(second > 0, first > 0)
    assert torch.equal(resumed.allocate(stats, BUDGET - stats.total), second)


def test_sampler_continues_only_all_equal_groups_then_top_up_goes_to_mixed_groups():
    alloc = SelectThenSample(
        Uniform(POOL, 3, seed=0),
        ReinforceAda(POOL, 3, seed=0, balanced=True, target=2, round_size=2, max_samples=4),
    )
    stats = RolloutStats.fresh(torch.arange(5))
    assert alloc.allocate(stats, 20).tolist() == [2, 2, 2, 0, 0]  # Uniform chose 0, 1, 2
    stats = stats.add(torch.tensor([2, 2, 2, 0, 0]), torch.tensor([1.0, 0, 1, 1, 0, 0]))
    assert alloc.allocate(stats, 14).tolist() == [0, 2, 2, 0, 0]  # mixed group 0 is done
    stats = stats.add(torch.tensor([0, 2, 2, 0, 0]), torch.tensor([1.0, 1, 0, 0]))
    # groups 1 and 2 hit max_samples=4; only group 0 has signal, so it takes the rest
    assert alloc.allocate(stats, 10).tolist() == [10, 0, 0, 0, 0]
    capped = SelectThenSample(
        Uniform(POOL, 3, seed=0),
        ReinforceAda(POOL, 3, seed=0, balanced=True, target=2, round_size=2, max_samples=4),
        top_up_cap=5,
    )
    capped.allocate(RolloutStats.fresh(torch.arange(5)), 20)
    assert capped.allocate(stats, 10).tolist() == [3, 0, 0, 0, 0]


def test_composite_halves_zero_variance_groups_against_uniform_on_a_polarised_pool():
    def zero_fraction(alloc):
        fracs = []
        for step in range(60):
            _, ro = env_step(alloc, step)
            fracs.append(zero_variance_mask(ro.rewards, ro.sizes).float().mean().item())
        return sum(fracs[20:]) / 40  # after the selector has seen the pool

    uniform = zero_fraction(Uniform(POOL, P, seed=0))
    assert uniform > 0.5  # 30 of 40 prompts always give all-equal groups
    assert zero_fraction(composite(0)) < uniform / 2
    # the sampler alone cannot rescue hopeless or solved prompts: selection does the work
    assert zero_fraction(composite(0, selector=Uniform)) > 0.8 * uniform


@pytest.mark.parametrize(
    "build, match",
    [
        (
            lambda: SelectThenSample(VADE(POOL, P, seed=0), ReinforceAda(POOL, P + 1, seed=0)),
            "prompts_per_step: selector 4, sampler 5",
        ),
        (
            lambda: SelectThenSample(VADE(POOL, P, seed=0), ReinforceAda(POOL + 1, P, seed=0)),
            "num_prompts: selector 40, sampler 41",
        ),
        (
            lambda: SelectThenSample(
                VADE(POOL, P, seed=0), ReinforceAda(POOL, P, seed=0), top_up_cap=0
            ),
            "top_up_cap=0",
        ),
    ],
)
def test_composite_construction_errors(build, match):
    with pytest.raises(GradNoiseError, match=match):
        build()


@pytest.mark.parametrize(
    "ids, rewards, match",
    [
        (torch.tensor([0, 1]), torch.tensor([0.5, 1.5]), "declared range"),
        (torch.tensor([0, 99]), torch.ones(2), "integer prompt ids in \\[0, 40\\)"),
        (torch.tensor([0, 1, 2]), torch.ones(2), "one prompt id per reward"),
    ],
)
def test_composite_refuses_bad_updates_before_either_part_changes(ids, rewards, match):
    alloc = composite(0)
    run(alloc, 2)
    before = copy.deepcopy(alloc.state_dict())
    with pytest.raises(GradNoiseError, match=f"SelectThenSample.update.*{match}"):
        alloc.update(ids, rewards)
    after = alloc.state_dict()
    for part in ("selector", "sampler"):
        for k in ("n", "s", "q"):
            assert torch.equal(before[part]["history"][k], after[part]["history"][k])
    assert torch.equal(before["selector"]["evidence"], after["selector"]["evidence"])


def test_composite_allocate_refuses_a_budget_below_the_first_round():
    with pytest.raises(GradNoiseError, match="budget of at least 8 rollouts"):
        composite(0).allocate(RolloutStats.fresh(torch.arange(8)), 7)
