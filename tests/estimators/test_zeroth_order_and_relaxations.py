"""SPSA, forward gradients, MeZO and the Gumbel relaxations against closed forms.

Quadratic f(x) = 0.5 x'Ax + b'x with g = A theta + b: the SPSA term (g.eps) eps is exact (central
differences are exact on quadratics), so E[t] = g and Var[t]_j = |g|^2 + g_j^2. The spread of a
variance estimate comes from 2-D quadrature of t_j = (g_j a + rho b) a, rho^2 = |g|^2 - g_j^2.
Budget as in test_closed_form_estimators.py: 5 sigma on the mean and on the variance.
"""

import math

import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Independent, Normal, OneHotCategorical

from gradnoise.estimators import SPSA, ForwardGradient, GumbelSoftmax, MeZO, StraightThrough
from gradnoise.perturbation import direction, perturb_

A = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 3.0]], dtype=torch.float64)
B = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
THETA = torch.tensor([0.3, 0.4, -0.6], dtype=torch.float64)
G = A @ THETA + B
K = 4096


def quadratic(x):
    return 0.5 * ((x @ A) * x).sum(-1) + x @ B


def closed_form(gauss):
    out = []
    for j in range(3):
        rho = math.sqrt(float(G.pow(2).sum() - G[j] ** 2))
        out.append(gauss.moments(lambda a, b, j=j, rho=rho: (G[j] * a + rho * b) * a, dims=2))
    return [torch.stack(column) for column in zip(*out, strict=True)]


def check(grad, variance, n, gauss):
    mean, var, spread = closed_form(gauss)
    torch.testing.assert_close(mean, G)  # the reference: E[t] = g
    torch.testing.assert_close(var, G.pow(2).sum() + G.pow(2))  # and Var[t]_j = |g|^2 + g_j^2
    assert torch.all((grad - G).abs() <= 5 * torch.sqrt(var / n)), (grad, G)
    assert torch.all((variance - var).abs() <= 5 * spread / math.sqrt(n)), (variance, var)


@pytest.mark.parametrize("make", [SPSA, ForwardGradient], ids=["spsa", "forward"])
def test_smoothed_estimators_match_closed_form(make, gauss):
    # sigma = 1e-6 makes the forward gradient's O(sigma^2) extra variance negligible.
    theta = THETA.clone().requires_grad_()
    dist = Independent(Normal(theta, torch.full_like(theta, 1e-6)), 1)
    est = make()(quadratic, dist, K, generator=torch.Generator().manual_seed(0))
    assert est.params[0] is theta
    assert est.num_evals == (2 * K if make is SPSA else K)
    check(est.grads[0], est.variance[0], K, gauss)


class Quadratic(nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(THETA.clone())

    def forward(self):
        return quadratic(self.theta.unsqueeze(0))[0]


def test_mezo_estimate_matches_closed_form_and_restores_parameters(gauss):
    model = Quadratic()
    est = MeZO(eps=1e-3)(
        model, list(model.parameters()), K, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(model.theta.detach(), THETA, rtol=0, atol=1e-12)
    check(est.grads[0], est.variance[0], K, gauss)


def test_sparse_mezo_only_moves_the_masked_coordinates():
    model = Quadratic()  # |theta| = (0.3, 0.4, 0.6): density 1/3 keeps the first coordinate only
    est = MeZO(eps=1e-3, density=1 / 3)(model, model.parameters(), 8, generator=torch.Generator())
    assert est.grads[0][0] != 0 and torch.all(est.grads[0][1:] == 0)


def test_directions_regenerate_and_perturbations_undo():
    param = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(direction(param, 3, 1), direction(param, 3, 1))
    assert not torch.equal(direction(param, 3, 1), direction(param, 3, 2))
    before = param.clone()
    perturb_([param], 3, 0.1)
    assert not torch.equal(param, before)
    perturb_([param], 3, -0.1)
    torch.testing.assert_close(param, before)


LOGITS = [0.5, -1.0, 0.2, 1.0]
R = torch.tensor([1.0, 3.0, -2.0, 0.5], dtype=torch.float64)


def _relaxed(make, temperature, seen=None):
    theta = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)

    def f(y):
        if seen is not None:
            seen.append(y.detach())
        return y @ R

    est = make(temperature)(
        f, lambda: OneHotCategorical(logits=theta), K, generator=torch.Generator().manual_seed(2)
    )
    p = torch.softmax(theta.detach(), 0)
    return est, p * (R - p @ R)  # exact gradient of E[<onehot, r>] = p'r


def test_gumbel_softmax_bias_shrinks_and_variance_grows_as_temperature_drops():
    # Measured at K=4096: bias 0.26 at tau=2 vs 0.04 at tau=0.5, each with a standard error
    # below 0.02, so the ordering below is far outside the noise.
    (hot, exact), (cold, _) = _relaxed(GumbelSoftmax, 2.0), _relaxed(GumbelSoftmax, 0.5)
    assert (cold.grads[0] - exact).norm() < (hot.grads[0] - exact).norm()
    assert cold.total_variance > hot.total_variance


def test_straight_through_feeds_hard_one_hot_samples():
    seen = []
    est, exact = _relaxed(StraightThrough, 0.5, seen)
    y = torch.cat(seen)
    assert torch.all((y == 0) | (y == 1)) and torch.all(y.sum(-1) == 1)
    assert torch.cosine_similarity(est.grads[0], exact, 0) > 0.95  # measured 0.998


def test_relaxed_bernoulli_gradients_have_parameter_shape():
    logits = torch.zeros(3, requires_grad=True)
    est = StraightThrough(0.5)(
        lambda y: y.sum(-1), lambda: Bernoulli(logits=logits), 32, generator=torch.Generator()
    )
    assert est.grads[0].shape == (3,) and torch.all(est.grads[0] > 0)
