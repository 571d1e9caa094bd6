"""Property-based fuzzing of the advantage functions of ``gradnoise.rl`` against direct formulas.

Strategies (hypothesis, derandomized; see tests/README.md):

* **layouts**: dense ``(P, G)`` with 1-5 prompts and 1-6 samples, or flat rewards with ragged
  ``sizes`` (1-6 groups of 1-6); rewards as float32, float64, int64 or bool tensors, or lists;
* **reward values**: binary, small integers, floats in [-10, 10], floats of any magnitude from
  1e-30 to 1e15, pass rates in [0, 1], groups that repeat one value (zero variance), and now and
  then a NaN or an infinity; for the known bugs also 1e17-1e30 and float64 beyond float32;
* **arguments**: ``eps`` (valid, or negative/NaN), OPO lengths (positive, or zero, negative,
  NaN, inf, of the wrong shape), BNPO ``alpha``/``beta`` (fitted, given, or <= 0/NaN), global
  prompt means and tracker values (finite, NaN/inf, of the wrong shape);
* **bad layouts**: empty or non-positive sizes, sizes that do not sum to the rewards, sizes of a
  wrong type, rewards of a wrong dimension or empty.

Asserted: with finite rewards and valid arguments every advantage equals the paper formula
computed in float64 with plain Python (per-group means, Bessel standard deviations,
leave-one-out baselines, length-weighted baselines, Beta densities), within float32 rounding
scaled by the formula's conditioning (the package computes in the default dtype); a zero-variance
group gets 0 where the docstring says so; anything else raises ``GradNoiseError``, never a raw
exception and never a NaN/inf advantage. Properties that fail today are ``known_bug`` tests
(strict xfails listed with reproducers in tests/README.md).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from gradnoise.errors import GradNoiseError
from gradnoise.rl import (
    bnpo_advantages,
    dr_grpo_advantages,
    global_baseline_advantages,
    grpo_advantages,
    opo_advantages,
    rloo_advantages,
    tracker_advantages,
)
from tests.fuzz import fuzz_settings

F32_MAX = float(torch.finfo(torch.float32).max)
REL = 2e-5  # float32 rounding (the package computes in the default dtype) with headroom


# ----------------------------------------------------------------------------- strategies
def _values(kind: str):
    return {
        "binary": st.sampled_from([0.0, 1.0]),
        "ints": st.integers(-3, 3).map(float),
        "floats": st.floats(-10, 10, width=32),
        "wide": st.builds(
            lambda m, e: m * 10.0**e, st.floats(-1, 1, width=32), st.integers(-30, 15)
        ),
        "big": st.builds(lambda m, e: m * 10.0**e, st.floats(-1, 1, width=32), st.integers(17, 30)),
        "huge64": st.floats(1e39, 1e300).map(lambda v: v * 1.0),
        "unit": st.one_of(st.sampled_from([0.0, 1.0]), st.floats(1e-6, 1 - 1e-6)),
    }[kind]


@st.composite
def layouts(draw, *, kinds: tuple[str, ...] = ("binary", "ints", "floats", "wide", "unit")):
    """``(rewards as passed, sizes as passed, groups as lists of floats)``."""
    if draw(st.booleans()):
        p, g = draw(st.integers(1, 5)), draw(st.integers(1, 6))
        sizes = [g] * p
        dense = True
    else:
        sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=6))
        dense = False
    kind = draw(st.sampled_from(kinds))
    constant = draw(st.integers(0, 3)) == 0  # every group repeats one value
    groups = []
    for n in sizes:
        if constant:
            groups.append([draw(_values(kind))] * n)
        else:
            groups.append(draw(st.lists(_values(kind), min_size=n, max_size=n)))
    if draw(st.integers(0, 9)) == 0:  # a NaN or an infinity somewhere
        g = draw(st.integers(0, len(groups) - 1))
        i = draw(st.integers(0, len(groups[g]) - 1))
        groups[g][i] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    flat = [v for group in groups for v in group]
    integral = all(math.isfinite(v) and v == int(v) and abs(v) < 2**53 for v in flat)
    options = ["float32", "float64"] + (["int64"] if integral else [])
    options += ["bool"] if kind == "binary" and integral else []
    options += ["list"] if all(math.isfinite(v) for v in flat) else []
    if kind == "huge64":
        options = ["float64"]
    dtype = draw(st.sampled_from(options))
    if dtype == "list":
        rewards = [list(g) for g in groups] if dense else flat
    else:
        tensor = torch.tensor(flat, dtype=torch.float64)
        tensor = tensor.to(getattr(torch, dtype))
        rewards = tensor.reshape(len(sizes), -1) if dense else tensor
        groups = _split(tensor.double().tolist(), sizes)  # what the tensor really holds
    return rewards, (None if dense else sizes), groups


def _split(flat: list[float], sizes: list[int]) -> list[list[float]]:
    out, start = [], 0
    for n in sizes:
        out.append(flat[start : start + n])
        start += n
    return out


# ------------------------------------------------------------------------------ reference
# Each reference gives, per sample, ``(value, conditioning)``: the float64 value of the formula
# and how much float32 rounding of the inputs, of the baseline and of the scale can move it
# (the package computes in the default dtype, float32), so the tolerance is REL * (|value| +
# conditioning) and nothing looser.
def _mean(xs):
    return math.fsum(xs) / len(xs)


def _std(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _biggest(xs):
    return max(map(abs, xs), default=0.0)


def _ref_grpo(groups, eps):
    out = []
    for g in groups:
        m, d, big = _mean(g), _std(g) + eps, _biggest(g)
        out.append([((r - m) / d, big / d * (1 + abs((r - m) / d))) for r in g])
    return out


def _ref_dr_grpo(groups):
    return [[(r - _mean(g), _biggest(g)) for r in g] for g in groups]


def _ref_rloo(groups):
    out = []
    for g in groups:
        n, total = len(g), math.fsum(g)
        out.append([(r - (total - r) / (n - 1) if n > 1 else 0.0, 2 * _biggest(g)) for r in g])
    return out


def _ref_opo(groups, lengths):
    out = []
    for g, ls in zip(groups, lengths, strict=True):
        b = math.fsum(ll * r for ll, r in zip(ls, g, strict=True)) / math.fsum(ls)
        out.append([(r - b, _biggest(g)) for r in g])
    return out


def _fit(means):
    """The method-of-moments Beta fit of ``fit_beta``'s docstring, and its conditioning."""
    m = _mean(means)
    v = statistics.pvariance(means) if len(means) > 1 else 0.0
    c = m * (1 - m) / v - 1 if v > 0 else -1.0
    a, b = (m * c, (1 - m) * c) if c > 0 and 0 < m < 1 else (1.0, 1.0)
    return 1 + a / 3, 1 + b / 3, (c if c > 0 else 0.0)


