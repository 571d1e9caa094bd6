"""Presampling (draw K candidates, resample B by fresh scores) on a population with known answers.

The population is that of test_sampling.py: N = 40 vectors g_i in R^6 whose norms span ~30x.
E[g_hat] = g_bar and tr Var[g_hat] = (m_p - G)/K + (1 - 1/K)(S - G)/B are known exactly; seeded
draws (R batches) are compared with them within 4 standard errors estimated from the same draws,
and the variance formula is also checked by enumerating every candidate set of a tiny case.
"""

import itertools
import math
import re

import pytest
import torch

from gradnoise.data import (
    ImportanceSampler,
    draw_candidates,
    exact_sampling_variance,
    presample,
    presampling_variance,
)
from gradnoise.errors import GradNoiseError

N, D, B, K, R = 40, 6, 4, 16, 6000


def _population():
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1, 0.5, N, dtype=torch.float64)
    grads = scales[:, None] * torch.randn(N, D, generator=gen, dtype=torch.float64)
    return grads + 0.05


def _stale_proposal(grads):
    """A sampler's proposal from deliberately wrong scores (noisy norms), mixed with uniform."""
    sampler = ImportanceSampler(N, B, mix=0.2)
    noise = torch.rand(N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sampler.update(torch.arange(N), grads.norm(dim=1) * (0.2 + 2 * noise))
    return sampler.probabilities()


def _draws(grads, *, probabilities=None, proxy=None, seed=1):
    """R presampled batch means; scores are fresh norms, or ``proxy`` (N,) scores."""
    generator = torch.Generator().manual_seed(seed)
    scores = grads.norm(dim=1) if proxy is None else proxy
    means = []
    for _ in range(R):
        candidates, c = draw_candidates(N, K, probabilities=probabilities, generator=generator)
        positions, w = presample(scores[candidates], B, candidate_weights=c, generator=generator)
        means.append((w[:, None] * grads[candidates[positions]]).mean(0))
    return torch.stack(means)


def _within(values: torch.Tensor, want: float, sigmas: float = 4.0) -> bool:
    se = float(values.std()) / math.sqrt(values.numel())
    return abs(float(values.mean()) - want) < sigmas * se


CASES = {
    "uniform candidates, fresh norms": {},
    "stale-proposal candidates, fresh norms": {"stale": True},
    "uniform candidates, proxy scores": {"proxy": True},
}


@pytest.mark.parametrize("case", list(CASES))
def test_presampled_mean_is_unbiased_and_its_variance_matches_the_formula(case):
    grads = _population()
    p = _stale_proposal(grads) if CASES[case].get("stale") else None
    proxy = None
    if CASES[case].get("proxy"):  # a positive proxy that is not the norm (e.g. a loss)
        gen = torch.Generator().manual_seed(5)
        proxy = 0.1 + torch.rand(N, generator=gen, dtype=torch.float64)
    means = _draws(grads, probabilities=p, proxy=proxy)
    g_bar = grads.mean(0)
    se = means.std(0) / math.sqrt(R)
    assert bool(((means.mean(0) - g_bar).abs() < 4 * se).all())
    exact = presampling_variance(
        grads.pow(2).sum(1), float(g_bar.pow(2).sum()), B, K, probabilities=p, scores=proxy
    )
    assert _within((means - g_bar).pow(2).sum(1), exact.importance)  # E = tr Var (g_bar known)


def _enumerated_variance(grads, p, k, batch):
    """tr Var[g_hat] by brute force: every ordered candidate tuple, its probability, and the
    exact conditional variance of the resampled batch given the candidates."""
    n = len(grads)
    g_bar = grads.mean(0)
    total = 0.0
    for tup in itertools.product(range(n), repeat=k):
        prob = math.prod(float(p[j]) for j in tup)
        c = 1 / (n * p[list(tup)])
        terms = c[:, None] * grads[list(tup)]  # c_j g_j, whose mean is g_bar_C
        g_c = terms.mean(0)
        mass = c * grads[list(tup)].norm(dim=1)
        q = mass / mass.sum()
        one = (q[:, None] * (terms / (k * q[:, None])).pow(2)).sum()  # E||w g||^2 given C
        within = (float(one.sum()) - float(g_c.pow(2).sum())) / batch
        total += prob * (within + float((g_c - g_bar).pow(2).sum()))
    return total


def test_the_variance_formula_equals_brute_force_over_every_candidate_set():
    grads = _population()[:5]
    p = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=torch.float64)
    for probabilities in (None, p):
        want = _enumerated_variance(
            grads, torch.full((5,), 0.2, dtype=torch.float64) if probabilities is None else p, 3, 2
        )
        got = presampling_variance(
            grads.pow(2).sum(1),
            float(grads.mean(0).pow(2).sum()),
            2,
            3,
            probabilities=probabilities,
        )
        assert got.importance == pytest.approx(want, rel=1e-10)


