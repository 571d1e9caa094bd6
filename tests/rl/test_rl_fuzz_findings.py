"""One unit test per bug the fuzz suite found in gradnoise.rl (tests/fuzz, tests/README.md):
exact numbers where a result exists, a GradNoiseError naming the argument (and no state change)
where it does not."""

import copy
import math

import numpy as np
import pytest
import torch

from gradnoise.errors import GradNoiseError
from gradnoise.rl import (
    GVM,
    VADE,
    DynamicSampling,
    ReinforceAda,
    RolloutStats,
    SelectThenSample,
    Uniform,
    ValueTracker,
    VarianceAwareSampling,
    apportion,
    bnpo_advantages,
    dr_grpo_advantages,
    global_baseline_advantages,
    grpo_advantages,
    opo_advantages,
    rloo_advantages,
    tracker_advantages,
)

NAN, INF = math.nan, math.inf


# ------------------------------------------------------------------ constant groups, precision
@pytest.mark.parametrize(
    "level, n, dtype",
    [
        (98765.4, 7, torch.float64),
        (102.78345489501953, 5, torch.float32),
        (-3e-7, 4, torch.float32),
    ],
)
def test_constant_groups_get_exactly_zero_at_any_reward_level(level, n, dtype):
    rewards = torch.full((2, n), level, dtype=dtype)
    assert torch.equal(grpo_advantages(rewards), torch.zeros_like(rewards))
    assert torch.equal(grpo_advantages(rewards, eps=0.0), torch.zeros_like(rewards))
    assert torch.equal(dr_grpo_advantages(rewards), torch.zeros_like(rewards))
    assert torch.equal(rloo_advantages(rewards), torch.zeros_like(rewards))


def test_global_baseline_of_a_constant_batch_divides_by_eps_alone():
    rewards = torch.full((7,), 777.7)
    got = global_baseline_advantages(
        rewards, [7], prompt_means=torch.tensor([0.0], dtype=torch.float64)
    )
    want = rewards[0].item() / 1e-4  # the batch std of equal rewards is exactly 0
    assert got.dtype == torch.float32
    assert got.double().sub(want).abs().max().item() <= 1e-6 * want


# ------------------------------------------------------------------- magnitudes beyond float32
def test_float64_rewards_beyond_float32_give_float64_advantages():
    got = grpo_advantages(torch.tensor([[1e39, -1e39]], dtype=torch.float64))
    assert got.dtype == torch.float64
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(got, torch.tensor([[s, -s]], dtype=torch.float64))
    # squares of 1e300 overflow float64: the statistics are computed on scaled rewards
    got = grpo_advantages(torch.tensor([[1e300, -1e300, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64))
    got = rloo_advantages(torch.tensor([[3e38, -3e38]], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([[6e38, -6e38]], dtype=torch.float64))


def test_float32_rewards_with_huge_spread_are_exact():
    got = grpo_advantages(torch.tensor([[0.0, 0.0, 1e20]]))  # the float32 std overflows
    want = torch.tensor([[-1 / math.sqrt(3), -1 / math.sqrt(3), 2 / math.sqrt(3)]])
    torch.testing.assert_close(got, want)
    got = rloo_advantages(torch.tensor([[3e38, 3e38, 1.0]]))  # S_p overflows float32
    x = torch.tensor([[3e38, 3e38, 1.0]], dtype=torch.float64)
    want = x - (x.sum() - x) / 2
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_advantages_that_do_not_fit_the_dtype_are_refused():
    with pytest.raises(GradNoiseError, match=r"fit in the rewards' dtype torch.float32"):
        rloo_advantages(torch.tensor([[3e38, -3e38]]))  # +-6e38
    with pytest.raises(GradNoiseError, match=r"advantages that fit in float64"):
        rloo_advantages(torch.tensor([[1.7e308, -1.7e308]], dtype=torch.float64))  # +-3.4e308


def test_output_dtype_follows_floating_rewards_else_the_default():
    assert grpo_advantages(torch.tensor([[1.0, 0.0]], dtype=torch.float64)).dtype == torch.float64
    assert grpo_advantages(torch.tensor([[1, 0]])).dtype == torch.get_default_dtype()
    assert grpo_advantages(torch.tensor([[True, False]])).dtype == torch.get_default_dtype()
    assert grpo_advantages([[1.0, 0.0]]).dtype == torch.get_default_dtype()


# ---------------------------------------------------------------------------------- eps
@pytest.mark.parametrize("eps", [-0.7071067811865476, -1e-4, NAN, INF, -INF, "1e-4", None, True])
@pytest.mark.parametrize("name", ["grpo", "global", "tracker"])
def test_invalid_eps_is_refused(eps, name):
    r = torch.tensor([[1.0, 0.0]])
    with pytest.raises(GradNoiseError, match=r"\(eps\): expected a finite real number >= 0"):
        if name == "grpo":
            grpo_advantages(r, eps=eps)
        elif name == "global":
            global_baseline_advantages(r, eps=eps)
        else:
            tracker_advantages(r, torch.zeros(1), eps=eps)


def test_eps_zero_is_plain_standardisation():
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(
        grpo_advantages(torch.tensor([[1.0, 0.0]]), eps=0), torch.tensor([[s, -s]])
    )
    # a batch without spread: 0 where r = mu, refused where (r - mu) / 0 would be inf
    same = torch.ones(2, 2)
    assert torch.equal(global_baseline_advantages(same, eps=0.0), torch.zeros(2, 2))
    with pytest.raises(GradNoiseError, match="or eps > 0"):
        global_baseline_advantages(same, prompt_means=torch.zeros(2), eps=0.0)
    assert torch.equal(tracker_advantages(same, torch.zeros(2), eps=0.0), torch.zeros(2, 2))


# ------------------------------------------------------------------ NaN from the caller
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_opo_refuses_non_finite_lengths(bad):
    with pytest.raises(GradNoiseError, match="finite positive response lengths"):
        opo_advantages(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, bad]]))


