"""Unbiased pass@k (Chen et al. 2021) against exact enumeration, and its errors."""

import itertools
import math

import pytest
import torch

from gradnoise.errors import GradNoiseError
from gradnoise.evaluation import pass_at_k, pass_at_k_interval, t_quantile


def brute_force(n: int, c: int, k: int) -> float:
    """The fraction of all k-subsets of the n samples (the first c correct) holding a correct
    one: the expectation the estimator must equal exactly."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


def test_equals_the_average_over_every_k_subset():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                got = float(pass_at_k(n, c, k)[0])
                assert got == pytest.approx(brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_vectorised_over_problems_matches_one_at_a_time():
    n, c = [10, 7, 20, 5], [3, 0, 20, 1]
    per_problem = pass_at_k(n, c, 5)
    assert per_problem.dtype == torch.float64 and per_problem.shape == (4,)
    for i in range(4):
        assert float(per_problem[i]) == pytest.approx(float(pass_at_k(n[i], c[i], 5)[0]))
    assert pass_at_k(torch.tensor(n), torch.tensor(c), 5).tolist() == per_problem.tolist()


def test_large_n_is_stable_and_matches_the_binomial_ratio():
    """1 - C(n-c, k)/C(n, k) with exact integers against the product form: no overflow at
    n = 10000, and small values (c = 1: k/n) keep their relative precision."""
    for n, c, k in [(200, 3, 50), (10_000, 1, 1), (10_000, 1, 7), (10_000, 9_000, 100)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert float(pass_at_k(n, c, k)[0]) == pytest.approx(exact, rel=1e-12)
    assert float(pass_at_k(10_000, 1, 1)[0]) == pytest.approx(1e-4, rel=1e-12)
    assert math.copysign(1, float(pass_at_k(5, 0, 2)[0])) == 1.0  # 0.0, not -0.0


def test_interval_is_the_mean_over_problems_with_its_standard_error():
    n, c, k = [10, 10, 10, 10, 10], [0, 2, 5, 9, 10], 3
    per_problem = pass_at_k(n, c, k)
    r = pass_at_k_interval(n, c, k, confidence=0.9)
    se = float(per_problem.std()) / math.sqrt(5)
    assert r.estimate == pytest.approx(float(per_problem.mean()))
    assert r.standard_error == pytest.approx(se) and r.sd == pytest.approx(se * math.sqrt(5))
    half = t_quantile(0.9, 4) * se
    assert r.low == pytest.approx(max(0.0, r.estimate - half))
    assert r.high == pytest.approx(min(1.0, r.estimate + half))
    assert (r.k, r.n_problems, r.confidence) == (3, 5, 0.9)


def test_interval_is_cut_to_zero_one():
    r = pass_at_k_interval([4, 4, 4], [4, 4, 0], 1)
    assert r.low >= 0.0 and r.high == 1.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: pass_at_k(5, 1, 0), r"pass_at_k k: expected a positive integer, got 0\."),
        (lambda: pass_at_k(5, 1, 1.5), r"pass_at_k k: expected a positive integer, got 1\.5"),
        (lambda: pass_at_k(5, 1, True), r"pass_at_k k: expected a positive integer, got True"),
        (
            lambda: pass_at_k([5, -1], [1, 0], 1),
            r"pass_at_k n: expected non-negative integers \(one per problem\), got -1 at "
            r"position 1\. Count samples",
        ),
        (lambda: pass_at_k(5.0, 1, 1), r"pass_at_k n: expected non-negative .* got 5\.0 at"),
        (lambda: pass_at_k(5, [True], 1), r"pass_at_k c: expected non-negative .* got True at"),
        (
            lambda: pass_at_k([5, 5], [1], 1),
            r"pass_at_k: expected n and c of the same non-zero length .* got 2 and 1 entries",
        ),
        (lambda: pass_at_k([], [], 1), r"same non-zero length .* got 0 and 0 entries"),
        (
            lambda: pass_at_k([5, 5], [1, 6], 1),
            r"pass_at_k problem 1: expected c <= n .* got c=6 > n=5\. Count each",
        ),
        (
            lambda: pass_at_k([10, 4], [1, 1], 5),
            r"pass_at_k problem 1: expected at least k=5 samples \(the estimator needs n >= k\), "
            r"got n=4\. Draw at least 5 samples per problem, or use k <= 4\.",
        ),
        (
            lambda: pass_at_k_interval([5], [1], 1),
            r"pass_at_k_interval: expected at least 2 problems .* got 1\. Use pass_at_k",
        ),
        (
            lambda: pass_at_k_interval([5, 5], [1, 1], 1, confidence=1.0),
            r"pass_at_k_interval confidence: expected a number in \(0, 1\), got 1\.0",
        ),
    ],
)
def test_errors(call, match):
    with pytest.raises(GradNoiseError, match=match):
        call()