def _beta_density(p, a, b):
    log_norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return math.exp((a - 1) * math.log(p) + (b - 1) * math.log(1 - p) - log_norm)


def _ref_bnpo(groups, alpha, beta):
    means = [_mean(g) for g in groups]
    if alpha is None or beta is None:
        alpha, beta, _ = _fit(means)
    out = []
    for g, p in zip(groups, means, strict=True):
        if 0 < p < 1:
            f = _beta_density(p, alpha, beta)
            # d log f / dp = (alpha - 1)/p - (beta - 1)/(1 - p): rounding of p moves 1/f too
            slope = abs(alpha - 1) / p + abs(beta - 1) / (1 - p)
            out.append([((r - p) / f, (1 + abs(r - p) * slope) / f) for r in g])
        else:
            out.append([(0.0, 0.0) for _ in g])
    return out


def _ref_global(groups, prompt_means, eps):
    flat = [r for g in groups for r in g]
    d = _std(flat) + eps
    means = prompt_means if prompt_means is not None else [_mean(g) for g in groups]
    big = _biggest(flat) + _biggest(means)
    return [
        [((r - mu) / d, big / d * (1 + abs((r - mu) / d))) for r in g]
        for g, mu in zip(groups, means, strict=True)
    ]


def _ref_tracker(groups, values, normalize, eps):
    adv = [[r - v for r in g] for g, v in zip(groups, values, strict=True)]
    flat = [a for g in adv for a in g]
    big = _biggest([r for g in groups for r in g]) + _biggest(values)
    if normalize and len(flat) > 1:
        m, d = _mean(flat), _std(flat) + eps
        return [[((a - m) / d, 2 * big / d * (1 + abs((a - m) / d))) for a in g] for g in adv]
    return [[(a, big) for a in g] for g in adv]


def _compare(got: torch.Tensor, expected: list[list[tuple[float, float]]], shape) -> None:
    """``got`` (the package's output) against ``(value, conditioning)`` pairs per sample."""
    assert tuple(got.shape) == tuple(shape)
    flat = got.reshape(-1).double().tolist()
    pairs = [pair for group in expected for pair in group]
    assert len(flat) == len(pairs)
    for i, (value, (want, cond)) in enumerate(zip(flat, pairs, strict=True)):
        assert math.isfinite(value), (i, value, want)
        tol = REL * (abs(want) + cond) + 1e-30
        assert abs(value - want) <= tol, (i, value, want, tol)