def test_opo_lengths_of_any_magnitude_are_exact():
    r = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    got = opo_advantages(r, torch.tensor([[1e300, 3e300]], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([[0.75, -0.25]], dtype=torch.float64))


@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_baselines_are_refused(bad):
    with pytest.raises(GradNoiseError, match=r"prompt_means\): expected finite prompt means"):
        global_baseline_advantages(torch.ones(2, 2), prompt_means=torch.tensor([bad, 1.0]))
    with pytest.raises(GradNoiseError, match=r"values\): expected finite tracked values"):
        tracker_advantages(torch.ones(2, 2), torch.tensor([bad, 1.0]))


def test_tracked_values_beyond_float32_are_not_rounded_to_inf():
    rewards = torch.tensor([0.0, 0.0], dtype=torch.float64)
    values = torch.tensor([1e39], dtype=torch.float64)
    got = tracker_advantages(rewards, values, [2], normalize=False)
    torch.testing.assert_close(got, torch.tensor([-1e39, -1e39], dtype=torch.float64))


# ---------------------------------------------------------------------------------- BNPO
@pytest.mark.parametrize(
    "alpha, beta",
    [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0), (NAN, 1.0), (1.0, INF), ("1", 1.0), (True, 1.0)],
)
def test_bnpo_refuses_invalid_beta_shapes(alpha, beta):
    with pytest.raises(GradNoiseError, match=r"bnpo_advantages\((alpha|beta)\): expected a finite"):
        bnpo_advantages(torch.tensor([[1.0, 0.0]]), alpha=alpha, beta=beta)


def test_bnpo_wants_both_shapes_or_neither_and_refuses_overflow():
    with pytest.raises(GradNoiseError, match="both alpha and beta, or neither"):
        bnpo_advantages(torch.tensor([[1.0, 0.0]]), alpha=2.0)
    with pytest.raises(GradNoiseError, match="advantages that fit in float64"):
        bnpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), alpha=1e300, beta=1e300)


# --------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    "sizes", ["ab", 1.5, 4, [1.5, 2.5], [2, 1.5], (True, False), torch.tensor([2.0, 2.0]), None]
)
@pytest.mark.parametrize(
    "fn", [grpo_advantages, dr_grpo_advantages, rloo_advantages, bnpo_advantages]
)
def test_sizes_of_a_wrong_type_are_refused(fn, sizes):
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5])
    match = r"\(sizes\): expected sizes as a list" if sizes is not None else "no sizes"
    with pytest.raises(GradNoiseError, match=match):
        fn(rewards, sizes)


@pytest.mark.parametrize(
    "sizes", [[2, 2], (2, 2), torch.tensor([2, 2]), np.array([2, 2]), [np.int64(2), 2]]
)
def test_integer_sizes_of_any_integer_type_are_accepted(sizes):
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5])
    torch.testing.assert_close(
        dr_grpo_advantages(rewards, sizes), torch.tensor([-0.5, 0.5, 0.25, -0.25])
    )


