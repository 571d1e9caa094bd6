"""Hill tail index and affine noise-variance fit against closed forms (tolerances: see the
docstring of gradnoise.stats.instruments: 90% coverage over 200 seeds in [0.84, 0.96], about
+-2.8 binomial sd; point estimates within 4 of their standard errors)."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from gradnoise.errors import GradNoiseError
from gradnoise.stats import (
    AffineVarianceFit,
    TailIndex,
    affine_variance_fit,
    gradient_noise_scale,
    hill_tail_index,
)
from gradnoise.stats.averaging import student_quantile
from gradnoise.stats.instruments import _gamma_quantile
from gradnoise.testing.problems import LinearGaussian

from .conftest import per_example_grads, step_moments

SEEDS = 200


def pareto(n: int, alpha: float, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Pareto(alpha) samples above ``scale``: P(X > x) = (x / scale)^-alpha."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    return scale * (1.0 - u).pow(-1.0 / alpha)


def test_quantiles_match_tables():
    # Student t (two-sided 90% / 95% table values) and Gamma(k, 1) quantiles
    for nu, ref in [(1, 6.313752), (2, 2.919986), (3, 2.353363), (10, 1.812461), (30, 1.697261)]:
        assert student_quantile(0.95, nu) == pytest.approx(ref, abs=2e-6)
    assert student_quantile(0.975, 4) == pytest.approx(2.776445, abs=2e-6)
    assert student_quantile(0.95, 5000) == pytest.approx(NormalDist().inv_cdf(0.95), abs=1e-3)
    assert _gamma_quantile(1, 0.05) == pytest.approx(-math.log(0.95), rel=1e-9)  # Exp(1)
    assert _gamma_quantile(10, 0.95) == pytest.approx(15.70522, abs=1e-4)  # chi2_20(0.95) / 2


@pytest.mark.parametrize("alpha", [1.5, 3.0])
def test_hill_interval_covers_pareto_alpha(alpha):
    covered = 0
    for seed in range(SEEDS):
        est = hill_tail_index(pareto(500, alpha, seed), tail_fraction=0.1, confidence=0.9)
        assert (est.k, est.n) == (50, 500)
        assert est.low < est.alpha < est.high
        covered += est.low <= alpha <= est.high
    assert 0.84 <= covered / SEEDS <= 0.96


@pytest.mark.parametrize("alpha", [1.5, 3.0])
def test_hill_point_estimate_and_asymptotic_width(alpha):
    est = hill_tail_index(pareto(100_000, alpha, 7, scale=3.0), tail_fraction=0.1)
    assert isinstance(est, TailIndex)
    k = est.k
    assert k == 10_000
    # alpha_hat / alpha ~ k / Gamma(k, 1): relative sd about 1 / sqrt(k)
    assert abs(est.alpha / alpha - 1.0) < 4.0 / math.sqrt(k)
    # for large k the exact interval tends to alpha_hat * (1 +- z / sqrt(k))
    z = NormalDist().inv_cdf(0.95)
    assert est.low == pytest.approx(est.alpha * (1 - z / math.sqrt(k)), rel=2e-3)
    assert est.high == pytest.approx(est.alpha * (1 + z / math.sqrt(k)), rel=2e-3)
    assert est.heavy == (alpha == 1.5)


def test_hill_only_sees_the_tail():
    # a Pareto(2.5) tail above 10 spliced onto a uniform bulk in (0, 1): a 10% tail sees only it
    gen = torch.Generator().manual_seed(3)
    bulk = torch.rand(9_000, generator=gen, dtype=torch.float64) + 1e-3
    samples = torch.cat([bulk, pareto(1_000, 2.5, 4, scale=10.0)])
    est = hill_tail_index(samples, tail_fraction=0.099)
    assert est.low <= 2.5 <= est.high


def test_hill_errors():
    good = pareto(100, 2.0, 0)
    with pytest.raises(GradNoiseError, match=r"tail_fraction: expected a float in \(0, 1\)"):
        hill_tail_index(good, tail_fraction=1.0)
    with pytest.raises(GradNoiseError, match=r"tail_fraction: expected a float in \(0, 1\)"):
        hill_tail_index(good, tail_fraction=0.0)
    with pytest.raises(GradNoiseError, match=r"confidence: expected a number in \(0, 1\)"):
        hill_tail_index(good, confidence=1.5)
    with pytest.raises(GradNoiseError, match=r"expected positive samples.*1 value\(s\) <= 0"):
        hill_tail_index(torch.cat([good, torch.zeros(1)]))
    with pytest.raises(GradNoiseError, match=r"expected finite values, got 1 NaN or inf"):
        hill_tail_index(torch.cat([good, torch.tensor([math.inf])]))
    with pytest.raises(GradNoiseError, match=r"expected a 1-D sequence.*shape \(10, 10\)"):
        hill_tail_index(good.reshape(10, 10))
    with pytest.raises(GradNoiseError, match=r"at least k=2 order statistics.*n=10.*k=1"):
        hill_tail_index(good[:10], tail_fraction=0.1)
    with pytest.raises(GradNoiseError, match=r"expected distinct values in the tail"):
        hill_tail_index(torch.cat([torch.ones(50), torch.full((10,), 5.0)]), tail_fraction=0.1)
    # k is capped at n - 1
    assert hill_tail_index([1.0, 2.0, 4.0], tail_fraction=0.99).k == 2


def affine_data(seed, sigma0_sq=2.0, sigma1_sq=0.5, noise=0.3, steps=40, curvature=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = 0.5 + 9.5 * torch.rand(steps, generator=gen, dtype=torch.float64)
    eps = noise * torch.randn(steps, generator=gen, dtype=torch.float64)
    return sigma0_sq + sigma1_sq * x + curvature * x * x + eps, x


@pytest.mark.parametrize("robust", [True, False])
def test_affine_intervals_cover_known_sigmas(robust):
    cover0 = cover1 = holds = 0
    for seed in range(SEEDS):
        fit = affine_variance_fit(*affine_data(seed), confidence=0.9, robust=robust)
        cover0 += fit.sigma0_sq_low <= 2.0 <= fit.sigma0_sq_high
        cover1 += fit.sigma1_sq_low <= 0.5 <= fit.sigma1_sq_high
        holds += fit.holds
    for count in (cover0, cover1, holds):  # holds fails only by a 10%-level curvature test
        assert 0.84 <= count / SEEDS <= 0.96


def linear_gaussian_steps(rep: int, steps: int = 30, batch: int = 512):
    """Per-step unbiased (tr Sigma, |G|^2) with |delta| varying across steps, as over training."""
    problem = LinearGaussian(dim=4, sigma=1.0)
    traces, grads = [], []
    for step, norm in enumerate(torch.linspace(0.5, 2.5, steps, dtype=torch.float64)):
        delta = torch.full((4,), float(norm) / 2.0, dtype=torch.float64)
        grads_ = per_example_grads(problem, 1, batch, seed=1000 * rep + step, delta=delta)
        est = gradient_noise_scale(step_moments(grads_)[0])
        traces.append(est.trace_sigma)
        grads.append(est.grad_sq_norm)
    return traces, grads


def test_affine_recovers_linear_gaussian_closed_form():
    # g = x (x^T delta - eps): tr(Sigma) = (d + 1) |delta|^2 + d s^2, so sigma0^2 = d s^2 = 4 and
    # sigma1^2 = d + 1 = 5 exactly.
    fit = affine_variance_fit(*linear_gaussian_steps(0), confidence=0.9)
    assert isinstance(fit, AffineVarianceFit)
    t = student_quantile(0.95, fit.steps - 2)
    se0 = (fit.sigma0_sq_high - fit.sigma0_sq) / t
    se1 = (fit.sigma1_sq_high - fit.sigma1_sq) / t
    assert abs(fit.sigma0_sq - 4.0) < 4 * se0
    assert abs(fit.sigma1_sq - 5.0) < 4 * se1
    assert fit.r_squared > 0.9
    # holds measured 0.84 over 100 repetitions; over 40, sd ~0.06: 0.65 is ~3 sd below
    holds = sum(affine_variance_fit(*linear_gaussian_steps(rep)).holds for rep in range(40))
    assert holds / 40 >= 0.65


def test_affine_flags_quadratic_and_negative_coefficients():
    quad = affine_variance_fit(*affine_data(0, sigma0_sq=1.0, sigma1_sq=0.0, curvature=0.5))
    assert not quad.holds
    assert "curved in |G|^2" in quad.reason
    assert quad.curvature_low <= 0.5 <= quad.curvature_high
    neg0 = affine_variance_fit(*affine_data(1, sigma0_sq=-5.0, sigma1_sq=2.0))
    assert not neg0.holds and "intercept sigma0^2 significantly negative" in neg0.reason
    neg1 = affine_variance_fit(*affine_data(2, sigma0_sq=10.0, sigma1_sq=-0.5))
    assert not neg1.holds and "slope sigma1^2 significantly negative" in neg1.reason
    flat = affine_variance_fit(*affine_data(3, sigma1_sq=0.0))  # constant noise is affine
    assert flat.holds and flat.reason.startswith("affine model consistent")
    assert flat.r_squared < 0.5


def test_affine_errors():
    y, x = affine_data(0, steps=6)
    with pytest.raises(GradNoiseError, match=r"same length.*lengths 6 and 5"):
        affine_variance_fit(y, x[:5])
    with pytest.raises(GradNoiseError, match=r"at least 5 steps.*got 4 step\(s\)"):
        affine_variance_fit(y[:4], x[:4])
    with pytest.raises(GradNoiseError, match=r"at least 3 distinct grad_sq.*got 2 distinct"):
        affine_variance_fit(y, torch.tensor([1.0, 2.0] * 3))
    with pytest.raises(GradNoiseError, match=r"trace_sigma: expected finite values"):
        affine_variance_fit(torch.cat([y[:5], torch.tensor([math.nan])]), x)
    with pytest.raises(GradNoiseError, match=r"grad_sq: expected a 1-D sequence"):
        affine_variance_fit(y, x.reshape(2, 3))
    with pytest.raises(GradNoiseError, match=r"affine_variance_fit confidence: expected"):
        affine_variance_fit(y, x, confidence=0.0)
