"""SecondMomentProbe on a synthetic gradient distribution with known mu and sigma.

Per-example gradients g_i ~ N(mu, diag(sigma^2)) over d = 2000 coordinates, batches of B = 8,
Adam with lr = 0 (the distribution stays fixed). Then E[sum_j v_hat_j] = |mu|^2 + sum sigma^2 / B
once the EMA has forgotten its start, so ``tracking`` -> 1 and ``noise_share`` -> its closed form
(sum sigma^2 / B) / (|mu|^2 + sum sigma^2 / B). With d = 2000 each probe's estimates are
concentrated (relative sd of tr(Sigma) ~ sqrt(2 / (d (B - 1))) ~ 0.01), so the means over the
last 200 probes are checked within 4 of their own standard errors (probes are correlated through
v_hat, so for ``tracking`` the error is taken from batch means of 20 probes) plus 1% for the
EMA's finite memory.
"""

import math
import statistics

import pytest
import torch

from gradnoise.errors import GradNoiseError
from gradnoise.stats.moments import GradMoments
from gradnoise.stats.second_moment import SecondMomentProbe

D, B = 2000, 8


def _run(steps, beta2=0.99, scale_after=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mu = torch.randn(D, generator=generator, dtype=torch.float64) * 0.5
    sigma = torch.rand(D, generator=generator, dtype=torch.float64) + 0.5
    param = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64))
    optimizer = torch.optim.Adam([param], lr=0.0, betas=(0.9, beta2))
    probe = SecondMomentProbe(optimizer, {"w": param})
    readings = []
    for t in range(steps):
        scale = 3.0 if scale_after is not None and t >= scale_after else 1.0
        g = scale * (mu + sigma * torch.randn(B, D, generator=generator, dtype=torch.float64))
        param.grad = g.mean(0)
        optimizer.step()
        readings.append(probe.update({"w": GradMoments.from_per_example(g)})["w"])
    noise = float((sigma**2).sum()) / B
    return readings, noise / (float((mu**2).sum()) + noise)


def _mean_and_se(values, block=20):
    blocks = [statistics.fmean(values[i : i + block]) for i in range(0, len(values), block)]
    return statistics.fmean(values), statistics.stdev(blocks) / math.sqrt(len(blocks))


def test_tracking_and_noise_share_match_the_closed_form():
    readings, want_share = _run(1200)
    late = readings[-200:]
    share, share_se = _mean_and_se([r.noise_share for r in late])
    tracking, tracking_se = _mean_and_se([r.tracking for r in late])
    assert abs(share - want_share) < 4 * share_se + 0.01 * want_share
    assert abs(tracking - 1.0) < 4 * tracking_se + 0.01
    # the pooled ratio from the parts each reading carries, the same closed form
    target = sum(r.signal + r.noise for r in late)
    assert abs(sum(r.noise for r in late) / target - want_share) < 4 * share_se + 0.01 * want_share
    assert abs(target / sum(r.v_hat_sum for r in late) - 1.0) < 4 * tracking_se + 0.01


def test_settles_after_the_burn_in_and_unsettles_when_the_scale_jumps():
    """beta2 = 0.99: at rest v_hat moves ~1% per step; a 9x jump of E[g^2] moves it by
    (1 - beta2) * 8 = 8% per step, above the 5% tolerance, until it has caught up."""
    readings, _ = _run(1500, scale_after=1000)
    assert not any(r.settled for r in readings[:5])  # too few changes, and large ones
    assert all(r.settled for r in readings[900:1000])
    assert not any(r.settled for r in readings[1003:1010])
    assert readings[1002].tracking > 2  # v_hat lags the new second moment
    assert all(r.settled for r in readings[1400:])
    assert readings[0].adam_step == 1 and math.isnan(readings[0].change)


def _adam():
    param = torch.nn.Parameter(torch.zeros(3))
    return param, torch.optim.Adam([param])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 1}, "SecondMomentProbe window: expected an int >= 2"),
        ({"tolerance": 0}, "SecondMomentProbe tolerance: expected a number > 0"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    param, optimizer = _adam()
    with pytest.raises(GradNoiseError, match=message):
        SecondMomentProbe(optimizer, {"w": param}, **kwargs)


def test_an_optimizer_without_second_moments_is_refused():
    param = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(GradNoiseError, match="expected parameters of an Adam-family optimizer"):
        SecondMomentProbe(torch.optim.SGD([param], lr=0.1), {"w": param})
    _, other = _adam()
    with pytest.raises(GradNoiseError, match="expected parameters of an Adam-family optimizer"):
        SecondMomentProbe(other, {"w": param})


def test_update_before_the_first_step_is_refused():
    param, optimizer = _adam()
    probe = SecondMomentProbe(optimizer, {"w": param})
    moments = GradMoments.from_per_example(torch.randn(4, 3))
    with pytest.raises(GradNoiseError, match=r"expected an optimizer state with 'exp_avg_sq'"):
        probe.update({"w": moments})
