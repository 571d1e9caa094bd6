"""Intervals over items (bootstrap), seeds (t) and both (variance components)."""

import math

import pytest
import torch

from gradnoise.errors import GradNoiseError
from gradnoise.evaluation import (
    bootstrap_interval,
    seed_interval,
    t_quantile,
    variance_components,
)
from gradnoise.evaluation import intervals as intervals_module


def test_bootstrap_interval_of_the_mean_covers_the_truth_at_its_level():
    """Budget: 1000 repetitions of n = 200 Bernoulli(0.3) items, 1000 resamples each, data
    seeded with 2024 and the bootstrap with the repetition's index (about 2 s). The percentile
    interval's coverage here measured 0.952 over 4000 other repetitions; the 1000-repetition
    rate has sd sqrt(0.95 * 0.05 / 1000) = 0.007, so [0.93, 0.97] is about +-2.8 sd around
    0.95 and fails a too-narrow (e.g. 0.90) or too-wide (0.99) interval. This seed: 0.954."""
    gen = torch.Generator().manual_seed(2024)
    hits = 0
    for rep in range(1000):
        x = (torch.rand(200, generator=gen) < 0.3).double()
        hits += bootstrap_interval(x, resamples=1000, seed=rep).covers(0.3)
    assert 0.93 <= hits / 1000 <= 0.97


def test_bootstrap_standard_error_is_the_plug_in_one():
    """The bootstrap variance of a mean is (n-1)/n s^2/n exactly in expectation; with 20000
    resamples the replicates' sd has relative sd 1/sqrt(2 * 20000) = 0.5%, so 2.5% is 5 sd."""
    x = torch.randn(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = bootstrap_interval(x, resamples=20000)
    plug_in = float(x.std()) * math.sqrt(49 / 50) / math.sqrt(50)
    assert r.standard_error == pytest.approx(plug_in, rel=0.025)
    assert r.estimate == pytest.approx(float(x.mean()))
    assert (r.n, r.method, r.confidence) == (50, "bootstrap", 0.95)
    assert r.sd == pytest.approx(float(x.std()))
    assert r.replicates.shape == (20000,)
    assert r.low < r.estimate < r.high and r.half_width == pytest.approx((r.high - r.low) / 2)


def test_bootstrap_is_reproducible_and_follows_its_generator():
    x = [0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.25]
    assert bootstrap_interval(x) == bootstrap_interval(x, seed=0)
    same = bootstrap_interval(x, generator=torch.Generator().manual_seed(5))
    assert same == bootstrap_interval(x, seed=5)
    assert bootstrap_interval(x, seed=1) != bootstrap_interval(x, seed=2)


def test_bootstrap_other_statistics_and_chunks(monkeypatch):
    x = torch.arange(101, dtype=torch.float64)
    median = bootstrap_interval(x, statistic="median", resamples=500)
    assert median.estimate == 50.0 and median.low < 50 < median.high
    trimmed = bootstrap_interval(x, statistic=lambda r: r.sort(-1).values[:, 10:-10].mean(-1))
    assert trimmed.estimate == pytest.approx(50.0)
    # 100 indices per chunk: one resample per chunk, 300 chunks, the same distribution
    monkeypatch.setattr(intervals_module, "_CHUNK_ELEMENTS", 100)
    chunked = bootstrap_interval(x[:100], resamples=300)
    assert chunked.replicates.shape == (300,)
    assert chunked.standard_error == pytest.approx(float(x[:100].std()) / 10, rel=0.15)


def test_constant_values_give_a_zero_width_interval():
    r = bootstrap_interval([0.7] * 10, resamples=100)
    assert (r.low, r.estimate, r.high, r.standard_error) == pytest.approx((0.7, 0.7, 0.7, 0.0))


def test_t_quantile_matches_tables():
    # two-sided 95% and 90% values of Student's t (any statistics table)
    table = {(0.95, 1): 12.7062, (0.95, 2): 4.3027, (0.95, 4): 2.7764, (0.95, 30): 2.0423}
    table |= {(0.9, 3): 2.3534, (0.9, 9): 1.8331}
    for (confidence, dof), value in table.items():
        assert t_quantile(confidence, dof) == pytest.approx(value, abs=1e-4)
    assert t_quantile(0.95, 4.9) == t_quantile(0.95, 4)  # rounded down: conservative


def test_seed_interval_by_hand():
    r = seed_interval([1.0, 2.0, 3.0], confidence=0.95)
    se = 1 / math.sqrt(3)
    assert (r.estimate, r.sd, r.n, r.method) == (2.0, 1.0, 3, "t")
    assert r.standard_error == pytest.approx(se)
    assert (r.low, r.high) == pytest.approx((2 - 4.302653 * se, 2 + 4.302653 * se), abs=1e-5)


def test_seed_interval_covers_at_its_level_with_four_seeds():
    """Budget: 4000 draws of 4 normal per-seed scores (seed 11); the t interval is exact, so
    the coverage rate has sd sqrt(0.95 * 0.05 / 4000) = 0.0034 and [0.94, 0.96] is +-2.9 sd."""
    scores = torch.randn(4000, 4, generator=torch.Generator().manual_seed(11)) * 0.02 + 0.7
    hits = sum(seed_interval(row).covers(0.7) for row in scores)
    assert 0.94 <= hits / 4000 <= 0.96


def test_variance_components_of_an_additive_matrix_by_hand():
    """x_ij = r_i + c_j has no residual: the components are the plain variances of r and c."""
    r = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=torch.float64)
    c = torch.tensor([0.0, 0.02, -0.04], dtype=torch.float64)
    v = variance_components(r[:, None] + c[None, :])
    assert v.residual_variance == pytest.approx(0.0, abs=1e-15)
    assert v.item_variance == pytest.approx(float(r.var()))
    assert v.seed_variance == pytest.approx(float(c.var()))
    assert v.estimate == pytest.approx(float(r.mean() + c.mean()))
    assert v.standard_error**2 == pytest.approx(float(r.var()) / 4 + float(c.var()) / 3)
    assert (v.from_items, v.from_seeds) == pytest.approx((float(r.var()) / 4, float(c.var()) / 3))
    assert v.seed_sd == pytest.approx(float(c.std()))  # sd of the per-seed scores
    assert v.item_standard_error == pytest.approx(float(r.std()) / 2)
    assert (v.n_items, v.n_seeds) == (4, 3)


