"""GSNR without the 1/B floor: zero-signal and closed-form cases (issue 11).

Budget: 400 seeded batches of d = 64 Gaussian coordinates per batch size. The mean of the 400
per-batch readings must be within 3 standard errors (the readings' own spread / sqrt(400)) of
the truth, plus the ratio's second-order bias, which is bounded in closed form below.
"""

import math

import pytest
import torch

from gradnoise import GradMoments, layer_gsnr
from gradnoise.monitor.summary import late_gsnr

REPEATS, DIM = 400, 64


def _readings(batch: int, mu: float, sigma: float, *, seed: int, unbiased: bool = True):
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(REPEATS):
        grads = mu + sigma * torch.randn(batch, DIM, generator=generator, dtype=torch.float64)
        record = GradMoments.from_per_example(grads)
        if unbiased:
            values.append(layer_gsnr(record))
        else:  # the plug-in ratio |g_bar|^2 / tr(Sigma_hat) that the old reading used
            values.append(float(grads.mean(0).pow(2).sum() / grads.var(0).sum()))
    return torch.tensor(values, dtype=torch.float64)


def _ratio_bias_bound(batch: int, truth: float) -> float:
    """Second-order bias of q/t for Gaussian gradients: Var(t)/E[t]^2 (1/n + r), with
    Var(t)/E[t]^2 = 2 / (d (n - 1)) for a chi-square trace estimate (delta method)."""
    return 2.0 / (DIM * (batch - 1)) * (1.0 / batch + truth)


@pytest.mark.parametrize("batch", [16, 32, 64])
def test_zero_signal_reads_zero_not_one_over_b(batch):
    values = _readings(batch, 0.0, 1.0, seed=batch)
    standard_error = float(values.std() / math.sqrt(REPEATS))
    bias = _ratio_bias_bound(batch, 0.0)
    assert abs(float(values.mean())) <= 3 * standard_error + bias
    plug_in = _readings(batch, 0.0, 1.0, seed=batch, unbiased=False)
    assert float(plug_in.mean()) == pytest.approx(1 / batch, rel=0.05)  # the old floor


@pytest.mark.parametrize("batch", [2, 16, 32, 64])
@pytest.mark.parametrize(("mu", "sigma"), [(0.5, 1.0), (0.1, 2.0)])
def test_gsnr_matches_mu_squared_over_sigma_squared(batch, mu, sigma):
    truth = mu**2 / sigma**2
    values = _readings(batch, mu, sigma, seed=7 * batch)
    standard_error = float(values.std() / math.sqrt(REPEATS))
    tolerance = 3 * standard_error + _ratio_bias_bound(batch, truth)
    assert abs(float(values.mean()) - truth) <= tolerance


def test_the_reports_band_covers_the_truth_and_reaches_zero_without_signal():
    generator = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(40):
        signal = 0.3 + torch.randn(16, DIM, generator=generator, dtype=torch.float64)
        noise = torch.randn(16, DIM, generator=generator, dtype=torch.float64)
        record = {"layer_trace": {}, "layer_grad_sq": {}}
        for name, grads in (("signal", signal), ("noise", noise)):
            moments = GradMoments.from_per_example(grads)
            trace = float(grads.var(0).sum())
            record["layer_trace"][name] = trace
            record["layer_grad_sq"][name] = layer_gsnr(moments) * trace
        steps.append(record)
    summary = late_gsnr(steps)
    assert summary["signal"].low <= 0.09 <= summary["signal"].high
    assert summary["noise"].low == 0.0 and summary["noise"].high > 0
