"""ControlVariate's contract: expectation(dist) -> E[h], shape () or (m,), matching h's m controls.

Shapes that do not match are refused (a scalar for m > 1 controls used to be broadcast into a
wrong estimate), constant expectations (a number, a constant or detached tensor: gradient zero)
are accepted, and every refusal happens before any state (coefficients, baselines) changes.

Closed-form case for the constant expectation: x ~ N(mu, I_3), f(x) = |x|^2 (gradient 2 mu) and
h(x) = (x - mu0)^2 per coordinate with mu0 = mu's current value, so E[h] = (mu - mu0)^2 + 1 has
zero gradient at mu = mu0 and a constant expectation is exact there.
"""

import math
import re

import pytest
import torch
from torch.distributions import Independent, Normal

from gradnoise.errors import GradNoiseError
from gradnoise.estimators import ControlVariate, MovingAverage, Pathwise, ScoreFunction

MU = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
ESTIMATORS = [ScoreFunction, Pathwise]
IDS = ["score", "pathwise"]


def problem():
    mu = MU.clone().requires_grad_()
    return lambda: Independent(Normal(mu, torch.ones_like(mu)), 1)


def f(x):
    return x.pow(2).sum(-1)


def assert_unbiased(est, true):
    grad, var = est.grads[0], est.variance_of_mean[0]
    assert torch.all((grad - true).abs() <= 5 * var.sqrt() + 1e-10), (grad, true, var)


@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
def test_scalar_expectation_for_several_controls_is_refused(make):
    # Used to be broadcast: Pathwise on the docs' quadratic (true gradient -2) returned 0.25,
    # -0.39, 0.66 with h(x) = x and expectation d.mean.sum().
    dist = problem()
    cv = ControlVariate(lambda x: x, lambda d: d.mean.sum())
    with pytest.raises(
        GradNoiseError,
        match=r"ControlVariate expectation: expected a tensor of shape \(3,\) matching h's 3 "
        r"controls, got shape \(\)\. .*scalar is not broadcast",
    ):
        make(control_variate=cv)(f, dist, 16, generator=torch.Generator().manual_seed(0))
    assert cv.state is None


@pytest.mark.parametrize("shape", [(2,), (3, 1), (1, 3)])
@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
def test_expectation_with_another_number_of_controls_is_refused(make, shape):
    dist = problem()
    cv = ControlVariate(lambda x: x, lambda d: d.mean[: math.prod(shape)].reshape(shape))
    with pytest.raises(
        GradNoiseError,
        match=r"expected a tensor of shape \(3,\) matching h's 3 controls, got shape "
        + re.escape(str(shape)),
    ):
        make(control_variate=cv)(f, dist, 16, generator=torch.Generator().manual_seed(0))
    assert cv.state is None


@pytest.mark.parametrize("expectation", [lambda d: d.mean.sum(), lambda d: d.mean.sum()[None]])
def test_one_control_takes_a_scalar_or_a_one_vector(expectation):
    dist = problem()
    true = 2 * MU
    est = Pathwise(control_variate=ControlVariate(lambda x: x.sum(-1), expectation))
    generator = torch.Generator().manual_seed(1)
    est(f, dist, 256, generator=generator)
    assert_unbiased(est(f, dist, 1024, generator=generator), true)


def test_refused_expectation_leaves_the_baseline_untouched():
    # The control variate is checked before the baseline runs (a moving average updates itself).
    dist = problem()
    baseline = MovingAverage()
    est = ScoreFunction(baseline, control_variate=ControlVariate(lambda x: x, lambda d: 0.0))
    with pytest.raises(GradNoiseError, match="matching h's 3 controls"):
        est(f, dist, 16, generator=torch.Generator().manual_seed(0))
    assert baseline.value is None


def _centred_squares():
    mu0 = MU.clone()
    return lambda x: (x - mu0).pow(2)  # (K, 3) controls, E = (mu - mu0)^2 + 1


CONSTANTS = {
    "constant tensor": lambda d: torch.ones(3, dtype=torch.float64),
    "detached tensor": lambda d: (d.mean - d.mean).pow(2).detach() + 1,
    "float tensor": lambda d: torch.ones(3),
}


@pytest.mark.parametrize("name", list(CONSTANTS))
@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
def test_constant_expectation_has_zero_gradient_and_keeps_the_estimate_unbiased(make, name):
    dist = problem()
    true = 2 * MU
    plain = make()(f, dist, 2048, generator=torch.Generator().manual_seed(2))
    est = make(control_variate=ControlVariate(_centred_squares(), CONSTANTS[name]))
    generator = torch.Generator().manual_seed(3)
    est(f, dist, 512, generator=generator)  # warm-up: the first call is uncorrected
    corrected = est(f, dist, 2048, generator=generator)
    assert_unbiased(corrected, true)
    # h is correlated with f (f = sum h + 2 mu0.x - |mu0|^2): the correction must help.
    assert corrected.total_variance < 0.7 * plain.total_variance


@pytest.mark.parametrize("value", [3.0, 3, torch.tensor(3.0)], ids=["float", "int", "0-dim"])
@pytest.mark.parametrize("make", ESTIMATORS, ids=IDS)
def test_python_number_expectation_is_a_constant(make, value):
    dist = problem()
    mu0 = MU.clone()
    cv = ControlVariate(lambda x: (x - mu0).pow(2).sum(-1), lambda d: value)  # E[h] = 3 at mu0
    est = make(control_variate=cv)
    generator = torch.Generator().manual_seed(4)
    est(f, dist, 512, generator=generator)
    assert_unbiased(est(f, dist, 2048, generator=generator), 2 * MU)