def test_variance_components_floor_a_negative_component_at_zero():
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    v = variance_components(x)  # identical seed means: M_B = 0 < M_E
    assert v.seed_variance == 0.0 and v.from_seeds == 0.0
    assert v.standard_error**2 == pytest.approx(v.from_items + v.from_residual)


def test_variance_components_are_unbiased_and_cover_in_simulation():
    """Budget: 1000 matrices of 40 items x 4 seeds from the two-way model (sigma_a 0.3,
    sigma_b 0.1, sigma_e 0.2; seed 3; 0.1 s). Var(mean) = 0.005; the mean of the 1000
    estimates has a standard error of 7.5e-5 (measured: the estimate's sd is 0.0024), so 5%
    (2.5e-4) is 3.3 sd; the coverage rate's sd is 0.007 at 0.95, and [0.93, 0.97] is +-2.9 sd.
    This seed: mean 0.00506, coverage 0.943."""
    gen = torch.Generator().manual_seed(3)
    n_items, n_seeds, sa, sb, se = 40, 4, 0.3, 0.1, 0.2
    true = sa**2 / n_items + sb**2 / n_seeds + se**2 / (n_items * n_seeds)
    estimates, hits = [], 0
    for _ in range(1000):
        x = (
            torch.randn(n_items, 1, generator=gen, dtype=torch.float64) * sa
            + torch.randn(1, n_seeds, generator=gen, dtype=torch.float64) * sb
            + torch.randn(n_items, n_seeds, generator=gen, dtype=torch.float64) * se
        )
        v = variance_components(x)
        estimates.append(v.standard_error**2)
        hits += v.low <= 0.0 <= v.high
    assert sum(estimates) / 1000 == pytest.approx(true, rel=0.05)
    assert 0.93 <= hits / 1000 <= 0.97


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: bootstrap_interval([1.0, 2.0], confidence=1.5),
            r"bootstrap_interval confidence: expected a number in \(0, 1\), got 1\.5\. "
            r"Use for example confidence=0\.95",
        ),
        (lambda: bootstrap_interval([1.0, 2.0], confidence=True), r"in \(0, 1\), got True"),
        (
            lambda: bootstrap_interval([1.0, 2.0], resamples=50),
            r"bootstrap_interval resamples: expected an integer >= 100, got 50\. Use "
            r"resamples=2000",
        ),
        (lambda: bootstrap_interval([1.0, 2.0], resamples=500.0), r"integer >= 100, got 500\.0"),
        (
            lambda: bootstrap_interval([1.0, 2.0], seed=1, generator=torch.Generator()),
            r"bootstrap_interval: expected seed= or generator=, not both, got seed=1 and a "
            r"generator\. Pass only one",
        ),
        (
            lambda: bootstrap_interval([1.0, 2.0], generator=3),
            r"bootstrap_interval generator: expected a torch\.Generator, got int",
        ),
        (
            lambda: bootstrap_interval([1.0, 2.0], seed="a"),
            r"bootstrap_interval seed: expected an integer, got 'a'",
        ),
        (
            lambda: bootstrap_interval([1.0, 2.0], statistic="mode"),
            r'bootstrap_interval statistic: expected "mean", "median" or a function .* got '
            r"'mode'",
        ),
        (
            lambda: bootstrap_interval([1.0, 2.0], statistic=lambda r: r),
            r"bootstrap_interval statistic: expected one value per resample, shape \(1,\), "
            r"got shape \(1, 2\)\. Reduce the last dimension only",
        ),
        (
            lambda: bootstrap_interval([1.0, 2.0], statistic=lambda r: r.mean(-1) / (r[:, 0] - 1)),
            r"bootstrap_interval statistic: expected finite values on every resample",
        ),
        (
            lambda: bootstrap_interval(["a", "b"]),
            r"bootstrap_interval values: expected a 1-D sequence of numbers \(a list or a "
            r"tensor\), got list",
        ),
        (
            lambda: bootstrap_interval([[1.0, 2.0]]),
            r"bootstrap_interval values: expected a 1-D sequence of numbers, got shape \(1, 2\)",
        ),
        (
            lambda: bootstrap_interval([1.0]),
            r"bootstrap_interval values: expected at least 2 values, got 1\. A spread needs",
        ),
        (
            lambda: bootstrap_interval([1.0, math.nan, math.inf]),
            r"bootstrap_interval values: expected finite values, got 2 NaN or inf value\(s\)",
        ),
        (
            lambda: seed_interval([0.5]),
            r"seed_interval per_seed_scores: expected at least 2 values, got 1",
        ),
        (lambda: seed_interval([0.5, 0.6], confidence=0), r"seed_interval confidence: expected"),
        (
            lambda: variance_components([1.0, 2.0, 3.0]),
            r"variance_components scores: expected an \(items, seeds\) matrix with at least 2 "
            r"items and 2 seeds, got shape \(3,\)\. Use bootstrap_interval for one seed",
        ),
        (lambda: variance_components([[1.0, 2.0]]), r"2 seeds, got shape \(1, 2\)"),
        (
            lambda: variance_components([[1.0, 2.0], [3.0, math.nan]]),
            r"variance_components scores: expected finite values \(a complete matrix\), got 1 "
            r"NaN or inf value\(s\)\. Keep only the items scored under every seed",
        ),
        (
            lambda: variance_components([[1.0, "x"], [3.0, 4.0]]),
            r"variance_components scores: expected an \(items, seeds\) matrix of numbers, got "
            r"list",
        ),
        (
            lambda: variance_components([[1.0, 2.0], [3.0, 4.0]], confidence=2),
            r"variance_components confidence: expected a number in \(0, 1\), got 2",
        ),
    ],
)
def test_errors(call, match):
    with pytest.raises(GradNoiseError, match=match):
        call()