# ------------------------------------------------------------------------------ apportion
@pytest.mark.parametrize(
    "weights, budget, lo, hi, want",
    [
        ([1.0, 1.9], 2, 0, None, [1, 1]),  # fractions 0.69 and 0.31, not the larger weight
        ([1.0, 2.0], 6, 2, None, [3, 3]),
        ([1.0, 1.0, 1.0], 2, 0, None, [1, 1, 0]),  # ties to the lower index
        ([3.0, 1.0], 8, 0, None, [6, 2]),
        ([10.0, 1.0, 1.0], 9, 0, 4, [4, 3, 2]),  # water-filling: capped, the rest re-shared
        ([0.0, 0.0], 3, 0, None, [2, 1]),  # all-zero weights share equally
        ([5.0, 1.0], 6, 0, torch.tensor([2, 10]), [2, 4]),  # one cap per weight
    ],
)
def test_apportion_is_water_filling_then_largest_remainder(weights, budget, lo, hi, want):
    got = apportion(torch.tensor(weights), budget, lo=lo, hi=hi)
    assert got.tolist() == want


@pytest.mark.parametrize(
    "kwargs", [{"budget": 2.5}, {"budget": None}, {"budget": True}, {"lo": -1}, {"hi": "4"}]
)
def test_apportion_refuses_non_integer_bounds(kwargs):
    args = {"budget": 4, **kwargs}
    with pytest.raises(GradNoiseError, match="apportion: expected finite weights and integer"):
        apportion(torch.ones(2), args.pop("budget"), **args)


# ------------------------------------------------------------------------------- budgets
def _allocators():
    return {
        "uniform": Uniform(8, 2, seed=0),
        "dapo": DynamicSampling(8, 2, group_size=4, seed=0),
        "gvm": GVM(8, 2, seed=0),
        "ada": ReinforceAda(8, 2, seed=0),
        "vade": VADE(8, 2, seed=0),
        "vas": VarianceAwareSampling(8, 2, seed=0),
        "combo": SelectThenSample(VADE(8, 2, seed=0), ReinforceAda(8, 2, seed=1)),
    }


def _rng_states(allocator):
    if isinstance(allocator, SelectThenSample):
        return _rng_states(allocator.selector), _rng_states(allocator.sampler)
    return copy.deepcopy(allocator.rng.bit_generator.state)


@pytest.mark.parametrize("budget", [None, 64.5, NAN, "64", True, -1])
@pytest.mark.parametrize("name", sorted(_allocators()))
def test_allocate_refuses_a_budget_that_is_not_an_int_before_drawing(name, budget):
    allocator = _allocators()[name]
    before = _rng_states(allocator)
    with pytest.raises(GradNoiseError, match=r"allocate\(budget\): expected an integer >= 0"):
        allocator.allocate(RolloutStats.fresh(torch.arange(8)), budget)
    assert _rng_states(allocator) == before


def test_allocate_accepts_numpy_and_torch_integer_budgets():
    for budget in (np.int64(8), torch.tensor(8)):
        assert (
            int(Uniform(8, 2, seed=0).allocate(RolloutStats.fresh(torch.arange(8)), budget).sum())
            == 8
        )


# ---------------------------------------------------------------------------- state dicts
def _stepped(allocator):
    stats = RolloutStats.fresh(torch.arange(8))
    counts = allocator.allocate(stats, 8)
    ids = stats.prompt_ids.repeat_interleave(counts)
    allocator.update(ids, (torch.arange(len(ids)) % 2).double())
    return allocator


@pytest.mark.parametrize(
    "path, value", [(("state", "inc"), -1), (("state", "state"), 2**128), (("uinteger",), -(2**70))]
)
def test_corrupted_rng_states_are_refused_before_any_change(path, value):
    allocator = _stepped(Uniform(8, 2, seed=0))
    state = copy.deepcopy(allocator.state_dict())
    parent = state["rng"]
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    state["history"]["n"] += 5  # would show if the history were replaced first
    before = copy.deepcopy(allocator.state_dict())
    with pytest.raises(GradNoiseError, match=r"load_state_dict: expected a valid PCG64"):
        allocator.load_state_dict(state)
    after = allocator.state_dict()
    assert torch.equal(after["history"]["n"], before["history"]["n"])
    assert after["rng"] == before["rng"]


def test_a_corrupted_rng_state_of_a_part_leaves_both_parts_unchanged():
    combo = SelectThenSample(VADE(8, 2, seed=0), ReinforceAda(8, 2, seed=1))
    state = copy.deepcopy(combo.state_dict())
    state["sampler"]["rng"]["state"]["inc"] = -1
    state["selector"]["evidence"] += 1.0
    before = copy.deepcopy(combo.state_dict())
    with pytest.raises(GradNoiseError, match="ReinforceAda.load_state_dict"):
        combo.load_state_dict(state)
    assert torch.equal(combo.state_dict()["selector"]["evidence"], before["selector"]["evidence"])


