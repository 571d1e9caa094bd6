"""TimestepSampler: unbiased reweighting, and lower gradient variance than uniform buckets.

The gradient checks use a finite population (64 points, noises and in-bucket offsets, K = 10
buckets), so the objective (1/K) sum_k L_k and its gradient are exact: the mean loss over all
640 (example, bucket) pairs. Seeded minibatches (examples uniform, buckets from the sampler,
weights 1/(K p_k)) are compared with it along 4 fixed random directions within 4 standard
errors; the variance comparison uses the same draws, with the standard error of each variance
estimate from the sample variance of the squared deviations.
"""

import functools
import math
import re

import pytest
import torch

from gradnoise import GradStats
from gradnoise.errors import GradNoiseError
from gradnoise.sampled import TimestepSampler, bucket_sampling_variance, bucket_second_moments
from gradnoise.workloads.diffusion import DDPM, Denoiser, mixture, timesteps_in_buckets

K, N, B, DRAWS = 10, 64, 16, 300
DDPM_ = DDPM()


def test_weights_make_every_bucket_function_unbiased_exactly():
    sampler = TimestepSampler(4, mix=0.3, smoothing=0.0)
    sampler.update(torch.arange(4), torch.tensor([9.0, 1.0, 0.25, 0.01]))
    probs = sampler.probs
    assert math.isclose(float(probs.sum()), 1.0) and float(probs.min()) >= 0.3 / 4
    values = torch.tensor([3.0, -1.0, 2.0, 7.0], dtype=torch.float64)
    assert torch.allclose((probs / (4 * probs) * values).sum(), values.mean())  # E_p[w f]
    buckets, weights = sampler.sample(20_000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(weights.double(), 1 / (4 * probs[buckets]), rtol=1e-6)
    draws = weights.double() * values[buckets]
    assert abs(float(draws.mean() - values.mean())) <= 4 * float(draws.std()) / 20_000**0.5
    # sqrt(m_k) proposal: E||w g||^2 = (mean sqrt m)^2 at mix 0, smaller than uniform's mean m
    m = torch.tensor([9.0, 1.0, 0.25, 0.01], dtype=torch.float64)
    optimal = m.sqrt() / m.sqrt().sum()
    assert torch.allclose(bucket_sampling_variance(m, optimal), m.sqrt().mean() ** 2)
    assert float(bucket_sampling_variance(m, torch.full((4,), 0.25))) == pytest.approx(m.mean())


@functools.cache
def _setup():
    torch.manual_seed(0)
    model = Denoiser()
    generator = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(300):  # a little training makes the buckets' gradient scales differ
        x0 = mixture(128, generator=generator)
        t = torch.randint(0, DDPM_.steps, (128,), generator=generator)
        opt.zero_grad()
        DDPM_.losses(model, x0, t, torch.randn(128, 2, generator=generator)).mean().backward()
        opt.step()
    x0, noise = mixture(N, generator=generator), torch.randn(N, 2, generator=generator)
    offsets = torch.randint(0, DDPM_.steps // K, (N,), generator=generator)
    return model, x0, noise, offsets


def _losses(model, examples, buckets):
    _, x0, noise, offsets = _setup()
    t = buckets * (DDPM_.steps // K) + offsets[examples]
    return DDPM_.losses(model, x0[examples], t, noise[examples])


def _flat_grad(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


@functools.cache
def _population():
    """The exact gradient, and the sampler fitted to the population's bucket second moments."""
    model = _setup()[0]
    examples = torch.arange(N).repeat(K)
    buckets = torch.arange(K).repeat_interleave(N)
    exact = _flat_grad(model, _losses(model, examples, buckets).mean())
    model.zero_grad()
    with GradStats(model) as stats:
        _losses(model, examples, buckets).mean().backward()
    sampler = TimestepSampler(K, mix=0.1, smoothing=0.0)
    sampler.update(buckets, stats.total_sq_norms())
    return exact, sampler


@functools.cache
def _draws(importance: bool) -> torch.Tensor:
    model = _setup()[0]
    _, fitted = _population()
    sampler = fitted if importance else TimestepSampler(K)
    generator = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(DRAWS):
        examples = torch.randint(0, N, (B,), generator=generator)
        buckets, weights = sampler.sample(B, generator=generator)
        grads.append(_flat_grad(model, (weights * _losses(model, examples, buckets)).mean()))
    return torch.stack(grads)


@pytest.mark.parametrize("importance", [False, True])
def test_reweighted_gradient_is_unbiased_within_4_standard_errors(importance):
    exact, _ = _population()
    directions = torch.randn(4, exact.numel(), generator=torch.Generator().manual_seed(2))
    projected = _draws(importance).double() @ directions.T.double()
    se = projected.std(0) / DRAWS**0.5
    error = (projected.mean(0) - directions.double() @ exact).abs()
    assert bool((error <= 4 * se).all()), error / se


def _trace_variance(draws: torch.Tensor) -> tuple[float, float]:
    deviations = (draws - draws.mean(0)).pow(2).sum(1)
    return float(deviations.sum() / (len(draws) - 1)), float(deviations.std() / len(draws) ** 0.5)


def test_importance_buckets_have_lower_measured_variance_at_equal_batch():
    _, sampler = _population()
    assert float(sampler.probs.max() / sampler.probs.min()) > 3  # the proposal is not uniform
    uniform, se_u = _trace_variance(_draws(False))
    importance, se_i = _trace_variance(_draws(True))
    assert uniform - importance > 4 * math.hypot(se_u, se_i), (uniform, importance)


def test_bucket_second_moments_from_gradstats_match_a_loop():
    model = _setup()[0]
    examples, buckets = torch.arange(6), torch.tensor([0, 0, 3, 3, 3, 9])
    model.zero_grad()
    with GradStats(model) as stats:
        _losses(model, examples, buckets).mean().backward()
    loop = torch.stack(
        [
            _flat_grad(model, _losses(model, examples[i : i + 1], buckets[i : i + 1]).sum())
            .pow(2)
            .sum()
            for i in range(6)
        ]
    )
    sums, counts = bucket_second_moments(stats.total_sq_norms(), buckets, K)
    assert counts.tolist() == [2, 0, 0, 3, 0, 0, 0, 0, 0, 1]
    expected = torch.zeros(K, dtype=torch.float64).index_add_(0, buckets, loop)
    assert torch.allclose(sums, expected, rtol=1e-4)


def test_update_divides_out_weights_smooths_and_keeps_unseen_buckets():
    sampler = TimestepSampler(3, smoothing=0.5)
    sampler.update(torch.tensor([0, 1]), torch.tensor([4.0, 8.0]), weights=torch.tensor([2.0, 2.0]))
    assert sampler.second_moments[:2].tolist() == [1.0, 2.0]
    assert torch.allclose(sampler.probs, torch.full((3,), 1 / 3, dtype=torch.float64))  # unseen
    sampler.update(torch.tensor([0, 2]), torch.tensor([3.0, 1.0]))
    assert sampler.second_moments.tolist() == [2.0, 2.0, 1.0]
    state = sampler.state_dict()
    copy = TimestepSampler(3)
    copy.load_state_dict(state)
    assert torch.equal(copy.probs, sampler.probs)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TimestepSampler(0), "TimestepSampler(num_buckets=...): expected a positive int"),
        (lambda: TimestepSampler(4, mix=0), "expected a number in (0, 1] (the uniform share)"),
        (lambda: TimestepSampler(4, smoothing=1.0), "expected a number in [0, 1), got 1.0"),
        (lambda: TimestepSampler(4).sample(0), "expected a positive int, got 0"),
        (
            lambda: TimestepSampler(4).update(torch.tensor([0, 1]), torch.ones(3)),
            "expected buckets and sq_norms of the same shape (B,)",
        ),
        (
            lambda: TimestepSampler(4).update(torch.tensor([0, 4]), torch.ones(2)),
            "expected bucket ids in [0, 4), got ids from 0 to 4",
        ),
        (
            lambda: timesteps_in_buckets(
                torch.zeros(2, dtype=torch.long), 7, 1000, generator=torch.Generator()
            ),
            "expected steps a multiple of num_buckets",
        ),
    ],
)
def test_bad_input_is_refused(build, message):
    with pytest.raises(GradNoiseError, match=re.escape(message)):
        build()


def test_a_refused_update_leaves_the_estimates_unchanged():
    sampler = TimestepSampler(2, smoothing=0.0)
    sampler.update(torch.tensor([0, 1]), torch.tensor([1.0, 4.0]))
    with pytest.raises(GradNoiseError):
        sampler.update(torch.tensor([0, 2]), torch.tensor([9.0, 9.0]))
    assert sampler.second_moments.tolist() == [1.0, 4.0]


def test_timesteps_stay_inside_their_buckets():
    buckets = torch.arange(20).repeat(50)
    t = timesteps_in_buckets(buckets, 20, 1000, generator=torch.Generator().manual_seed(0))
    assert bool(((t // 50) == buckets).all()) and int(t.max()) < 1000
