"""RL cases of "no silently wrong number": inf rewards, duplicates, state dicts, apportion."""

import pytest
import torch

from gradnoise.errors import GradNoiseError
from gradnoise.rl.adaptive import GVM, DynamicSampling
from gradnoise.rl.advantages import dr_grpo_advantages, grpo_advantages, rloo_advantages
from gradnoise.rl.allocators import RolloutStats, Uniform, apportion
from gradnoise.rl.composite import SelectThenSample

INF = float("inf")


@pytest.mark.parametrize("fn", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
@pytest.mark.parametrize("value", [INF, -INF])
def test_infinite_rewards_are_refused_naming_the_first_bad_index(fn, value):
    rewards = torch.tensor([[1.0, 0.0], [0.0, value]])
    with pytest.raises(
        GradNoiseError, match=r"expected finite rewards, got .*positions \[3\] \(first: index 3"
    ):
        fn(rewards)


def test_duplicate_candidate_prompt_ids_are_refused():
    with pytest.raises(
        GradNoiseError,
        match=r"RolloutStats.fresh\(prompt_ids\): expected distinct candidate prompt ids.*"
        r"got duplicated ids \[2\]",
    ):
        RolloutStats.fresh(torch.tensor([2, 0, 2]))


def test_allocator_state_across_types_or_sizes_is_refused_without_change():
    gvm = GVM(4, 2, seed=0)
    before = gvm.grad_norms.clone()
    with pytest.raises(GradNoiseError, match=r"GVM.load_state_dict: expected a state_dict of "):
        gvm.load_state_dict(Uniform(4, 2, seed=0).state_dict())
    with pytest.raises(GradNoiseError, match=r"shape \(6,\) torch.float64, expected \(4,\)"):
        gvm.load_state_dict(GVM(6, 2, seed=0).state_dict())
    dapo = DynamicSampling(4, 2, group_size=2, seed=0).state_dict()
    with pytest.raises(
        GradNoiseError, match=r"state\['allocator'\]='DynamicSampling', expected 'Uniform'"
    ):
        Uniform(4, 2, seed=0).load_state_dict(dapo)
    assert torch.equal(before, gvm.grad_norms)
    gvm.load_state_dict(GVM(4, 2, seed=1).state_dict())  # the same layout still loads


def test_composite_state_is_checked_before_either_part_changes():
    combo = SelectThenSample(Uniform(4, 2, seed=0), GVM(4, 2, seed=0))
    bad = {**combo.state_dict(), "sampler": Uniform(4, 2, seed=0).state_dict()}
    rng = combo.selector.rng.bit_generator.state
    combo.selector.rng.random()
    after_draw = combo.selector.rng.bit_generator.state
    with pytest.raises(GradNoiseError, match="GVM.load_state_dict"):
        combo.load_state_dict(bad)
    assert combo.selector.rng.bit_generator.state == after_draw != rng
    with pytest.raises(GradNoiseError, match="SelectThenSample.load_state_dict"):
        combo.load_state_dict(Uniform(4, 2, seed=0).state_dict())


def test_apportion_with_infinite_weight_is_a_clear_error():
    with pytest.raises(
        GradNoiseError,
        match=r"apportion: expected finite weights .*got non-finite weights at "
        r"positions \[0\]",
    ):
        apportion(torch.tensor([INF, 1.0]), 10)
    with pytest.raises(GradNoiseError, match=r"got budget=inf"):
        apportion(torch.tensor([1.0, 1.0]), INF)
    assert apportion(torch.tensor([3.0, 1.0]), 8).tolist() == [6, 2]
