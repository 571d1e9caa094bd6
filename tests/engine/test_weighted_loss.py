"""Losses that are not a plain batch mean: a declared weighted loss sum_i w_i l_i.

The padded causal-LM loss (token mean over the batch) weighs sequence i by n_i / N; declared with
``token_mean_weights(labels)``, per-example gradients are those of each sequence's own token mean.
"""

import math

import pytest
import torch

from gradnoise import GradNoiseError, GradStats, token_mean_weights
from gradnoise.testing import LinearGaussian
from gradnoise.testing.reference import per_example_grads

hf_models = pytest.importorskip("gradnoise.testing.hf_models")
pytest.importorskip("transformers")

SIZE = {"d": 16, "layers": 1, "heads": 2, "vocab": 40}


def _padded(arch):
    return hf_models.make_padded_lm(
        4, 10, generator=torch.Generator().manual_seed(0), arch=arch, **SIZE
    )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_declared_token_mean_gives_each_sequences_own_gradient(arch):
    model, (ids, labels), loss_fn = _padded(arch)
    own_mean = per_example_grads(model, loss_fn, (ids, labels))  # a batch of one: its token mean
    with GradStats(model, loss_reduction="weighted") as stats:
        stats.set_example_weights(token_mean_weights(labels))
        loss_fn(model, ids, labels).backward()
    got = stats.per_example_sq_norms()
    for name, grads in own_mean.items():
        want = grads.flatten(1).pow(2).sum(1)
        error = float((got[name] - want).norm() / want.norm().clamp_min(1e-30))
        assert error < 1e-5 or float(want.norm()) < 1e-9 * float(got[name].norm() + 1), name


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_undeclared_padding_is_refused_with_the_declaration_to_use(reduction):
    model, (ids, labels), loss_fn = _padded("gpt2")
    with GradStats(model, loss_reduction=reduction) as stats:
        loss_fn(model, ids, labels).backward()
    with pytest.raises(GradNoiseError, match=r"share n_i / N.*token_mean_weights\(labels\)"):
        stats.per_example_sq_norms()


def test_equal_lengths_with_the_shifted_last_position_ignored_are_a_plain_mean():
    """A causal LM ignores one (shifted-out) position per sequence: equal shares, no refusal."""
    model, batch, loss_fn = hf_models.make_gpt2(
        3, generator=torch.Generator().manual_seed(0), seq=6, **SIZE
    )
    with GradStats(model) as stats:
        loss_fn(model, *batch).backward()
    assert stats.total_sq_norms().shape == (3,)


def test_class_weighted_mean_is_refused_unless_declared():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y, class_weights = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), torch.rand(3) + 0.5
    with (
        pytest.raises(GradNoiseError, match=r"class-weighted mean.*set_example_weights"),
        GradStats(model),
    ):
        torch.nn.functional.cross_entropy(model(x), y, weight=class_weights).backward()
    model.zero_grad(set_to_none=True)
    with GradStats(model, loss_reduction="weighted") as stats:
        shares = class_weights[y] / class_weights[y].sum()
        stats.set_example_weights(shares.double())
        torch.nn.functional.cross_entropy(model(x), y, weight=class_weights).backward()
    plain = [
        torch.autograd.grad(
            torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), model.weight
        )[0]
        for i in range(6)
    ]
    want = torch.stack([g.pow(2).sum() for g in plain])
    torch.testing.assert_close(
        stats.per_example_sq_norms()["weight"], want.double(), rtol=1e-5, atol=0
    )


def test_uniform_weights_give_the_mean_results_exactly():
    problem = LinearGaussian(dim=4)
    model = problem.model()
    x, y = problem.sample(8, generator=torch.Generator().manual_seed(1))
    out = {}
    for reduction in ("mean", "weighted"):
        with GradStats(model, loss_reduction=reduction) as stats:
            if reduction == "weighted":
                stats.set_example_weights(torch.full((8,), 1 / 8, dtype=torch.float64))
            problem.loss(model, x, y).backward()
        out[reduction] = (stats.noise_scale(), stats.moments()["weight"])
        model.zero_grad(set_to_none=True)
    (a, ma), (b, mb) = out["mean"], out["weighted"]
    assert mb.n == pytest.approx(8)
    assert b.b_simple == pytest.approx(a.b_simple, rel=1e-12)
    torch.testing.assert_close(mb.grad_sum, ma.grad_sum)


