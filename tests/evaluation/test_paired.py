"""Paired comparison: the exact sign test, the MDD formula, and interval coverage."""

import math
from fractions import Fraction
from statistics import NormalDist

import pytest
import torch

from gradnoise.errors import GradNoiseError
from gradnoise.evaluation import (
    minimum_detectable_difference,
    paired_comparison,
    sign_test_p_value,
    t_quantile,
)


def exact_sign_p(wins: int, losses: int) -> float:
    """2 P(W <= min) for W ~ Bin(n, 1/2) with exact fractions, capped at 1."""
    n, k = wins + losses, min(wins, losses)
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def test_sign_test_by_hand():
    # 8 wins, 2 losses: 2 (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * 56 / 1024
    assert sign_test_p_value(8, 2) == pytest.approx(112 / 1024, rel=1e-12)
    assert sign_test_p_value(2, 8) == sign_test_p_value(8, 2)
    assert sign_test_p_value(0, 10) == pytest.approx(2 / 1024, rel=1e-12)
    assert sign_test_p_value(5, 5) == 1.0 and sign_test_p_value(0, 0) == 1.0
    assert sign_test_p_value(1, 0) == 1.0


def test_sign_test_matches_exact_fractions_at_large_counts():
    for wins, losses in [(60, 40), (530, 470), (1300, 1200), (30, 0)]:
        assert sign_test_p_value(wins, losses) == pytest.approx(
            exact_sign_p(wins, losses), rel=1e-9
        )


def test_minimum_detectable_difference_closed_form():
    z = NormalDist().inv_cdf
    assert minimum_detectable_difference(1.0, 100) == pytest.approx(
        (z(0.975) + z(0.8)) / 10, rel=1e-12
    )
    assert minimum_detectable_difference(1.0, 100) == pytest.approx(0.28016, abs=1e-5)
    got = minimum_detectable_difference(0.5, 400, alpha=0.01, power=0.9)
    assert got == pytest.approx((2.5758293 + 1.2815516) * 0.5 / 20, rel=1e-7)
    assert minimum_detectable_difference(0.0, 10) == 0.0