def test_limits_one_candidate_is_one_draw_and_many_reach_the_optimum():
    grads = _population()
    sq, g = grads.pow(2).sum(1), float(grads.mean(0).pow(2).sum())
    p = _stale_proposal(grads)
    one = presampling_variance(sq, g, B, 1, probabilities=p)  # B copies of one draw from p
    assert one.importance == pytest.approx(exact_sampling_variance(sq, p, g, 1).importance)
    norms = grads.norm(dim=1)
    optimum = exact_sampling_variance(sq, norms / norms.sum(), g, B)
    many = presampling_variance(sq, g, B, 10**9)
    assert many.importance == pytest.approx(optimum.importance, rel=1e-6)
    # fresh norms as explicit scores are the default
    same = presampling_variance(sq, g, B, K, scores=norms)
    assert same.importance == pytest.approx(presampling_variance(sq, g, B, K).importance)
    # uniform candidates: the reduction is 1 / (B/K + (1 - 1/K) / rho*), below k = K/B
    want = 1 / (B / K + (1 - 1 / K) / optimum.reduction)
    assert presampling_variance(sq, g, B, K).reduction == pytest.approx(want, rel=1e-12)
    assert want < K / B


def test_draws_are_reproducible_with_a_generator_and_zero_scores_are_never_drawn():
    first = draw_candidates(N, 8, generator=torch.Generator().manual_seed(7))
    again = draw_candidates(N, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first[0], again[0])
    torch.testing.assert_close(first[1], torch.ones(8, dtype=torch.float64))
    scores = torch.tensor([0.0, 1.0, 0.0, 3.0])
    positions, w = presample(scores, 200, generator=torch.Generator().manual_seed(0))
    assert set(positions.tolist()) <= {1, 3}
    torch.testing.assert_close(w[positions == 3][0], torch.tensor(1 / 3, dtype=torch.float64))
    positions, w = presample(torch.zeros(4), 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, torch.ones(5, dtype=torch.float64))  # all zero: uniform


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: draw_candidates(0, 4), "num_examples: a positive int"),
        (lambda: draw_candidates(10, 0), "k * batch_size candidates"),
        (lambda: draw_candidates(3, 4, probabilities=torch.tensor([0.5, 0.5, 0])), "values > 0"),
        (lambda: presample(torch.tensor([1.0, -1.0]), 2), "finite numbers >= 0"),
        (lambda: presample(torch.ones(3), 2, candidate_weights=torch.ones(2)), "one per score"),
        (lambda: presample(torch.ones(3), 0), "batch_size: a positive int"),
        (lambda: presampling_variance(torch.ones(3), 0.0, 2, 0), "num_candidates >= 1"),
        (lambda: presampling_variance(torch.ones(3), 0.0, 0, 4), "positive ints"),
        (
            lambda: presampling_variance(torch.ones(3), 0.0, 2, 4, probabilities=torch.ones(3)),
            "summing to 1",
        ),
        (
            lambda: presampling_variance(
                torch.ones(3), 0.0, 2, 4, scores=torch.tensor([1, 0, 1.0])
            ),
            "zero scores with non-zero gradients",
        ),
    ],
)
def test_bad_input_is_refused_with_a_fix(make, message):
    with pytest.raises(GradNoiseError, match="(?i)" + re.escape(message)):
        make()