def test_zero_gradient_of_a_constant_is_materialized_per_parameter():
    mu = MU.clone().requires_grad_()
    sigma = torch.ones(3, dtype=torch.float64, requires_grad=True)
    d = Independent(Normal(mu, sigma), 1)
    cv = ControlVariate(lambda x: x, lambda d: torch.zeros(3))
    grads = cv.mean_grads(d, (mu, sigma), 3)
    assert [tuple(g.shape) for g in grads] == [(3, 3), (3, 3)]
    assert all(torch.equal(g, torch.zeros(3, 3, dtype=torch.float64)) for g in grads)
    # partly constant: the differentiable entries still get their gradient
    mixed = ControlVariate(lambda x: x, lambda d: torch.cat([d.mean[:2], torch.ones(1)]))
    grad_mu, grad_sigma = mixed.mean_grads(d, (mu, sigma), 3)
    torch.testing.assert_close(grad_mu, torch.diag(torch.tensor([1.0, 1.0, 0.0]).double()))
    assert torch.equal(grad_sigma, torch.zeros(3, 3, dtype=torch.float64))


@pytest.mark.parametrize(
    "expectation, got",
    [(lambda d: [0.0, 0.0, 0.0], "got list"), (lambda d: None, "got NoneType")],
    ids=["list", "none"],
)
def test_expectation_that_is_not_a_tensor_or_number(expectation, got):
    dist = problem()
    cv = ControlVariate(lambda x: x, expectation)
    with pytest.raises(
        GradNoiseError, match=rf"ControlVariate expectation: expected E\[h\].*{got}"
    ):
        ScoreFunction(control_variate=cv)(f, dist, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "h, got",
    [(lambda x: x.tolist(), "got list"), (lambda x: x[:, :0], r"m >= 1, got \(8, 0\)")],
    ids=["list", "no controls"],
)
def test_h_that_is_not_a_tensor_of_controls(h, got):
    dist = problem()
    cv = ControlVariate(h, lambda d: d.mean)
    with pytest.raises(GradNoiseError, match=rf"ControlVariate h: expected a tensor.*{got}"):
        ScoreFunction(control_variate=cv)(f, dist, 8, generator=torch.Generator().manual_seed(0))


def test_pathwise_needs_a_differentiable_h():
    # A step function has zero pathwise terms but a nonzero closed-form gradient: it would bias
    # the correction, so it is refused instead of failing with a raw autograd error.
    dist = problem()
    cv = ControlVariate(lambda x: (x > 0).double(), lambda d: torch.special.ndtr(d.mean))
    with pytest.raises(
        GradNoiseError, match=r"ControlVariate h \(pathwise\): expected values differentiable"
    ):
        Pathwise(control_variate=cv)(f, dist, 8, generator=torch.Generator().manual_seed(0))
    assert cv.state is None


def test_zero_ridge_with_a_degenerate_control_falls_back_to_the_pseudo_inverse():
    # Under Pathwise a constant control column has zero terms: E[cc'] is singular, and with
    # ridge=0 the coefficients' solve used to raise a raw linalg error.
    dist = problem()

    def h(x):
        return torch.cat([x, torch.ones_like(x[:, :1])], -1)

    def expectation(d):
        return torch.cat([d.mean, torch.ones(1, dtype=torch.float64)])

    est = Pathwise(control_variate=ControlVariate(h, expectation, ridge=0.0))
    generator = torch.Generator().manual_seed(5)
    est(f, dist, 256, generator=generator)
    out = est(f, dist, 1024, generator=generator)
    assert all(torch.isfinite(g).all() for g in out.grads)
    assert_unbiased(out, 2 * MU)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"decay": "0.5"}, r"decay: expected a float in \[0, 1\), got '0.5'"),
        ({"ridge": -1.0}, r"ridge: expected a finite float >= 0, got -1.0"),
        ({"ridge": float("nan")}, r"ridge: expected a finite float >= 0, got nan"),
    ],
)
def test_constructor_arguments(kwargs, match):
    with pytest.raises(GradNoiseError, match=f"ControlVariate {match}"):
        ControlVariate(lambda x: x, lambda d: d.mean, **kwargs)


def test_coefficients_fitted_to_other_parameters_are_refused():
    dist = problem()
    cv = ControlVariate(lambda x: x[:, :2], lambda d: d.mean[:2])
    ScoreFunction(control_variate=cv)(f, dist, 16, generator=torch.Generator().manual_seed(0))
    state = [tuple(t.clone() for t in pair) for pair in cv.state]
    small = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    other = Independent(Normal(small, torch.ones(2, dtype=torch.float64)), 1)
    with pytest.raises(
        GradNoiseError,
        match=r"ControlVariate: expected the parameter shapes x controls of its earlier calls, "
        r"\[\(3, 2\)\], got \[\(2, 2\)\]\. Use one ControlVariate per problem",
    ):
        ScoreFunction(control_variate=cv)(f, other, 16, generator=torch.Generator().manual_seed(0))
    for (cc, ct), (cc0, ct0) in zip(cv.state, state, strict=True):
        assert torch.equal(cc, cc0) and torch.equal(ct, ct0)
