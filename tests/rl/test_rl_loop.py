"""collect_rollouts drives the protocol; zero_variance_mask finds groups without signal."""

import pytest
import torch

from gradnoise.errors import GradNoiseError
from gradnoise.rl.adaptive import ReinforceAda
from gradnoise.rl.allocators import Uniform
from gradnoise.rl.loop import collect_rollouts, zero_variance_mask


def test_rollouts_are_grouped_in_candidate_order_and_payload_maps_back():
    alloc = ReinforceAda(10, 3, seed=0, round_size=2)
    rewards_of = {4: [0.0, 0.0, 1.0, 0.0], 7: [1.0, 1.0], 2: [0.0] * 6}
    served = {k: 0 for k in rewards_of}

    def sample(ids):
        out = []
        for i in ids.tolist():
            out.append(rewards_of[i][served[i]])
            served[i] += 1
        return torch.tensor(out), ids * 100  # payload: something per rollout

    ro = collect_rollouts(alloc, torch.tensor([4, 7, 2, 9]), 12, sample)
    # round 1: 2 each; prompt 7 has a success; round 2: 4 and 2; prompt 4 succeeds; round 3: 2
    assert ro.rounds == 3 and ro.sizes.tolist() == [4, 2, 6]
    assert ro.prompt_ids.tolist() == [4] * 4 + [7] * 2 + [2] * 6
    assert ro.rewards.tolist() == rewards_of[4] + rewards_of[7] + rewards_of[2]
    assert ro.group_ids.tolist() == [4, 7, 2]
    torch.testing.assert_close(torch.cat(ro.payload)[ro.order], ro.prompt_ids * 100)
    assert alloc.history.n[[4, 7, 2, 9]].tolist() == [4, 2, 6, 0]


def test_uniform_takes_one_round_and_the_whole_budget():
    ro = collect_rollouts(
        Uniform(10, 2, seed=0), torch.arange(5), 9, lambda ids: (torch.ones(len(ids)), None)
    )
    assert ro.rounds == 1 and ro.sizes.tolist() == [5, 4]


def test_zero_variance_mask_dense_and_ragged():
    assert zero_variance_mask(torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])).tolist() == [
        True,
        False,
        True,
    ]
    assert zero_variance_mask(torch.tensor([1.0, 0.5, 0.5, 0.5]), [1, 3]).tolist() == [True, True]
    with pytest.raises(GradNoiseError, match="NaN rewards"):
        zero_variance_mask(torch.tensor([[float("nan"), 1.0]]))
