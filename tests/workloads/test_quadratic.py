"""The noisy quadratic: closed forms by hand, GradStats against them, every error."""

from __future__ import annotations

import math
import re

import pytest
import torch

from gradnoise import GradStats
from gradnoise.errors import GradNoiseError
from gradnoise.workloads.quadratic import NoisyQuadratic, estimator_variances


def test_closed_forms_by_hand_on_two_coordinates():
    problem = NoisyQuadratic(dim=2, condition=4.0, noise=0.5)  # h = (1, 1/4), Sigma = h / 2
    theta = torch.tensor([2.0, 4.0], dtype=torch.float64)
    assert problem.hessian.tolist() == pytest.approx([1.0, 0.25])
    assert problem.gradient(theta).tolist() == pytest.approx([2.0, 1.0])
    assert problem.value(theta) == pytest.approx(0.5 * (4 + 0.25 * 16))
    assert problem.trace_sigma == pytest.approx(0.625)
    assert problem.b_simple(theta) == pytest.approx(0.625 / 5)
    # tr(H Sigma) = (1 + 1/16) / 2, G^T H G = 4 + 1/4
    assert problem.b_noise(theta) == pytest.approx((17 / 32) / 4.25)
    var_trace, var_grad_sq, cov = estimator_variances(problem, theta, 4)
    trace_sq = 0.25 + 1 / 64  # tr(Sigma^2)
    assert var_trace == pytest.approx(2 * trace_sq / 3)
    assert var_grad_sq == pytest.approx(4 * (0.5 * 4 + 0.125 * 1) / 4 + 2 * trace_sq / 12)
    assert cov == pytest.approx(-2 * trace_sq / 12)
    at_optimum = problem.theta_star
    assert problem.b_simple(at_optimum) == problem.b_noise(at_optimum) == math.inf


def test_the_two_noise_scales_agree_when_the_hessian_is_the_identity():
    problem = NoisyQuadratic(dim=5, condition=1.0, noise=3.0)
    theta = torch.arange(1.0, 6.0, dtype=torch.float64)
    assert problem.b_noise(theta) == pytest.approx(problem.b_simple(theta))
    assert problem.b_simple(theta) == pytest.approx(15.0 / 55.0)


def test_grad_stats_sees_exactly_the_per_example_gradients():
    problem = NoisyQuadratic(dim=8)
    theta = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)
    model = problem.model(theta)
    noise = problem.sample(6, generator=torch.Generator().manual_seed(0))
    with GradStats(model) as stats:
        problem.loss(model, noise).backward()
    assert stats.coverage() == {"theta": "direct"}
    by_hand = (problem.gradient(theta) + noise).pow(2).sum(1)  # g_i = H delta + xi_i
    torch.testing.assert_close(stats.per_example_sq_norms()["theta"], by_hand)
    torch.testing.assert_close(model.theta.grad, (problem.gradient(theta) + noise).mean(0))


def _moments_check(values: list[float], mean: float, variance: float) -> None:
    """The mean of K draws within 4 standard errors sqrt(variance / K) of ``mean``, and their
    sample variance within 4 of its own standard errors, sqrt((m4 - s^4) / K), of ``variance``."""
    x = torch.tensor(values, dtype=torch.float64)
    k = len(values)
    assert abs(float(x.mean()) - mean) <= 4 * math.sqrt(variance / k)
    centred = x - x.mean()
    s2, m4 = float(centred.pow(2).mean()), float(centred.pow(4).mean())
    assert abs(s2 - variance) <= 4 * math.sqrt((m4 - s2 * s2) / k)


def test_grad_stats_estimates_are_unbiased_with_the_stated_variances():
    problem, n, draws = NoisyQuadratic(dim=64), 16, 400
    theta = torch.full((64,), 0.5, dtype=torch.float64)
    model, generator = problem.model(theta), torch.Generator().manual_seed(1)
    traces, grad_sqs = [], []
    for _ in range(draws):
        with GradStats(model) as stats:
            problem.loss(model, problem.sample(n, generator=generator)).backward()
        estimate = stats.noise_scale()
        traces.append(estimate.trace_sigma)
        grad_sqs.append(estimate.grad_sq_norm)
        model.theta.grad = None
    var_trace, var_grad_sq, _ = estimator_variances(problem, theta, n)
    # 4 standard errors of the means are 0.20 (tr Sigma = 14.05) and 0.12 (|G|^2 = 1.84): an
    # estimator that left out the -tr(Sigma)/n correction of |G|^2 (off by 14.05 / 16 = 0.88)
    # would miss by 28 standard errors.
    _moments_check(traces, problem.trace_sigma, var_trace)
    _moments_check(grad_sqs, problem.grad_sq_norm(theta), var_grad_sq)


BAD = [
    ({"dim": 0}, "NoisyQuadratic(dim=...): expected an int >= 1, got 0. E.g. dim=64."),
    ({"dim": True}, "NoisyQuadratic(dim=...): expected an int >= 1, got True. E.g. dim=64."),
    (
        {"condition": 0.5},
        "NoisyQuadratic(condition=...): expected a float >= 1, got 0.5. Use condition=1 for H = I.",
    ),
    (
        {"noise": 0.0},
        "NoisyQuadratic(noise=...): expected a positive float, got 0.0. E.g. noise=1.0.",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(GradNoiseError, match=re.escape(message)):
        NoisyQuadratic(**kwargs)


def test_model_and_variances_reject_bad_input():
    problem = NoisyQuadratic(dim=3)
    message = "NoisyQuadratic.model(theta): expected shape (3,), got (2,). Pass one value per"
    with pytest.raises(GradNoiseError, match=re.escape(message)):
        problem.model(torch.zeros(2))
    message = "estimator_variances(n=...): expected an int >= 2, got 1. A variance needs two"
    with pytest.raises(GradNoiseError, match=re.escape(message)):
        estimator_variances(problem, torch.zeros(3), 1)
