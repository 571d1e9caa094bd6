"""Moments and the quantities computed from them, against closed forms and direct formulas."""

import math

import pytest
import torch

from gradnoise import (
    GradMoments,
    GradNoiseError,
    GradStats,
    elementwise_variance,
    gradient_noise_scale,
    gsnr,
    layer_gsnr,
    merge_all,
    noise_scale_per_layer,
    norm_test,
    total_moments,
    trace_covariance,
    two_batch_estimates,
)
from gradnoise.stats import quantities
from gradnoise.testing import LinearGaussian


def _random_moments(n=6, shape=(3, 2), seed=0):
    grads = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)).double()
    return grads, GradMoments.from_per_example(grads)


def test_elementwise_variance_and_trace_match_torch_var():
    grads, moments = _random_moments()
    torch.testing.assert_close(elementwise_variance(moments), grads.var(0))
    torch.testing.assert_close(trace_covariance(moments), grads.var(0).sum())


def test_gsnr_takes_the_noise_out_of_the_squared_mean():
    grads, moments = _random_moments()
    variance = grads.var(0)
    want = (grads.mean(0).pow(2) - variance / len(grads)) / variance
    torch.testing.assert_close(gsnr(moments), want)
    torch.testing.assert_close(gsnr(moments, unbiased=False), grads.mean(0).pow(2) / variance)
    signal = grads.mean(0).pow(2).sum() - variance.sum() / len(grads)
    assert layer_gsnr(moments) == pytest.approx(float(signal / variance.sum()))


def test_merge_of_parts_equals_the_whole():
    grads, whole = _random_moments(n=9)
    parts = [GradMoments.from_per_example(part) for part in grads.split([2, 3, 4])]
    merged = merge_all(parts)
    assert merged.n == 9
    for field in ("grad_sum", "sq_norm_sum", "elem_sq_sum"):
        torch.testing.assert_close(getattr(merged, field), getattr(whole, field))


def test_merge_without_elementwise_drops_it():
    _, full = _random_moments()
    partial = GradMoments(full.n, full.grad_sum, full.sq_norm_sum)
    assert full.merge(partial).elem_sq_sum is None


def test_gradstats_micro_batches_merge_to_the_big_batch():
    problem = LinearGaussian(dim=4)
    model = problem.model()
    x, y = problem.sample(12, generator=torch.Generator().manual_seed(0))
    records = []
    for xs, ys in [(x[:5], y[:5]), (x[5:], y[5:]), (x, y)]:
        with GradStats(model, elementwise=True) as stats:
            problem.loss(model, xs, ys).backward()
        records.append(stats.moments()["weight"])
    merged = records[0].merge(records[1])
    for field in ("grad_sum", "sq_norm_sum", "elem_sq_sum"):
        torch.testing.assert_close(getattr(merged, field), getattr(records[2], field))


def test_two_batch_estimates_with_single_examples_equal_the_per_example_estimator():
    grads, moments = _random_moments(n=8)
    small = grads.flatten(1).pow(2).sum(1).mean()
    big = grads.mean(0).pow(2).sum()
    grad_sq, trace = two_batch_estimates(small, 1, big, 8)
    estimate = gradient_noise_scale(moments)
    assert float(trace) == pytest.approx(estimate.trace_sigma)
    assert float(grad_sq) == pytest.approx(estimate.grad_sq_norm)


def test_noise_scale_estimators_are_unbiased_on_linear_gaussian_regression():
    """E[tr Sigma_hat] = tr Sigma and E[|G|^2_hat] = |G|^2 on the closed-form problem.

    Budget: 400 seeded batches of 32; the mean of each estimate must be within 4 standard errors
    (the empirical std over batches / sqrt(400)) of the closed form.
    """
    problem = LinearGaussian(dim=6, sigma=1.5, delta_norm=1.0)
    model, generator = problem.model(), torch.Generator().manual_seed(0)
    traces, grad_sqs = [], []
    for _ in range(400):
        x, y = problem.sample(32, generator=generator)
        with GradStats(model) as stats:
            problem.loss(model, x, y).backward()
        estimate = stats.noise_scale()
        traces.append(estimate.trace_sigma)
        grad_sqs.append(estimate.grad_sq_norm)
    for values, truth in [(traces, problem.true_trace_sigma), (grad_sqs, problem.delta_norm**2)]:
        values = torch.tensor(values, dtype=torch.float64)
        standard_error = float(values.std()) / math.sqrt(len(values))
        assert abs(float(values.mean()) - truth) < 4 * standard_error


