"""Every error the estimators raise: what was expected, what was given, how to fix it."""

import pytest
import torch
from torch.distributions import Categorical, Gamma, Normal

from gradnoise.errors import GradNoiseError
from gradnoise.estimators import (
    QMC,
    SPSA,
    Antithetic,
    ControlVariate,
    ForwardGradient,
    GumbelSoftmax,
    MeZO,
    MovingAverage,
    Pathwise,
    ScoreFunction,
    compare,
)
from gradnoise.perturbation import magnitude_masks, projected_gradient


def normal(requires_grad=True):
    mu = torch.zeros(2, requires_grad=requires_grad)
    return Normal(mu, torch.ones(2))


def square(x):
    return x.pow(2).sum(-1)


def test_not_a_distribution():
    with pytest.raises(
        GradNoiseError, match="expected a torch.distributions.Distribution.*got str"
    ):
        ScoreFunction()(square, "normal", 8)


def test_parameters_that_do_not_require_grad():
    with pytest.raises(GradNoiseError, match="whose parameters require grad.*requires_grad=True"):
        Pathwise()(square, normal(requires_grad=False), 8)


@pytest.mark.parametrize("num_samples", [1, 0, 2.5])
def test_num_samples_below_two(num_samples):
    with pytest.raises(
        GradNoiseError, match="num_samples: expected an int >= 2.*a variance exists"
    ):
        ScoreFunction()(square, normal(), num_samples)


def test_antithetic_needs_whole_pairs():
    with pytest.raises(GradNoiseError, match="an int >= 4 and a multiple of 2.*got 5"):
        ScoreFunction(sampler=Antithetic())(square, normal(), 5)


def test_f_returning_the_wrong_shape():
    with pytest.raises(GradNoiseError, match=r"f: expected a tensor of shape \(8,\).*got \(8, 2\)"):
        Pathwise()(lambda x: x.pow(2), normal(), 8)


def test_pathwise_needs_rsample():
    logits = torch.zeros(3, requires_grad=True)
    with pytest.raises(GradNoiseError, match="Pathwise: expected a distribution with rsample"):
        Pathwise()(lambda x: x.float(), Categorical(logits=logits), 8)


def test_inverse_cdf_samplers_need_icdf():
    rate = torch.ones(2, requires_grad=True)
    with pytest.raises(GradNoiseError, match="with icdf.*got Gamma, which has no icdf"):
        Pathwise(sampler=QMC(4))(square, Gamma(rate, rate), 8)


def test_qmc_points():
    with pytest.raises(GradNoiseError, match="QMC points: expected an int >= 2"):
        QMC(points=1)


def test_moving_average_decay_and_state_untouched_by_bad_calls():
    with pytest.raises(GradNoiseError, match=r"MovingAverage decay: expected a float in \[0, 1\)"):
        MovingAverage(decay=1.0)
    baseline = MovingAverage()
    with pytest.raises(GradNoiseError, match="num_samples"):
        ScoreFunction(baseline)(square, normal(), 1)
    assert baseline.value is None  # raised before any state changed


def test_control_variate_decay_and_shape():
    with pytest.raises(GradNoiseError, match="ControlVariate decay"):
        ControlVariate(square, lambda d: d.mean.sum(), decay=-0.1)
    cv = ControlVariate(lambda x: x.pow(2).sum(-1, keepdim=True).T, lambda d: d.mean.sum())
    with pytest.raises(
        GradNoiseError, match=r"ControlVariate h: expected a tensor of shape \(8,\)"
    ):
        ScoreFunction(control_variate=cv)(square, normal(), 8)


def test_relaxation_temperature_and_distribution():
    with pytest.raises(GradNoiseError, match="GumbelSoftmax temperature: expected a positive"):
        GumbelSoftmax(0.0)
    with pytest.raises(GradNoiseError, match="relaxation: expected a Categorical.*got Normal"):
        GumbelSoftmax(0.5)(square, normal(), 8)


@pytest.mark.parametrize("make", [SPSA, ForwardGradient])
def test_smoothing_distribution(make):
    rate = torch.ones(2, requires_grad=True)
    with pytest.raises(GradNoiseError, match=r"expected Normal\(theta, sigma\).*got Gamma"):
        make()(square, Gamma(rate, rate), 8)
    with pytest.raises(GradNoiseError, match="got Normal whose loc does not require grad"):
        make()(square, Normal(torch.zeros(2), torch.ones(2)), 8)


def test_mezo_needs_trainable_params_and_positive_eps():
    frozen = torch.zeros(3)
    with pytest.raises(GradNoiseError, match="MeZO params: expected at least one tensor"):
        MeZO()(lambda: frozen.sum(), [frozen], 8)
    param = torch.zeros(3, requires_grad=True)
    with pytest.raises(GradNoiseError, match="MeZO eps: expected a positive perturbation scale"):
        projected_gradient(lambda: param.sum(), [param], 0, 0.0)
    assert torch.equal(param, torch.zeros(3))


def test_sparse_density():
    with pytest.raises(
        GradNoiseError, match=r"Sparse-MeZO density: expected a fraction in \(0, 1\]"
    ):
        magnitude_masks([torch.ones(3)], 0.0)


def test_compare_needs_repeats():
    with pytest.raises(
        GradNoiseError, match="compare: expected at least one estimator and repeats"
    ):
        compare({"sf": ScoreFunction()}, square, normal(), 8, repeats=1)