def _shape(rewards) -> tuple:
    return tuple(torch.as_tensor(rewards).shape)


def _finite(groups) -> bool:
    return all(math.isfinite(v) for g in groups for v in g)


def _expect(call, expected_fn, *, valid: bool, shape) -> None:
    """``call`` raises GradNoiseError unless ``valid``; if valid it gives the reference numbers."""
    if not valid:
        with pytest.raises(GradNoiseError):
            call()
        return
    _compare(call(), expected_fn(), shape)


def _refused_or_right(call, expected_fn, shape) -> None:
    """Either a GradNoiseError or the reference numbers (never NaN, inf or a wrong number)."""
    try:
        got = call()
    except GradNoiseError:
        return
    _compare(got, expected_fn(), shape)


GROUP_FUNCTIONS = {
    "grpo": (grpo_advantages, lambda groups, eps: _ref_grpo(groups, eps)),
    "dr_grpo": (dr_grpo_advantages, lambda groups, eps: _ref_dr_grpo(groups)),
    "rloo": (rloo_advantages, lambda groups, eps: _ref_rloo(groups)),
}
valid_eps = st.one_of(st.just(None), st.sampled_from([1e-8, 1e-4, 0.1, 1.0]))
bad_eps = st.sampled_from([-1e-4, -1.0, math.nan, -math.inf])


def _eps_kwargs(eps) -> dict:
    return {} if eps is None else {"eps": eps}


def _eps(eps) -> float:
    return 1e-4 if eps is None else eps


# ---------------------------------------------------------------- group-relative advantages
@fuzz_settings(150)
@given(layouts(), valid_eps, st.sampled_from(sorted(GROUP_FUNCTIONS)))
def test_group_advantages_match_the_formulas(layout, eps, name):
    rewards, sizes, groups = layout
    fn, ref = GROUP_FUNCTIONS[name]
    kwargs = _eps_kwargs(eps) if name == "grpo" else {}
    _expect(
        lambda: fn(rewards, sizes, **kwargs),
        lambda: ref(groups, _eps(eps)),
        valid=_finite(groups),
        shape=_shape(rewards),
    )


@fuzz_settings(80)
@given(layouts(kinds=("binary", "ints")))
def test_grpo_gives_zero_to_zero_variance_groups_of_exact_rewards(layout):
    rewards, sizes, groups = layout
    if not _finite(groups):
        return
    got = grpo_advantages(rewards, sizes).reshape(-1).tolist()
    start = 0
    for g in groups:
        if len(set(g)) == 1:
            assert all(abs(a) <= 1e-6 for a in got[start : start + len(g)]), (g, got)
        start += len(g)


@fuzz_settings(60, shrink=False)
@given(
    st.integers(2, 16),
    st.floats(-1000, 1000, width=32),
    st.sampled_from([torch.float32, torch.float64]),
)
@example(n=5, level=102.78345489501953, dtype=torch.float32)  # -0.0703, not 0
def test_grpo_gives_zero_to_constant_groups_at_any_reward_level(n, level, dtype):
    # "a zero-variance group gets 0" (grpo_advantages docstring), whatever the common reward
    got = grpo_advantages(torch.full((2, n), level, dtype=dtype))
    assert got.abs().max().item() <= 1e-6, (level, n, got)


@fuzz_settings(60, shrink=False)
@given(layouts(kinds=("big", "huge64")), st.sampled_from(sorted(GROUP_FUNCTIONS)))
@example(
    layout=(torch.tensor([[1e39, -1e39]], dtype=torch.float64), None, [[1e39, -1e39]]), name="grpo"
)  # NaN
def test_rewards_beyond_float32_are_refused_or_exact(layout, name):
    rewards, sizes, groups = layout
    fn, ref = GROUP_FUNCTIONS[name]
    if not _finite(groups):
        return
    _refused_or_right(lambda: fn(rewards, sizes), lambda: ref(groups, 1e-4), _shape(rewards))


@fuzz_settings(40, shrink=False)
@given(
    layouts(kinds=("binary", "floats")),
    bad_eps,
    st.sampled_from(["grpo", "global", "tracker"]),
)
@example(
    layout=(torch.tensor([[1.0, 0.0]]), None, [[1.0, 0.0]]), eps=-1e-4, name="grpo"
)  # finite, wrong
def test_invalid_eps_is_refused(layout, eps, name):
    rewards, sizes, groups = layout
    with pytest.raises(GradNoiseError):
        if name == "grpo":
            grpo_advantages(rewards, sizes, eps=eps)
        elif name == "global":
            global_baseline_advantages(rewards, sizes, eps=eps)
        else:
            tracker_advantages(rewards, torch.zeros(len(groups)), sizes, eps=eps)


