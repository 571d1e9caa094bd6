"""Unbiasedness and reported variance against Gauss-Hermite closed forms (see conftest.py).

Problem: x ~ Normal(mu, sigma) with scalar mu, sigma; f is x^2 or cos(x). For each estimator the
per-term gradient is an explicit function t(eps) of the standard normal noise, so its exact mean m,
variance v and the spread of a variance estimate follow by quadrature. Budget, per coordinate:
|mean - m| <= 5 sqrt(v / n) and |reported variance - v| <= 5 sqrt(mu4 - v^2) / sqrt(n), a 5-sigma
band (two-sided tail 6e-7 per check, under 1e-4 over the ~100 checks of this file), plus 1e-10
for round-off where a coordinate has zero variance (antithetic pathwise on x^2).
"""

import math

import pytest
import torch
from torch.distributions import Normal

from gradnoise.estimators import IID, Antithetic, Constant, Pathwise, ScoreFunction

MU, SIGMA, K = 0.5, 1.3, 8192
FUNCTIONS = {
    "square": (lambda x: x**2, lambda x: 2 * x),
    "cosine": (torch.cos, lambda x: -torch.sin(x)),
}


def score_terms(f, df, baseline=0.0):
    def term(eps):
        value = f(MU + SIGMA * eps) - baseline
        return torch.stack([value * eps / SIGMA, value * (eps**2 - 1) / SIGMA])

    return term


def pathwise_terms(f, df):
    def term(eps):
        slope = df(MU + SIGMA * eps)
        return torch.stack([slope, slope * eps])

    return term


def antithetic(term):
    return lambda eps: (term(eps) + term(-eps)) / 2


CASES = {
    "score": (lambda: ScoreFunction(), score_terms, 1),
    "score+constant": (
        lambda: ScoreFunction(Constant(0.8)),
        lambda f, d: score_terms(f, d, 0.8),
        1,
    ),
    "score+antithetic": (lambda: ScoreFunction(sampler=Antithetic()), score_terms, 2),
    "pathwise": (lambda: Pathwise(), pathwise_terms, 1),
    "pathwise+antithetic": (lambda: Pathwise(sampler=Antithetic()), pathwise_terms, 2),
}


def _params():
    mu = torch.tensor(MU, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(SIGMA, dtype=torch.float64, requires_grad=True)
    return mu, sigma


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fname", FUNCTIONS)
def test_mean_and_reported_variance_match_closed_form(case, fname, gauss):
    make, terms_for, block = CASES[case]
    f, df = FUNCTIONS[fname]
    term = terms_for(f, df)
    term = antithetic(term) if block == 2 else term
    mean, var, spread = gauss.moments(term)
    mu, sigma = _params()
    est = make()(f, Normal(mu, sigma), K, generator=torch.Generator().manual_seed(7))
    n = K // block
    assert est.params[0] is mu and est.params[1] is sigma
    assert est.moments[0].n == n and est.num_samples == K
    got_mean = torch.stack(est.grads)
    got_var = torch.stack(est.variance)
    assert torch.all((got_mean - mean).abs() <= 5 * torch.sqrt(var / n) + 1e-10), (got_mean, mean)
    assert torch.all((got_var - var).abs() <= 5 * spread / math.sqrt(n) + 1e-10), (got_var, var)


def test_true_gradient_is_what_the_quadrature_says(gauss):
    # d/dmu E[x^2] = 2 mu and d/dsigma E[x^2] = 2 sigma: the reference itself is checked.
    mean, _, _ = gauss.moments(score_terms(*FUNCTIONS["square"]))
    torch.testing.assert_close(mean, torch.tensor([2 * MU, 2 * SIGMA], dtype=torch.float64))
    mean, _, _ = gauss.moments(pathwise_terms(*FUNCTIONS["cosine"]))
    exact = math.exp(-(SIGMA**2) / 2) * torch.tensor([-math.sin(MU), -SIGMA * math.cos(MU)])
    torch.testing.assert_close(mean, exact.double())


def test_same_generator_seed_gives_the_same_estimate():
    mu, sigma = _params()
    f = FUNCTIONS["cosine"][0]
    runs = [
        ScoreFunction(sampler=IID())(
            f, Normal(mu, sigma), 64, generator=torch.Generator().manual_seed(3)
        )
        for _ in range(2)
    ]
    torch.testing.assert_close(runs[0].grads, runs[1].grads)


def test_factory_of_a_distribution_is_accepted():
    mu, sigma = _params()
    est = Pathwise()(lambda x: x**2, lambda: Normal(mu, sigma), 16, generator=torch.Generator())
    assert len(est.grads) == 2 and est.num_evals == 16
