"""Plausible inputs that used to broadcast silently or fail with a raw Python / autograd error.

Each is now either handled or refused with a GradNoiseError (expected / got / fix), raised before
any state (baselines, estimator arguments, parameters) changes.
"""

import pytest
import torch
from torch.distributions import Independent, Normal, OneHotCategorical

from gradnoise.errors import GradNoiseError
from gradnoise.estimators import (
    SPSA,
    Constant,
    ForwardGradient,
    GumbelSoftmax,
    LeaveOneOut,
    MeZO,
    MovingAverage,
    Pathwise,
    ScoreFunction,
    StraightThrough,
    compare,
)


def gaussian(dim=3):
    mu = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    return mu, (lambda: Independent(Normal(mu, torch.ones_like(mu)), 1))


def square(x):
    return x.pow(2).sum(-1)


def seed(n=0):
    return torch.Generator().manual_seed(n)


@pytest.mark.parametrize(
    "f, dtype",
    [
        (lambda x: (x > 0).double().sum(-1), "float64"),
        (lambda x: x.detach().pow(2).sum(-1), "float64"),
        (lambda x: (x > 0).sum(-1), "int64"),
    ],
    ids=["step", "detached", "integer"],
)
def test_pathwise_refuses_a_non_differentiable_f(f, dtype):
    _, dist = gaussian()
    with pytest.raises(
        GradNoiseError,
        match=rf"Pathwise f: expected values differentiable in the samples.*got a torch\.{dtype} "
        r"tensor with no gradient path.*or use ScoreFunction",
    ):
        Pathwise()(f, dist, 8, generator=seed())


def test_forward_gradient_refuses_a_non_differentiable_f():
    # jvp used to return a zero slope for such an f: a silent all-zero gradient estimate.
    _, dist = gaussian()
    with pytest.raises(
        GradNoiseError, match=r"ForwardGradient f: expected values differentiable.*use SPSA"
    ):
        ForwardGradient()(lambda x: (x > 0).double().sum(-1), dist, 8, generator=seed())
    est = ForwardGradient()(square, dist, 8, generator=seed())  # a differentiable f still runs
    assert est.grads[0].shape == (3,)


@pytest.mark.parametrize("make", [GumbelSoftmax, StraightThrough])
def test_relaxations_refuse_a_non_differentiable_f(make):
    logits = torch.zeros(4, requires_grad=True)
    with pytest.raises(
        GradNoiseError,
        match=rf"{make.__name__} f: expected values differentiable in the relaxed sample",
    ):
        make()(lambda y: y.argmax(-1).float(), OneHotCategorical(logits=logits), 8)


class PerSample:
    """A custom baseline that returns a per-sample (K,) vector, not (K, 1)."""

    def __call__(self, values, scores):
        return [values.mean().expand_as(values).clone() for _ in scores]


def test_per_sample_baseline_without_its_parameter_axes_is_refused():
    # With K == D = 3 a (K,) baseline broadcasts along the coordinates: b[j] multiplies
    # coordinate j instead of sample j, silently.
    _, dist = gaussian(3)
    with pytest.raises(
        GradNoiseError,
        match=r"ScoreFunction baseline for parameter 0: expected a number or a tensor of shape "
        r"\(\), \(3, 1\) or \(3, 3\), got shape \(3,\)\. .*b\.reshape\(3, 1\)",
    ):
        ScoreFunction(PerSample())(square, dist, 3, generator=seed())


@pytest.mark.parametrize(
    "out, got",
    [(lambda s: [], "got a list of 0"), (lambda s: None, "got NoneType")],
    ids=["too few", "none"],
)
def test_baseline_returning_the_wrong_number_of_baselines(out, got):
    _, dist = gaussian()

    def baseline(values, scores):
        return out(scores)

    with pytest.raises(
        GradNoiseError, match=rf"ScoreFunction baseline: expected a list with one baseline.*{got}"
    ):
        ScoreFunction(baseline)(square, dist, 8, generator=seed())


@pytest.mark.parametrize(
    "b", [0.5, torch.tensor(0.5), torch.full((8, 1), 0.5, dtype=torch.float64)], ids=str
)
def test_numbers_and_full_rank_baselines_are_accepted(b):
    _, dist = gaussian()
    fixed = ScoreFunction(Constant(0.5))(square, dist, 8, generator=seed())
    custom = ScoreFunction(lambda values, scores: [b])(square, dist, 8, generator=seed())
    torch.testing.assert_close(custom.grads, fixed.grads)


