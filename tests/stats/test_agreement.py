"""Agreement diagnostics and Bollapragada et al.'s tests against explicit per-example gradients."""

import pytest
import torch
from torch import nn

from gradnoise.errors import GradNoiseError
from gradnoise.stats.agreement import (
    agreement,
    agreement_from_norms,
    directional_derivatives,
    inner_product_test,
    orthogonality_test,
)
from gradnoise.stats.twobatch import TwoBatchNorms
from gradnoise.testing.reference import per_example_grads


def test_agreement_of_known_vectors():
    result = agreement(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]))
    # pairs: (1,2) cos 0, (1,3) cos -1, (2,3) cos 0
    assert result.mean_cosine == pytest.approx(-1 / 3)
    assert result.min_cosine == pytest.approx(-1.0)
    assert result.conflict_fraction == pytest.approx(1 / 3)
    assert agreement(torch.eye(3), threshold=0.5).conflict_fraction == pytest.approx(1.0)
    torch.testing.assert_close(result.cosine.diagonal(), torch.ones(3))


def test_agreement_from_norms_is_the_mean_pairwise_inner_product():
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(4, 10, generator=gen, dtype=torch.float64) + 0.5  # K = 4 micro-batches
    record = TwoBatchNorms(
        {"w": grads.pow(2).sum(1).mean()}, 8, {"w": grads.mean(0).pow(2).sum()}, 32
    )
    gram = grads @ grads.T
    pairwise = (gram.sum() - gram.diagonal().sum()) / (4 * 3)
    assert agreement_from_norms(record) == pytest.approx(float(pairwise / gram.diagonal().mean()))


def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    return model, torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)


def test_directional_derivatives_match_per_example_gradients():
    model, x, y = model_and_batch()
    per_example = per_example_grads(model, lambda m, a, b: (m(a) - b).pow(2).mean(), (x, y))
    gen = torch.Generator().manual_seed(1)
    direction = {
        n: torch.randn(p.shape, generator=gen).double() for n, p in model.named_parameters()
    }
    dots = directional_derivatives(model, lambda call: (call(x) - y).pow(2).squeeze(1), direction)
    want = sum((per_example[n] * direction[n]).flatten(1).sum(1) for n in direction)
    torch.testing.assert_close(dots, want)


def test_sampling_tests_equal_their_definitions_on_explicit_gradients():
    model, x, y = model_and_batch()
    per_example = per_example_grads(model, lambda m, a, b: (m(a) - b).pow(2).mean(), (x, y))
    flat = torch.cat([g.flatten(1) for g in per_example.values()], dim=1)  # (n, P)
    mean = flat.mean(0)
    g2, n = float(mean.pow(2).sum()), len(flat)
    dots, sq_norms = flat @ mean, flat.pow(2).sum(1)
    inner = inner_product_test(sq_norms, dots, g2, theta=0.5)
    assert inner.statistic == pytest.approx(float(((dots - g2) ** 2).sum()) / (n - 1) / n / g2**2)
    assert inner.passed == (inner.statistic <= 0.25)
    assert inner.suggested_batch_size == pytest.approx(inner.statistic * n / 0.25)
    orthogonal = flat - (dots / g2).unsqueeze(1) * mean
    ortho = orthogonality_test(sq_norms, dots, g2)
    want = float(orthogonal.pow(2).sum()) / (n - 1) / n / g2
    assert ortho.statistic == pytest.approx(want)
    assert ortho.suggested_batch_size == pytest.approx(want * n / 5.67**2)


def test_errors():
    with pytest.raises(GradNoiseError, match=r"agreement: expected at least 2 gradients"):
        agreement(torch.ones(1, 3))
    with pytest.raises(GradNoiseError, match=r"got shapes \(3,\) and \(4,\)"):
        inner_product_test(torch.ones(3), torch.ones(4), 1.0)
    with pytest.raises(GradNoiseError, match=r"expected per-example sq_norms and dots"):
        orthogonality_test(torch.ones(1), torch.ones(1), 1.0)
