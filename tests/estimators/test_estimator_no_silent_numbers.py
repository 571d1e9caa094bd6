"""Estimator case of "no silently wrong number": the optimal scalar baseline on 0-dim params."""

import torch

from gradnoise.estimators import ScoreFunction
from gradnoise.estimators.baselines import OptimalScalar


def test_optimal_scalar_baseline_on_zero_dim_parameters_matches_the_scalar_formula():
    scores = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 1.0, -1.0])]
    values = torch.tensor([3.0, 1.0, 2.0])
    (b_mu, b_sigma) = OptimalScalar()(values, scores)
    w = scores[0] ** 2 + scores[1] ** 2
    expected = torch.stack([(values * w).sum() - values[k] * w[k] for k in range(3)]) / torch.stack(
        [w.sum() - w[k] for k in range(3)]
    )
    torch.testing.assert_close(b_mu.reshape(-1), expected)
    torch.testing.assert_close(b_sigma.reshape(-1), expected)


def test_score_function_with_optimal_scalar_on_scalar_normal():
    mu = torch.tensor(0.3, requires_grad=True)
    sigma = torch.tensor(1.2, requires_grad=True)
    dist = torch.distributions.Normal(mu, sigma)
    gen = torch.Generator().manual_seed(0)
    est = ScoreFunction(OptimalScalar())(lambda x: x**2, dist, 4000, generator=gen)
    grads = [g.reshape(()) for g in est.grads]
    # d/dmu E[x^2] = 2 mu, d/dsigma E[x^2] = 2 sigma
    torch.testing.assert_close(grads[0], torch.tensor(0.6), atol=0.15, rtol=0)
    torch.testing.assert_close(grads[1], torch.tensor(2.4), atol=0.3, rtol=0)