def test_noise_scale_shortcut_equals_the_moments_formula():
    problem = LinearGaussian(dim=5)
    model = problem.model()
    x, y = problem.sample(16, generator=torch.Generator().manual_seed(3))
    with GradStats(model) as stats:
        problem.loss(model, x, y).backward()
    fast, slow = stats.noise_scale(), gradient_noise_scale(stats.moments())
    assert fast.b_simple == pytest.approx(slow.b_simple, rel=1e-10)
    per_layer = noise_scale_per_layer(stats.moments())
    assert per_layer["weight"].b_simple == pytest.approx(slow.b_simple, rel=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum", "weighted"])
def test_layer_estimates_shortcut_equals_the_moments_formula(reduction):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    x, y = torch.randn(10, 4).double(), torch.randn(10, 3).double()
    weights = torch.rand(10).double() + 0.5
    with GradStats(model, loss_reduction=reduction) as stats:
        losses = (model(x) - y).pow(2).sum(1)
        if reduction == "weighted":
            stats.set_example_weights(weights)
            loss = (weights * losses).sum()
        else:
            loss = losses.mean() if reduction == "mean" else losses.sum()
        loss.backward()
    names, traces, sqs = stats.layer_estimates()
    want_names, want_traces, want_sqs = quantities.layer_estimates(stats.moments())
    assert names == want_names
    torch.testing.assert_close(traces, want_traces, rtol=1e-12, atol=0)
    torch.testing.assert_close(sqs, want_sqs, rtol=1e-10, atol=1e-14)


def test_layer_estimates_of_one_example_are_refused():
    model = torch.nn.Linear(3, 2)
    with GradStats(model) as stats:
        model(torch.randn(1, 3)).sum().backward()
    with pytest.raises(GradNoiseError, match=r"GradStats.layer_estimates: expected a batch of at"):
        stats.layer_estimates()


def test_undefined_noise_scale_is_nan_not_clipped():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]).double()
    estimate = gradient_noise_scale(GradMoments.from_per_example(grads))
    assert estimate.grad_sq_norm < 0
    assert math.isnan(estimate.b_simple) and not estimate.defined


def test_whole_model_totals_add_over_parameters():
    ga, a = _random_moments(shape=(3,), seed=1)
    gb, b = _random_moments(shape=(2, 2), seed=2)
    total = total_moments({"a": a, "b": b})
    joint = GradMoments.from_per_example(torch.cat([ga, gb.flatten(1)], dim=1))
    for field in ("grad_sum", "sq_norm_sum", "elem_sq_sum"):
        torch.testing.assert_close(getattr(total, field), getattr(joint, field))
    assert gradient_noise_scale({"a": a, "b": b}).b_simple == pytest.approx(
        gradient_noise_scale(joint).b_simple
    )


def test_norm_test_statistic_and_suggested_batch():
    grads, moments = _random_moments(n=10)
    result = norm_test(moments, theta=0.5)
    mean_sq = float(grads.mean(0).pow(2).sum())
    trace = float(grads.var(0).sum())
    assert result.statistic == pytest.approx(trace / 10 / mean_sq)
    assert result.suggested_batch_size == pytest.approx(trace / (0.25 * mean_sq))
    assert result.passed == (result.statistic <= 0.25)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m1, m: elementwise_variance(m1), "at least 2 examples.*got n=1"),
        (lambda m1, m: trace_covariance(m1), "at least 2 examples"),
        (lambda m1, m: gradient_noise_scale(m1), "at least 2 examples"),
        (
            lambda m1, m: elementwise_variance(GradMoments(m.n, m.grad_sum, m.sq_norm_sum)),
            "elem_sq_sum=None.*elementwise=True",
        ),
        (lambda m1, m: two_batch_estimates(1.0, 4, 1.0, 4), "0 < b_small < b_big"),
        (lambda m1, m: norm_test(m, theta=0), "theta.*positive"),
        (lambda m1, m: total_moments({}), "got an empty mapping"),
        (lambda m1, m: gradient_noise_scale({}), "got an empty mapping"),
        (lambda m1, m: total_moments({"a": m, "b": m1}), r"n values \[1, 6\]"),
        (lambda m1, m: merge_all([]), "at least one GradMoments"),
        (lambda m1, m: m.merge(m1.__class__(1, torch.zeros(4), torch.zeros(()))), "same parameter"),
        (lambda m1, m: GradMoments(0, m.grad_sum, m.sq_norm_sum), "positive int.*got 0"),
        (
            lambda m1, m: GradMoments(2, m.grad_sum, m.sq_norm_sum, torch.zeros(7)),
            r"elem_sq_sum: expected the shape of grad_sum \(3, 2\), got \(7,\)",
        ),
    ],
)
def test_errors(call, match):
    _, moments = _random_moments()
    _, single = _random_moments(n=1)
    with pytest.raises(GradNoiseError, match=match):
        call(single, moments)