@pytest.mark.parametrize("bad", [NAN, INF, -1.0])
def test_states_with_non_finite_or_negative_statistics_are_refused(bad):
    allocator = VADE(8, 2, seed=0)
    state = copy.deepcopy(allocator.state_dict())
    state["evidence"][0, 0] = bad
    with pytest.raises(
        GradNoiseError, match=r"state\['evidence'\] holds NaN, infinite or negative"
    ):
        allocator.load_state_dict(state)
    state = copy.deepcopy(allocator.state_dict())
    state["history"]["step"] = 2**64
    with pytest.raises(GradNoiseError, match=r"state\['history'\]\['step'\]"):
        allocator.load_state_dict(state)


# ------------------------------------------------------------------------ hyperparameters
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Uniform(8.5, 2, seed=0), r"Uniform\(num_prompts\): expected an integer >= 1"),
        (lambda: Uniform(8, 2, seed=-1), r"Uniform\(seed\)"),
        (lambda: Uniform(8, 2, seed=0, reward_range=(0.0, NAN)), "reward_range lo < hi"),
        (lambda: DynamicSampling(8, 2, group_size=0, seed=0), r"\(group_size\): expected an int"),
        (lambda: DynamicSampling(8, 2, group_size=2.5, seed=0), r"\(group_size\)"),
        (lambda: GVM(8, 2, seed=0, min_samples=3, max_samples=2), r"GVM\(max_samples\)"),
        (lambda: ReinforceAda(8, 2, seed=0, round_size=1), r"ReinforceAda\(round_size\)"),
        (lambda: ReinforceAda(8, 2, seed=0, balanced="yes"), r"ReinforceAda\(balanced\)"),
        (lambda: VADE(8, 2, seed=0, rho_long=0.0), r"VADE\(rho_long\): expected a finite real"),
        (lambda: VADE(8, 2, seed=0, rho_short=NAN), r"VADE\(rho_short\)"),
        (lambda: VADE(8, 2, seed=0, prior=(0.0, 1.0)), r"VADE\(prior\[0\]\)"),
        (lambda: VADE(8, 2, seed=0, score="grup"), r"VADE\(score\)"),
        (lambda: VarianceAwareSampling(8, 2, seed=0, mix=1.5), r"\(mix\): expected a finite"),
        (lambda: VarianceAwareSampling(8, 2, seed=0, refresh_every=0), r"\(refresh_every\)"),
        (lambda: VarianceAwareSampling(8, 2, seed=0, weight_outcome=NAN), r"\(weight_outcome\)"),
        (
            lambda: SelectThenSample(
                VADE(8, 2, seed=0), ReinforceAda(8, 2, seed=0), top_up_cap="2"
            ),
            "top_up_cap='2'",
        ),
        (lambda: ValueTracker(4, rho=NAN), r"a discount in \(0, 1\]"),
        (lambda: ValueTracker(4, prior=(0.0, 0.5)), r"ValueTracker\(prior\[0\]\)"),
        (lambda: ValueTracker(4, reward_range=(1.0, 1.0)), r"ValueTracker\(reward_range\)"),
    ],
)
def test_hyperparameters_are_validated_when_built(build, match):
    with pytest.raises(GradNoiseError, match=match):
        build()


def test_observations_of_a_wrong_type_are_refused():
    vas = VarianceAwareSampling(8, 2, seed=0)
    for ids, tds in [([0], [NAN]), ([0], [1.5]), ([0, 1], [0.5]), ([0.5], [0.5]), ([9], [0.5])]:
        with pytest.raises(GradNoiseError, match="observe_diversity"):
            vas.observe_diversity(torch.tensor(ids), torch.tensor(tds))
    assert torch.equal(vas.diversity, torch.zeros(8, dtype=torch.float64))
    with pytest.raises(GradNoiseError, match="integer candidate prompt ids"):
        RolloutStats.fresh(torch.tensor([0.5, 1.5]))
    stats = RolloutStats.fresh(torch.arange(2))
    with pytest.raises(GradNoiseError, match="non-negative integer counts"):
        stats.add(torch.tensor([2, -1]), torch.ones(1))
    with pytest.raises(GradNoiseError, match="non-negative integer counts"):
        stats.add(torch.tensor([1.0, 0.0]), torch.ones(1))
