"""Advantage functions against the papers' formulas, written out per group in plain Python."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradnoise.errors import GradNoiseError
from gradnoise.rl import advantages as adv
from gradnoise.rl.tracker import ValueTracker

ragged = st.lists(
    st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=1, max_size=6), min_size=1, max_size=5
)


def flat(groups):
    return torch.tensor([r for g in groups for r in g]), [len(g) for g in groups]


def per_group(groups, fn):
    return torch.tensor([fn(g, r) for g in groups for r in g])


@settings(max_examples=25, deadline=None)
@given(ragged)
def test_grpo_dr_grpo_rloo_match_the_per_group_formulas(groups):
    rewards, sizes = flat(groups)
    mean = statistics.fmean
    std = lambda g: statistics.stdev(g) if len(g) > 1 else 0.0  # noqa: E731
    grpo = per_group(groups, lambda g, r: (r - mean(g)) / (std(g) + 1e-4) if len(g) > 1 else 0.0)
    rloo = per_group(groups, lambda g, r: r - (sum(g) - r) / (len(g) - 1) if len(g) > 1 else 0.0)
    torch.testing.assert_close(adv.grpo_advantages(rewards, sizes), grpo)
    torch.testing.assert_close(
        adv.dr_grpo_advantages(rewards, sizes), per_group(groups, lambda g, r: r - mean(g))
    )
    torch.testing.assert_close(adv.rloo_advantages(rewards, sizes), rloo)


def test_dense_and_ragged_layouts_agree():
    dense = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    for fn in (
        adv.grpo_advantages,
        adv.dr_grpo_advantages,
        adv.rloo_advantages,
        adv.bnpo_advantages,
    ):
        out = fn(dense)
        assert out.shape == dense.shape
        torch.testing.assert_close(out.reshape(-1), fn(dense.reshape(-1), [3, 3]))


def test_rloo_is_grpo_mean_scaled_by_n_over_n_minus_1():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(adv.rloo_advantages(r), adv.dr_grpo_advantages(r) * 5 / 4)


def test_opo_baseline_is_the_length_weighted_mean():
    r, lengths = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([2.0, 6.0, 1.0, 3.0])
    b1, b2 = (2 * 1 + 0) / 8, (1 * 1 + 0) / 4
    expected = torch.tensor([1 - b1, -b1, 1 - b2, -b2])
    torch.testing.assert_close(adv.opo_advantages(r, lengths, [2, 2]), expected)
    # equal lengths reduce OPO to Dr. GRPO
    torch.testing.assert_close(
        adv.opo_advantages(r, torch.ones(4), [2, 2]), adv.dr_grpo_advantages(r, [2, 2])
    )


def test_bnpo_special_cases_from_the_paper():
    r = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # alpha = beta = 1: Beta density is 1, REINFORCE with the group-mean baseline
    torch.testing.assert_close(
        adv.bnpo_advantages(r, alpha=1.0, beta=1.0), adv.dr_grpo_advantages(r)
    )
    # alpha = beta = 3/2: density sqrt(p(1-p)) / B(3/2, 3/2) with B = pi / 8, i.e. GRPO with the
    # population std, times pi/8
    p = r.mean(1, keepdim=True)
    pop = torch.where(p * (1 - p) > 0, (r - p) / (p * (1 - p)).clamp(min=1e-12).sqrt(), 0.0)
    torch.testing.assert_close(adv.bnpo_advantages(r, alpha=1.5, beta=1.5), pop * math.pi / 8)


def test_bnpo_default_uses_the_moment_fit_plus_one_third_rule():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    a, b = adv.fit_beta(r.mean(1))
    p = torch.tensor([0.25, 0.5, 0.75])
    m, v = p.mean().item(), p.var(correction=0).item()
    c = m * (1 - m) / v - 1
    assert (a, b) == pytest.approx((m * c, (1 - m) * c))
    torch.testing.assert_close(
        adv.bnpo_advantages(r), adv.bnpo_advantages(r, alpha=1 + a / 3, beta=1 + b / 3)
    )


def test_global_baseline_uses_prompt_means_and_batch_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    means = torch.tensor([0.2, 0.9])
    expected = (r - torch.tensor([0.2] * 3 + [0.9] * 3)) / (r.std() + 1e-4)
    torch.testing.assert_close(
        adv.global_baseline_advantages(r, [3, 3], prompt_means=means), expected
    )


def test_tracker_advantages_follow_the_spo_beta_tracker():
    tracker = ValueTracker(3, rho=0.5, prior=(1.0, 1.0))
    tracker.update(torch.tensor([0, 0, 2]), torch.tensor([1.0, 1.0, 0.0]))
    # prompt 0: alpha = 0.5 * 1 + 2, beta = 0.5 * 1 + 0; prompt 2: alpha = 0.5, beta = 1.5
    torch.testing.assert_close(
        tracker.values(torch.tensor([0, 1, 2])),
        torch.tensor([2.5 / 3, 0.5, 0.25], dtype=torch.float64),
    )
    values = tracker.values(torch.tensor([0, 2]))
    raw = torch.tensor([1.0, 0.0, 1.0]) - values[[0, 0, 1]].float()
    out = adv.tracker_advantages(torch.tensor([1.0, 0.0, 1.0]), values, [2, 1], normalize=False)
    torch.testing.assert_close(out, raw)
    normed = adv.tracker_advantages(torch.tensor([1.0, 0.0, 1.0]), values, [2, 1])
    torch.testing.assert_close(normed, (raw - raw.mean()) / (raw.std() + 1e-4))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: adv.grpo_advantages(torch.tensor([1.0, float("nan")]), [2]), "NaN rewards"),
        (
            lambda: adv.rloo_advantages(torch.tensor([1.0, 0.0]), [2, 0]),
            "empty groups at positions \\[1\\]",
        ),
        (lambda: adv.dr_grpo_advantages(torch.zeros(0, 4)), "at least one sample per prompt"),
        (lambda: adv.grpo_advantages(torch.zeros(0), []), "got no groups"),
        (lambda: ValueTracker(3).values(torch.tensor([0.5])), "integer prompt ids"),
        (lambda: adv.grpo_advantages(torch.ones(3), [2, 2]), "flat rewards of length sum"),
        (lambda: adv.bnpo_advantages(torch.tensor([[2.0, 0.0]])), "declared range \\[0.0, 1.0\\]"),
        (lambda: adv.opo_advantages(torch.ones(2, 2), torch.ones(3)), "positive response lengths"),
        (
            lambda: adv.global_baseline_advantages(torch.ones(2, 2), prompt_means=torch.ones(3)),
            "one mean per group",
        ),
        (
            lambda: adv.tracker_advantages(torch.ones(2, 2), torch.ones(1)),
            "one tracked value per group",
        ),
        (lambda: ValueTracker(2, rho=0.0), "a discount in \\(0, 1\\]"),
        (
            lambda: ValueTracker(2).update(torch.tensor([0, 5]), torch.ones(2)),
            "integer prompt ids in \\[0, 2\\)",
        ),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, match):
    with pytest.raises(GradNoiseError, match=match):
        call()