def test_a_true_difference_of_one_mdd_is_detected_with_the_stated_power():
    """Budget: 8000 simulated benchmarks of n = 100 normal differences (sd 1, seed 5) whose
    mean is the MDD; a two-sided t test at 0.05 rejects in about 0.80 of them (t with n - 1 =
    99 dof loses under 0.01 against the normal formula). The rate's sd is
    sqrt(0.8 * 0.2 / 8000) = 0.0045, so [0.78, 0.82] is over +-4 sd around 0.80."""
    n = 100
    delta = minimum_detectable_difference(1.0, n)
    d = torch.randn(8000, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    d = d + delta
    t = d.mean(1) / (d.std(1) / math.sqrt(n))
    rate = float((t.abs() > t_quantile(0.95, n - 1)).double().mean())
    assert 0.78 <= rate <= 0.82


def test_paired_comparison_by_hand():
    a = [1.0, 1.0, 0.0, 1.0, 0.5, 1.0]
    b = [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    r = paired_comparison(a, b, resamples=500)
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    se = float(d.std()) / math.sqrt(6)
    assert r.difference == pytest.approx(float(d.mean())) and r.n == 6
    assert (r.wins, r.losses, r.ties) == (3, 1, 2)
    assert r.sign_test_p == pytest.approx(sign_test_p_value(3, 1))
    assert (r.t.low, r.t.high) == pytest.approx(
        (r.difference - t_quantile(0.95, 5) * se, r.difference + t_quantile(0.95, 5) * se)
    )
    assert r.sd == pytest.approx(float(d.std()))
    assert r.bootstrap.estimate == pytest.approx(r.difference)
    assert r.minimum_detectable == pytest.approx(minimum_detectable_difference(r.sd, 6))


def test_pairing_removes_the_shared_item_difficulty():
    """Two systems that agree on which items are hard: the paired interval is much narrower
    than the one from two independent standard errors (sqrt(se_a^2 + se_b^2))."""
    gen = torch.Generator().manual_seed(0)
    difficulty = torch.rand(300, generator=gen, dtype=torch.float64)
    a = difficulty + 0.05 * torch.randn(300, generator=gen, dtype=torch.float64)
    b = difficulty + 0.05 * torch.randn(300, generator=gen, dtype=torch.float64) - 0.02
    r = paired_comparison(a, b)
    unpaired = math.sqrt(float(a.var()) / 300 + float(b.var()) / 300)
    assert r.t.standard_error < unpaired / 3
    assert r.t.low > 0 and r.bootstrap.low > 0  # the 0.02 shift is found


def test_paired_intervals_cover_the_true_difference_in_simulation():
    """Budget: 1000 repetitions (seed 7) of n = 200 items: a ~ Bernoulli(0.6), b equal to a
    with probability 0.7 and otherwise an independent Bernoulli(0.5), so E[a - b] = 0.6 - 0.57
    = 0.03; 1000 resamples per bootstrap (about 1.5 s). Over 2000 other repetitions the
    coverage measured 0.960 (bootstrap) and 0.955 (t); this seed: 0.956 and 0.949. The rate's
    sd is 0.007 at 0.95: [0.93, 0.975] is -2.9 / +3.6 sd around 0.95 (the upper side leaves
    room for the discreteness of d)."""
    gen = torch.Generator().manual_seed(7)
    boot = t = 0
    for rep in range(1000):
        a = (torch.rand(200, generator=gen) < 0.6).double()
        same = torch.rand(200, generator=gen) < 0.7
        b = torch.where(same, a, (torch.rand(200, generator=gen) < 0.5).double())
        r = paired_comparison(a, b, resamples=1000, seed=rep)
        boot += r.bootstrap.covers(0.03)
        t += r.t.covers(0.03)
    assert 0.93 <= boot / 1000 <= 0.975
    assert 0.93 <= t / 1000 <= 0.975


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: paired_comparison([1.0, 0.0, 1.0], [1.0, 0.0]),
            r"paired_comparison: expected a and b of the same length \(one score per shared "
            r"item\), got 3 and 2 scores\. Keep only the items both systems",
        ),
        (
            lambda: paired_comparison([1.0], [0.0]),
            r"paired_comparison a: expected at least 2 values, got 1",
        ),
        (
            lambda: paired_comparison([1.0, 0.0], [0.0, math.nan]),
            r"paired_comparison b: expected finite values, got 1 NaN",
        ),
        (
            lambda: paired_comparison([1.0, 0.0], [0.0, 1.0], confidence=95),
            r"paired_comparison confidence: expected a number in \(0, 1\), got 95",
        ),
        (
            lambda: paired_comparison([1.0, 0.0], [0.0, 1.0], resamples=10),
            r"bootstrap_interval resamples: expected an integer >= 100, got 10",
        ),
        (
            lambda: sign_test_p_value(-1, 3),
            r"sign_test_p_value wins: expected a non-negative integer, got -1\. Count the items",
        ),
        (lambda: sign_test_p_value(1, 2.0), r"sign_test_p_value losses: expected a non-negative"),
        (
            lambda: minimum_detectable_difference(-1.0, 10),
            r"minimum_detectable_difference sd_of_differences: expected a finite number >= 0, "
            r"got -1\.0\. Pass the sample sd",
        ),
        (lambda: minimum_detectable_difference(math.nan, 10), r"finite number >= 0, got nan"),
        (lambda: minimum_detectable_difference(True, 10), r"finite number >= 0, got True"),
        (
            lambda: minimum_detectable_difference(1.0, 0),
            r"minimum_detectable_difference n_items: expected a positive integer, got 0",
        ),
        (
            lambda: minimum_detectable_difference(1.0, 10, alpha=0.0),
            r"minimum_detectable_difference alpha: expected a number in \(0, 1\), got 0\.0\. "
            r"Use for example alpha=0\.05",
        ),
        (
            lambda: minimum_detectable_difference(1.0, 10, power=1.5),
            r"minimum_detectable_difference power: expected a number in \(0, 1\), got 1\.5\. "
            r"Use for example power=0\.8",
        ),
    ],
)
def test_errors(call, match):
    with pytest.raises(GradNoiseError, match=match):
        call()
