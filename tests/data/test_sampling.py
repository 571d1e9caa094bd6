"""ImportanceSampler and the two variance functions on a fixed population with known answers.

The population: N = 40 vectors g_i in R^6 whose norms span ~30x (heterogeneous examples). Every
expectation over the sampler's draws is known exactly: E[g_hat] = mean g_i, tr Var[g_hat] =
(sum ||g_i||^2 / (N^2 p_i) - ||g_bar||^2) / B. Seeded draws (R = 4000 batches of B = 8) are
compared with these within 4 standard errors estimated from the same draws.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from gradnoise import GradStats
from gradnoise.data import ImportanceSampler, exact_sampling_variance, importance_sampling_variance
from gradnoise.errors import GradNoiseError

N, D, B, R = 40, 6, 8, 4000


def _population():
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1, 0.5, N, dtype=torch.float64)
    grads = scales[:, None] * torch.randn(N, D, generator=gen, dtype=torch.float64)
    return grads + 0.05  # a non-zero mean gradient


def _sampler(grads, mix=0.2, seed=1):
    sampler = ImportanceSampler(N, B, mix=mix, num_batches=R, seed=seed)
    sampler.update(torch.arange(N), grads.norm(dim=1))
    return sampler


def _draws(sampler, grads):
    """R reweighted batch means and their per-batch variance readings."""
    means, readings = [], []
    for indices in sampler:
        weights = sampler.weights(indices)
        per_example = grads[indices] * weights[:, None]
        mean = per_example.mean(0)
        means.append(mean)
        sq_norms = grads[indices].pow(2).sum(1)
        readings.append(importance_sampling_variance(sq_norms, weights, float(mean.pow(2).sum())))
    return torch.stack(means), readings


def _within(values: torch.Tensor, want: float, sigmas: float = 4.0) -> bool:
    se = float(values.std()) / math.sqrt(values.numel())
    return abs(float(values.mean()) - want) < sigmas * se


def test_the_reweighted_mean_is_unbiased_and_its_variance_matches_the_formula():
    grads = _population()
    sampler = _sampler(grads)
    probabilities = sampler.probabilities()
    means, _ = _draws(sampler, grads)
    g_bar = grads.mean(0)
    se = means.std(0) / math.sqrt(R)
    assert bool(((means.mean(0) - g_bar).abs() < 4 * se).all())
    exact = exact_sampling_variance(
        grads.pow(2).sum(1), probabilities, float(g_bar.pow(2).sum()), B
    )
    deviations = (means - g_bar).pow(2).sum(1)  # E = tr Var exactly (g_bar known)
    assert _within(deviations, exact.importance)
    assert exact.reduction > 1.5  # the population is heterogeneous: importance helps


def test_the_one_batch_estimates_of_both_variances_are_unbiased():
    grads = _population()
    sampler = _sampler(grads)
    exact = exact_sampling_variance(
        grads.pow(2).sum(1), sampler.probabilities(), float(grads.mean(0).pow(2).sum()), B
    )
    _, readings = _draws(sampler, grads)
    assert _within(torch.tensor([r.importance for r in readings]), exact.importance)
    assert _within(torch.tensor([r.uniform for r in readings]), exact.uniform)


def test_uniform_scores_give_the_uniform_variance_and_unit_weights():
    grads = _population()
    sampler = ImportanceSampler(N, B, mix=0.2, num_batches=3)
    sampler.update(torch.arange(N), torch.ones(N))
    torch.testing.assert_close(
        sampler.probabilities(), torch.full((N,), 1 / N, dtype=torch.float64)
    )
    exact = exact_sampling_variance(
        grads.pow(2).sum(1), sampler.probabilities(), float(grads.mean(0).pow(2).sum()), B
    )
    assert exact.importance == pytest.approx(exact.uniform, rel=1e-12)
    indices = next(iter(sampler))
    torch.testing.assert_close(sampler.weights(indices), torch.ones(B, dtype=torch.float64))


def test_norm_proportional_proposal_reaches_the_cauchy_schwarz_optimum():
    """p_i = ||g_i|| / sum ||g_j||: sum ||g_i||^2 / (N^2 p_i) = (mean ||g_i||)^2."""
    grads = _population()
    norms = grads.norm(dim=1)
    sampler = ImportanceSampler(N, B, mix=1e-12)
    sampler.update(torch.arange(N), norms)
    g_sq = float(grads.mean(0).pow(2).sum())
    exact = exact_sampling_variance(norms**2, sampler.probabilities(), g_sq, B)
    assert exact.importance * B + g_sq == pytest.approx(float(norms.mean()) ** 2, rel=1e-9)
    assert exact.uniform * B + g_sq == pytest.approx(float((norms**2).mean()), rel=1e-12)


def test_mixing_bounds_the_cost_of_wrong_scores():
    """Scores that are exactly backwards: the second moment stays <= 1/mix times uniform's."""
    grads = _population()
    norms = grads.norm(dim=1)
    for mix in (0.1, 0.5):
        sampler = ImportanceSampler(N, B, mix=mix)
        sampler.update(torch.arange(N), 1.0 / norms)
        p = sampler.probabilities()
        second = float((norms**2 / (N * N * p)).sum())
        assert second <= float((norms**2).mean()) / mix + 1e-12
        assert float((1 / (N * p)).max()) <= 1 / mix + 1e-9