@pytest.mark.parametrize("value", ["a", torch.tensor([1.0, 2.0]), float("nan"), None], ids=repr)
def test_constant_baseline_needs_a_finite_number(value):
    with pytest.raises(GradNoiseError, match="Constant baseline: expected a finite number"):
        Constant(value)


def test_moving_average_decay_must_be_a_number():
    with pytest.raises(GradNoiseError, match=r"MovingAverage decay: expected a float in \[0, 1\)"):
        MovingAverage("0.9")


@pytest.mark.parametrize(
    "kwargs, got",
    [({"repeats": 3.0}, "repeats=3.0"), ({"warmup": 0.5}, "warmup=0.5"), ({"warmup": -1}, "-1")],
)
def test_compare_repeats_and_warmup_are_ints(kwargs, got):
    _, dist = gaussian()
    with pytest.raises(GradNoiseError, match=rf"compare: expected .*both ints.*got .*{got}"):
        compare({"sf": ScoreFunction()}, square, dist, 8, **kwargs)


@pytest.mark.parametrize(
    "true_grad, got",
    [([torch.tensor(0.0)], r"\[\(\)\]"), ([torch.zeros(2)], r"\[\(2,\)\]"), ([], r"\[\]")],
    ids=["scalar", "short", "missing"],
)
def test_compare_true_grad_must_match_the_parameters(true_grad, got):
    # A scalar true_grad used to be broadcast against every coordinate: a silently wrong bias.
    _, dist = gaussian()
    baseline = MovingAverage()
    with pytest.raises(
        GradNoiseError,
        match=rf"compare true_grad: expected one tensor per parameter, shaped like the "
        rf"distribution's parameters: \[\(3,\)\], got {got}",
    ):
        compare({"ma": ScoreFunction(baseline)}, square, dist, 8, repeats=3, true_grad=true_grad)
    assert baseline.value is None  # refused before any estimator ran


def test_compare_true_grad_checked_against_each_estimators_gradients():
    # SPSA differentiates the loc only: a true_grad for (loc, scale) fits the distribution but
    # not SPSA's estimate, which used to fail with a raw size-mismatch RuntimeError.
    mu = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    sigma = torch.ones(3, dtype=torch.float64, requires_grad=True)
    dist = Independent(Normal(mu, sigma), 1)
    true = [2 * mu.detach(), 2 * sigma.detach()]
    rows = compare({"sf": ScoreFunction()}, square, dist, 8, repeats=3, true_grad=true)
    assert rows[0].bias is not None
    with pytest.raises(
        GradNoiseError,
        match=r"compare true_grad: expected one tensor per parameter, shaped like 'spsa'\'s "
        r"gradients: \[\(3,\)\], got \[\(3,\), \(3,\)\]",
    ):
        compare({"spsa": SPSA()}, square, dist, 8, repeats=3, true_grad=true)


def test_compare_takes_a_lone_tensor_as_the_one_parameters_gradient():
    _, dist = gaussian()
    lone = compare({"sf": ScoreFunction()}, square, dist, 8, repeats=3, true_grad=torch.zeros(3),
                   generator=seed())  # fmt: skip
    listed = compare({"sf": ScoreFunction()}, square, dist, 8, repeats=3,
                     true_grad=[torch.zeros(3)], generator=seed())  # fmt: skip
    assert lone[0].bias == listed[0].bias


def test_mezo_refuses_a_lone_tensor():
    theta = torch.ones(3, requires_grad=True)
    with pytest.raises(
        GradNoiseError,
        match=r"MeZO params: expected an iterable of tensors .*got a single Tensor.*\[theta\]",
    ):
        MeZO()(lambda: theta.pow(2).sum(), theta, 4, generator=seed())
    assert torch.equal(theta, torch.ones(3))
    with pytest.raises(GradNoiseError, match="MeZO params: .*got an iterable holding non-tensors"):
        MeZO()(lambda: theta.pow(2).sum(), [theta, 1.0], 4, generator=seed())
    model = torch.nn.Linear(2, 1)  # the module itself instead of model.parameters()
    with pytest.raises(GradNoiseError, match="MeZO params: .*got a single Linear"):
        MeZO()(lambda: model.weight.sum(), model, 4, generator=seed())


def test_rloo_still_runs_through_the_baseline_check():
    _, dist = gaussian()
    est = ScoreFunction(LeaveOneOut())(square, dist, 16, generator=seed())
    assert est.grads[0].shape == (3,) and est.total_variance > 0