# ------------------------------------------------------------------------------------ OPO
def _lengths(data, groups) -> list[list[float]]:
    return [[float(data.draw(st.integers(1, 500))) for _ in g] for g in groups]


@fuzz_settings(100)
@given(layouts(), st.data())
def test_opo_advantages_match_the_length_weighted_baseline(layout, data):
    rewards, sizes, groups = layout
    lengths = _lengths(data, groups)
    flat = [v for g in lengths for v in g]
    kind = data.draw(st.sampled_from(["good"] * 4 + ["zero", "negative", "shape"]))
    if kind == "zero":
        flat[0] = 0.0
    elif kind == "negative":
        flat[-1] = -3.0
    elif kind == "shape":
        flat = [*flat, 1.0]
    _expect(
        lambda: opo_advantages(rewards, torch.tensor(flat), sizes),
        lambda: _ref_opo(groups, lengths),
        valid=kind == "good" and _finite(groups),
        shape=_shape(rewards),
    )


@fuzz_settings(30, shrink=False)
@given(
    layouts(kinds=("binary", "floats")), st.sampled_from([math.nan, math.inf]), st.integers(0, 99)
)
@example(
    layout=(torch.tensor([[1.0, 0.0]]), None, [[1.0, 0.0]]), bad=math.nan, where=1
)  # NaN advantages
def test_opo_refuses_non_finite_lengths(layout, bad, where):
    rewards, sizes, groups = layout
    flat = [float(1 + i % 7) for i in range(sum(len(g) for g in groups))]
    flat[where % len(flat)] = bad
    with pytest.raises(GradNoiseError):
        opo_advantages(rewards, torch.tensor(flat), sizes)


# ----------------------------------------------------------------------------------- BNPO
@fuzz_settings(100)
@given(
    layouts(kinds=("unit", "binary")),
    st.one_of(st.just((None, None)), st.tuples(st.floats(0.5, 5), st.floats(0.5, 5))),
)
def test_bnpo_advantages_match_the_beta_normalisation(layout, ab):
    rewards, sizes, groups = layout
    alpha, beta = ab
    if alpha is None and _finite(groups):
        *_, c = _fit([_mean(g) for g in groups])
        if c > 1e3:
            return  # the moment fit is ill-conditioned: rounding of the means moves alpha, beta
    _expect(
        lambda: bnpo_advantages(rewards, sizes, alpha=alpha, beta=beta),
        lambda: _ref_bnpo(groups, alpha, beta),
        valid=_finite(groups),
        shape=_shape(rewards),
    )


@fuzz_settings(40)
@given(layouts(kinds=("floats",)))
def test_bnpo_refuses_rewards_outside_the_unit_interval(layout):
    rewards, sizes, groups = layout
    inside = all(0 <= v <= 1 for g in groups for v in g)
    if inside:
        return
    with pytest.raises(GradNoiseError):
        bnpo_advantages(rewards, sizes)


@fuzz_settings(30, shrink=False)
@given(
    layouts(kinds=("binary",)),
    st.sampled_from([0.0, -1.0, math.nan]),
    st.floats(0.5, 5),
    st.booleans(),
)
@example(
    layout=(torch.tensor([[1.0, 0.0]]), None, [[1.0, 0.0]]), bad=0.0, good=1.0, bad_first=True
)  # raw ValueError
def test_bnpo_refuses_invalid_beta_parameters(layout, bad, good, bad_first):
    rewards, sizes, _ = layout
    alpha, beta = (bad, good) if bad_first else (good, bad)
    with pytest.raises(GradNoiseError):
        bnpo_advantages(rewards, sizes, alpha=alpha, beta=beta)


# ---------------------------------------------------------------- global and tracker baselines
@fuzz_settings(100)
@given(layouts(kinds=("binary", "ints", "floats", "wide")), valid_eps, st.data())
def test_global_baseline_advantages_match_the_batch_formula(layout, eps, data):
    rewards, sizes, groups = layout
    kind = data.draw(st.sampled_from(["none", "given", "given", "shape"]))
    means = None
    if kind != "none":
        means = [data.draw(st.floats(-10, 10)) for _ in groups]
    passed = None
    if means is not None:
        passed = torch.tensor([*means, 0.0] if kind == "shape" else means, dtype=torch.float64)
    _expect(
        lambda: global_baseline_advantages(rewards, sizes, prompt_means=passed, **_eps_kwargs(eps)),
        lambda: _ref_global(groups, means, _eps(eps)),
        valid=_finite(groups) and kind != "shape",
        shape=_shape(rewards),
    )