def test_unscored_examples_count_with_the_mean_score_and_smoothing_averages_visits():
    sampler = ImportanceSampler(4, 2, mix=0.5, smoothing=0.5)
    sampler.update([0, 1], torch.tensor([1.0, 3.0]))
    p = sampler.probabilities()
    want = 0.5 * torch.tensor([1.0, 3.0, 2.0, 2.0], dtype=torch.float64) / 8 + 0.5 / 4
    torch.testing.assert_close(p, want)
    sampler.update([0], torch.tensor([5.0]))
    assert float(sampler.scores[0]) == pytest.approx(3.0)  # 0.5 * 1 + 0.5 * 5
    sampler.refresh(torch.tensor([4.0, 0.0, 2.0, 2.0]))  # replaces, no smoothing
    torch.testing.assert_close(
        sampler.probabilities(),
        0.5 * torch.tensor([0.5, 0, 0.25, 0.25], dtype=torch.float64) + 0.125,
    )


def test_weights_follow_the_batches_through_a_prefetching_dataloader():
    grads = _population()
    sampler = _sampler(grads)
    sampler.num_batches = 20
    dataset = TensorDataset(torch.arange(N))
    loader = DataLoader(dataset, batch_sampler=sampler)
    probabilities = sampler.probabilities()
    for (indices,) in loader:
        weights = sampler.weights(indices)
        torch.testing.assert_close(weights, 1 / (N * probabilities[indices]))
    assert not sampler._pending


def test_state_dict_resumes_the_same_draws():
    grads = _population()
    sampler = _sampler(grads)
    state = sampler.state_dict()
    first = sampler.draw()
    other = ImportanceSampler(N, B, mix=0.2)
    other.load_state_dict(state)
    again = other.draw()
    assert first[0] == again[0]
    torch.testing.assert_close(first[1], again[1])


def test_weighted_gradstats_gives_the_norms_the_variance_reading_needs():
    """Train with (w * losses).mean(); declare weights w / B to GradStats(loss_reduction=
    'weighted'): the per-example norms are those of the unweighted losses (vs a loop)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(N, 5), torch.randint(0, 3, (N,))
    sampler = ImportanceSampler(N, B, mix=0.3)
    sampler.update(torch.arange(N), torch.rand(N, generator=torch.Generator().manual_seed(2)))
    indices, weights = sampler.draw()
    weights = weights.float()
    with GradStats(model, loss_reduction="weighted") as stats:
        stats.set_example_weights(weights / B)
        losses = F.cross_entropy(model(x[indices]), y[indices], reduction="none")
        (weights * losses).mean().backward()
    want = []
    for i in indices:
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        want.append(sum(float(g.pow(2).sum()) for g in grads))
    torch.testing.assert_close(stats.total_sq_norms(), torch.tensor(want), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ImportanceSampler(0, 4), "pass len(dataset)"),
        (lambda: ImportanceSampler(10, 0), "ImportanceSampler(batch_size=...)"),
        (lambda: ImportanceSampler(10, 4, mix=0), "infinite weight"),
        (lambda: ImportanceSampler(10, 4, smoothing=1), "ImportanceSampler(smoothing=...)"),
        (lambda: ImportanceSampler(3, 4), "ImportanceSampler(num_batches=...)"),
        (lambda: ImportanceSampler(10, 2).update([0, 1], torch.ones(3)), "one score per index"),
        (lambda: ImportanceSampler(10, 2).update([0, 10], torch.ones(2)), "indices in [0, 10)"),
        (lambda: ImportanceSampler(10, 2).update([0], torch.tensor([-1.0])), "finite scores"),
        (lambda: ImportanceSampler(10, 2).weights([3, 4]), "pending batches"),
        (lambda: ImportanceSampler(10, 2).refresh(torch.ones(9)), "one score per example (10)"),
        (lambda: ImportanceSampler(3, 2).refresh(torch.tensor([1, 2, -3.0])), "scores >= 0"),
        (lambda: importance_sampling_variance([1.0], [1.0], 0.0), "at least 2 finite"),
        (lambda: importance_sampling_variance([1.0, 2], [1.0, 1, 1], 0.0), "same length"),
        (lambda: exact_sampling_variance([1.0, 2], [0.2, 0.2], 0.0, 4), "summing to 1"),
    ],
)
def test_bad_input_is_refused_with_a_fix(make, message):
    with pytest.raises(GradNoiseError, match="(?i)" + re.escape(message)):
        make()