def test_weighted_estimators_are_unbiased_on_linear_gaussian_regression():
    """E[tr Sigma_hat] and E[|G|^2_hat] under random weights independent of the examples.

    Budget: 400 seeded batches of 16 with weights ~ Uniform(0.2, 2), loss sum_i w_i l_i; each
    mean within 4 standard errors of the closed form.
    """
    problem = LinearGaussian(dim=6, sigma=1.5, delta_norm=1.0)
    model, generator = problem.model(), torch.Generator().manual_seed(0)
    traces, grad_sqs = [], []
    for _ in range(400):
        x, y = problem.sample(16, generator=generator)
        w = torch.rand(16, generator=generator, dtype=torch.float64) * 1.8 + 0.2
        with GradStats(model, loss_reduction="weighted") as stats:
            stats.set_example_weights(w)
            per_example = 0.5 * (model(x) - y).pow(2).squeeze(1)
            (w * per_example).sum().backward()
        estimate = stats.noise_scale()
        traces.append(estimate.trace_sigma)
        grad_sqs.append(estimate.grad_sq_norm)
        model.zero_grad(set_to_none=True)
    for values, truth in [(traces, problem.true_trace_sigma), (grad_sqs, problem.delta_norm**2)]:
        values = torch.tensor(values, dtype=torch.float64)
        standard_error = float(values.std()) / math.sqrt(len(values))
        assert abs(float(values.mean()) - truth) < 4 * standard_error


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([0.5, 0.5], "1-d floating tensor.*got \\[0.5, 0.5\\]"),
        (torch.tensor([0.5, 0.0, 0.5]), "weight <= 0 or not finite"),
        (torch.ones(2, 2), "shape \\(2, 2\\)"),
        (torch.tensor([1, 2]), "torch.int64"),
    ],
)
def test_bad_weights_are_refused(weights, match):
    model = LinearGaussian(dim=2).model()
    with (
        GradStats(model, loss_reduction="weighted") as stats,
        pytest.raises(GradNoiseError, match=match),
    ):
        stats.set_example_weights(weights)


def test_weights_outside_the_weighted_mode_or_the_block_or_missing():
    problem = LinearGaussian(dim=2)
    model = problem.model()
    x, y = problem.sample(4, generator=torch.Generator().manual_seed(0))
    with (
        GradStats(model) as stats,
        pytest.raises(GradNoiseError, match="loss_reduction='weighted'"),
    ):
        stats.set_example_weights(torch.ones(4, dtype=torch.float64))
    stats = GradStats(model, loss_reduction="weighted")
    with pytest.raises(GradNoiseError, match="outside any open block"):
        stats.set_example_weights(torch.ones(4, dtype=torch.float64))
    with stats:
        problem.loss(model, x, y).backward()
    with pytest.raises(
        GradNoiseError, match=r"weights of shape \(4,\) declared in this block.*got none"
    ):
        stats.per_example_sq_norms()
    with stats:
        stats.set_example_weights(torch.ones(3, dtype=torch.float64))
        problem.loss(model, x, y).backward()
    with pytest.raises(GradNoiseError, match=r"got shape \(3,\)"):
        stats.noise_scale()


def test_token_mean_weights_count_shifted_labels():
    labels = torch.tensor([[5, 6, 7, 8], [5, 6, -100, -100]])
    torch.testing.assert_close(
        token_mean_weights(labels), torch.tensor([0.75, 0.25], dtype=torch.float64)
    )
    unshifted = token_mean_weights(labels, shift=False)
    torch.testing.assert_close(unshifted, torch.tensor([4 / 6, 2 / 6], dtype=torch.float64))