@fuzz_settings(40, shrink=False)
@given(
    st.integers(2, 12),
    st.floats(-1000, 1000, width=32),
    st.floats(-10, 10),
)
@example(n=7, level=777.7, mean=0.0)  # 4.69e6, not 7.78e6
def test_global_baseline_of_a_constant_batch_is_exact(n, level, mean):
    # the batch std of equal rewards is 0, so A = (r - mu) / eps exactly
    got = global_baseline_advantages(
        torch.full((n,), level), [n], prompt_means=torch.tensor([mean], dtype=torch.float64)
    )
    want = (level - mean) / 1e-4
    assert abs(got[0].item() - want) <= 1e-3 * abs(want) + 1e-6, (got, want)


@fuzz_settings(30, shrink=False)
@given(
    layouts(kinds=("binary", "floats")),
    st.booleans(),
    st.integers(0, 99),
    st.sampled_from([math.nan, math.inf]),
)
@example(
    layout=(torch.tensor([[1.0, 0.0]]), None, [[1.0, 0.0]]), tracker=False, where=0, bad=math.nan
)  # NaN advantages
def test_non_finite_baselines_are_refused(layout, tracker, where, bad):
    rewards, sizes, groups = layout
    values = torch.zeros(len(groups), dtype=torch.float64)
    values[where % len(groups)] = bad
    with pytest.raises(GradNoiseError):
        if tracker:
            tracker_advantages(rewards, values, sizes)
        else:
            global_baseline_advantages(rewards, sizes, prompt_means=values)


@fuzz_settings(100)
@given(layouts(kinds=("binary", "ints", "floats", "wide")), valid_eps, st.booleans(), st.data())
def test_tracker_advantages_match_the_batch_normalised_formula(layout, eps, normalize, data):
    rewards, sizes, groups = layout
    shape_ok = data.draw(st.integers(0, 4)) > 0
    values = [data.draw(st.floats(-10, 10)) for _ in groups]
    passed = torch.tensor(values if shape_ok else [*values, 0.0], dtype=torch.float64)
    _expect(
        lambda: tracker_advantages(rewards, passed, sizes, normalize=normalize, **_eps_kwargs(eps)),
        lambda: _ref_tracker(groups, values, normalize, _eps(eps)),
        valid=_finite(groups) and shape_ok,
        shape=_shape(rewards),
    )


# --------------------------------------------------------------------------- bad layouts
ADVANTAGES = [
    grpo_advantages,
    dr_grpo_advantages,
    rloo_advantages,
    bnpo_advantages,
    global_baseline_advantages,
]


def _reshaped(values, shape) -> torch.Tensor:
    rewards = torch.tensor(values)
    try:
        return rewards.reshape(shape)
    except RuntimeError:
        return rewards.reshape(-1)


def _layout_ok(rewards: torch.Tensor, sizes) -> bool:
    if sizes is None:
        return rewards.dim() == 2 and 0 not in rewards.shape
    return (
        isinstance(sizes, list)
        and bool(sizes)
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)
        and rewards.dim() == 1
        and sum(sizes) == rewards.numel()
    )


@fuzz_settings(120)
@given(
    st.sampled_from(ADVANTAGES),
    st.one_of(st.lists(st.integers(-2, 6), max_size=5), st.none()),
    st.lists(st.floats(0, 1), min_size=0, max_size=12),
    st.sampled_from([(-1,), (1, -1), (-1, 1), (2, 2, -1), (0, -1)]),
)
def test_bad_layouts_raise_only_gradnoise_errors(fn, sizes, values, shape):
    rewards = _reshaped(values, shape)
    if not _layout_ok(rewards, sizes):
        with pytest.raises(GradNoiseError):
            fn(rewards, sizes)
        return
    out = fn(rewards, sizes)
    assert torch.isfinite(out).all() and out.shape == rewards.shape


@fuzz_settings(30, shrink=False)
@given(
    st.sampled_from(ADVANTAGES),
    st.sampled_from(["ab", 1.5, [1.5, 2.5], [2, 1.5], (True, False)]),
)
@example(fn=grpo_advantages, sizes="ab")  # raw TypeError
def test_sizes_of_a_wrong_type_are_refused(fn, sizes):
    with pytest.raises(GradNoiseError):
        fn(torch.tensor([0.0, 1.0, 1.0, 0.5]), sizes)
